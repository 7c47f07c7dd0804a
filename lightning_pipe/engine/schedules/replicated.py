"""Schedules for a pipeline whose stages have several ranks each (PipeDream's "3-1": stage 0 on 3 ranks, stage 1
on 1), taking the micro-batches in turn: micro-batch ``j`` of stage ``s`` runs on replica ``j % replicas[s]``.

Ranks are numbered stage by stage: with ``replicas=[3, 1]`` stage 0 is ranks 0, 1, 2 and stage 1 is rank 3. A
stage is replicated because it is slower, so the order is planned as if each stage's work per micro-batch took
time in proportion to its replica count (the balanced pipeline a planner aims for), by playing the pipeline
forward on that clock: a rank that is free runs the backward of its oldest micro-batch in flight if its output
gradient is there, else the forward of its next micro-batch if its input is there and it holds fewer than its
limit, else waits for whichever comes first. Each rank thus runs its own micro-batches' forwards and backwards in
micro-batch order, so every channel carries messages in the order they are received.

The limit is PipeDream's number of micro-batches in flight per replica (1F1B-RR): the micro-batches a stage must
hold to keep the stages after it busy, ``sum(replicas[s:])``, shared among its ``replicas[s]`` ranks. With one rank
per stage it is ``p - s`` and the order is :func:`~.basic.one_f_one_b`'s. ``replicated([3, 1], 6)`` on that
clock (stage 0's forward takes 3 ticks and its backward 6, stage 1's 1 and 2; ``~`` continues an action)::

    rank 0 | 0F0 ~   ~   0F3 ~   ~   0B0 ~   ~   ~   ~   ~   .   .   .   0B3 ~   ~   ~   ~   ~   .   .   .
    rank 1 | 0F1 ~   ~   0F4 ~   ~   .   .   .   0B1 ~   ~   ~   ~   ~   .   .   .   0B4 ~   ~   ~   ~   ~
    rank 2 | 0F2 ~   ~   0F5 ~   ~   .   .   .   .   .   .   0B2 ~   ~   ~   ~   ~   .   .   .   0B5 ~   ~ ...
    rank 3 | .   .   .   1F0 1B0 ~   1F1 1B1 ~   1F2 1B2 ~   1F3 1B3 ~   1F4 1B4 ~   1F5 1B5 ~

The bubble is one forward and one backward of the slowest replica (9 ticks of 27), as in 1F1B with stages that
slow; the 3 ranks of stage 0 together keep rank 3 busy from its first forward to its last backward.

The last stage must have one rank: it computes the loss and the outputs, which come back whole from one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .actions import Action, Op, Schedule, add_communication

__all__ = ["check_replicas", "replica_ranks", "replicated", "replicated_forward_only", "in_flight_limits"]

REPLICATED_SCHEDULES = ("1f1b", "gpipe")


def check_replicas(replicas: Sequence[int]) -> list[int]:
    """``replicas`` as a list of counts per stage; says how to fix a layout that cannot run."""
    counts = list(replicas)
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise ValueError(f"replicas={counts!r} must list a positive number of ranks for each stage, e.g. [3, 1]")
    if counts[-1] != 1:
        way_out = (f"e.g. replicas={[*counts[:-2], counts[-2] + counts[-1] - 1, 1]} with more layers in the last stage"
                   if len(counts) > 1 else "or use data parallelism for a single stage")
        raise ValueError(f"replicas={counts}: the last stage must have one rank (it computes the loss and the "
                         f"outputs); replicate the stages before it, {way_out}, or give every stage the same count "
                         f"(even replication)")
    return counts


def replica_ranks(replicas: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The ranks of each stage, numbered stage by stage."""
    ranks, first = [], 0
    for count in replicas:
        ranks.append(tuple(range(first, first + count)))
        first += count
    return tuple(ranks)


def in_flight_limits(replicas: Sequence[int]) -> list[int]:
    """Most micro-batches one replica of each stage holds in 1F1B: ``ceil(sum(replicas[s:]) / replicas[s])``."""
    return [math.ceil(sum(replicas[s:]) / count) for s, count in enumerate(replicas)]


