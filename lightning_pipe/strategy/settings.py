"""PipelineStrategy's settings: one frozen value, checked where it is made; each error says how to fix the call.

:class:`PipelineSettings` travels from the strategy's constructor to the engine: the strategy resolves what a planned
cut chooses (partition, schedule, micro-batches, replicas) and asks :meth:`PipelineSettings.engine_config` for the
engine's :class:`~lightning_pipe.engine.config.PipelineConfig`.
"""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from lightning_pipe.engine.config import PipelineConfig, ReadOnly
from lightning_pipe.engine.cut import Partition
from lightning_pipe.engine.schedules import SCHEDULE_ALIASES, SCHEDULES, registered_name, schedule_kind
from lightning_pipe.engine.watchdog import DEFAULT_WAIT_TIMEOUT
from lightning_pipe.planner.cut_plan import AUTO_SCHEDULE, PLANNED_PARTITIONS
from lightning_pipe.strategy.mesh import AUTO, check_replicas
from lightning_pipe.strategy.reduction import check_loss_reduction

__all__ = ["PipelineSettings"]


@dataclass(frozen=True)
class PipelineSettings:
    """What :class:`~lightning_pipe.strategy.PipelineStrategy` was asked for (its arguments are documented there)."""

    schedule: str = "1f1b"
    num_microbatches: int = 4
    partition: Partition = "uniform"
    layers: str | None = None
    checkpoint_activations: bool = False
    schedule_options: Mapping[str, int] = field(default_factory=dict)
    vertical_sync: bool = False
    num_stages: int | None = None
    replicas: int | tuple[int, ...] | str | None = None
    memory_cap: float | None = None
    profile_cache: str | os.PathLike[str] | bool | None = None
    split_points: Any = None
    allow_autograd_functions: bool = False
    dynamic_shapes: bool = True
    checkpoint_format: str = "full"
    loss_reduction: str | Callable[[Any], Any] = "auto"
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT
    detect_anomaly: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("schedule", _check_schedule(self.schedule))
        put("schedule_options", _check_schedule_options(self.schedule_options))
        put("num_microbatches", _check_num_microbatches(self.num_microbatches))
        put("partition", _check_partition(self.partition))
        put("memory_cap", _check_planning(self.partition, self.schedule, self.schedule_options, self.memory_cap))
        put("profile_cache", _check_profile_cache(self.profile_cache))
        put("checkpoint_format", _check_checkpoint_format(self.checkpoint_format))
        put("layers", _check_layers(self.layers))
        put("split_points", _check_split_points(self.split_points))
        put("allow_autograd_functions", _check_flag("allow_autograd_functions", self.allow_autograd_functions))
        put("dynamic_shapes", _check_flag("dynamic_shapes", self.dynamic_shapes))
        put("loss_reduction", check_loss_reduction(self.loss_reduction))
        if callable(self.loss_reduction) and self.asynchronous:
            raise ValueError(f"loss_reduction as a function (a mean over what it counts in the batch) needs a "
                             f"synchronous schedule; {self.schedule!r} updates the weights after every micro-batch, "
                             f"each with its own mean: leave loss_reduction='auto'")
        put("checkpoint_activations", _check_flag("checkpoint_activations", self.checkpoint_activations))
        put("vertical_sync", _check_vertical_sync(self.vertical_sync, self.schedule, self.schedule_options))
        put("num_stages", _check_num_stages(self.num_stages))
        put("replicas", check_replicas(self.replicas))
        _check_auto_replicas(self.replicas, self.partition, self.schedule)
        put("wait_timeout", _check_wait_timeout(self.wait_timeout))
        put("detect_anomaly", _check_detect_anomaly(self.detect_anomaly, self.schedule))
        _check_option_names(self.schedule, self.schedule_options)

    @property
    def plans_cut(self) -> bool:
        """Whether a profile decides the cut (``partition="profile" | "time" | "memory"`` or ``schedule="auto"``)."""
        return self.schedule == AUTO_SCHEDULE or self.partition in PLANNED_PARTITIONS

    @property
    def asynchronous(self) -> bool:
        """Whether the schedule steps the optimizer inside the pipeline (PipeDream)."""
        return self.schedule != AUTO_SCHEDULE and schedule_kind(self.schedule).asynchronous

    def engine_config(self, *, partition: Partition | None = None, schedule: str | None = None,
                      num_microbatches: int | None = None, replicas: Sequence[int] | None = None) -> PipelineConfig:
        """The engine's config, with what a planned cut chose in place of ``"auto"`` and the planned partitions."""
        return PipelineConfig(
            schedule=schedule or self.schedule, num_microbatches=num_microbatches or self.num_microbatches,
            partition=self.partition if partition is None else partition,
            checkpoint_activations=self.checkpoint_activations, schedule_options=dict(self.schedule_options),
            vertical_sync=self.vertical_sync, replicas=None if not replicas else tuple(replicas),
            wait_timeout=self.wait_timeout, detect_anomaly=self.detect_anomaly)

    def replace(self, **changes: Any) -> PipelineSettings:
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# The strategy names Lightning knows, as schedules: PipelineStrategy(schedule="pipedream") is Trainer(strategy=
# "pipedream")'s schedule (gpipe is both; its re-materialization stays checkpoint_activations'); and the names people
# use for the interleaved schedule (Megatron's "interleaved", torch's "Interleaved1F1B").


