"""Predict the step time, bubble and activation memory of a schedule from per-stage costs and a link model.

The schedule's own action lists are played on a virtual clock (:func:`~lightning_pipe.engine.schedules.rules.simulate`),
so the prediction follows exactly the order the executor will follow. Compute takes the stage's cost; a
message arrives ``latency + message_bytes / bandwidth`` after its send; sends do not occupy the sender (the
executor posts them without waiting) and links carry any number of messages at once (no contention).

With equal stages the predictions reproduce the textbook forms, e.g. the idle fraction of every rank of
``gpipe`` and ``1f1b`` is ``(p - 1) / (m + p - 1)``; ``tests/test_simulate.py`` checks them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_pipe.engine.schedules.rules import Timeline, activation_peaks, simulate
from lightning_pipe.engine.schedules import Action, Op, Schedule

__all__ = ["StageCost", "Link", "Prediction", "predict"]


@dataclass(frozen=True)
class StageCost:
    """Seconds one micro-batch spends in each pass of one stage (any unit works, if used throughout)."""

    forward: float = 1.0
    """Forward pass."""
    backward_input: float = 1.0
    """Input gradient (``I``), the part of the backward the stage before waits for."""
    backward_weight: float = 1.0
    """Weight gradient (``W``). An unsplit backward ``B`` costs ``backward_input + backward_weight``."""
    optimizer: float = 0.0
    """Optimizer step of the stage's parameters, once per batch after its last backward."""

    def __post_init__(self) -> None:
        for name in ("forward", "backward_input", "backward_weight", "optimizer"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"StageCost.{name} ({value}) must be a finite number >= 0")

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight

    def of(self, op: Op) -> float:
        """Cost of one compute action; communication actions cost nothing on the rank that runs them."""
        return {
            Op.FORWARD: self.forward,
            Op.BACKWARD: self.backward,
            Op.BACKWARD_INPUT: self.backward_input,
            Op.BACKWARD_WEIGHT: self.backward_weight,
            Op.OPTIMIZER: self.optimizer,
        }.get(op, 0.0)


@dataclass(frozen=True)
class Link:
    """How long an activation (or its gradient) takes from one rank to the next."""

    latency: float = 0.0
    """Seconds from send to arrival of an empty message."""
    bandwidth: float = math.inf
    """Bytes per second."""
    message_bytes: float = 0.0
    """Bytes of one activation message (its gradient is as large)."""

    def __post_init__(self) -> None:
        if self.latency < 0 or self.message_bytes < 0:
            raise ValueError(f"Link latency ({self.latency}) and message_bytes ({self.message_bytes}) must be >= 0")
        if not self.bandwidth > 0:
            raise ValueError(f"Link.bandwidth ({self.bandwidth}) must be > 0 bytes/s; use math.inf for a free link")

    @property
    def transfer_time(self) -> float:
        return self.latency + self.message_bytes / self.bandwidth


@dataclass(frozen=True)
class Prediction:
    """What :func:`predict` expects of one step of a schedule."""

    timeline: Timeline
    """When every action starts and ends (communication actions take no time)."""
    step_time: float
    """Seconds per batch: the latest end of a rank's last action plus that rank's optimizer step."""
    busy: tuple[float, ...]
    """Compute seconds per rank inside the pipeline (no optimizer)."""
    idle_fraction: tuple[float, ...]
    """Per rank, the share of ``makespan`` it spends waiting: its bubble."""
    peak_activations: tuple[int, ...]
    """Per rank, most micro-batches held at once (forward run, backward or ``W`` not yet)."""
    num_messages: int
    """Activation and gradient messages between ranks in one step."""

    @property
    def schedule(self) -> Schedule:
        return self.timeline.schedule

    @property
    def makespan(self) -> float:
        """From the first action to the last, without the optimizer step."""
        return self.timeline.makespan

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks together: ``1 - total busy / (ranks * makespan)``."""
        return sum(self.idle_fraction) / len(self.idle_fraction) if self.idle_fraction else 0.0

    @property
    def bubble_over_compute(self) -> tuple[float, ...]:
        """Per rank, idle time over compute time: the measure the interleaved-1F1B paper uses."""
        return tuple((self.makespan - busy) / busy if busy else 0.0 for busy in self.busy)


def predict(
    schedule: Schedule,
    costs: StageCost | Sequence[StageCost] = StageCost(),
    link: Link | Sequence[Link] = Link(),
) -> Prediction:
    """Simulate one step of ``schedule`` with ``costs`` (one for all stages, or one per stage) and ``link`` (one
    for all cuts, or one per cut: ``link[s]`` carries activations from stage ``s`` to ``s + 1`` and their gradients
    back)."""
    if isinstance(costs, StageCost):
        costs = [costs] * schedule.num_stages
    costs = list(costs)
    if len(costs) != schedule.num_stages:
        raise ValueError(f"got {len(costs)} StageCosts for a schedule of {schedule.num_stages} stages; "
                         "pass one per stage, or a single StageCost for all")
    links = [link] * max(schedule.num_stages - 1, 0) if isinstance(link, Link) else list(link)
    if len(links) != max(schedule.num_stages - 1, 0):
        raise ValueError(f"got {len(links)} Links for a schedule of {schedule.num_stages} stages; pass one per cut "
                         f"({max(schedule.num_stages - 1, 0)}), or a single Link for all")
    transfer = [item.transfer_time for item in links]

    def cost(action: Action) -> float:
        return costs[action.stage].of(action.op)

    def latency(action: Action) -> float:
        return transfer[action.stage if action.op is Op.SEND_ACTIVATION else action.stage - 1]

    timeline = simulate(schedule, cost, latency)
    makespan = timeline.makespan
    busy = tuple(sum(cost(action) for action in actions) for actions in schedule.actions)
    idle = tuple((makespan - b) / makespan if makespan else 0.0 for b in busy)
    ends = [ends[-1] if ends else 0.0 for ends in timeline.end]
    # Synchronous schedules step the optimizer after the pipeline; asynchronous ones have it in their lists.
    final_step = [0.0 if schedule.asynchronous else sum(costs[stage].optimizer for stage in schedule.stages_of(rank))
                  for rank in range(schedule.num_ranks)]
    step_time = max((end + extra for end, extra in zip(ends, final_step)), default=0.0)
    num_messages = sum(
        action.op in (Op.SEND_ACTIVATION, Op.SEND_GRAD) for actions in schedule.actions for action in actions
    )
    return Prediction(timeline, step_time, busy, idle, tuple(activation_peaks(schedule)), num_messages)
