"""Tests of interleaved_1f1b, zb_h1 and zb_v: literal tables for small cases, rules over many sizes, errors."""

import pytest

from lightning_pipe.engine.schedules.rules import activation_peaks, check_schedule, format_grid
from lightning_pipe.engine.schedules import SCHEDULES, Action, Op, get_schedule, one_f_one_b
from lightning_pipe.engine.schedules.zoo import interleaved_1f1b, zb_h1, zb_v


def compute_strings(schedule):
    return [" ".join(str(a) for a in schedule.compute_actions(rank)) for rank in range(schedule.num_ranks)]


# Worked out by hand from Megatron-LM's rules (forward_backward_pipelining_with_interleaving): rank r runs
# (p - r - 1) * 2 + (v - 1) * p warm-up forwards; its k-th forward is chunk (k % (p*v)) // p on micro-batch
# (k // (p*v)) * p + k % p, its k-th backward the same with the chunks reversed. p=2, v=2: rank 0 holds
# stages 0 and 2, rank 1 stages 1 and 3; rank 0 warms up with 4 forwards, rank 1 with 2.
INTERLEAVED_P2_M4_V2 = [
    "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3",
    "1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3",
]

INTERLEAVED_P2_M4_V2_GRID = """\
step | rank 0 rank 1
--------------------
   0 | 0F0    .
   1 | 0F1    1F0
   2 | 2F0    1F1
   3 | 2F1    3F0
   4 | 0F2    3B0
   5 | 2B0    3F1
   6 | 0F3    3B1
   7 | 2B1    1F2
   8 | 2F2    1B0
   9 | 0B0    1F3
  10 | 2F3    1B1
  11 | 0B1    3F2
  12 | .      3B2
  13 | 2B2    3F3
  14 | .      3B3
  15 | 2B3    1B2
  16 | 0B2    1B3
  17 | 0B3    ."""

# ZB-H1 (Qi et al. 2023, Fig. 3 and Sec. 3.1): in round x stage s runs F[x], I[x-(p-1-s)], W[x-(p-1)].
# p=3: the last stage alternates F and I and starts its W two micro-batches late; the first stage runs
# 1F1B's order (F, I, W) with nothing held back; W fills the cool-down on every rank.
ZB_H1_P3_M4 = [
    "0F0 0F1 0F2 0I0 0W0 0F3 0I1 0W1 0I2 0W2 0I3 0W3",
    "1F0 1F1 1I0 1F2 1I1 1W0 1F3 1I2 1W1 1I3 1W2 1W3",
    "2F0 2I0 2F1 2I1 2F2 2I2 2W0 2F3 2I3 2W1 2W2 2W3",
]

ZB_H1_P3_M4_GRID = """\
step | rank 0 rank 1 rank 2
---------------------------
   0 | 0F0    .      .
   1 | 0F1    1F0    .
   2 | 0F2    1F1    2F0
   3 | .      .      2I0
   4 | .      1I0    2F1
   5 | 0I0    1F2    2I1
   6 | 0W0    1I1    2F2
   7 | 0F3    1W0    2I2
   8 | 0I1    1F3    2W0
   9 | 0W1    1I2    2F3
  10 | 0I2    1W1    2I3
  11 | 0W2    1I3    2W1
  12 | 0I3    1W2    2W2
  13 | 0W3    1W3    2W3"""

# ZB-V, p=2: rank 0 holds stages 0 and 3 (the loss), rank 1 stages 1 and 2. Rank 0 warms up with
# 2p - 1 = 3 forwards of stage 0, then runs stage 3's first two micro-batches through F, I, W; rank 1 runs
# 1F0, then 2F0 1F1 (both stages), then 2F1 2I0 2W0. Cool-down: I first, deferred W last.
ZB_V_P2_M4 = [
    "0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3",
    "1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3",
]


def test_interleaved_literal_table():
    schedule = interleaved_1f1b(2, 4, virtual_stages=2)
    assert compute_strings(schedule) == INTERLEAVED_P2_M4_V2
    assert format_grid(schedule) == INTERLEAVED_P2_M4_V2_GRID
    assert schedule.num_stages == 4 and schedule.num_ranks == 2
    assert schedule.stage_to_rank == (0, 1, 0, 1)
    assert schedule.stages_of(0) == [0, 2]


def test_interleaved_communication_between_chunks():
    # Stage 1 (rank 1) feeds stage 2 (rank 0): the wrap-around from the last rank back to the first.
    rank0 = [str(a) for a in interleaved_1f1b(2, 4, virtual_stages=2).actions[0]]
    assert rank0[rank0.index("2F0") - 1] == "2RECV_F0"
    assert rank0[rank0.index("2B0") + 1] == "2SEND_B0"
    assert "0RECV_F0" not in rank0  # stage 0 reads the batch, receives nothing


def test_zb_h1_literal_table():
    schedule = zb_h1(3, 4)
    assert compute_strings(schedule) == ZB_H1_P3_M4
    assert format_grid(schedule) == ZB_H1_P3_M4_GRID


