"""What a contiguous stage of profiled layers costs: compute seconds, weight bytes, and bytes stashed per micro-batch.

Sums over layer ranges come from prefix sums, so the partition search asks for any stage in O(1).
A stage stashes, per micro-batch in flight: its input (kept for the backward), what its layers save for
backward, each tensor passed between two of its layers once if either of them saves it, and its output
(kept until the backward). :func:`stage_peaks` says how many micro-batches a schedule keeps in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate

from lightning_pipe.engine.schedules import Op, Schedule
from lightning_pipe.planner.profile import LayerProfile

__all__ = ["LayerSums", "stage_peaks"]


def _prefix(values: Sequence[float]) -> list[float]:
    return [0.0, *accumulate(values)]


class LayerSums:
    """Stage costs of ``profiles`` (one per layer, for one micro-batch) over layer ranges ``[first, end)``."""

    def __init__(self, profiles: Sequence[LayerProfile]) -> None:
        if not profiles:
            raise ValueError("no layer profiles: profile a model with at least one layer")
        self.profiles = list(profiles)
        p = self.profiles
        self._forward = _prefix([x.forward for x in p])
        self._backward = _prefix([x.backward for x in p])
        self._parameters = _prefix([x.parameter_bytes for x in p])
        self._weights = _prefix([x.weight_bytes for x in p])
        self._gradients = _prefix([x.gradient_bytes for x in p])
        # Bytes layer l adds to a stage's stash when layer l + 1 is in the same stage.
        inner = [x.saved_bytes + (x.output_bytes if x.saves_output or nxt.saves_input else 0)
                 for x, nxt in zip(p, p[1:])]
        self._inner = _prefix(inner)

    @property
    def num_layers(self) -> int:
        return len(self.profiles)

    def forward(self, first: int, end: int) -> float:
        return self._forward[end] - self._forward[first]

    def backward(self, first: int, end: int) -> float:
        return self._backward[end] - self._backward[first]

    def compute(self, first: int, end: int) -> float:
        """Forward plus backward seconds of one micro-batch."""
        return self.forward(first, end) + self.backward(first, end)

    def parameter_bytes(self, first: int, end: int) -> int:
        return round(self._parameters[end] - self._parameters[first])

    def gradient_bytes(self, first: int, end: int) -> int:
        """Bytes of the gradients a replica of the stage allreduces."""
        return round(self._gradients[end] - self._gradients[first])

    def weight_bytes(self, first: int, end: int) -> int:
        """Parameters, gradients and optimizer state."""
        return round(self._weights[end] - self._weights[first])

    def stash_bytes(self, first: int, end: int) -> int:
        """Activation bytes the stage keeps for one micro-batch between its forward and its backward."""
        last = self.profiles[end - 1]
        inner = self._inner[end - 1] - self._inner[first]
        return round(self.profiles[first].input_bytes + inner + last.saved_bytes + last.output_bytes)

    def message_bytes(self, end: int) -> int:
        """Bytes of the activation sent across a cut after layer ``end - 1`` (its gradient is as large)."""
        return self.profiles[end - 1].output_bytes

    def memory_bytes(self, first: int, end: int, in_flight: int, replicas: int = 1) -> int:
        """Bytes one replica of the stage holds with ``in_flight`` micro-batches in flight in the whole stage
        (its replicas share them)."""
        return self.weight_bytes(first, end) + math.ceil(in_flight / replicas) * self.stash_bytes(first, end)


def stage_peaks(schedule: Schedule) -> list[int]:
    """Per stage, the most micro-batches whose forward ran and whose backward (or ``W``) has not."""
    held = [0] * schedule.num_stages
    peaks = [0] * schedule.num_stages
    for rank in range(schedule.num_ranks):
        for stage, op, _ in schedule.compute_actions(rank):
            if op is Op.FORWARD:
                held[stage] += 1
                peaks[stage] = max(peaks[stage], held[stage])
            elif op in (Op.BACKWARD, Op.BACKWARD_WEIGHT):
                held[stage] -= 1
    return peaks
