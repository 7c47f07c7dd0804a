"""gpipe, 1f1b and forward_only: literal tables for small cases, and every rule over many sizes."""

from __future__ import annotations

import pytest

from lightning_pipe.engine.schedules.rules import ScheduleError, activation_peaks, check_schedule, format_grid
from lightning_pipe.engine.schedules import Action, Op, Schedule, forward_only, get_schedule, gpipe, one_f_one_b


def _lists(schedule: Schedule) -> list[str]:
    return [" ".join(str(action) for action in actions) for actions in schedule.actions]


def test_gpipe_literal_table() -> None:
    assert _lists(gpipe(2, 3)) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 0F2 0SEND_F2 0RECV_B0 0B0 0RECV_B1 0B1 0RECV_B2 0B2",
        "1RECV_F0 1F0 1RECV_F1 1F1 1RECV_F2 1F2 1B0 1SEND_B0 1B1 1SEND_B1 1B2 1SEND_B2",
    ]


def test_1f1b_literal_table() -> None:
    assert _lists(one_f_one_b(2, 3)) == [
        "0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0F2 0SEND_F2 0RECV_B1 0B1 0RECV_B2 0B2",
        "1RECV_F0 1F0 1B0 1SEND_B0 1RECV_F1 1F1 1B1 1SEND_B1 1RECV_F2 1F2 1B2 1SEND_B2",
    ]
    compute = [" ".join(str(a) for a in one_f_one_b(4, 6).compute_actions(rank)) for rank in range(4)]
    assert compute == [
        "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5",
        "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1B4 1B5",
        "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2B5",
        "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5",
    ]


def test_grid_of_1f1b() -> None:
    assert format_grid(one_f_one_b(3, 3)) == "\n".join([
        "step | rank 0 rank 1 rank 2",
        "---------------------------",
        "   0 | 0F0    .      .",
        "   1 | 0F1    1F0    .",
        "   2 | 0F2    1F1    2F0",
        "   3 | .      .      2B0",
        "   4 | .      1B0    2F1",
        "   5 | 0B0    1F2    2B1",
        "   6 | .      1B1    2F2",
        "   7 | 0B1    .      2B2",
        "   8 | .      1B2    .",
        "   9 | 0B2    .      .",
    ])


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "forward_only"])
def test_rules_hold_for_every_size(name: str) -> None:
    for p in range(1, 9):
        for m in range(1, 33):
            schedule = get_schedule(name, p, m)
            timeline = check_schedule(schedule)  # raises ScheduleError on any broken rule or a deadlock
            assert schedule.num_ranks == p and schedule.num_stages == p
            if name != "forward_only":  # unit cost, F = B = 1: fill-drain takes 2(m + p - 1) steps
                assert timeline.makespan == 2 * (m + p - 1), (name, p, m)


def test_activation_peaks() -> None:
    p, m = 4, 8
    assert activation_peaks(gpipe(p, m)) == [m] * p
    assert activation_peaks(one_f_one_b(p, m)) == [p - stage for stage in range(p)]


def test_action_parse_round_trip() -> None:
    for action in one_f_one_b(3, 4).actions[1]:
        assert Action.parse(str(action)) == action
    with pytest.raises(ValueError, match="cannot read action"):
        Action.parse("F2")


def _tamper(schedule: Schedule, rank: int, actions: list[Action]) -> Schedule:
    lists = list(schedule.actions)
    lists[rank] = tuple(actions)
    return Schedule(schedule.name, schedule.num_stages, schedule.num_microbatches, schedule.stage_to_rank,
                    tuple(lists))


def test_broken_schedules_are_caught() -> None:
    base = one_f_one_b(2, 2)
    rank1 = list(base.actions[1])
    # A backward before its forward.
    swapped = rank1[:]
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(ScheduleError, match="before"):
        check_schedule(_tamper(base, 1, swapped))
    # A receive dropped: the message is sent but never received.
    with pytest.raises(ScheduleError, match="before its input|never received"):
        check_schedule(_tamper(base, 1, [a for a in rank1 if a != Action(1, Op.RECV_ACTIVATION, 1)]))
    # A backward dropped, with the send of its gradient.
    with pytest.raises(ScheduleError, match="sends 1SEND_B1 before computing it"):
        check_schedule(_tamper(base, 1, [a for a in rank1 if a != Action(1, Op.BACKWARD, 1)]))
    single = gpipe(1, 2)
    with pytest.raises(ScheduleError, match="micro-batch 1 needs one B or one I and one W, has B=0"):
        check_schedule(_tamper(single, 0, list(single.actions[0][:-1])))
    # Both ranks wait for each other first: rank 0 waits for a gradient before sending any activation.
    rank0 = list(base.actions[0])
    deadlock = [rank0[4], rank0[0], rank0[1], rank0[5]] + rank0[2:4] + rank0[6:]
    with pytest.raises(ScheduleError):
        check_schedule(_tamper(base, 0, deadlock))


def test_deadlock_is_reported_by_simulation() -> None:
    from lightning_pipe.engine.schedules.rules import simulate

    base = gpipe(2, 1)
    # Rank 0 waits for a gradient before sending the activation that rank 1 needs to produce it: a cycle.
    rank0 = [Action(0, Op.RECV_GRAD, 0), Action(0, Op.FORWARD, 0), Action(0, Op.SEND_ACTIVATION, 0),
             Action(0, Op.BACKWARD, 0)]
    with pytest.raises(ScheduleError, match="deadlocks: rank 0 waits at 0RECV_B0, rank 1 waits at 1RECV_F0"):
        simulate(_tamper(base, 0, rank0))


def test_bad_sizes_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="num_microbatches \\(0\\) must be >= 1"):
        one_f_one_b(2, 0)
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'; choose one of"):
        get_schedule("zigzag", 2, 2)
    assert forward_only(3, 2, stage_to_rank=[0, 1, 0]).num_ranks == 2
