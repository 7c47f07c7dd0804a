"""PipeDream's asynchronous schedules: 1F1B that never flushes, updating weights inside the pipeline.

``async_1f1b`` (PipeDream with weight stashing) updates a stage's weights after every backward; ``2bw``
(PipeDream-2BW) accumulates a batch's gradients and updates once per batch. Both run the same 1F1B order
across batch boundaries: stage ``s`` keeps ``d = p - s - 1`` micro-batches in flight, so the backwards it runs
while the forwards of batch ``k`` go through belong partly to batch ``k - 1``.

Each function returns the steady state, the action list of one batch in the middle of training. There a
negative micro-batch id ``-j`` means micro-batch ``m - j`` of the batch before. The first batch runs the
same list without those actions (:func:`start`), and :func:`drain` finishes what the last batch left in
flight, so one list is the single source of truth for all three phases. Since ``m >= p`` is required, no id
reaches further back than one batch. A last partial batch with fewer micro-batches runs alone, after a
drain: :func:`alone` gives its list (1F1B with flush, with the same optimizer steps).

Steady state of ``async_1f1b(3, 3)`` (``O`` = optimizer step of that stage after that micro-batch)::

    rank 0 | 0F0 0B-2 0O-2 0F1 0B-1 0O-1 0F2 0B0 0O0
    rank 1 | 1F0 1B-1 1O-1 1F1 1B0  1O0  1F2 1B1 1O1
    rank 2 | 2F0 2B0  2O0  2F1 2B1  2O1  2F2 2B2 2O2
"""

from __future__ import annotations

from dataclasses import replace

from .actions import Action, Op, Schedule, add_communication
from .basic import one_f_one_b

__all__ = ["async_1f1b", "two_bw", "start", "drain", "alone", "stream"]


def _steady(name: str, num_stages: int, num_microbatches: int, update_every_microbatch: bool,
            slack: int = 0) -> Schedule:
    p, m = num_stages, num_microbatches
    if p < 1 or m < 1:
        raise ValueError(f"{name}: num_stages ({p}) and num_microbatches ({m}) must be >= 1")
    if slack < 0:
        raise ValueError(f"{name}: slack ({slack}) must be >= 0")
    if m < p + slack:
        raise ValueError(f"num_microbatches ({m}) must be >= the number of stages ({p}) + slack ({slack}) for {name}, "
                         f"so that the micro-batches in flight come from at most one earlier batch; raise it to "
                         f"{p + slack}")
    compute = []
    for stage in range(p):
        in_flight = p - stage - 1 + slack
        actions = []
        # Every step of the steady state: one forward of this batch, one backward of the oldest in flight.
        for i in range(m):
            j = i - in_flight
            actions.append(Action(stage, Op.FORWARD, i))
            actions.append(Action(stage, Op.BACKWARD, j))
            if update_every_microbatch or j % m == m - 1:  # 2BW: after the last micro-batch of a batch
                actions.append(Action(stage, Op.OPTIMIZER, j))
        compute.append(actions)
    schedule = add_communication(name, compute, range(p), m)
    return replace(schedule, asynchronous=True)


def async_1f1b(num_stages: int, num_microbatches: int, slack: int = 0) -> Schedule:
    """PipeDream: 1F1B without flushes; each stage steps its optimizer after every backward (weight stashing
    keeps each micro-batch's forward and backward on the same weights).

    ``slack`` keeps that many more micro-batches in flight on every stage. With the fewest (PipeDream's
    ``p - s`` on stage ``s``) a stage's backward needs the gradient its successor computed one forward earlier,
    so every forward-backward period also waits two message latencies; one micro-batch of slack gives the
    gradient a whole period to arrive, for one more weight version and one more micro-batch of activations
    per stage (and one step more staleness).
    """
    return _steady("async_1f1b", num_stages, num_microbatches, True, slack)


def two_bw(num_stages: int, num_microbatches: int, slack: int = 0) -> Schedule:
    """PipeDream-2BW: 1F1B without flushes; each stage steps once per batch, after the batch's last backward,
    with the gradient accumulated over its micro-batches. ``slack`` as for :func:`async_1f1b`."""
    return _steady("2bw", num_stages, num_microbatches, False, slack)


def alone(schedule: Schedule, num_microbatches: int) -> Schedule:
    """One batch of ``num_microbatches`` (any count) run by itself with ``schedule``'s optimizer steps: 1F1B
    with a flush, an ``O`` after every backward (async_1f1b) or after the batch's last one (2bw)."""
    # Steps per batch in the steady state: m means after every backward, 1 means once per batch.
    every = sum(a.op is Op.OPTIMIZER for a in schedule.actions[0]) == schedule.num_microbatches
    plain = one_f_one_b(schedule.num_stages, num_microbatches)
    compute = []
    for rank in range(plain.num_ranks):
        actions = []
        for action in plain.compute_actions(rank):
            actions.append(action)
            if action.op is Op.BACKWARD and (every or action.microbatch == num_microbatches - 1):
                actions.append(Action(action.stage, Op.OPTIMIZER, action.microbatch))
        compute.append(actions)
    result = add_communication(f"{schedule.name}:alone", compute, schedule.stage_to_rank, num_microbatches)
    return replace(result, asynchronous=True)


def start(schedule: Schedule) -> Schedule:
    """The first batch: the steady state without the actions of the (non-existent) batch before."""
    actions = tuple(tuple(a for a in rank if a.microbatch >= 0) for rank in schedule.actions)
    return replace(schedule, name=f"{schedule.name}:start", actions=actions)


def drain(schedule: Schedule) -> Schedule:
    """After the last batch: the actions it left in flight, renumbered as micro-batches of that batch.

    """
    m = schedule.num_microbatches
    actions = tuple(tuple(Action(a.stage, a.op, a.microbatch + m) for a in rank if a.microbatch < 0)
                    for rank in schedule.actions)
    return replace(schedule, name=f"{schedule.name}:drain", actions=actions)


def stream(schedule: Schedule, num_batches: int) -> Schedule:
    """``num_batches`` batches run back to back (start, steady states, drain) as one list with global
    micro-batch ids: what the rule checks verify, and what the version bookkeeping is read from."""
    m = schedule.num_microbatches
    lists: list[list[Action]] = [[] for _ in schedule.actions]
    for batch in range(num_batches):
        phase = start(schedule) if batch == 0 else schedule
        for rank, actions in enumerate(phase.actions):
            lists[rank].extend(Action(a.stage, a.op, a.microbatch + batch * m) for a in actions)
    for rank, actions in enumerate(drain(schedule).actions):
        lists[rank].extend(Action(a.stage, a.op, a.microbatch + (num_batches - 1) * m) for a in actions)
    return replace(schedule, name=f"{schedule.name}x{num_batches}", num_microbatches=num_batches * m,
                   actions=tuple(tuple(actions) for actions in lists))
