"""The comm plan of every registered schedule runs under NCCL's point-to-point rules: a static proof, no processes.

NCCL matches messages by order alone and runs a rank's operations in issue order; :mod:`.schedules.ordering` plays a
plan by those rules (one stream per rank for ``batch_isend_irecv`` groups, and one per pair of ranks) and fails on a
mismatched or blocked operation. Here: every synchronous schedule, the asynchronous ones through their phases (start,
steady states, drain, a short batch alone), and replicated layouts, for ``p <= 8`` stages and ``m <= 32``
micro-batches. The sizes are sampled where schedules change shape (every ``m`` up to ``2p + 2``, where warm-ups and
the V fill, then a few beyond, where steady states only repeat); ``LIGHTNING_PIPE_FULL_P2P_PROOF=1`` checks every
``m <= 32`` (about 40 s of CPU). A hand-written order of the old transport (receives posted ahead) must be
rejected.
"""

from __future__ import annotations

import os

import pytest

from lightning_pipe.engine.schedules import SCHEDULES, get_schedule
from lightning_pipe.engine.schedules import asynchronous as schedules_async
from lightning_pipe.engine.schedules.ordering import (MODELS, Group, P2POrderError, WireOp, check_comm_plan,
                                                      check_program)
from lightning_pipe.engine.schedules.replicated import replicated, replicated_forward_only
from lightning_pipe.engine.schedules.rules import ScheduleError
from lightning_pipe.engine.schedules.transfers import carried_out, comm_plan, shift

FULL = os.environ.get("LIGHTNING_PIPE_FULL_P2P_PROOF", "") not in ("", "0")
MAX_STAGES, MAX_MICROBATCHES = 8, 32


def sizes(p: int) -> list[int]:
    if FULL:
        return list(range(1, MAX_MICROBATCHES + 1))
    return sorted({*range(1, min(2 * p + 3, MAX_MICROBATCHES + 1)), 3 * p, 4 * p + 1, MAX_MICROBATCHES - 1,
                   MAX_MICROBATCHES} & set(range(1, MAX_MICROBATCHES + 1)))


def plan_table(plan) -> list[list[str]]:
    """Each rank's steps as ``[sends> <recvs] action``."""
    rows = []
    for steps in plan.steps:
        cells = []
        for step in steps:
            ops = [f"{t.stage}{t.kind}{t.microbatch}>" for t in step.sends]
            ops += [f"<{t.stage}{t.kind}{t.microbatch}" for t in step.recvs]
            cells.append(("[" + " ".join(ops) + "] " if ops else "") + (str(step.action) if step.action else "end"))
        rows.append(cells)
    return rows


def test_1f1b_plan_on_two_ranks() -> None:
    """Sends of a compute action go with the receives of the next one, in one group: the steady state's exchange of
    an activation and a gradient runs as one ``batch_isend_irecv`` on both ends."""
    assert plan_table(comm_plan(get_schedule("1f1b", 2, 3))) == [
        ["0F0", "[0F0>] 0F1", "[0F1> <1B0] 0B0", "0F2", "[0F2> <1B1] 0B1", "[<1B2] 0B2"],
        ["[<0F0] 1F0", "1B0", "[1B0> <0F1] 1F1", "1B1", "[1B1> <0F2] 1F2", "1B2", "[1B2>] end"],
    ]


def test_interleaved_plan_receives_in_the_senders_order() -> None:
    """Rank 0 sends 0F2 and then 2B0 to rank 1, which needs 2B0 only three steps later; rank 0's send of 2B0 would
    wait for it there for ever (NCCL's sends meet their receive), so rank 1 takes both where it waits for 0F2."""
    table = plan_table(comm_plan(get_schedule("interleaved_1f1b", 2, 4)))
    assert table[1][6] == "[3B1> <0F2 <2B0] 1F2"
    assert table[0][6] == "[2B0> <3B1] 0F3"


def _synchronous_cases():
    for name, kind in SCHEDULES.items():
        if kind.asynchronous:
            continue
        for p in range(1, MAX_STAGES + 1):
            for m in sizes(p):
                options = [{}] if kind.stages_per_rank is not None else [{"virtual_stages": 2}, {"virtual_stages": 3}]
                for option in options:
                    try:
                        yield name, p, m, get_schedule(name, p, m, **option)
                    except ValueError:
                        continue


def test_every_synchronous_schedule_runs_under_nccl_rules() -> None:
    checked = set()
    for name, p, m, schedule in _synchronous_cases():
        phases = [(comm_plan(schedule), 0, True)]
        for model in MODELS:
            check_comm_plan(phases, model)
        checked.add(name)
    assert checked == {name for name, kind in SCHEDULES.items() if not kind.asynchronous}


def _async_phases(steady, batches: int) -> list:
    """What a run of ``batches`` full batches and a flush issues: start, steady states, drain (first ids global)."""
    m = steady.num_microbatches
    leaving = carried_out(steady)
    phases = [(comm_plan(schedules_async.start(steady)), 0, False)]
    phases += [(comm_plan(steady, shift(leaving, -m)), b * m, False) for b in range(1, batches)]
    phases.append((comm_plan(schedules_async.drain(steady), leaving), (batches - 1) * m, True))
    return phases