def _check_schedule(schedule: str) -> str:
    """The registered schedule ``schedule`` names, in any case ("GPipe", "1F1B") or by an alias."""
    schedule = registered_name(schedule)
    if schedule != AUTO_SCHEDULE and (schedule not in SCHEDULES or not SCHEDULES[schedule].trains):
        names = ", ".join(name for name, kind in SCHEDULES.items() if kind.trains)
        aliases = ", ".join(f"{alias} ({name})" for alias, name in SCHEDULE_ALIASES.items() if alias.isidentifier()
                            and alias != "interleaved1f1b")
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {names}, or {AUTO_SCHEDULE!r} to let the "
                         f"planner choose (also by the names {aliases})")
    return schedule


def _check_schedule_options(options: Any) -> Mapping[str, int]:
    """``schedule_options`` as a read-only dict of integers (a YAML or command-line value may come quoted: "2" reached
    the schedule's sizes and failed there, a bare TypeError, once the processes ran)."""
    if options is None:
        return ReadOnly({})
    if not isinstance(options, Mapping) or not all(isinstance(name, str) for name in options):
        raise ValueError(f"schedule_options must be a dict of the schedule's option names to integers "
                         f"({{'virtual_stages': 4}} for interleaved_1f1b), got {options!r}")
    for name, value in options.items():  # (sizes are integers; gpipe's stage_to_rank is a list of them)
        if isinstance(value, (bool, str, bytes, float)):
            raise ValueError(f"schedule_options[{name!r}] must be an integer (or a list of them), got {value!r} "
                             f"({type(value).__name__}): give it unquoted (strategy.schedule_options.{name}=4 on the "
                             f"command line, {name}: 4 in YAML)")
    return ReadOnly({name: int(value) if isinstance(value, numbers.Integral) else value
                             for name, value in options.items()})


def _check_option_names(schedule: str, options: Mapping[str, int]) -> None:
    """Refuse ``options`` the ``schedule`` does not take (before any process starts), as the schedule's build would
    (one taking ``**options`` takes any)."""
    if schedule not in SCHEDULES:
        return
    parameters = inspect.signature(SCHEDULES[schedule].build).parameters.values()
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return
    accepted = SCHEDULES[schedule].options
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"schedule {schedule!r} takes no option {', '.join(unknown)}; it takes: "
                         f"{', '.join(accepted) or 'no options'}")


def _check_planning(partition: Partition, schedule: str, schedule_options: dict[str, int] | None,
                    memory_cap: float | None) -> float | None:
    """The memory cap, if the arguments that plan the cut go together."""
    if schedule == AUTO_SCHEDULE:
        if partition not in ("uniform", "profile"):
            raise ValueError(f"schedule='auto' chooses the partition with the schedule; drop partition={partition!r} "
                             f"(or pass partition='profile'), or name a schedule")
        if schedule_options:
            raise ValueError(f"schedule='auto' tries each schedule with its default options and takes no "
                             f"schedule_options (got {schedule_options}); remove them, or name a schedule")
    if partition in ("profile", "memory") and schedule != AUTO_SCHEDULE:
        kind = schedule_kind(schedule)
        per_rank = kind.stages_per_rank or int((schedule_options or {}).get("virtual_stages", 2))
        if per_rank > 1:
            raise ValueError(f"partition={partition!r} places one stage on each device, but schedule {schedule!r} runs "
                             f"{per_rank} stages per rank: use partition='time' with it (a profile balancing the "
                             f"stages' times{', under memory_cap' if partition == 'memory' else ''}), 'uniform', "
                             f"'parameters' or a list of layer counts, or schedule='1f1b'")
    planned = schedule == AUTO_SCHEDULE or partition in PLANNED_PARTITIONS
    if memory_cap is None:
        if partition == "memory":
            raise ValueError("partition='memory' needs memory_cap= (bytes per device), e.g. memory_cap=8e9; or use "
                             "partition='profile'")
        return None
    if not planned:
        raise ValueError(f"memory_cap applies to planned cuts (partition='profile', 'time' or 'memory', or "
                         f"schedule='auto'), not partition={partition!r}; drop it or plan the cut")
    if isinstance(memory_cap, bool) or not isinstance(memory_cap, (int, float)) or not memory_cap > 0:
        raise ValueError(f"memory_cap must be a number of bytes per device > 0 (e.g. 8e9), got {memory_cap!r}")
    return float(memory_cap)


