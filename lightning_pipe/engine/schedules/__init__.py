"""Pipeline schedules as data, and the registry that names them with the facts every check asks.

A schedule is a pure function ``(num_stages, num_microbatches, **options) -> Schedule``: each rank's ordered list of
actions for one batch, the single source of truth for the order of work. The executor follows it action by action and
decides nothing itself; the rule checks (:mod:`.rules`) and the simulator read the same lists.

What a schedule *is* (asynchronous, splits the backward, several stages per rank, runs replicated stages, allows
re-materialization) is said once, on its :class:`ScheduleKind` here; the strategy, the executor and the planner ask
:func:`schedule_kind` instead of comparing names.

The modules below: :mod:`.actions` (Op, Action, Schedule, add_communication), :mod:`.basic` (gpipe, 1f1b,
forward-only), :mod:`.zoo` (interleaved 1F1B, ZB-H1, ZB-V), :mod:`.asynchronous` (PipeDream, 2BW),
:mod:`.replicated` (stages on several ranks taking micro-batches in turn), :mod:`.rules` (checks, simulation, grid).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from .actions import COMPUTE_OPS, Action, Op, Schedule, add_communication
from .asynchronous import async_1f1b, two_bw
from .basic import forward_only, gpipe, one_f_one_b
from .replicated import REPLICATED_SCHEDULES
from .zoo import interleaved_1f1b, zb_h1, zb_v

__all__ = ["Op", "Action", "Schedule", "COMPUTE_OPS", "add_communication", "gpipe", "one_f_one_b", "forward_only",
           "ScheduleKind", "SCHEDULES", "SCHEDULE_ALIASES", "register_schedule", "schedule_kind", "get_schedule",
           "training_schedules", "registered_name"]

ScheduleFn = Callable[..., Schedule]


@dataclass(frozen=True)
class ScheduleKind:
    """A registered schedule: how to build it, and what it is."""

    name: str
    build: ScheduleFn
    """``build(num_stages, num_microbatches, **options) -> Schedule``."""
    trains: bool = True
    """Has backwards (``forward_only`` does not: evaluation)."""
    asynchronous: bool = False
    """Runs across batches without a flush and steps the optimizer inside the pipeline (PipeDream)."""
    double_buffered: bool = False
    """PipeDream-2BW's weights: batch ``b`` after a drain runs on the weights after batch ``b - 2``'s update."""
    vertical_sync: bool = False
    """Can run every stage of a micro-batch on the weight version stage 0 used (``vertical_sync=True``)."""
    splits_backward: bool = False
    """Splits each backward into an input-gradient ``I`` and a weight-gradient ``W`` action (zero-bubble)."""
    stages_per_rank: int | None = 1
    """Stages each rank holds; ``None``: set by an option (``virtual_stages``)."""
    replicated: bool = False
    """Has a round-robin form for stages with several ranks each (uneven replication, PipeDream's 3-1)."""

    @property
    def rematerializes(self) -> bool:
        """Whether forwards may be recomputed in the backward (``checkpoint_activations``): not with a split
        backward, whose two halves both need the saved activations."""
        return self.trains and not self.splits_backward

    @property
    def options(self) -> list[str]:
        """The options ``build`` takes besides the sizes."""
        return [name for name in inspect.signature(self.build).parameters if name not in ("num_stages",
                                                                                           "num_microbatches")]


SCHEDULES: dict[str, ScheduleKind] = {}


def register_schedule(kind: ScheduleKind) -> None:
    """Make a schedule available by ``kind.name`` (``Pipeline(schedule=...)``, ``PipelineStrategy(schedule=...)``)."""
    SCHEDULES[kind.name] = kind


for _kind in (
    ScheduleKind("gpipe", gpipe, replicated="gpipe" in REPLICATED_SCHEDULES),
    ScheduleKind("1f1b", one_f_one_b, replicated="1f1b" in REPLICATED_SCHEDULES),
    ScheduleKind("forward_only", forward_only, trains=False),
    ScheduleKind("interleaved_1f1b", interleaved_1f1b, stages_per_rank=None),
    ScheduleKind("zb_h1", zb_h1, splits_backward=True),
    ScheduleKind("zb_v", zb_v, splits_backward=True, stages_per_rank=2),
    ScheduleKind("async_1f1b", async_1f1b, asynchronous=True, vertical_sync=True),
    ScheduleKind("2bw", two_bw, asynchronous=True, double_buffered=True),
):
    register_schedule(_kind)


# other names users know the schedules by: PipeDream's and the interleaved schedule's short name
SCHEDULE_ALIASES = {"pipedream": "1f1b", "pipedream_async": "async_1f1b", "pipedream_2bw": "2bw",
                    "interleaved": "interleaved_1f1b", "interleaved1f1b": "interleaved_1f1b"}


def registered_name(name: str) -> str:
    """The registered name of the schedule ``name`` names in any case ("GPipe", "1F1B") or by an alias; ``name`` as
    it is where it names none."""
    if name in SCHEDULES:  # (a schedule registered under an alias's name is that schedule)
        return name
    key = name.lower() if isinstance(name, str) else name
    return key if key in SCHEDULES else SCHEDULE_ALIASES.get(key, name)


def schedule_kind(name: str) -> ScheduleKind:
    """The registered schedule ``name``; says which names exist if it is not one."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(sorted(SCHEDULES))}") from None


def training_schedules(asynchronous: bool = False) -> list[str]:
    """Names of the schedules that train, synchronous (or asynchronous) ones, in registry order."""
    return [kind.name for kind in SCHEDULES.values() if kind.trains and kind.asynchronous == asynchronous]


def get_schedule(name: str, num_stages: int, num_microbatches: int, **options: int) -> Schedule:
    """Build the schedule registered as ``name``."""
    kind = schedule_kind(name)
    accepted = inspect.signature(kind.build).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(param.kind is param.VAR_KEYWORD for param in accepted.values()):
        raise ValueError(f"schedule {name!r} takes no option {', '.join(unknown)}; "
                         f"it takes: {', '.join(kind.options) or 'no options'}")
    return kind.build(num_stages, num_microbatches, **options)
