"""A proof that a comm plan cannot deadlock under NCCL's point-to-point rules, by playing its operations through them.

NCCL's rules, as :func:`check_program` plays them (tags play no part anywhere):

- Messages are matched by order alone: the ``k``-th send from rank ``a`` to rank ``b`` meets the ``k``-th receive
  on ``b`` from ``a``. Both must name the same message, or data lands in the wrong place.
- An operation is a rendezvous: it completes only when its partner has started too (NCCL may finish a small send
  into a buffer, but nothing may rely on it).
- ``model="stream"``: a rank's groups (one ``batch_isend_irecv`` each) run on one stream in issue order: a group
  starts when the one before it has completed, and completes when every operation in it has met its partner. This
  is how ProcessGroupNCCL runs batched point-to-point operations (one communicator and stream per device for the
  whole group), and what the transport's strict CPU mode emulates on gloo.
- ``model="pair"``: the rule as the issue states it for NCCL's single (unbatched) operations: one stream per pair
  of ranks, an operation starts once the operations the rank issued before it towards that peer, in earlier
  groups, have completed (a receive blocks what follows it until matched); the host waits only for receives.

Both are rendezvous systems in which every rule only adds waits, so whatever completes under ``"stream"`` completes
under ``"pair"`` and on gloo (which needs no more than a posted receive): ``"stream"`` is the one to prove, and the
tests prove both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .actions import Schedule
from .rules import ScheduleError
from .transfers import CommPlan, Transfer, comm_plan

__all__ = ["P2POrderError", "WireOp", "Group", "MODELS", "wire_program", "check_program", "check_comm_plan",
           "check_schedule_p2p"]

MODELS = ("stream", "pair")


class P2POrderError(ScheduleError):
    """Point-to-point operations that NCCL would mismatch or leave blocked for ever."""


class WireOp(NamedTuple):
    """One point-to-point operation a rank issues."""

    send: bool
    peer: int
    message: tuple  # the message's identity; both ends must name it alike

    def __str__(self) -> str:
        name = _name(self.message)
        return f"send {name} to rank {self.peer}" if self.send else f"receive {name} from rank {self.peer}"


def _name(message: tuple) -> str:
    if len(message) == 3 and isinstance(message[0], str):
        kind, stage, mb = message
        return f"{stage}{kind}{mb}"
    return str(message)


@dataclass(frozen=True)
class Group:
    """Operations a rank issues at once; ``where`` says where in the rank's plan (for error messages).

    Before issuing its next group the rank's host waits for this group's receives, or, where ``waits_for`` is given,
    for the operations (of this group or earlier ones) that move those messages: ``()`` issues on at once, as a
    transport that posts receives ahead does. ``barrier``: it waits for everything it issued so far (the end of a
    synchronous step). Under ``"stream"`` a group completes as a whole before the next starts, whatever the host
    waits for."""

    ops: tuple[WireOp, ...]
    where: str
    barrier: bool = False
    waits_for: tuple[tuple, ...] | None = None


def wire_program(phases: Sequence[tuple[CommPlan, int, bool]]) -> list[list[Group]]:
    """Each rank's groups for ``phases`` run one after the other, as the executor issues them: ``(plan, first
    micro-batch id, whether the rank waits for its sends at the end)``. Micro-batch ids become global (``first id +
    id``), so a message carried from one phase to the next is one message on both ends."""
    num_ranks = phases[0][0].schedule.num_ranks
    program: list[list[Group]] = [[] for _ in range(num_ranks)]
    for plan, first_id, barrier in phases:
        name = plan.schedule.name
        for rank, steps in enumerate(plan.steps):
            for index, step in enumerate(steps):
                ops = tuple([WireOp(True, t.dst, _globally(t, first_id)) for t in step.sends]
                            + [WireOp(False, t.src, _globally(t, first_id)) for t in step.recvs])
                if ops:
                    where = f"{name} before {step.action}" if step.action else f"{name} after its last action"
                    program[rank].append(Group(ops, where))
            if barrier:
                program[rank].append(Group((), f"the end of {name} (waits for its sends)", barrier=True))
    return program


def _globally(transfer: Transfer, first_id: int) -> tuple[str, int, int]:
    return (transfer.kind, transfer.stage, transfer.microbatch + first_id)


def _partners(program: list[list[Group]]) -> dict[tuple[int, int, int], tuple[int, int, int]]:
    """``(rank, group, op) -> (rank, group, op)`` of its partner; raises if the two ends disagree on an order."""
    sends: dict[tuple[int, int], list[tuple[int, int, WireOp]]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[tuple[int, int, WireOp]]] = defaultdict(list)
    for rank, groups in enumerate(program):
        for g, group in enumerate(groups):
            for o, op in enumerate(group.ops):
                if op.send:
                    sends[(rank, op.peer)].append((g, o, op))
                else:
                    recvs[(op.peer, rank)].append((g, o, op))
    partner = {}
    for pair in sends.keys() | recvs.keys():
        src, dst = pair
        out, into = sends.get(pair, []), recvs.get(pair, [])
        for k in range(max(len(out), len(into))):
            if k >= len(out):
                raise P2POrderError(f"rank {dst} {into[k][2]} ({program[dst][into[k][0]].where}), but rank {src} sends "
                                    f"it only {len(out)} messages")
            if k >= len(into):
                raise P2POrderError(f"rank {src} {out[k][2]} ({program[src][out[k][0]].where}), but rank {dst} posts "
                                    f"only {len(into)} receives from it")
            (g1, o1, a), (g2, o2, b) = out[k], into[k]
            if a.message != b.message:
                raise P2POrderError(
                    f"message {k} from rank {src} to rank {dst} does not match (NCCL matches by order, not by tag): "
                    f"rank {src} sends {_name(a.message)} ({program[src][g1].where}) where rank {dst} receives "
                    f"{_name(b.message)} ({program[dst][g2].where})")
            partner[(src, g1, o1)] = (dst, g2, o2)
            partner[(dst, g2, o2)] = (src, g1, o1)
    return partner


def check_program(program: list[list[Group]], model: str = "stream") -> None:
    """Play ``program`` by NCCL's rules (see the module docstring); raise :class:`P2POrderError` naming the stuck
    ranks and operations if it mismatches a message or cannot run to its end."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    partner = _partners(program)
    (_play_stream if model == "stream" else _play_pairs)(program, partner)