def test_zb_h1_sends_gradient_after_input_backward():
    rank1 = [str(a) for a in zb_h1(3, 4).actions[1]]
    assert rank1[rank1.index("1I0") - 1] == "1RECV_B0"
    assert rank1[rank1.index("1I0") + 1] == "1SEND_B0"
    assert rank1[rank1.index("1W0") + 1] != "1SEND_B0"


@pytest.mark.parametrize("num_stages", range(1, 9))
def test_interleaved_rules_over_sizes(num_stages):
    for virtual_stages in (2, 3):
        for num_microbatches in range(num_stages, 33, num_stages):
            schedule = interleaved_1f1b(num_stages, num_microbatches, virtual_stages)
            check_schedule(schedule)
            assert schedule.num_stages == num_stages * virtual_stages


@pytest.mark.parametrize("num_stages", range(1, 9))
def test_zb_h1_rules_over_sizes(num_stages):
    for num_microbatches in range(1, 33):
        check_schedule(zb_h1(num_stages, num_microbatches))


@pytest.mark.parametrize("num_stages", range(1, 9))
def test_zb_h1_memory_within_1f1b_peak(num_stages):
    # The paper's claim: the pipeline's peak (first rank's) is 1F1B's. Every rank holds up to min(p, m)
    # micro-batches, so ranks after the first hold more than under 1F1B (p instead of p - s): said plainly here.
    for num_microbatches in range(1, 33):
        zb = activation_peaks(zb_h1(num_stages, num_microbatches))
        ofob = activation_peaks(one_f_one_b(num_stages, num_microbatches))
        assert max(zb) == max(ofob) == min(num_stages, num_microbatches)
        assert zb == [min(num_stages, num_microbatches)] * num_stages


def test_zb_v_literal_table():
    schedule = zb_v(2, 4)
    assert compute_strings(schedule) == ZB_V_P2_M4
    assert schedule.stage_to_rank == (0, 1, 1, 0)
    rank1 = [str(a) for a in schedule.actions[1]]
    assert "2RECV_F0" not in rank1 and "1SEND_F0" not in rank1  # stages 1 and 2 share rank 1: in memory


@pytest.mark.parametrize("num_stages", range(1, 9))
def test_zb_v_rules_and_memory_over_sizes(num_stages):
    p = num_stages
    for num_microbatches in range(1, 33):
        schedule = zb_v(p, num_microbatches)
        check_schedule(schedule)
        peaks = activation_peaks(schedule)  # in half-size stages: 2p of them is 1F1B's first-rank memory
        assert max(peaks) <= 2 * p
        if num_microbatches >= 2 * p - 1:
            assert peaks == [2 * p] * p


def test_zb_h1_splits_every_backward():
    schedule = zb_h1(4, 6)
    ops = {a.op for rank in range(4) for a in schedule.compute_actions(rank)}
    assert ops == {Op.FORWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT}


def test_registered_and_options_passed():
    assert SCHEDULES["interleaved_1f1b"].build is interleaved_1f1b
    assert SCHEDULES["zb_h1"].build is zb_h1
    assert SCHEDULES["zb_v"].build is zb_v
    schedule = get_schedule("interleaved_1f1b", 4, 8, virtual_stages=3)
    assert schedule.num_stages == 12 and schedule.num_ranks == 4
    assert get_schedule("interleaved_1f1b", 4, 8).num_stages == 8  # two stages per rank by default
    assert get_schedule("zb_h1", 4, 8).actions == zb_h1(4, 8).actions


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4, 6, 2), r"num_microbatches \(6\) must be a multiple of the number of ranks \(4\) for interleaved_1f1b; "
                    r"use 8 or schedule='1f1b'"),
        ((4, 3, 2), r"use 4 or schedule='1f1b'"),
        ((4, 0, 2), r"num_microbatches \(0\) must be a multiple"),
        ((4, 8, 1), r"virtual_stages \(1\) must be >= 2; for one stage per rank use schedule='1f1b'"),
        ((0, 8, 2), r"num_stages \(0\) is the number of ranks and must be >= 1"),
    ],
)
def test_interleaved_errors(args, message):
    with pytest.raises(ValueError, match=message):
        interleaved_1f1b(*args)


@pytest.mark.parametrize("build", [zb_h1, zb_v])
def test_zero_bubble_errors(build):
    with pytest.raises(ValueError, match=r"num_microbatches \(0\) must be >= 1"):
        build(4, 0)
    with pytest.raises(ValueError, match=r"num_stages \(0\) .*must be >= 1"):
        build(0, 4)


def test_unknown_option_says_what_the_schedule_takes():
    with pytest.raises(ValueError, match=r"schedule '1f1b' takes no option virtual_stages"):
        get_schedule("1f1b", 4, 8, virtual_stages=2)
    with pytest.raises(ValueError, match=r"takes: virtual_stages"):
        get_schedule("interleaved_1f1b", 4, 8, chunks=2)


def test_action_strings_parse_back():
    for action in zb_h1(3, 4).actions[1]:
        assert Action.parse(str(action)) == action
