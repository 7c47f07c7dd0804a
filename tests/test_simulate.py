"""Tests of the planner's simulator: with equal stages it reproduces the closed forms of each schedule."""

import math

import pytest

from lightning_pipe.engine.schedules import get_schedule, gpipe, one_f_one_b
from lightning_pipe.engine.schedules.zoo import interleaved_1f1b, zb_h1, zb_v
from lightning_pipe.planner import Link, StageCost, predict

EQUAL = StageCost(forward=1.0, backward_input=1.0, backward_weight=1.0)  # B = 2
UNEVEN = StageCost(forward=2.0, backward_input=1.5, backward_weight=2.5)  # B = 4


@pytest.mark.parametrize("build", [gpipe, one_f_one_b])
@pytest.mark.parametrize("cost", [EQUAL, UNEVEN])
@pytest.mark.parametrize(("p", "m"), [(1, 4), (2, 1), (2, 8), (4, 4), (4, 8), (4, 16), (8, 3), (8, 32)])
def test_fill_drain_bubble(build, cost, p, m):
    prediction = predict(build(p, m), cost)
    # Every rank idles (p - 1)(F + B) of a makespan of (m + p - 1)(F + B).
    assert prediction.makespan == pytest.approx((m + p - 1) * (cost.forward + cost.backward))
    for idle in prediction.idle_fraction:
        assert idle == pytest.approx((p - 1) / (m + p - 1))
    assert prediction.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


def test_fill_drain_numbers():
    # p = 4, m = 8: 3 / 11 of the step is bubble.
    assert predict(one_f_one_b(4, 8)).bubble_fraction == pytest.approx(3 / 11)
    assert predict(one_f_one_b(4, 8)).makespan == 33


