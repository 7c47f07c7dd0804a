"""Plan where to cut a module (and, with ``schedule="auto"``, which schedule and micro-batch count to run) from a
profile of one real batch: what one rank of :class:`~lightning_pipe.strategy.PipelineStrategy` computes and shares.

The profile runs the sequence's layers on one micro-batch of the batch's input to the sequence (captured by running
the module's step up to the sequence); :mod:`lightning_pipe.planner` turns it into a plan. Needs no Trainer and no
process group: the strategy fetches the batch and broadcasts the :class:`CutPlan`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.engine.microbatch import batch_rows, split_batch
from lightning_pipe.planner import Level, Topology, choose_schedule, plan_pipeline, profile_layers
from lightning_pipe.planner.partition import ROUND_ROBIN

__all__ = ["PLANNED_PARTITIONS", "AUTO_SCHEDULE", "CutPlan", "plan_cut", "sequence_input", "default_topology"]

PLANNED_PARTITIONS = ("profile", "time", "memory")
"""``partition=`` names that need a profile (the planner's methods); ``"uniform"`` and ``"parameters"`` do not."""
AUTO_SCHEDULE = "auto"
"""``schedule=`` name that lets the simulator choose the schedule and the number of micro-batches."""

# gloo between processes of one machine, as measured by benchmarks/partition_quality.py on an idle machine; and
# NVLink-class links inside a GPU node, 100 Gb/s between nodes.
_CPU_LINK = dict(bandwidth=1e9, latency=2e-4, overhead=3e-4)
_GPU_LINK = dict(bandwidth=100e9, latency=1e-5, overhead=2e-5)
_NODE_LINK = dict(bandwidth=12.5e9, latency=1e-5, overhead=2e-5)


@dataclass(frozen=True)
class CutPlan:
    """What every rank cuts with, resolved into the arguments ``Pipeline`` takes."""

    partition: list[int]
    """Layer counts per stage."""
    schedule: str
    num_microbatches: int
    report: str
    """The plan as text (and the candidates, under ``schedule="auto"``), for the log."""
    replicas: list[int] | None = None
    """Ranks per stage, where the plan replicates stages unevenly (``replicas="round_robin"``); else ``None``."""


class _Reached(BaseException):
    """Stops a step where the sequence is called (BaseException: a user's ``except Exception`` lets it pass)."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def sequence_input(module: nn.Module, sequence: nn.Sequential, batch: Any, step: str = "training_step") -> Any:
    """What ``module.<step>(batch, 0)`` passes to ``sequence`` (the step stops there; ``self.log`` is ignored)."""
    def stop(_: nn.Module, args: tuple) -> None:
        raise _Reached(args[0] if len(args) == 1 else args)

    handle = sequence.register_forward_pre_hook(stop)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]  # no loop collects logs here
    try:
        with torch.no_grad():
            getattr(module, step)(batch, 0)
    except _Reached as reached:
        return reached.value
    finally:
        handle.remove()
        del module.log
    raise RuntimeError(f"{type(module).__name__}.{step} never called its nn.Sequential; the planner profiles that "
                       f"sequence, so the step must call it (directly or through forward)")


def default_topology(devices: int, num_nodes: int, accelerator: str) -> Topology:
    """One level of ``devices`` per node (gloo-like on CPU, NVLink-like on GPUs), and nodes at 100 Gb/s."""
    link = _GPU_LINK if accelerator in ("gpu", "cuda") else _CPU_LINK
    levels = [Level(devices, **link)]
    if num_nodes > 1:
        levels.append(Level(num_nodes, **_NODE_LINK))
    return Topology(levels)


def plan_cut(
    module: nn.Module,
    sequence: nn.Sequential,
    batch: Any,
    *,
    partition: str,
    schedule: str,
    num_microbatches: int,
    num_stages: int | None,
    device: torch.device,
    memory_cap: float | None = None,
    schedule_options: Mapping[str, int] | None = None,
    cache: str | os.PathLike[str] | None = None,
    step: str = "training_step",
    replicas: Sequence[int] | str | None = None,
    num_devices: int | None = None,
    inputs: Any = None,
) -> CutPlan:
    """Profile ``sequence`` on one micro-batch of ``batch`` and plan one pipeline of ``num_stages`` ranks.

    ``partition``: a planner method (``"profile"``, ``"time"``, ``"memory"``); with ``schedule="auto"`` the
    simulator picks the schedule, the micro-batch count and the cut (``partition`` is then unused). The profile is
    taken on micro-batches of ``batch / num_microbatches`` rows and scaled to other counts. The module's RNG state
    is left as it was. ``replicas``: ranks per stage (uneven replication), which the cut balances: a stage on 3 ranks
    gets about 3 times the work; ``"round_robin"``: the planner chooses them (partition ``"profile"``) for
    ``num_devices`` ranks, with ``num_stages`` stages if given. ``inputs``: the sequence's input for the whole batch,
    when the caller has it (a captured model's flattened call), instead of running ``step`` up to the sequence. Raises the planner's error (e.g.
    :class:`~lightning_pipe.planner.MemoryCapError`) when no plan fits ``memory_cap``.
    """
    chosen = replicas == ROUND_ROBIN
    if chosen:
        if num_devices is None:
            raise ValueError("replicas='round_robin' places stages and replicas on num_devices ranks: pass num_devices")
        devices = num_devices
    elif replicas:
        devices = sum(replicas)  # type: ignore[arg-type]
    else:
        if num_stages is None:
            raise ValueError("plan_cut needs num_stages (or replicas per stage)")
        devices = num_stages
    if schedule == AUTO_SCHEDULE and replicas:
        raise ValueError("schedule='auto' plans one rank per stage; name a schedule to plan with replicas")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if inputs is None:
            inputs = sequence_input(module, sequence, batch, step)
        sample = split_batch(inputs, num_microbatches)[0]
        profiles = profile_layers(sequence, sample, device=device, cache=cache)
    topology = default_topology(devices, 1, device.type)
    heading = (f"profiled {len(profiles)} layers on {device} with micro-batches of {batch_rows(sample)} rows "
               f"({batch_rows(inputs)} per batch)")
    if schedule == AUTO_SCHEDULE:
        choice = choose_schedule(profiles, topology, batch_rows=batch_rows(inputs), sample_rows=batch_rows(sample),
                                 memory_cap=memory_cap, replicas=1)
        plan = choice.plan
        report = "\n".join([heading, "schedule='auto': candidates", choice.table(), plan.summary()])
    else:
        depth = num_stages if partition == "profile" else None  # the other methods take it from the schedule
        counts = replicas if chosen else list(replicas) if replicas else 1
        plan = plan_pipeline(profiles, topology, method=partition, schedule=schedule, num_microbatches=num_microbatches,
                             num_stages=depth, replicas=counts, memory_cap=memory_cap, **dict(schedule_options or {}))
        report = "\n".join([heading, plan.summary()])
    uneven = chosen and len(set(plan.replicas)) > 1
    return CutPlan(list(plan.partition), plan.schedule, plan.num_microbatches, report,
                   list(plan.replicas) if uneven else None)
