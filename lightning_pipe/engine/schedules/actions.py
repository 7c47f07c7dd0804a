"""Actions and the Schedule that orders them: the data every schedule function returns.

A :class:`Schedule` holds each rank's ordered list of :class:`Action` for one batch. Schedule functions order only
the *compute* actions of every rank; :func:`add_communication` then inserts the sends and receives the same way for
all of them: a receive right before the action that needs the data, a send right after the action that produced it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Op", "Action", "Schedule", "COMPUTE_OPS", "add_communication", "check_sizes"]


class Op(str, enum.Enum):
    """What an action does. Compute ops print as one letter; communication ops as their name."""

    FORWARD = "F"
    BACKWARD = "B"  # input gradient and weight gradient together
    BACKWARD_INPUT = "I"  # input gradient only (zero-bubble schedules)
    BACKWARD_WEIGHT = "W"  # weight gradient of an earlier BACKWARD_INPUT
    SEND_ACTIVATION = "SEND_F"
    RECV_ACTIVATION = "RECV_F"
    SEND_GRAD = "SEND_B"
    RECV_GRAD = "RECV_B"
    OPTIMIZER = "O"  # update this stage's weights (asynchronous schedules, inside the action list)

    def __str__(self) -> str:
        return self.value


COMPUTE_OPS = frozenset({Op.FORWARD, Op.BACKWARD, Op.BACKWARD_INPUT, Op.BACKWARD_WEIGHT})


class Action(NamedTuple):
    """One unit of a rank's work: ``Action(2, Op.FORWARD, 0)`` prints as ``2F0``."""

    stage: int
    op: Op
    microbatch: int  # negative in an asynchronous schedule's steady state: a micro-batch of the batch before

    def __str__(self) -> str:
        return f"{self.stage}{self.op.value}{self.microbatch}"

    @property
    def described(self) -> str:
        """The action in words, for messages: ``"stage 2's forward of micro-batch 0"``."""
        what = {Op.FORWARD: "forward", Op.BACKWARD: "backward", Op.BACKWARD_INPUT: "input-gradient backward",
                Op.BACKWARD_WEIGHT: "weight-gradient backward", Op.SEND_ACTIVATION: "send of the output",
                Op.RECV_ACTIVATION: "receive of the input", Op.SEND_GRAD: "send of the input's gradient",
                Op.RECV_GRAD: "receive of the output's gradient", Op.OPTIMIZER: "optimizer step"}[self.op]
        batch = "" if self.op is Op.OPTIMIZER else \
            f" of micro-batch {self.microbatch}" if self.microbatch >= 0 else \
            f" of micro-batch {self.microbatch} (the batch before's)"
        return f"stage {self.stage}'s {what}{batch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Read ``"2F0"`` or ``"1SEND_B3"`` back into an action."""
        for op in sorted(Op, key=lambda o: -len(o.value)):
            head, sep, tail = text.partition(op.value)
            if sep and head.isdigit() and tail.lstrip("-").isdigit():
                return cls(int(head), op, int(tail))
        raise ValueError(f"cannot read action {text!r}; write stage, op, micro-batch, e.g. '2F0' or '1SEND_B3'")


@dataclass(frozen=True)
class Schedule:
    """Every rank's ordered actions for one batch, and which rank holds which stage."""

    name: str
    num_stages: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]  # actions[rank]
    asynchronous: bool = False  # runs across batches without a flush (see schedules_async)
    stage_replicas: tuple[tuple[int, ...], ...] = ()
    """With replicated stages (see schedules_replicated), the ranks of each stage; micro-batch ``j`` of stage ``s``
    runs on ``stage_replicas[s][j % len(stage_replicas[s])]`` (round-robin), and ``stage_to_rank`` names each
    stage's first replica. Empty: one rank per stage, ``stage_to_rank``."""

    @property
    def num_ranks(self) -> int:
        return len(self.actions)

    def rank_of(self, stage: int, microbatch: int) -> int:
        """The rank that runs ``stage`` for ``microbatch``."""
        if self.stage_replicas:
            ranks = self.stage_replicas[stage]
            return ranks[microbatch % len(ranks)]
        return self.stage_to_rank[stage]

    def stages_of(self, rank: int) -> list[int]:
        """The stages held by ``rank``, in increasing order."""
        if self.stage_replicas:
            return [stage for stage, ranks in enumerate(self.stage_replicas) if rank in ranks]
        return [stage for stage, owner in enumerate(self.stage_to_rank) if owner == rank]

    def compute_actions(self, rank: int) -> list[Action]:
        return [action for action in self.actions[rank] if action.op in COMPUTE_OPS]


def add_communication(
    name: str,
    compute: Sequence[Sequence[Action]],
    stage_to_rank: Sequence[int],
    num_microbatches: int,
    stage_replicas: Sequence[Sequence[int]] = (),
) -> Schedule:
    """Insert sends and receives around each rank's compute actions and return the full schedule.

    Data crosses ranks only between neighbouring stages held by different ranks: a forward of stage ``s > 0``
    receives its input from stage ``s - 1`` and a backward (``B`` or ``I``) of a stage other than the last
    receives its output gradient from stage ``s + 1``. Stages on the same rank hand data over in memory.
    ``stage_replicas``: the ranks of each replicated stage (see :attr:`Schedule.stage_replicas`).
    """
    num_stages = len(stage_to_rank)
    last = num_stages - 1
    schedule = Schedule(name, num_stages, num_microbatches, tuple(stage_to_rank), (),
                        stage_replicas=tuple(tuple(ranks) for ranks in stage_replicas))
    owner = schedule.rank_of
    actions: list[tuple[Action, ...]] = []
    for rank, rank_compute in enumerate(compute):
        full: list[Action] = []
        for action in rank_compute:
            stage, op, mb = action
            if op is Op.FORWARD and stage > 0 and owner(stage - 1, mb) != rank:
                full.append(Action(stage, Op.RECV_ACTIVATION, mb))
            if op in (Op.BACKWARD, Op.BACKWARD_INPUT) and stage < last and owner(stage + 1, mb) != rank:
                full.append(Action(stage, Op.RECV_GRAD, mb))
            full.append(action)
            if op is Op.FORWARD and stage < last and owner(stage + 1, mb) != rank:
                full.append(Action(stage, Op.SEND_ACTIVATION, mb))
            if op in (Op.BACKWARD, Op.BACKWARD_INPUT) and stage > 0 and owner(stage - 1, mb) != rank:
                full.append(Action(stage, Op.SEND_GRAD, mb))
        actions.append(tuple(full))
    return dataclasses.replace(schedule, actions=tuple(actions))


def check_sizes(name: str, num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1:
        raise ValueError(f"{name}: num_stages ({num_stages}) must be >= 1")
    if num_microbatches < 1:
        raise ValueError(f"{name}: num_microbatches ({num_microbatches}) must be >= 1")


