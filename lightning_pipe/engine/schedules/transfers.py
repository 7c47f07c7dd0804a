"""The comm plan: each rank's steps, each the sends and receives issued together before one compute action, in an
order both ends of every pair derive alike from the schedule.

NCCL ignores tags, and the operations a rank issues run on one stream in issue order: the ``k``-th message rank
``a`` sends to rank ``b`` is whatever rank ``b`` receives ``k``-th from ``a``. So the order of the messages between
two ranks must be one fact both ends know, not something tags sort out. Here it is the *sender's* order: the order of
the send actions in the sender's list. A receiver needs the messages in its own list's order, which may differ
(interleaved schedules, a stage that receives from two stages of one rank); it then receives the earlier ones of
that peer too, as soon as it needs a later one, and keeps them until their action runs. Receiving early never waits
for anything the needed message did not wait for already, since the sender sent them before it.

A *step* is what a rank issues between two compute actions, as one group (``torch.distributed.batch_isend_irecv``, as
torch.distributed.pipelining and Megatron-LM do): the sends of the compute action before and the receives of the one
after. Sends and receives towards one peer in one group run together, so two ranks that exchange an activation and a
gradient at the same point do not wait on each other's send. A receive is posted no earlier than that, unless its
sender would otherwise wait on it for ever (NCCL's sends are rendezvous): :func:`comm_plan` plays the plan by NCCL's
rules and moves only those receives forward, into the step where the receiver waits. Posting receives ahead as a
habit is what deadlocks: a receive posted early sits in the stream in front of the sends that follow it, and if the
peer needs one of those sends before it can send what that receive waits for, both ranks stop (a 2-rank
``pipedream`` run did so in its first step). :func:`~.ordering.check_comm_plan` proves, independently, that no
registered schedule's plan can stop under NCCL's rules.

Each transfer is exactly one message on this ordered wire (see :mod:`lightning_pipe.engine.wire` for how a changed
shape keeps it so), which is what lets one group per step be the whole story.

The asynchronous schedules run in phases (start, steady states, drain): a gradient sent in one batch's last steps
may be received in the next batch's list. Such a message is *carried*: :func:`carried_out` lists the messages of a
phase that a later phase receives, in the sender's order, and the plan of that later phase puts them first on their
pair, ahead of its own (``comm_plan(phase, carried_in=...)``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .actions import Action, Op, Schedule

__all__ = ["Transfer", "Step", "CommPlan", "comm_plan", "carried_out", "shift"]


class Transfer(NamedTuple):
    """One message between two ranks: stage ``stage``'s activation (``"F"``) or input gradient (``"B"``) of
    ``microbatch``, sent by rank ``src`` to rank ``dst``."""

    kind: str
    stage: int  # the sending stage
    microbatch: int
    src: int
    dst: int

    @property
    def channel(self) -> tuple[str, int]:
        """Which stream of like messages this one continues (its shapes usually repeat the previous one's)."""
        return (self.kind, self.stage)

    @property
    def key(self) -> tuple[str, int, int]:
        """The message's identity, as :func:`~.rules.message_key` names it."""
        return (self.kind, self.stage, self.microbatch)

    @property
    def receiving_stage(self) -> int:
        return self.stage + 1 if self.kind == "F" else self.stage - 1

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch} ({self.src}->{self.dst})"


class Step(NamedTuple):
    """What a rank issues at once before ``action`` (``None``: after its last action): the sends of the compute
    action before it and the receives that ``action`` needs, or that a sender waits on (see :func:`comm_plan`), in
    wire order."""

    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]
    action: Action | None


@dataclass(frozen=True)
class CommPlan:
    """Every rank's steps for one schedule (or one phase of an asynchronous one)."""

    schedule: Schedule
    steps: tuple[tuple[Step, ...], ...]  # steps[rank]
    leaving: frozenset[tuple[str, int, int]] = frozenset()
    """Keys of the messages sent here but received by the next phase (see :func:`carried_out`)."""

    def wire_order(self, src: int, dst: int) -> list[Transfer]:
        """The messages ``src`` sends ``dst`` in this plan, in the order they leave."""
        return [t for step in self.steps[src] for t in step.sends if t.dst == dst]


