"""One planning problem (profiles, topology, schedule, memory cap): the costs PipeDream's dynamic program minimises,
the schedule a plan runs (round-robin where stages are replicated unevenly), and a plan's evaluation by simulation.

Shared by the partition methods (:mod:`.partition`) and the planning of uneven replication (:mod:`.uneven`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

from lightning_pipe.engine.schedules import Schedule, get_schedule, schedule_kind
from lightning_pipe.engine.schedules.replicated import replicated
from lightning_pipe.planner.costs import LayerSums, stage_peaks
from lightning_pipe.planner.plans import Plan, StagePlan
from lightning_pipe.planner.search import Segment
from lightning_pipe.planner.simulate import Link, StageCost, predict
from lightning_pipe.planner.topology import Topology

__all__ = ["Method", "Problem"]

Method = Union[str, Sequence[int]]
"""A partition method: ``"uniform"``, ``"parameters"``, ``"time"``, ``"memory"``, ``"profile"``, or layer counts."""
_REFINE_ROUNDS = 100
_SHIFT_SPAN = 3  # most boundaries one refining move shifts together


class Problem:
    """One planning problem: the profiles' sums, the topology, the schedule and the cap; the costs PipeDream's program
    minimises, and the evaluation of a plan by playing it through its schedule."""

    def __init__(self, sums: LayerSums, topology: Topology, schedule: str, num_microbatches: int,
                 memory_cap: float | None, options: dict[str, int]) -> None:
        self.sums, self.topology, self.schedule, self.m = sums, topology, schedule, num_microbatches
        self.cap, self.options = memory_cap, options
        self.L, self.D = sums.num_layers, topology.num_devices
        self._peaks: dict[int, list[int]] = {}
        self.round_robin_mode = False  # replicas="round_robin": see plan_pipeline

    # -- costs of the dynamic program ---------------------------------------------------------------
    def stage_time(self, first: int, end: int, device: int, replicas: int) -> float:
        compute = self.m * (self.sums.compute(first, end) + self.messages(first, end, device, replicas)) / replicas
        return compute + self.topology.allreduce_time(self.sums.gradient_bytes(first, end), device, replicas)

    def messages(self, first: int, end: int, device: int, replicas: int) -> float:
        """Seconds per micro-batch a stage spends on its messages: receive and send in forward, and in backward."""
        busy = 0.0
        if first > 0:
            busy += 2 * self.topology.link(device - 1, device).overhead
        if end < self.L:
            if device + replicas >= self.D:
                return math.inf  # layers left but no device: not a plan
            busy += 2 * self.topology.link(device + replicas - 1, device + replicas).overhead
        return busy

    def cut_time(self, end: int, device: int) -> float:
        return self.m * 2 * self.topology.transfer_time(self.sums.message_bytes(end), device - 1, device)

    def build(self, num_ranks: int) -> Schedule:
        try:
            return get_schedule(self.schedule, num_ranks, self.m, **self.options)
        except ValueError as error:
            raise ValueError(f"cannot plan for schedule {self.schedule!r} on {num_ranks} ranks: {error}") from None

    def peaks(self, num_stages: int) -> list[int]:
        """Micro-batches in flight per stage, for a one-stage-per-rank schedule of ``num_stages`` stages."""
        if num_stages not in self._peaks:
            self._peaks[num_stages] = stage_peaks(self.build(num_stages))
        return self._peaks[num_stages]

    def one_stage_per_rank(self, why: str) -> None:
        probe = self.build(1)
        if probe.num_stages != probe.num_ranks:
            raise ValueError(f"{why} places one stage on each device, but {self.schedule!r} runs "
                             f"{probe.num_stages // probe.num_ranks} stages per rank; use method='time' (or "
                             f"'uniform', 'parameters', a list of counts) with it, or schedule='1f1b'")

    def stage_counts(self, num_stages: int | None, replicas: int | None) -> list[int]:
        if num_stages is not None:
            return [num_stages]
        top = min(self.L, self.D)
        return [p for p in range(1, top + 1) if replicas is None or p * replicas == self.D]

    def round_robin_schedule(self, segments: Sequence[Segment]) -> Schedule | None:
        """The schedule PipelineStrategy runs a plan of unevenly replicated stages with (its stages take micro-batches
        in turn), or ``None`` where it would not: stages replicated evenly are data-parallel pipelines, and a
        replicated last stage or a schedule without a round-robin form has no such run."""
        counts = [seg.replicas for seg in segments]
        if len(set(counts)) == 1 or counts[-1] != 1 or not schedule_kind(self.schedule).replicated or self.options:
            return None
        return replicated(counts, self.m, self.schedule)

    def refine(self, plan: Plan, replicas: int | Sequence[int] | None) -> Plan:
        """Shift stage boundaries by a layer, or (with free replicas) a device between neighbouring stages, as long
        as the best such move (:func:`_neighbours`) shortens the simulated step and keeps every device under the cap."""
        segments = [Segment(s.first_layer, s.first_layer + s.num_layers, s.first_device, s.replicas)
                    for s in plan.stages]
        shape = plan.prediction.schedule
        for _ in range(_REFINE_ROUNDS):
            best = plan
            for candidate in _neighbours(segments, moves_devices=replicas is None):
                if self.round_robin_mode and candidate[-1].replicas != 1:
                    continue
                tried = self.evaluate(plan.method, candidate, shape)
                if self.cap is not None and tried.peak_memory > self.cap:
                    continue
                if tried.step_time < best.step_time * (1 - 1e-9):
                    best, chosen = tried, candidate
            if best is plan:
                return plan
            plan, segments = best, chosen
        return plan

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, method: str, segments: Sequence[Segment], shape: Schedule) -> Plan:
        """A plan's costs and memory, and its step played through ``shape``. A round-robin ``shape`` (replicated
        stages) runs each replica at its own speed; otherwise a replicated stage is one faster device."""
        sums, m = self.sums, self.m
        if self.round_robin_mode:
            shape = self.round_robin_schedule(segments) or shape
        peaks = stage_peaks(shape)
        round_robin = bool(shape.stage_replicas)
        stages, costs = [], []
        owner = shape.stage_to_rank
        for index, seg in enumerate(segments):
            i, j, c, r = seg.first, seg.end, seg.first_device, seg.replicas
            if round_robin:  # stage_peaks counts one replica's micro-batches; the stage holds r times that
                peaks[index] *= r
            allreduce = self.topology.allreduce_time(sums.gradient_bytes(i, j), c, r)
            forward, backward = sums.forward(i, j), sums.backward(i, j)
            overhead = 0.0  # per message of forward, and of backward: a receive and a send each
            if index > 0 and owner[index - 1] != owner[index]:
                before = segments[index - 1]
                overhead += self.topology.link(*sorted((before.first_device + before.replicas - 1, c))).overhead
            if index + 1 < len(segments) and owner[index + 1] != owner[index]:
                overhead += self.topology.link(*sorted((segments[index + 1].first_device, c + r - 1))).overhead
            forward, backward = forward + overhead, backward + overhead
            stages.append(StagePlan(
                first_layer=i, num_layers=j - i, first_device=c, replicas=r, forward=forward, backward=backward,
                allreduce=allreduce, time=m * (forward + backward) / r + allreduce,
                parameters=sum(x.parameters for x in sums.profiles[i:j]), parameter_bytes=sums.parameter_bytes(i, j),
                in_flight=peaks[index], memory_bytes=sums.memory_bytes(i, j, peaks[index], r)))
            speed = 1 if round_robin else r
            costs.append(StageCost(forward=forward / speed, backward_input=backward / (2 * speed),
                                   backward_weight=backward / (2 * speed), optimizer=allreduce))
        links, cut_times = [], []
        for before, after in zip(segments, segments[1:]):
            source, target = before.first_device + before.replicas - 1, after.first_device
            level = self.topology.link(min(source, target), max(source, target))
            links.append(Link(latency=level.latency, bandwidth=level.bandwidth,
                              message_bytes=sums.message_bytes(before.end)))
            cut_times.append(0.0 if shape.stage_to_rank[len(links) - 1] == shape.stage_to_rank[len(links)]
                             else m * 2 * links[-1].transfer_time)
        rank_memory = [0] * shape.num_ranks
        for index, stage in enumerate(stages):
            for rank in shape.stage_replicas[index] if round_robin else (shape.stage_to_rank[index],):
                rank_memory[rank] += stage.memory_bytes
        prediction = predict(shape, costs, links)
        bottleneck = max([s.time for s in stages] + cut_times)
        names = tuple(x.name for x in sums.profiles)
        return Plan(method, self.schedule, m, tuple(stages), names, prediction, bottleneck, tuple(cut_times),
                    tuple(rank_memory), self.D, self.cap)



def _neighbours(segments: list[Segment], moves_devices: bool) -> list[list[Segment]]:
    """Plans one move away: up to ``_SHIFT_SPAN`` neighbouring boundaries shift by one layer together (a layer
    passes through the stages between them), or a device crosses one boundary."""
    found = []
    ends = [seg.end for seg in segments[:-1]]
    for first in range(len(ends)):
        for last in range(first, min(first + _SHIFT_SPAN, len(ends))):
            for step in (-1, 1):
                moved = [end + step if first <= k <= last else end for k, end in enumerate(ends)]
                bounds = [0, *moved, segments[-1].end]
                if all(bounds[k] < bounds[k + 1] for k in range(len(segments))) and moved != ends:
                    found.append([Segment(bounds[k], bounds[k + 1], seg.first_device, seg.replicas)
                                  for k, seg in enumerate(segments)])
    if moves_devices:
        for s in range(len(segments) - 1):
            a, b = segments[s], segments[s + 1]
            if a.replicas > 1:
                found.append([*segments[:s], Segment(a.first, a.end, a.first_device, a.replicas - 1),
                              Segment(b.first, b.end, b.first_device - 1, b.replicas + 1), *segments[s + 2:]])
            if b.replicas > 1:
                found.append([*segments[:s], Segment(a.first, a.end, a.first_device, a.replicas + 1),
                              Segment(b.first, b.end, b.first_device + 1, b.replicas - 1), *segments[s + 2:]])
    return found
