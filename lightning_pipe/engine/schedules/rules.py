"""Rules every schedule must obey, a timing simulation of the action lists, and the step x rank grid."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from .actions import COMPUTE_OPS, Action, Op, Schedule

__all__ = ["ScheduleError", "Timeline", "simulate", "check_schedule", "format_grid", "message_key", "activation_peaks"]


class ScheduleError(ValueError):
    """A schedule breaks a rule (a missing action, an unmatched send, a deadlock, ...)."""


@dataclass(frozen=True)
class Timeline:
    """When each action of each rank starts and ends in a simulation."""

    schedule: Schedule
    start: tuple[tuple[float, ...], ...]  # start[rank][i] for schedule.actions[rank][i]
    end: tuple[tuple[float, ...], ...]

    @property
    def makespan(self) -> float:
        return max((ends[-1] for ends in self.end if ends), default=0.0)


def message_key(action: Action) -> tuple[str, int, int]:
    """Identify the message a send or receive moves: (kind, sending stage, micro-batch)."""
    stage, op, mb = action
    if op is Op.SEND_ACTIVATION:
        return ("F", stage, mb)
    if op is Op.RECV_ACTIVATION:
        return ("F", stage - 1, mb)
    if op is Op.SEND_GRAD:
        return ("B", stage, mb)
    if op is Op.RECV_GRAD:
        return ("B", stage + 1, mb)
    raise ValueError(f"{action} moves no message")


def _unit_cost(action: Action) -> float:
    return 1.0 if action.op in COMPUTE_OPS else 0.0


def simulate(
    schedule: Schedule,
    cost: Callable[[Action], float] = _unit_cost,
    latency: Callable[[Action], float] = lambda action: 0.0,
) -> Timeline:
    """Run the action lists on a virtual clock: compute takes ``cost(action)``, sends never block, a receive
    waits until its message has arrived (``latency(send)`` after the send). Raises :class:`ScheduleError`
    naming the stuck actions if the lists deadlock."""
    num_ranks = schedule.num_ranks
    position = [0] * num_ranks
    clock = [0.0] * num_ranks
    start: list[list[float]] = [[] for _ in range(num_ranks)]
    end: list[list[float]] = [[] for _ in range(num_ranks)]
    arrival: dict[tuple[str, int, int], float] = {}
    remaining = sum(len(actions) for actions in schedule.actions)
    while remaining:
        progressed = False
        for rank in range(num_ranks):
            actions = schedule.actions[rank]
            while position[rank] < len(actions):
                action = actions[position[rank]]
                begin = clock[rank]
                if action.op in (Op.RECV_ACTIVATION, Op.RECV_GRAD):
                    key = message_key(action)
                    if key not in arrival:
                        break
                    begin = max(begin, arrival[key])
                finish = begin + cost(action)
                if action.op in (Op.SEND_ACTIVATION, Op.SEND_GRAD):
                    arrival[message_key(action)] = finish + latency(action)
                start[rank].append(begin)
                end[rank].append(finish)
                clock[rank] = finish
                position[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = ", ".join(
                f"rank {rank} waits at {schedule.actions[rank][position[rank]]}"
                for rank in range(num_ranks)
                if position[rank] < len(schedule.actions[rank])
            )
            raise ScheduleError(f"schedule {schedule.name!r} deadlocks: {stuck}")
    return Timeline(schedule, tuple(map(tuple, start)), tuple(map(tuple, end)))


def check_schedule(schedule: Schedule) -> Timeline:
    """Check every rule and return the unit-cost timeline; raise :class:`ScheduleError` saying what is wrong.

    Rules: each stage runs on its own rank (each micro-batch on its replica's, with replicated stages); every
    micro-batch has exactly one forward per stage and either no backward anywhere (forward-only) or exactly one
    ``B`` (or one ``I`` and one later ``W``) per stage; a forward comes after the forward of the stage before it and
    a backward after its forward and after the backward of the stage after it; data crossing ranks is received
    before it is used, every send has exactly one matching receive, both in the same order on each channel; and
    the lists run to the end without deadlock.
    """
    p, m, name = schedule.num_stages, schedule.num_microbatches, schedule.name
    if len(schedule.stage_to_rank) != p:
        raise ScheduleError(f"{name}: stage_to_rank has {len(schedule.stage_to_rank)} entries for {p} stages")
    counts: dict[tuple[int, Op, int], int] = defaultdict(int)
    done: set[tuple[int, Op, int]] = set()  # compute actions finished, across ranks, in list order per rank
    sends: dict[tuple[str, int, int], int] = {}
    recvs: dict[tuple[str, int, int], int] = {}
    channel_order: dict[tuple[int, int, str, int], tuple[list, list]] = defaultdict(lambda: ([], []))
    for rank, actions in enumerate(schedule.actions):
        received: set[tuple[str, int, int]] = set()
        local_done: set[tuple[int, Op, int]] = set()
        for action in actions:
            stage, op, mb = action
            if not (0 <= stage < p and 0 <= mb < m):
                raise ScheduleError(f"{name}: {action} on rank {rank} is outside {p} stages x {m} micro-batches")
            if schedule.rank_of(stage, mb) != rank:
                raise ScheduleError(f"{name}: {action} runs on rank {rank}, but stage {stage} runs micro-batch {mb} "
                                    f"on rank {schedule.rank_of(stage, mb)}")
            if op is Op.OPTIMIZER:
                if not {(stage, Op.BACKWARD, mb), (stage, Op.BACKWARD_WEIGHT, mb)} & local_done:
                    raise ScheduleError(f"{name}: rank {rank} runs {action} before the backward of micro-batch {mb}")
                counts[(stage, op, mb)] += 1
            elif op in COMPUTE_OPS:
                counts[(stage, op, mb)] += 1
                _check_dependencies(schedule, rank, action, local_done, received)
                local_done.add((stage, op, mb))
                done.add((stage, op, mb))
            elif op in (Op.SEND_ACTIVATION, Op.SEND_GRAD):
                key = message_key(action)
                producer = Op.FORWARD if op is Op.SEND_ACTIVATION else None
                if producer and (stage, producer, mb) not in local_done or (
                    producer is None and not {(stage, Op.BACKWARD, mb), (stage, Op.BACKWARD_INPUT, mb)} & local_done
                ):
                    raise ScheduleError(f"{name}: rank {rank} sends {action} before computing it")
                if key in sends:
                    raise ScheduleError(f"{name}: {action} is sent twice")
                sends[key] = rank
                peer = schedule.rank_of(stage + 1 if op is Op.SEND_ACTIVATION else stage - 1, mb)
                channel_order[(rank, peer, key[0], key[1])][0].append(mb)
            else:
                key = message_key(action)
                if key in recvs:
                    raise ScheduleError(f"{name}: {action} is received twice")
                recvs[key] = rank
                received.add(key)
                peer = schedule.rank_of(key[1], mb)
                channel_order[(peer, rank, key[0], key[1])][1].append(mb)
    for key in sends.keys() - recvs.keys():
        raise ScheduleError(f"{name}: message {key} is sent by rank {sends[key]} but never received")
    for key in recvs.keys() - sends.keys():
        raise ScheduleError(f"{name}: message {key} is received by rank {recvs[key]} but never sent")
    for (src, dst, kind, stage), (sent, got) in channel_order.items():
        if sent != got:
            raise ScheduleError(f"{name}: rank {src} sends stage {stage}'s {kind} messages in micro-batch order "
                                f"{sent} but rank {dst} receives them in order {got}")
    _check_counts(schedule, counts)
    return simulate(schedule)


def _check_dependencies(schedule: Schedule, rank: int, action: Action, local_done: set, received: set) -> None:
    stage, op, mb = action
    name, last = schedule.name, schedule.num_stages - 1
    if op is Op.FORWARD and stage > 0:
        if schedule.rank_of(stage - 1, mb) == rank:
            ok = (stage - 1, Op.FORWARD, mb) in local_done
        else:
            ok = ("F", stage - 1, mb) in received
        if not ok:
            raise ScheduleError(f"{name}: rank {rank} runs {action} before its input (stage {stage - 1}) is there")
    if op in (Op.BACKWARD, Op.BACKWARD_INPUT):
        if (stage, Op.FORWARD, mb) not in local_done:
            raise ScheduleError(f"{name}: rank {rank} runs {action} before {Action(stage, Op.FORWARD, mb)}")
        if stage < last:
            if schedule.rank_of(stage + 1, mb) == rank:
                ok = bool({(stage + 1, Op.BACKWARD, mb), (stage + 1, Op.BACKWARD_INPUT, mb)} & local_done)
            else:
                ok = ("B", stage + 1, mb) in received
            if not ok:
                raise ScheduleError(f"{name}: rank {rank} runs {action} before its output gradient "
                                    f"(stage {stage + 1}) is there")
    if op is Op.BACKWARD_WEIGHT and (stage, Op.BACKWARD_INPUT, mb) not in local_done:
        raise ScheduleError(f"{name}: rank {rank} runs {action} before {Action(stage, Op.BACKWARD_INPUT, mb)}")


def _check_counts(schedule: Schedule, counts: dict[tuple[int, Op, int], int]) -> None:
    name = schedule.name
    has_backward = any(op in (Op.BACKWARD, Op.BACKWARD_INPUT) for (_, op, _) in counts)
    for stage in range(schedule.num_stages):
        for mb in range(schedule.num_microbatches):
            def n(op: Op) -> int:
                return counts.get((stage, op, mb), 0)

            if n(Op.FORWARD) != 1:
                raise ScheduleError(f"{name}: {Action(stage, Op.FORWARD, mb)} runs {n(Op.FORWARD)} times, not once")
            if not has_backward:
                continue
            split = (n(Op.BACKWARD_INPUT), n(Op.BACKWARD_WEIGHT))
            if not ((n(Op.BACKWARD), split) == (1, (0, 0)) or (n(Op.BACKWARD), split) == (0, (1, 1))):
                raise ScheduleError(f"{name}: stage {stage} micro-batch {mb} needs one B or one I and one W, "
                                    f"has B={n(Op.BACKWARD)} I={split[0]} W={split[1]}")


def format_grid(schedule: Schedule, timeline: Timeline | None = None) -> str:
    """The schedule as a step x rank grid: one row per unit-cost time step, one column per rank."""
    timeline = timeline or simulate(schedule)
    cells: dict[int, dict[int, str]] = defaultdict(dict)
    for rank, actions in enumerate(schedule.actions):
        for action, begin in zip(actions, timeline.start[rank]):
            if action.op in COMPUTE_OPS:
                cells[int(round(begin))][rank] = str(action)
    width = max([len(text) for row in cells.values() for text in row.values()] + [len(f"rank {schedule.num_ranks}")])
    steps = max(cells) + 1 if cells else 0
    header = "step | " + " ".join(f"rank {rank}".ljust(width) for rank in range(schedule.num_ranks))
    lines = [header, "-" * len(header)]
    for step in range(steps):
        row = " ".join(cells[step].get(rank, ".").ljust(width) for rank in range(schedule.num_ranks))
        lines.append(f"{step:4d} | {row}".rstrip())
    return "\n".join(lines)


def activation_peaks(schedule: Schedule) -> list[int]:
    """Most micro-batches whose forward ran but whose backward has not, per rank (activations held)."""
    peaks = []
    for rank in range(schedule.num_ranks):
        held = peak = 0
        for _, op, _ in schedule.compute_actions(rank):
            if op is Op.FORWARD:
                held += 1
            elif op in (Op.BACKWARD, Op.BACKWARD_WEIGHT):
                held -= 1
            peak = max(peak, held)
        peaks.append(peak)
    return peaks
