"""A plan: its stages (layers, replicas, devices), their costs and memory, and the predicted step; as a table or a dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_pipe.planner.simulate import Prediction

__all__ = ["MemoryCapError", "StagePlan", "Plan", "in_mib"]


def in_mib(size: float) -> str:
    """A memory size for a message: in MiB, with the bytes beside it where it is under a tenth of one (a cap given in
    bytes by mistake read "0.0 MiB")."""
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 / 10 else f"{size / 2**20:.4f} MiB ({size:.0f} bytes)"


class MemoryCapError(ValueError):
    """No plan fits the memory cap; ``least_bytes`` is the smallest cap that some plan fits."""

    def __init__(self, message: str, least_bytes: float) -> None:
        super().__init__(message)
        self.least_bytes = least_bytes


@dataclass(frozen=True)
class StagePlan:
    """One stage of a plan."""

    first_layer: int
    num_layers: int
    first_device: int
    replicas: int
    forward: float
    """Seconds of forward per micro-batch on one replica, with the overhead of its messages."""
    backward: float
    """Seconds of backward per micro-batch on one replica, with the overhead of its messages."""
    allreduce: float
    """Seconds to allreduce the stage's gradients over its replicas, once per step."""
    time: float
    """Busy seconds per step: ``num_microbatches * (forward + backward) / replicas + allreduce``."""
    parameters: int
    parameter_bytes: int
    in_flight: int
    """Most micro-batches the stage holds activations for at once (all replicas together)."""
    memory_bytes: int
    """Bytes on one replica: parameters, gradients, optimizer state and stashed activations."""

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


@dataclass(frozen=True)
class Plan:
    """Stages of a pipeline, their replicas, costs and memory, and the predicted step of the schedule."""

    method: str
    schedule: str
    num_microbatches: int
    stages: tuple[StagePlan, ...]
    layer_names: tuple[str, ...]
    prediction: Prediction
    bottleneck: float
    """Seconds per step of the slowest stage or cut: PipeDream's objective."""
    cut_times: tuple[float, ...]
    """Seconds per step each cut spends moving activations and gradients."""
    rank_memory: tuple[int, ...]
    """Bytes on each device of a pipeline replica (the sum of its stages for schedules with several per rank)."""
    num_devices: int
    memory_cap: float | None = None

    @property
    def partition(self) -> list[int]:
        """Layer counts per stage: ``Pipeline(partition=plan.partition)``."""
        return [stage.num_layers for stage in self.stages]

    @property
    def replicas(self) -> list[int]:
        return [stage.replicas for stage in self.stages]

    @property
    def step_time(self) -> float:
        """Predicted seconds per step."""
        return self.prediction.step_time

    @property
    def bubble(self) -> float:
        """Predicted idle share of the devices during a step."""
        return self.prediction.bubble_fraction

    @property
    def peak_memory(self) -> int:
        return max(self.rank_memory)

    def table(self) -> str:
        """The stages as a text table: layers, parameters, time, memory, replicas."""
        header = ("stage", "layers", "params", "fwd ms", "bwd ms", "allreduce ms", "step busy ms", "in flight",
                  "memory MiB", "replicas", "devices")
        rows = [header]
        for index, s in enumerate(self.stages):
            first, last = self.layer_names[s.first_layer], self.layer_names[s.first_layer + s.num_layers - 1]
            layers = first if s.num_layers == 1 else f"{first}..{last}"
            devices = str(s.first_device) if s.replicas == 1 else f"{s.first_device}-{s.first_device + s.replicas - 1}"
            rows.append((str(index), f"{layers} ({s.num_layers})", _count(s.parameters), f"{s.forward * 1e3:.2f}",
                         f"{s.backward * 1e3:.2f}", f"{s.allreduce * 1e3:.2f}", f"{s.time * 1e3:.1f}",
                         str(s.in_flight), f"{s.memory_bytes / 2**20:.1f}", str(s.replicas), devices))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def summary(self) -> str:
        """:meth:`table` and the predicted step time, bubble, slowest part and peak memory."""
        cap = f" (cap {self.memory_cap / 2**20:.1f} MiB)" if self.memory_cap is not None else ""
        return "\n".join([
            f"plan: method={self.method}, schedule={self.schedule}, {self.num_microbatches} micro-batches, "
            f"{len(self.stages)} stages on {self.num_devices} devices, partition={self.partition}, "
            f"replicas={self.replicas}",
            self.table(),
            f"predicted step time: {self.step_time * 1e3:.1f} ms; bubble: {self.bubble:.1%}; slowest stage or cut: "
            f"{self.bottleneck * 1e3:.1f} ms/step; peak memory per device: {self.peak_memory / 2**20:.1f} MiB{cap}",
        ])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no timeline)."""
        return {"method": self.method, "schedule": self.schedule, "num_microbatches": self.num_microbatches,
                "partition": self.partition, "replicas": self.replicas, "step_time": self.step_time,
                "bubble": self.bubble, "bottleneck": self.bottleneck, "peak_memory": self.peak_memory,
                "stages": [{"layers": [s.first_layer, s.first_layer + s.num_layers], "replicas": s.replicas,
                            "first_device": s.first_device, "forward": s.forward, "backward": s.backward,
                            "allreduce": s.allreduce, "time": s.time, "parameters": s.parameters,
                            "in_flight": s.in_flight, "memory_bytes": s.memory_bytes} for s in self.stages]}


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