@pytest.mark.parametrize("cost", [EQUAL, UNEVEN])
@pytest.mark.parametrize(("p", "v"), [(2, 2), (2, 3), (4, 2), (4, 3), (8, 2)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_interleaved_bubble(cost, p, v, groups):
    m = groups * p
    prediction = predict(interleaved_1f1b(p, m, v), cost)
    stage_time = cost.forward + cost.backward
    # Idle time per rank: (p - 1)(F + B) of one stage, 1/v of 1F1B's for a rank holding v stages;
    # relative to the rank's compute v * m * (F + B) that is (p - 1) / (v * m).
    assert prediction.makespan == pytest.approx((v * m + p - 1) * stage_time)
    for ratio in prediction.bubble_over_compute:
        assert ratio == pytest.approx((p - 1) / (v * m))


def test_interleaved_numbers():
    # p = 4, m = 8, v = 2: bubble 3 / 16 of compute, against 3 / 8 for 1F1B over the same 4 ranks.
    interleaved = predict(interleaved_1f1b(4, 8, 2))
    assert interleaved.bubble_over_compute == pytest.approx((3 / 16,) * 4)
    whole_rank = StageCost(2.0, 2.0, 2.0)  # one 1F1B stage = the rank's two interleaved stages
    assert predict(one_f_one_b(4, 8), whole_rank).bubble_over_compute == pytest.approx((3 / 8,) * 4)


def zb_h1_bubble(cost: StageCost, p: int) -> float:
    """What zb_h1 achieves for m >= p (derived in its docstring, checked here)."""
    f, i, w = cost.forward, cost.backward_input, cost.backward_weight
    return (p - 1) * max(f, i, f + i - w)


@pytest.mark.parametrize(
    "cost",
    [EQUAL, UNEVEN, StageCost(1.0, 1.0, 0.5), StageCost(2.0, 1.0, 1.0), StageCost(1.0, 0.5, 1.0),
     StageCost(1.0, 2.0, 2.0)],
)
@pytest.mark.parametrize(("p", "m"), [(2, 2), (2, 8), (3, 4), (4, 4), (4, 8), (6, 13), (8, 16), (8, 32)])
def test_zb_h1_bubble(cost, p, m):
    prediction = predict(zb_h1(p, m), cost)
    work = m * (cost.forward + cost.backward)
    assert prediction.makespan == pytest.approx(work + zb_h1_bubble(cost, p))
    for busy in prediction.busy:
        assert busy == pytest.approx(work)


def test_zb_h1_paper_form_and_one_third_of_1f1b():
    # W <= min(F, I): the paper's (p - 1)(F + I - W).
    p, m = 4, 8
    cost = StageCost(1.0, 1.0, 0.5)
    assert predict(zb_h1(p, m), cost).makespan - m * 2.5 == pytest.approx((p - 1) * (1.0 + 1.0 - 0.5))
    # F = I = W: a third of 1F1B's bubble (p - 1)(F + I + W): 3 against 9 time units, 27 against 33.
    zb, ofob = predict(zb_h1(p, m)), predict(one_f_one_b(p, m))
    assert zb.makespan == 27 and ofob.makespan == 33
    assert (zb.makespan - 24) * 3 == ofob.makespan - 24


@pytest.mark.parametrize("cost", [EQUAL, StageCost(1.0, 1.0, 0.5), StageCost(2.0, 2.0, 1.0)])
@pytest.mark.parametrize(("p", "m"), [(1, 3), (2, 3), (2, 8), (4, 7), (4, 16), (8, 15), (8, 32)])
def test_zb_v_bubble_is_the_unavoidable_fill(cost, p, m):
    # For W <= F = I and m >= 2p - 1, only the last rank's wait for its first input remains: (p - 1) * F.
    prediction = predict(zb_v(p, m), cost)
    work = 2 * m * (cost.forward + cost.backward)
    assert prediction.makespan == pytest.approx(work + (p - 1) * cost.forward)


def test_zb_v_numbers():
    # p = 4, m = 8, F = I = W = 1 per half-size stage: 51 time units, 3 idle, against 1F1B over whole-rank
    # stages (F = 2, B = 4): 66, with 18 idle.
    assert predict(zb_v(4, 8)).makespan == 51
    assert predict(one_f_one_b(4, 8), StageCost(2.0, 2.0, 2.0)).makespan == 66
    # ZB-V with other ratios leaves more than (p - 1) * F: here F > I.
    assert predict(zb_v(4, 8), StageCost(2.0, 1.0, 1.0)).makespan - 64 == pytest.approx(8.0)


def test_link_adds_transfer_per_hop():
    p, m = 4, 8
    link = Link(latency=0.25, bandwidth=1000.0, message_bytes=500.0)  # 0.75 per message
    prediction = predict(gpipe(p, m), EQUAL, link)
    # Fill and drain each cross p - 1 links.
    assert prediction.makespan == pytest.approx(m * 3 + (p - 1) * (3 + 2 * 0.75))
    assert link.transfer_time == pytest.approx(0.75)


def test_messages_and_peaks():
    p, m = 4, 8
    assert predict(one_f_one_b(p, m)).num_messages == 2 * (p - 1) * m
    assert predict(interleaved_1f1b(p, m, 2)).num_messages == 2 * (2 * p - 1) * m
    assert predict(one_f_one_b(p, m)).peak_activations == (4, 3, 2, 1)
    assert predict(gpipe(p, m)).peak_activations == (8, 8, 8, 8)


def test_optimizer_runs_after_each_ranks_last_action():
    p, m = 4, 8
    costs = [StageCost(optimizer=opt) for opt in (1.0, 1.0, 1.0, 20.0)]
    prediction = predict(one_f_one_b(p, m), costs)
    # 1F1B: the last rank finishes (p - 1) * B = 6 before the first, so its long step ends at 33 - 6 + 20.
    assert prediction.step_time == pytest.approx(33 - 6 + 20)
    assert predict(one_f_one_b(p, m), StageCost(optimizer=1.0)).step_time == pytest.approx(34)


def test_interleaved_optimizer_sums_the_ranks_stages():
    prediction = predict(interleaved_1f1b(2, 4, 2), StageCost(optimizer=1.5))
    assert prediction.step_time == pytest.approx(prediction.makespan + 3.0)


def test_bad_costs_say_how_to_fix():
    with pytest.raises(ValueError, match="got 3 StageCosts for a schedule of 4 stages"):
        predict(get_schedule("1f1b", 4, 4), [StageCost()] * 3)
    with pytest.raises(ValueError, match=r"StageCost.forward \(-1.0\) must be a finite number >= 0"):
        StageCost(forward=-1.0)
    with pytest.raises(ValueError, match="use math.inf for a free link"):
        Link(bandwidth=0.0)
    assert Link(bandwidth=math.inf).transfer_time == 0.0