def replicated(replicas: Sequence[int], num_microbatches: int, schedule: str = "1f1b") -> Schedule:
    """``schedule`` ("1f1b" or "gpipe") over stages with ``replicas[s]`` ranks each, micro-batches in turn."""
    counts = check_replicas(replicas)
    if schedule not in REPLICATED_SCHEDULES:
        raise ValueError(f"schedule {schedule!r} does not run with replicated stages; use one of "
                         f"{', '.join(REPLICATED_SCHEDULES)}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) must be >= 1")
    limits = in_flight_limits(counts) if schedule == "1f1b" else [num_microbatches] * len(counts)
    compute = _play(counts, num_microbatches, limits, backward_after_all_forwards=schedule == "gpipe")
    return _schedule(f"replicated_{schedule}", counts, num_microbatches, compute)


def replicated_forward_only(replicas: Sequence[int], num_microbatches: int) -> Schedule:
    """Forwards only (evaluation), each rank taking its micro-batches in order."""
    counts = check_replicas(replicas)
    compute = [[Action(stage, Op.FORWARD, mb) for mb in range(replica, num_microbatches, count)]
               for stage, count in enumerate(counts) for replica in range(count)]
    return _schedule("replicated_forward_only", counts, num_microbatches, compute)


def _schedule(name: str, counts: list[int], num_microbatches: int, compute: list[list[Action]]) -> Schedule:
    ranks = replica_ranks(counts)
    return add_communication(name, compute, [r[0] for r in ranks], num_microbatches, stage_replicas=ranks)


def _play(counts: list[int], m: int, limits: list[int], backward_after_all_forwards: bool) -> list[list[Action]]:
    """Each rank's compute actions, from playing the pipeline on a clock where stage ``s`` takes ``counts[s]`` per
    forward and twice that per backward (see the module's docstring)."""
    last = len(counts) - 1
    workers = [(stage, list(range(replica, m, count)))
               for stage, count in enumerate(counts) for replica in range(count)]
    free = [0.0] * len(workers)
    forwards, backwards = [0] * len(workers), [0] * len(workers)  # how many of its own micro-batches each has run
    forward_end: dict[tuple[int, int], float] = {}
    backward_end: dict[tuple[int, int], float] = {}
    compute: list[list[Action]] = [[] for _ in workers]
    remaining = 2 * m * len(counts)
    while remaining:
        best: tuple[float, int, Op] | None = None
        for rank, (stage, own) in enumerate(workers):
            options = []
            if backwards[rank] < forwards[rank] and not (backward_after_all_forwards and forwards[rank] < len(own)):
                mb = own[backwards[rank]]
                ready = forward_end[(stage, mb)] if stage == last else backward_end.get((stage + 1, mb))
                if ready is not None:
                    options.append((max(free[rank], ready), 0, Op.BACKWARD))  # 0: a backward wins a tie
            if forwards[rank] < len(own) and forwards[rank] - backwards[rank] < limits[stage]:
                mb = own[forwards[rank]]
                ready = 0.0 if stage == 0 else forward_end.get((stage - 1, mb))
                if ready is not None:
                    options.append((max(free[rank], ready), 1, Op.FORWARD))
            if options:
                begin, _, op = min(options)
                if best is None or begin < best[0]:
                    best = (begin, rank, op)
        if best is None:  # cannot happen with limits >= 1; kept so a bug shows as an error, not a hang
            raise RuntimeError(f"replicated schedule stuck: replicas={counts}, m={m}, limits={limits}")
        begin, rank, op = best
        stage, own = workers[rank]
        if op is Op.FORWARD:
            mb = own[forwards[rank]]
            forwards[rank] += 1
            free[rank] = forward_end[(stage, mb)] = begin + counts[stage]
        else:
            mb = own[backwards[rank]]
            backwards[rank] += 1
            free[rank] = backward_end[(stage, mb)] = begin + 2 * counts[stage]
        compute[rank].append(Action(stage, op, mb))
        remaining -= 1
    return compute