def _transfer(schedule: Schedule, rank: int, action: Action) -> Transfer:
    stage, op, mb = action
    if op is Op.SEND_ACTIVATION:
        return Transfer("F", stage, mb, rank, schedule.rank_of(stage + 1, mb))
    if op is Op.SEND_GRAD:
        return Transfer("B", stage, mb, rank, schedule.rank_of(stage - 1, mb))
    if op is Op.RECV_ACTIVATION:
        return Transfer("F", stage - 1, mb, schedule.rank_of(stage - 1, mb), rank)
    return Transfer("B", stage + 1, mb, schedule.rank_of(stage + 1, mb), rank)


def _sends_by_pair(schedule: Schedule) -> dict[tuple[int, int], list[Transfer]]:
    pairs: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    for rank, actions in enumerate(schedule.actions):
        for action in actions:
            if action.op in (Op.SEND_ACTIVATION, Op.SEND_GRAD):
                transfer = _transfer(schedule, rank, action)
                pairs[(transfer.src, transfer.dst)].append(transfer)
    return pairs


def carried_out(schedule: Schedule) -> dict[tuple[int, int], list[Transfer]]:
    """The messages ``schedule`` sends but does not receive (a later phase does), per ``(src, dst)`` in send order."""
    received = {_transfer(schedule, rank, a).key for rank, actions in enumerate(schedule.actions) for a in actions
                if a.op in (Op.RECV_ACTIVATION, Op.RECV_GRAD)}
    out = {}
    for pair, sends in _sends_by_pair(schedule).items():
        left = [t for t in sends if t.key not in received]
        if left:
            out[pair] = left
    return out


def shift(transfers: Mapping[tuple[int, int], Sequence[Transfer]],
          offset: int) -> dict[tuple[int, int], list[Transfer]]:
    """``transfers`` with their micro-batch ids moved by ``offset`` (a phase numbers them from its first batch)."""
    return {pair: [t._replace(microbatch=t.microbatch + offset) for t in ts] for pair, ts in transfers.items()}


def _steps_of(schedule: Schedule, index: dict) -> tuple[list, list, list]:
    """Each rank's compute actions (``None`` after the last, if messages follow it), the sends issued before each (of
    the action before it) and the receives each needs, in the action lists' order."""
    from .rules import ScheduleError

    actions: list[list[Action | None]] = []
    sends: list[list[list[Transfer]]] = []
    needs: list[list[list[Transfer]]] = []
    for rank, rank_actions in enumerate(schedule.actions):
        actions.append([]), sends.append([]), needs.append([])
        pending_sends: list[Transfer] = []
        pending_needs: list[Transfer] = []
        for action in rank_actions:
            if action.op in (Op.SEND_ACTIVATION, Op.SEND_GRAD):
                pending_sends.append(_transfer(schedule, rank, action))
            elif action.op in (Op.RECV_ACTIVATION, Op.RECV_GRAD):
                transfer = _transfer(schedule, rank, action)
                if transfer.key not in index:
                    raise ScheduleError(f"{schedule.name}: rank {rank} receives {transfer}, which rank {transfer.src} "
                                        f"never sends it")
                pending_needs.append(transfer)
            else:
                actions[rank].append(action), sends[rank].append(pending_sends), needs[rank].append(pending_needs)
                pending_sends, pending_needs = [], []
        if pending_sends or pending_needs:
            actions[rank].append(None), sends[rank].append(pending_sends), needs[rank].append(pending_needs)
    return actions, sends, needs


