"""Plan a pipeline from layer profiles: where to cut, how many replicas per stage, and what the plan will cost.

Methods (``plan_pipeline(profiles, topology, method=...)``):

- ``"uniform"``: the same number of layers per stage; ``"parameters"``: balanced parameter counts (what
  DeepSpeed does); explicit layer counts per stage, e.g. ``[2, 5, 5, 2]``.
- ``"time"``: balanced forward + backward time.
- ``"memory"``: the smallest slowest stage among cuts whose every stage fits ``memory_cap`` bytes (parameters,
  gradients, optimizer state, and the activations of the micro-batches the schedule keeps in flight there).
- ``"profile"``: PipeDream's dynamic program over a :class:`~.topology.Topology`: stage boundaries *and* a
  replica count per stage, minimising the slowest stage or cut (:mod:`.search`), where a stage's time per step is
  ``num_microbatches * (forward + backward + messages) / replicas + allreduce(its gradients over its replicas)``
  (``messages``: the per-message overhead of the 2 or 4 sends and receives of a micro-batch) and a cut's is
  ``num_microbatches * 2 * (latency + activation bytes / bandwidth)`` at the level the cut crosses.
  PipeDream's objective is the throughput of a pipeline that never flushes; ours flush every step, so more stages
  mean more fill and drain, and where the slowest stage sits matters too. So the program finds the best plan for
  each number of stages (one pass; ``num_stages=`` fixes the number), the simulator ranks them, and the fastest
  few are refined by moves of a boundary (or a device) while the simulated step drops (``refine=False``: not).

Every plan is then played through the schedule by :func:`~.simulate.predict` (a replicated stage as one device
``replicas`` times faster whose optimizer step waits for the allreduce) for its step time and bubble.
``plan.partition`` is what ``Pipeline(partition=...)`` takes.

``replicas=[3, 1]`` fixes each stage's replicas (uneven replication, run as one pipeline whose replicas take the
micro-batches in turn: :mod:`lightning_pipe.engine.schedules_replicated`): ``"time"`` then balances each stage's
time divided by its replicas, ``"profile"`` and ``"memory"`` search only cuts with those counts, and the plan is
played through that round-robin schedule itself, each replica at its own speed (:mod:`.uneven`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

from lightning_pipe.engine.partition import balance, stage_sizes
from lightning_pipe.engine.schedules import Schedule, get_schedule
from lightning_pipe.planner.costs import LayerSums, stage_peaks
from lightning_pipe.planner.plans import MemoryCapError, Plan, StagePlan
from lightning_pipe.planner import uneven
from lightning_pipe.planner.profile import LayerProfile
from lightning_pipe.planner.search import Segment, search, search_depths
from lightning_pipe.planner.simulate import Link, StageCost, predict
from lightning_pipe.planner.topology import Topology

__all__ = ["METHODS", "ROUND_ROBIN", "Method", "plan_pipeline", "smallest_memory_cap"]

METHODS = ("uniform", "parameters", "time", "memory", "profile")
ROUND_ROBIN = "round_robin"
_REFINED_DEPTHS = 3  # refine the plans of this many numbers of stages (the fastest before refining)
_REFINE_ROUNDS = 100
_SHIFT_SPAN = 3  # most boundaries one refining move shifts together
Method = Union[str, Sequence[int]]


def plan_pipeline(
    profiles: Sequence[LayerProfile],
    topology: Topology | int,
    *,
    method: Method = "profile",
    schedule: str = "1f1b",
    num_microbatches: int = 8,
    num_stages: int | None = None,
    replicas: int | Sequence[int] | None = None,
    memory_cap: float | None = None,
    refine: bool = True,
    **schedule_options: int,
) -> Plan:
    """Plan ``profiles`` (one per layer, for one micro-batch) on ``topology`` (or that many equal devices).

    ``replicas``: devices per stage for every stage (``None``: ``"profile"`` chooses per stage, the other methods
    use 1), or a list of them, one per stage (uneven replication; see the module's docstring). ``"round_robin"``:
    ``"profile"`` chooses per stage among the layouts ``PipelineStrategy(replicas="auto")`` runs: one device for the
    last stage, unevenly replicated stages played through the round-robin schedule, holding its micro-batches.
    ``num_stages``: for ``"profile"``, fix the number of stages (default: chosen); the other methods use
    the schedule's stages over ``devices / replicas`` ranks. ``memory_cap``: bytes per device; a plan over it
    raises :class:`MemoryCapError` naming the smallest cap that any cut would fit. ``refine`` (``"profile"``
    only): improve the dynamic program's plans by simulation (see the module's docstring); ``False`` returns
    PipeDream's plan as it is.
    """
    sums = LayerSums(profiles)
    topology = Topology.flat(topology) if isinstance(topology, int) else topology
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) must be >= 1")
    if memory_cap is not None and not memory_cap > 0:
        raise ValueError(f"memory_cap ({memory_cap}) must be a number of bytes > 0, or None for no cap")
    if isinstance(method, str) and method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; use one of {', '.join(METHODS)} or a list of layer "
                         f"counts per stage")
    context = _Context(sums, topology, schedule, num_microbatches, memory_cap, schedule_options)
    name = method if isinstance(method, str) else "explicit"
    if replicas == ROUND_ROBIN:
        if method != "profile":
            raise ValueError(f"replicas={ROUND_ROBIN!r} lets method='profile' choose the replicas; use it with that "
                             f"method, or give the replicas")
        context.round_robin_mode, replicas = True, None
    elif replicas is not None and not isinstance(replicas, int):
        return uneven.plan_per_stage(context, method, list(replicas), num_stages, refine)
    if method == "profile":  # the fastest in simulation of PipeDream's best plans for each number of stages
        plans = [context.evaluate(name, segments, shape) for segments, shape in context.profile(num_stages, replicas)]
        plans.sort(key=lambda p: (p.step_time, p.bottleneck))
        if refine:
            plans = sorted((context.refine(p, replicas) for p in plans[:_REFINED_DEPTHS]),
                           key=lambda p: (p.step_time, p.bottleneck))
        plan = plans[0]
    else:
        plan = context.evaluate(name, *context.fixed(method, num_stages, replicas))
    if memory_cap is not None and plan.peak_memory > memory_cap:
        if method == "profile":
            context.too_big(plan.peak_memory, num_stages, replicas, method)
        context.too_big(plan.peak_memory, len(plan.stages), replicas or 1, method)
    return plan


def smallest_memory_cap(
    profiles: Sequence[LayerProfile],
    topology: Topology | int,
    *,
    schedule: str = "1f1b",
    num_microbatches: int = 8,
    num_stages: int | None = None,
    replicas: int | None = None,
    **schedule_options: int,
) -> float:
    """The least bytes per device that some plan needs (for ``num_stages``/``replicas`` as given, else any)."""
    topology = Topology.flat(topology) if isinstance(topology, int) else topology
    context = _Context(LayerSums(profiles), topology, schedule, num_microbatches, None, schedule_options)
    return context.least_memory(num_stages, replicas)


class _Context:
    """One planning problem: the profiles' sums, the topology, the schedule and the cap."""

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

    # -- methods ------------------------------------------------------------------------------------
    def profile(self, num_stages: int | None, replicas: int | None) -> list[tuple[list[Segment], Schedule]]:
        """PipeDream's best plan for each allowed number of stages (one if ``num_stages`` is given)."""
        self.one_stage_per_rank("method='profile'")
        if replicas is not None and self.D % replicas:
            raise ValueError(f"replicas ({replicas}) must divide the topology's {self.D} devices")
        if num_stages is not None and not 1 <= num_stages <= min(self.L, self.D):
            raise ValueError(f"num_stages ({num_stages}) must be between 1 and {min(self.L, self.D)} (the fewer of "
                             f"{self.L} layers and {self.D} devices)")
        counts = self.stage_counts(num_stages, replicas)
        if self.round_robin_mode:
            results = [uneven.search_round_robin(self, p) for p in counts]
        elif self.cap is None:
            found = search_depths(self.L, self.D, lambda i, j, c, r, k: self.stage_time(i, j, c, r), self.cut_time,
                                  max_stages=max(counts, default=0), replicas=replicas)
            results = [found[p - 1] for p in counts]
        else:
            results = []
            for p in counts:
                peaks, cap = self.peaks(p), self.cap

                def cost(i: int, j: int, c: int, r: int, k: int | None, peaks: list[int] = peaks) -> float:
                    if self.sums.memory_bytes(i, j, peaks[k], r) > cap:  # type: ignore[index]
                        return math.inf
                    return self.stage_time(i, j, c, r)

                results.append(search(self.L, self.D, cost, self.cut_time, num_stages=p, replicas=replicas))
        plans = [(list(r.segments), self.build(len(r.segments))) for r in results if r is not None]
        if self.round_robin_mode:  # evaluate() plays each through its own round-robin schedule
            plans = [(segments, shape) for segments, shape in plans if len(segments) == shape.num_ranks]
        if not plans:
            if self.cap is not None:
                self.too_big(None, num_stages, replicas, "profile")
            raise ValueError(f"no plan puts {self.L} layers on {self.D} devices with num_stages={num_stages}, "
                             f"replicas={replicas}; every stage needs a layer and a device: loosen one of them")
        return plans

    def fixed(self, method: Method, num_stages: int | None, replicas: int | None) -> tuple[list[Segment], Schedule]:
        per_stage = replicas or 1
        if self.D % per_stage:
            raise ValueError(f"replicas ({per_stage}) must divide the topology's {self.D} devices")
        shape = self.build(self.D // per_stage)
        p = shape.num_stages
        if num_stages is not None and num_stages != p:
            raise ValueError(f"schedule {self.schedule!r} on {shape.num_ranks} ranks has {p} stages, not "
                             f"num_stages={num_stages}; leave num_stages out for this method")
        if p > self.L:
            raise ValueError(f"cannot cut {self.L} layers into {p} stages; use fewer devices or more layers")
        if method == "uniform" or not isinstance(method, str):
            sizes = stage_sizes([None] * self.L, p, method)  # type: ignore[list-item]
        elif method == "parameters":
            sizes = balance([x.parameters for x in self.sums.profiles], p)
        elif method == "time":
            sizes = balance([x.compute for x in self.sums.profiles], p)
        else:  # memory
            if self.cap is None:
                raise ValueError("method='memory' needs memory_cap= (bytes per device); or use method='time'")
            self.one_stage_per_rank("method='memory'")
            peaks, cap = stage_peaks(shape), self.cap

            def cost(i: int, j: int, c: int, r: int, k: int | None) -> float:
                if self.sums.memory_bytes(i, j, peaks[k], r) > cap:  # type: ignore[index]
                    return math.inf
                return self.sums.compute(i, j)

            result = search(self.L, self.D, cost, num_stages=p, replicas=per_stage)
            if result is None:
                self.too_big(None, p, per_stage, "memory")
            return list(result.segments), shape  # type: ignore[union-attr]
        starts = [sum(sizes[:s]) for s in range(p)]
        segments = [Segment(starts[s], starts[s] + sizes[s], shape.stage_to_rank[s] * per_stage, per_stage)
                    for s in range(p)]
        return segments, shape

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

    # -- memory -------------------------------------------------------------------------------------
    def least_memory(self, num_stages: int | None, replicas: int | None) -> float:
        if self.round_robin_mode:
            found = [uneven.search_round_robin(self, p, "memory") for p in self.stage_counts(num_stages, None)]
            return min((result.value for result in found if result is not None), default=math.inf)
        probe = self.build(1)
        if probe.num_stages != probe.num_ranks:  # several stages per rank: the uniform-count cut's memory
            return float(plan_pipeline(self.sums.profiles, self.topology, method="time", schedule=self.schedule,
                                       num_microbatches=self.m, replicas=replicas, **self.options).peak_memory)
        best = math.inf
        for p in self.stage_counts(num_stages, replicas):
            peaks = self.peaks(p)
            found = search(self.L, self.D, lambda i, j, c, r, k, peaks=peaks: float(
                self.sums.memory_bytes(i, j, peaks[k], r)), num_stages=p, replicas=replicas)
            if found is not None:
                best = min(best, found.value)
        return best

    def too_big(self, needed: float | None, num_stages: int | None, replicas: int | None, method: Method) -> None:
        least = self.least_memory(num_stages, replicas)
        probe = self.build(1)
        searched = "any cut fits" if probe.num_stages == probe.num_ranks else "the time-balanced cut needs"
        what = f"the {method!r} plan needs {needed / 2**20:.1f} MiB on its fullest device; " if needed else ""
        raise MemoryCapError(
            f"no plan of {self.L} layers on {self.D} devices fits memory_cap={self.cap / 2**20:.1f} MiB per device "
            f"with schedule {self.schedule!r} and {self.m} micro-batches: {what}the smallest cap {searched} is "
            f"{least / 2**20:.1f} MiB ({least:.0f} bytes). Raise memory_cap to at least that, use more devices, "
            f"use method='memory' or 'profile' to search under the cap, or keep fewer micro-batches in flight "
            f"(schedule='1f1b' instead of 'gpipe', checkpoint_activations=True)", least)

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, method: str, segments: Sequence[Segment], shape: Schedule) -> Plan:
        """A plan's costs and memory, and its step played through ``shape``. A round-robin ``shape`` (replicated
        stages) runs each replica at its own speed; otherwise a replicated stage is one faster device."""
        sums, m = self.sums, self.m
        if self.round_robin_mode:
            shape = uneven.round_robin_schedule(self, segments) or shape
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