def test_asynchronous_schedules_run_under_nccl_rules_through_their_phases() -> None:
    """Start, two steady states and a drain as one stream of groups (gradients sent in one batch are received in
    the next), then a short batch alone after the drain, as :meth:`Pipeline.train_step` runs them. A steady state
    only repeats itself beyond ``m = 2p``, so fewer sizes are sampled than for the synchronous schedules."""
    for name in [name for name, kind in SCHEDULES.items() if kind.asynchronous]:
        for slack in (0, 1):
            for p in range(1, MAX_STAGES + 1):
                first = p + slack  # the fewest micro-batches the steady state takes
                chosen = sizes(p) if FULL else {first, first + 1, first + 2, 2 * p + 1, MAX_MICROBATCHES}
                for m in sorted(m for m in chosen if first <= m <= MAX_MICROBATCHES):
                    steady = get_schedule(name, p, m, slack=slack)
                    phases = _async_phases(steady, 3)
                    phases.append((comm_plan(schedules_async.alone(steady, max(1, m - 1))), 3 * m, True))
                    for model in MODELS:
                        check_comm_plan(phases, model)


LAYOUTS = [[3, 1], [2, 1], [2, 1, 1], [1, 2, 1], [2, 2, 1], [3, 2, 1], [4, 1], [1, 3, 1], [2, 3, 2, 1], [2, 2, 2, 1],
           [1, 1, 2, 1], [2, 1, 2, 1, 1, 1]]


def test_replicated_layouts_run_under_nccl_rules() -> None:
    for replicas in LAYOUTS:
        assert sum(replicas) <= MAX_STAGES
        for m in sizes(sum(replicas)):
            for schedule in (replicated(replicas, m, "1f1b"), replicated(replicas, m, "gpipe"),
                             replicated_forward_only(replicas, m)):
                phases = [(comm_plan(schedule), 0, True)]
                for model in MODELS:
                    check_comm_plan(phases, model)


def _old_transport_1f1b_two_ranks() -> list[list[Group]]:
    """What the transport before the comm plan issued for 1F1B on 2 ranks, 2 micro-batches: each channel's first
    receive posted at the start of the step (and the next one as soon as one arrives), a send right after its
    compute; the host waits only for the receive it needs."""
    def recv(message: tuple, peer: int) -> WireOp:
        return WireOp(False, peer, message)

    def send(message: tuple, peer: int) -> WireOp:
        return WireOp(True, peer, message)

    f0, f1, b0, b1 = ("F", 0, 0), ("F", 0, 1), ("B", 1, 0), ("B", 1, 1)
    rank0 = [Group((recv(b0, 1),), "rank 0 posts 1B0 ahead", waits_for=()),
             Group((send(f0, 1),), "after 0F0", waits_for=()),
             Group((send(f1, 1),), "after 0F1", waits_for=(b0,)),
             Group((recv(b1, 1),), "after 0B0 (posts 1B1)", waits_for=(b1,))]
    rank1 = [Group((recv(f0, 0),), "rank 1 posts 0F0 ahead", waits_for=(f0,)),
             Group((recv(f1, 0),), "after 1F0 (posts 0F1)", waits_for=()),
             Group((send(b0, 0),), "after 1B0", waits_for=(f1,)),
             Group((send(b1, 0),), "after 1B1", waits_for=())]
    return [rank0, rank1]


@pytest.mark.parametrize("model", MODELS)
def test_the_old_transports_order_is_rejected_naming_ranks_and_operations(model: str) -> None:
    """Rank 0's receive of 1B0, posted ahead, sits on the stream in front of its send of 0F0, which rank 1 waits
    for before it can compute (and send) 1B0: the issue's pipedream deadlock, found without running anything."""
    with pytest.raises(P2POrderError) as caught:
        check_program(_old_transport_1f1b_two_ranks(), model)
    text = str(caught.value)
    assert "deadlock under NCCL's rules" in text
    assert "rank 0" in text and "rank 1" in text
    if model == "pair":
        assert "its send 0F0 to rank 1 (after 0F0) is queued behind its receive 1B0 from rank 1" in text
    else:
        assert "its receive 1B0 from rank 1 waits for rank 1" in text
    assert "receive 0F0 from rank 0" in text


def test_a_pair_that_disagrees_on_the_order_is_rejected() -> None:
    a, b = ("F", 0, 0), ("F", 2, 0)
    program = [[Group((WireOp(True, 1, a), WireOp(True, 1, b)), "rank 0's step")],
               [Group((WireOp(False, 0, b), WireOp(False, 0, a)), "rank 1's step")]]
    with pytest.raises(P2POrderError, match=r"message 0 from rank 0 to rank 1 does not match \(NCCL matches by "
                                            r"order, not by tag\): rank 0 sends 0F0 \(rank 0's step\) where rank 1 "
                                            r"receives 2F0"):
        check_program(program)


def test_a_receive_never_sent_is_rejected() -> None:
    from lightning_pipe.engine.schedules.actions import Action, Op, Schedule

    broken = Schedule("broken", 2, 1, (0, 1), ((Action(0, Op.FORWARD, 0),),
                                               (Action(1, Op.RECV_ACTIVATION, 0), Action(1, Op.FORWARD, 0))))
    with pytest.raises(ScheduleError, match="rank 1 receives 0F0 \\(0->1\\), which rank 0 never sends it"):
        comm_plan(broken)
