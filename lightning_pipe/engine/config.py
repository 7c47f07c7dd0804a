"""How a pipeline runs: schedule, micro-batches, partition and the schedule's options, as one checked, frozen value."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cut import Partition
from .schedules import SCHEDULES, ScheduleKind, schedule_kind
from .schedules.replicated import REPLICATED_SCHEDULES, check_replicas
from .watchdog import DEFAULT_WAIT_TIMEOUT

__all__ = ["PipelineConfig"]


class ReadOnly(Mapping):
    """A read-only dict (a config's options) that, unlike ``types.MappingProxyType``, pickles and deep-copies: a
    strategy kept in a module's hyper-parameters is (neuralforecast's models save their Trainer's arguments so)."""

    __slots__ = ("_items",)

    def __init__(self, items: Any = ()) -> None:
        object.__setattr__(self, "_items", dict(items))

    def __getitem__(self, key: Any) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self._items,)

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True)
class PipelineConfig:
    """What the engine needs to know to cut layers and run them; checked where it is made.

    ``Pipeline(layers, config=PipelineConfig(...))``, or the same fields as keywords of ``Pipeline``. Two configs are
    equal when they would run the same pipeline (a strategy compares them to decide whether a module cut earlier can
    be reused).
    """

    schedule: str = "1f1b"
    """A registered schedule name (:mod:`lightning_pipe.engine.schedules`)."""
    num_microbatches: int = 4
    """Micro-batches each batch is split into along dim 0."""
    partition: Partition = "uniform"
    """``"uniform"``, ``"parameters"`` or layer counts per stage (a list is stored as a tuple)."""
    checkpoint_activations: bool = False
    """Keep only each stage's input in forward and recompute the rest in backward (GPipe's re-materialization)."""
    schedule_options: Mapping[str, int] = field(default_factory=dict)
    """Extra arguments of the schedule, e.g. ``{"virtual_stages": 2}``."""
    vertical_sync: bool = False
    """``async_1f1b`` only: every stage runs a micro-batch on the weight version stage 0 used for it."""
    replicas: tuple[int, ...] | None = None
    """Ranks per stage (uneven replication, PipeDream's 3-1), numbered stage by stage; ``None``: one each."""
    deferred_batchnorm: bool = True
    """Batch norms update their running statistics once per step, with the whole batch's statistics, and never in a
    recomputation (GPipe's deferred batch norm, :mod:`.batchnorm`); ``False`` leaves them plain: each micro-batch's
    forward updates them, and a re-materialized forward a second time."""
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT
    """Seconds any one wait for another rank (a message, a step's collective) may last before it fails with an error
    that names the rank that stopped answering and what was awaited (:mod:`.watchdog`)."""
    detect_anomaly: bool = False
    """Check every step for a non-finite loss or gradient, and fail on every rank with the step, micro-batch and
    stage where it first appeared (:mod:`.anomaly`); synchronous schedules."""

    def __post_init__(self) -> None:
        kind = self.kind  # an unknown schedule fails here
        if isinstance(self.wait_timeout, bool) or not isinstance(self.wait_timeout, (int, float)) \
                or not self.wait_timeout > 0:
            raise ValueError(f"wait_timeout must be a number of seconds > 0 (e.g. 300), got {self.wait_timeout!r}")
        object.__setattr__(self, "wait_timeout", float(self.wait_timeout))
        object.__setattr__(self, "detect_anomaly", bool(self.detect_anomaly))
        if self.detect_anomaly and kind.asynchronous:
            raise ValueError(f"detect_anomaly=True checks each step's gradients before the optimizer steps, which "
                             f"schedule {self.schedule!r} does inside the pipeline; use a synchronous schedule or turn "
                             f"detect_anomaly off")
        if isinstance(self.num_microbatches, bool) or not isinstance(self.num_microbatches, int) \
                or self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be a positive integer, got {self.num_microbatches!r}")
        if not isinstance(self.partition, str):
            object.__setattr__(self, "partition", tuple(int(n) for n in self.partition))
        object.__setattr__(self, "schedule_options", ReadOnly(self.schedule_options))
        if not kind.trains:
            raise ValueError(f"schedule {self.schedule!r} runs no backward and cannot train; choose one of: "
                             f"{', '.join(name for name, k in _kinds() if k.trains)}")
        if self.vertical_sync and not kind.vertical_sync:
            raise ValueError(f"vertical_sync=True applies to schedule "
                             f"{' or '.join(repr(n) for n, k in _kinds() if k.vertical_sync)}, not "
                             f"{self.schedule!r}; drop it or change the schedule")
        if self.checkpoint_activations and not kind.rematerializes:
            raise ValueError(f"checkpoint_activations cannot be combined with schedule {self.schedule!r}, which splits "
                             f"the backward (both halves need the saved activations); turn one of them off")
        if self.replicas is not None:
            object.__setattr__(self, "replicas", tuple(check_replicas(self.replicas)))
            if self.vertical_sync:
                raise ValueError("vertical_sync belongs to the asynchronous schedule async_1f1b, which does not run "
                                 "replicated stages; drop vertical_sync or replicas")
            if not kind.replicated or self.schedule_options:
                options = f" with {dict(self.schedule_options)}" if self.schedule_options else ""
                raise ValueError(f"replicated stages run schedule={' or '.join(map(repr, REPLICATED_SCHEDULES))} "
                                 f"without options, not {self.schedule!r}{options}; change the schedule or drop "
                                 f"replicas")

    @property
    def kind(self) -> ScheduleKind:
        """What the schedule is (asynchronous, splits the backward, ...)."""
        return schedule_kind(self.schedule)

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with ``changes`` (checked again)."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields["schedule_options"] = dict(self.schedule_options)
        fields.update(changes)
        return PipelineConfig(**fields)

    @classmethod
    def of(cls, replicas: Sequence[int] | None = None, **fields: Any) -> PipelineConfig:
        """A config from keywords, where any keyword that is not a field is a schedule option."""
        names = set(cls.__dataclass_fields__)
        options = {key: fields.pop(key) for key in list(fields) if key not in names}
        if options:
            fields["schedule_options"] = {**dict(fields.get("schedule_options") or {}), **options}
        return cls(replicas=None if replicas is None else tuple(replicas), **fields)


def _kinds() -> list[tuple[str, ScheduleKind]]:
    return list(SCHEDULES.items())
