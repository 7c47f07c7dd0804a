"""Checks of PipelineStrategy's arguments, made where they enter; each error says how to fix the call."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from lightning_pipe.strategy.asynchronous import ASYNC_SCHEDULES
from lightning_pipe.engine.cut import Partition
from lightning_pipe.engine.schedules import SCHEDULES
from lightning_pipe.engine.schedules.replicated import REPLICATED_SCHEDULES
from lightning_pipe.planner.cut_plan import AUTO_SCHEDULE, PLANNED_PARTITIONS

__all__ = ["check_schedule", "check_planning", "check_vertical_sync", "check_num_microbatches", "check_partition",
           "check_profile_cache", "check_layers", "check_num_stages", "check_auto_replicas"]


def check_schedule(schedule: str) -> str:
    if schedule != AUTO_SCHEDULE and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(sorted(SCHEDULES))}, or "
                         f"{AUTO_SCHEDULE!r} to let the planner choose")
    return schedule


def check_planning(partition: Partition, schedule: str, schedule_options: dict[str, int] | None,
                    memory_cap: float | None) -> float | None:
    """The memory cap, if the arguments that plan the cut go together."""
    if schedule == AUTO_SCHEDULE:
        if partition not in ("uniform", "profile"):
            raise ValueError(f"schedule='auto' chooses the partition with the schedule; drop partition={partition!r} "
                             f"(or pass partition='profile'), or name a schedule")
        if schedule_options:
            raise ValueError(f"schedule='auto' tries each schedule with its default options and takes no "
                             f"schedule_options (got {schedule_options}); remove them, or name a schedule")
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


def check_vertical_sync(vertical_sync: bool, schedule: str, schedule_options: dict[str, int]) -> bool:
    if vertical_sync and schedule != "async_1f1b":
        raise ValueError(f"vertical_sync=True applies to schedule='async_1f1b' (strategy 'pipedream_async'), not "
                         f"{schedule!r}; drop it or change the schedule")
    if schedule in ASYNC_SCHEDULES and schedule_options:
        raise ValueError(f"schedule={schedule!r} runs one stage per rank and takes no schedule_options (got "
                         f"{schedule_options}); remove them")
    return bool(vertical_sync)


def check_num_microbatches(num_microbatches: int) -> int:
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")
    return num_microbatches


def check_partition(partition: Partition) -> Partition:
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


def check_profile_cache(profile_cache: Any) -> str | os.PathLike[str] | bool | None:
    if not (profile_cache is None or profile_cache is False or isinstance(profile_cache, (str, os.PathLike))):
        raise TypeError(f"profile_cache must be a folder path, None (under the Trainer's default_root_dir) or "
                        f"False (no cache), not {profile_cache!r}")
    return profile_cache


def check_layers(layers: Any) -> str | None:
    if layers is not None and not isinstance(layers, str):
        raise TypeError(f"layers must be the attribute path of an nn.Sequential (e.g. 'model.blocks'), "
                        f"not {type(layers).__name__}")
    return layers


def check_auto_replicas(replicas: Any, partition: Partition, schedule: str) -> None:
    """``replicas="auto"`` needs the planner's cut and a schedule that replicated stages run."""
    if replicas != "auto":
        return
    if partition != "profile":
        raise ValueError(f"replicas='auto' lets the planner choose each stage's replicas together with the cut: use "
                         f"partition='profile' (not {partition!r}), or give the replicas, e.g. replicas=[3, 1]")
    if schedule not in REPLICATED_SCHEDULES:
        raise ValueError(f"replicas='auto' may replicate stages unevenly, which runs schedule '1f1b' or 'gpipe', not "
                         f"{schedule!r}; name one of those, or give the replicas")


def check_num_stages(num_stages: Any) -> int | None:
    if num_stages is not None and (isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1):
        raise ValueError(f"num_stages must be a positive integer (ranks per pipeline), got {num_stages!r}")
    return num_stages
