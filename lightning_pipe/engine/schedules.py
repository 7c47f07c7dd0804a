"""Pipeline schedules as data: pure functions from (stages, micro-batches) to each rank's ordered action list.

A schedule is the single source of truth for the order of work. The executor follows it action by action
and decides nothing itself; the rule checks (:mod:`.schedule_rules`) and the simulator read the same lists.

Each schedule function below only orders the *compute* actions of every rank; :func:`add_communication`
then inserts the sends and receives the same way for all of them: a receive right before the action that
needs the data, a send right after the action that produced it. Sends never block; receives do.

Clock cycles of ``gpipe`` with 3 stages and 4 micro-batches (forward and backward drawn as one cycle each)::

    rank 0 | 0F0 0F1 0F2 0F3                         0B0 0B1 0B2 0B3
    rank 1 |     1F0 1F1 1F2 1F3             1B0 1B1 1B2 1B3
    rank 2 |         2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3

and of ``1f1b``: rank ``s`` runs ``stages - s - 1`` warm-up forwards, then alternates one forward and one
backward, then drains the backwards still owed, so it never holds more than ``stages - s`` micro-batches::

    rank 0 | 0F0 0F1 0F2             0B0 0F3     0B1     0B2     0B3
    rank 1 |     1F0 1F1     1B0 1F2     1B1 1F3     1B2     1B3
    rank 2 |         2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "Op",
    "Action",
    "Schedule",
    "COMPUTE_OPS",
    "add_communication",
    "gpipe",
    "one_f_one_b",
    "forward_only",
    "SCHEDULES",
    "register_schedule",
    "get_schedule",
]


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

    def __str__(self) -> str:
        from .schedule_rules import format_grid

        return format_grid(self)


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


def _check_sizes(name: str, num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1:
        raise ValueError(f"{name}: num_stages ({num_stages}) must be >= 1")
    if num_microbatches < 1:
        raise ValueError(f"{name}: num_microbatches ({num_microbatches}) must be >= 1")


def gpipe(num_stages: int, num_microbatches: int, stage_to_rank: Sequence[int] | None = None) -> Schedule:
    """GPipe's fill-drain: every forward of the batch, then every backward. Holds all m micro-batches.

    ``stage_to_rank`` places several stages on one rank (default: stage ``s`` on rank ``s``); a rank then runs
    its stages' forwards in stage order and their backwards in reverse order. Any ``m`` works for any
    placement, so this is also the fallback for a last partial batch that a schedule cannot split.
    """
    _check_sizes("gpipe", num_stages, num_microbatches)
    owners = list(stage_to_rank) if stage_to_rank is not None else list(range(num_stages))
    compute: list[list[Action]] = [[] for _ in range(max(owners) + 1)]
    for stage in range(num_stages):
        compute[owners[stage]].extend(Action(stage, Op.FORWARD, mb) for mb in range(num_microbatches))
    for stage in reversed(range(num_stages)):
        compute[owners[stage]].extend(Action(stage, Op.BACKWARD, mb) for mb in range(num_microbatches))
    return add_communication("gpipe", compute, owners, num_microbatches)


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """PipeDream-Flush (1F1B): same bubble as GPipe, but stage ``s`` holds at most ``p - s`` micro-batches."""
    _check_sizes("1f1b", num_stages, num_microbatches)
    compute = []
    for stage in range(num_stages):
        num_warmup = min(num_stages - stage - 1, num_microbatches)
        num_steady = num_microbatches - num_warmup
        actions = []
        # Warm-up: forwards only, filling the pipeline below this stage.
        for mb in range(num_warmup):
            actions.append(Action(stage, Op.FORWARD, mb))
        # Steady state: one forward, then the backward of the oldest micro-batch in flight.
        for i in range(num_steady):
            actions.append(Action(stage, Op.FORWARD, num_warmup + i))
            actions.append(Action(stage, Op.BACKWARD, i))
        # Cool-down: the backwards still owed.
        for mb in range(num_steady, num_microbatches):
            actions.append(Action(stage, Op.BACKWARD, mb))
        compute.append(actions)
    return add_communication("1f1b", compute, range(num_stages), num_microbatches)


def forward_only(
    num_stages: int, num_microbatches: int, stage_to_rank: Sequence[int] | None = None
) -> Schedule:
    """Forwards only, stage by stage and micro-batch by micro-batch: evaluation and prediction.

    ``stage_to_rank`` places several stages on one rank (default: stage ``s`` on rank ``s``).
    """
    _check_sizes("forward_only", num_stages, num_microbatches)
    owners = list(stage_to_rank) if stage_to_rank is not None else list(range(num_stages))
    compute: list[list[Action]] = [[] for _ in range(max(owners) + 1)]
    for stage in range(num_stages):
        compute[owners[stage]].extend(Action(stage, Op.FORWARD, mb) for mb in range(num_microbatches))
    return add_communication("forward_only", compute, owners, num_microbatches)


ScheduleFn = Callable[..., Schedule]

SCHEDULES: dict[str, ScheduleFn] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "forward_only": forward_only,
}


def register_schedule(name: str, fn: ScheduleFn) -> None:
    """Make ``fn(num_stages, num_microbatches, **options)`` available by ``name``."""
    SCHEDULES[name] = fn


def get_schedule(name: str, num_stages: int, num_microbatches: int, **options: int) -> Schedule:
    """Build the schedule registered as ``name``."""
    try:
        fn = SCHEDULES[name]
    except KeyError:
        known = ", ".join(sorted(SCHEDULES))
        raise ValueError(f"unknown schedule {name!r}; choose one of: {known}") from None
    accepted = inspect.signature(fn).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(param.kind is param.VAR_KEYWORD for param in accepted.values()):
        takes = [arg for arg in accepted if arg not in ("num_stages", "num_microbatches")]
        raise ValueError(f"schedule {name!r} takes no option {', '.join(unknown)}; "
                         f"it takes: {', '.join(takes) or 'no options'}")
    return fn(num_stages, num_microbatches, **options)


# Registers interleaved_1f1b, zb_h1, zb_v and the asynchronous schedules; defines the replicated ones. At the end, so
# that the zoo finds everything it imports from here.
from . import schedules_async, schedules_replicated, schedules_zoo  # noqa: E402, F401