def _check_flag(name: str, value: Any) -> bool:
    """A setting that is True or False (a string such as "false" from a config would be true): refused otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


def _check_vertical_sync(vertical_sync: bool, schedule: str, schedule_options: dict[str, int]) -> bool:
    _check_flag("vertical_sync", vertical_sync)
    kind = schedule_kind(schedule) if schedule != AUTO_SCHEDULE else None
    if vertical_sync and not (kind and kind.vertical_sync):
        raise ValueError(f"vertical_sync=True applies to schedule='async_1f1b' (strategy 'pipedream_async'), not "
                         f"{schedule!r}; drop it or change the schedule")
    if kind and kind.asynchronous and schedule_options:
        raise ValueError(f"schedule={schedule!r} runs one stage per rank and takes no schedule_options (got "
                         f"{schedule_options}); remove them")
    return bool(vertical_sync)


def _check_num_microbatches(num_microbatches: int) -> int:
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")
    return num_microbatches


def _check_partition(partition: Partition) -> Partition:
    names = ("uniform", "parameters", *PLANNED_PARTITIONS)
    if isinstance(partition, str):
        if partition not in names:
            raise ValueError(f"unknown partition {partition!r}; use one of {', '.join(map(repr, names))} or a list of "
                             f"layer counts per stage, e.g. partition=[3, 5]")
        return partition
    if not isinstance(partition, Sequence) or not all(isinstance(n, int) and n >= 1 for n in partition):
        raise ValueError(f"partition {partition!r} must be one of {', '.join(map(repr, names))} or a list of layer "
                         f"counts, each at least 1, one per stage, e.g. partition=[3, 5]")
    return list(partition)


def _check_profile_cache(profile_cache: Any) -> str | os.PathLike[str] | bool | None:
    if not (profile_cache is None or profile_cache is False or isinstance(profile_cache, (str, os.PathLike))):
        raise TypeError(f"profile_cache must be a folder path, None (under the Trainer's default_root_dir) or "
                        f"False (no cache), not {profile_cache!r}")
    return profile_cache


CHECKPOINT_FORMATS = ("full", "sharded")


def _check_checkpoint_format(checkpoint_format: Any) -> str:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be 'full' (one standard file, written by global rank 0) or 'sharded' "
                         f"(a folder every rank writes its own stages into), not {checkpoint_format!r}")
    return checkpoint_format


def _check_layers(layers: Any) -> str | None:
    if layers is not None and not isinstance(layers, str):
        raise TypeError(f"layers must be the attribute path of the model to pipeline (e.g. 'model', or an "
                        f"nn.Sequential's 'model.blocks'), not {type(layers).__name__}")
    return layers


def _check_split_points(split_points: Any) -> Any:
    """Module names (or ``(name, "begin" | "end")`` pairs, or a ``{name: where}`` mapping) where the captured model
    is cut; checked against the model when it is captured."""
    if split_points is None:
        return None
    if isinstance(split_points, str) or not isinstance(split_points, (Sequence, Mapping)) or not split_points:
        raise TypeError(f"split_points must be a non-empty list of module names (e.g. ['model.h.2', 'model.ln_f']) "
                        f"or a mapping name -> 'begin' | 'end', not {split_points!r}")
    if isinstance(split_points, Mapping):
        return ReadOnly(dict(split_points))
    return tuple(tuple(p) if isinstance(p, list) else p for p in split_points)


def _check_auto_replicas(replicas: Any, partition: Partition, schedule: str) -> None:
    """``replicas="auto"`` needs the planner's cut and a schedule that replicated stages run."""
    if replicas != AUTO:
        return
    if partition != "profile":
        raise ValueError(f"replicas='auto' lets the planner choose each stage's replicas together with the cut: use "
                         f"partition='profile' (not {partition!r}), or give the replicas, e.g. replicas=[3, 1]")
    if schedule == AUTO_SCHEDULE or not schedule_kind(schedule).replicated:
        raise ValueError(f"replicas='auto' may replicate stages unevenly, which runs schedule '1f1b' or 'gpipe', not "
                         f"{schedule!r}; name one of those, or give the replicas")


def _check_num_stages(num_stages: Any) -> int | None:
    if num_stages is not None and (isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1):
        raise ValueError(f"num_stages must be a positive integer (ranks per pipeline), got {num_stages!r}")
    return num_stages


def _check_wait_timeout(wait_timeout: Any) -> float:
    if isinstance(wait_timeout, bool) or not isinstance(wait_timeout, (int, float)) or not wait_timeout > 0:
        raise ValueError(f"wait_timeout must be a number of seconds > 0 (e.g. {DEFAULT_WAIT_TIMEOUT:.0f}), got "
                         f"{wait_timeout!r}")
    return float(wait_timeout)


def _check_detect_anomaly(detect_anomaly: Any, schedule: str) -> bool:
    _check_flag("detect_anomaly", detect_anomaly)
    if detect_anomaly and schedule != AUTO_SCHEDULE and schedule_kind(schedule).asynchronous:
        raise ValueError(f"detect_anomaly=True checks each batch before the optimizer steps, which schedule "
                         f"{schedule!r} does inside the pipeline; use a synchronous schedule (e.g. '1f1b') or drop "
                         f"detect_anomaly")
    return detect_anomaly