def _play_stream(program: list[list[Group]], partner: dict) -> None:
    position = [0] * len(program)  # each rank's current group: issued, not yet complete
    met: set[tuple[int, int, int]] = set()
    progressed = True
    while progressed:
        progressed = False
        for rank, groups in enumerate(program):
            while position[rank] < len(groups):
                g = position[rank]
                complete = True
                for o in range(len(groups[g].ops)):
                    if (rank, g, o) in met:
                        continue
                    peer, pg, po = partner[(rank, g, o)]
                    if position[peer] == pg:  # both are on their streams now: they meet
                        met.add((rank, g, o))
                        met.add((peer, pg, po))
                    else:
                        complete = False
                if not complete:
                    break
                position[rank] += 1
                progressed = True
    lines = []
    for rank, groups in enumerate(program):
        if position[rank] == len(groups):
            continue
        g = position[rank]
        for o, op in enumerate(groups[g].ops):
            if (rank, g, o) not in met:
                peer, pg, _ = partner[(rank, g, o)]
                there = (f"rank {peer} is at {program[peer][position[peer]].where}"
                         if position[peer] < len(program[peer]) else f"rank {peer} has ended")
                lines.append(f"rank {rank}, {groups[g].where}: its {op} waits for rank {peer} to get to "
                             f"{program[peer][pg].where}, but {there}")
    if lines:
        raise P2POrderError("deadlock under NCCL's rules (one stream per rank, its groups in issue order):\n  "
                            + "\n  ".join(lines))