def comm_plan(schedule: Schedule,
              carried_in: Mapping[tuple[int, int], Iterable[Transfer]] | None = None) -> CommPlan:
    """Each rank's steps for ``schedule``; ``carried_in``: messages an earlier phase sent, per ``(src, dst)`` in
    send order, which this one receives before the pair's own messages.

    Where each receive is posted is found by playing the plan by NCCL's rules (a send completes only when its
    receive is posted): a receive goes in the step of the action that needs it (with the earlier messages of the
    same peer), unless its sender would wait there for ever (the receiver waiting on that sender for something
    else): then it moves into the step where the receiver waits, so that the two ranks meet. That is as late as it
    can be, and a receive posted later cannot stop a send of the receiver (it is met at once).

    Raises :class:`~.rules.ScheduleError` if the plan cannot run: a message never sent, or a deadlock.
    """
    from .rules import ScheduleError

    name, num_ranks = schedule.name, schedule.num_ranks
    wire: dict[tuple[int, int], list[Transfer]] = defaultdict(list)  # (src, dst) -> messages in the sender's order
    carried = set()
    for pair, ts in (carried_in or {}).items():
        wire[pair].extend(ts)
        carried.update(t.key for t in ts)
    for pair, ts in _sends_by_pair(schedule).items():
        wire[pair].extend(ts)
    index = {t.key: i for ts in wire.values() for i, t in enumerate(ts)}
    leaving = {t.key for ts in carried_out(schedule).values() for t in ts}
    actions, sends, needs = _steps_of(schedule, index)

    recvs: list[list[list[Transfer]]] = [[[] for _ in steps] for steps in actions]
    taken = [defaultdict(int) for _ in range(num_ranks)]  # rank -> src -> messages of src received so far
    send_at = {t.key: (rank, k) for rank in range(num_ranks) for k, ts in enumerate(sends[rank]) for t in ts}
    recv_at: dict[tuple, tuple[int, int]] = {}
    position = [0] * num_ranks
    met: set[tuple] = set()

    def take(rank: int, k: int, transfer: Transfer) -> None:
        """Receive, in step ``k`` of ``rank``, every message of ``transfer``'s pair up to it not received yet."""
        pair = (transfer.src, rank)
        for t in wire[pair][taken[rank][transfer.src]: index[transfer.key] + 1]:
            recvs[rank][k].append(t)
            recv_at[t.key] = (rank, k)
        taken[rank][transfer.src] = max(taken[rank][transfer.src], index[transfer.key] + 1)

    def enter(rank: int, k: int) -> None:
        if k < len(actions[rank]):
            for transfer in needs[rank][k]:
                take(rank, k, transfer)

    elsewhere = (-1, -1)  # the partner of a message carried between phases: met in the other phase

    def partner(rank: int, transfer: Transfer, send: bool) -> tuple[int, int] | None:
        if transfer.key in (leaving if send else carried):
            return elsewhere
        return recv_at.get(transfer.key) if send else send_at[transfer.key]

    for rank in range(num_ranks):
        enter(rank, 0)
    while True:
        progressed = False
        for rank in range(num_ranks):
            while position[rank] < len(actions[rank]):
                k = position[rank]
                ops = [(t, True) for t in sends[rank][k]] + [(t, False) for t in recvs[rank][k]]
                for transfer, send in ops:
                    there = partner(rank, transfer, send)
                    if there is None or (there != elsewhere and transfer.key not in met
                                         and position[there[0]] != there[1]):
                        break  # the partner is not posted (yet)
                    met.add(transfer.key)
                else:
                    position[rank] += 1
                    enter(rank, k + 1)
                    progressed = True
                    continue
                break
        if all(position[r] == len(actions[r]) for r in range(num_ranks)):
            break
        if progressed:
            continue
        # Stuck: a sender waiting on a receive its peer has not reached; post that receive where the peer waits.
        for rank in range(num_ranks):
            if position[rank] == len(actions[rank]):
                continue
            for transfer in sends[rank][position[rank]]:
                dst = transfer.dst
                if (transfer.key not in recv_at and transfer.key not in leaving and position[dst] < len(actions[dst])
                        and taken[dst][rank] == index[transfer.key]):
                    take(dst, position[dst], transfer)
                    progressed = True
        if not progressed:
            stuck = ", ".join(f"rank {r} before {actions[r][position[r]]}" for r in range(num_ranks)
                              if position[r] < len(actions[r]))
            raise ScheduleError(f"{name}: the comm plan cannot run under NCCL's rules, even posting receives "
                                f"early: {stuck}")
    for (src, dst), ts in wire.items():
        rest = ts[taken[dst][src]:]
        if any(t.key not in leaving for t in rest):
            raise ScheduleError(f"{name}: rank {dst} never receives {rest[0]} from rank {src}")
    steps = tuple(tuple(Step(tuple(sends[rank][k]), tuple(recvs[rank][k]), actions[rank][k])
                        for k in range(len(actions[rank]))) for rank in range(num_ranks))
    return CommPlan(schedule, steps, frozenset(leaving))