def _play_pairs(program: list[list[Group]], partner: dict) -> None:
    num_ranks = len(program)
    fifo: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)  # (rank, peer) -> ops in issue order
    place: dict[tuple[int, int, int], tuple[tuple[int, int], int]] = {}
    for rank, groups in enumerate(program):
        for g, group in enumerate(groups):
            for o, op in enumerate(group.ops):
                key = (rank, op.peer)
                place[(rank, g, o)] = (key, len(fifo[key]))
                fifo[key].append((g, o))
    done: set[tuple[int, int, int]] = set()
    head: dict[tuple[int, int], int] = defaultdict(int)  # first op of each queue not yet complete
    issued = [0] * num_ranks  # groups each rank's host has issued
    pending: list[list[tuple[int, int, int]]] = [[] for _ in range(num_ranks)]

    def blocker(ref: tuple[int, int, int]) -> tuple[int, int] | None:
        """The op of an earlier group that ``ref`` waits behind on its pair's stream, if any."""
        key, index = place[ref]
        queue, first = fifo[key], head[key]
        while first < len(queue) and (key[0], *queue[first]) in done:
            first += 1
        head[key] = first
        return queue[first] if first < index and queue[first][0] != ref[1] else None

    def started(ref: tuple[int, int, int]) -> bool:
        return ref[1] < issued[ref[0]] and blocker(ref) is None

    def ready(rank: int, g: int) -> bool:  # may the host issue the group after g?
        group = program[rank][g]
        if group.barrier:
            return not pending[rank]
        if group.waits_for is None:
            return all((rank, g, o) in done for o, op in enumerate(group.ops) if not op.send)
        wanted = set(group.waits_for)
        return all((rank, gg, o) in done for gg in range(g + 1) for o, op in enumerate(program[rank][gg].ops)
                   if op.message in wanted)

    def issue(rank: int) -> None:
        g = issued[rank]
        pending[rank].extend((rank, g, o) for o in range(len(program[rank][g].ops)))
        issued[rank] += 1

    for rank in range(num_ranks):
        if program[rank]:
            issue(rank)
    progressed = True
    while progressed:
        progressed = False
        for rank in range(num_ranks):
            for ref in pending[rank]:
                if ref not in done and started(ref) and started(partner[ref]):
                    done.update((ref, partner[ref]))
                    progressed = True
            pending[rank] = [ref for ref in pending[rank] if ref not in done]
            while 0 < issued[rank] < len(program[rank]) and ready(rank, issued[rank] - 1):
                issue(rank)
                progressed = True
    lines = []
    for rank, groups in enumerate(program):
        finished = issued[rank] == len(groups) and (not groups or ready(rank, len(groups) - 1)) and not pending[rank]
        if finished:
            continue
        at = groups[issued[rank] - 1].where
        for ref in pending[rank][:4]:
            op = groups[ref[1]].ops[ref[2]]
            behind = blocker(ref)
            peer, pg, _ = partner[ref]
            why = (f"is queued behind its {groups[behind[0]].ops[behind[1]]} ({groups[behind[0]].where})" if behind
                   else f"waits for rank {peer} to start the matching operation ({program[peer][pg].where})")
            lines.append(f"rank {rank}, host at {at}: its {op} ({groups[ref[1]].where}) {why}")
    if lines:
        raise P2POrderError("deadlock under NCCL's rules (one stream per pair of ranks, operations in issue order):"
                            "\n  " + "\n  ".join(lines))


def check_comm_plan(phases: Sequence[tuple[CommPlan, int, bool]], model: str = "stream") -> None:
    """Check the plans of ``phases``, run one after the other (see :func:`wire_program`), under ``model``."""
    check_program(wire_program(phases), model)


def check_schedule_p2p(schedule: Schedule, model: str = "stream") -> None:
    """The comm plan of a synchronous schedule (one batch; the executor waits for its sends at the end) runs under
    NCCL's rules."""
    check_comm_plan([(comm_plan(schedule), 0, True)], model)
