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
micro-batches in turn: :mod:`lightning_pipe.engine.schedules.replicated`): ``"time"`` then balances each stage's
time divided by its replicas, ``"profile"`` and ``"memory"`` search only cuts with those counts, and the plan is
played through that round-robin schedule itself, each replica at its own speed (:mod:`.uneven`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightning_pipe.engine.cut import balance, stage_sizes
from lightning_pipe.engine.schedules import Schedule
from lightning_pipe.planner import uneven
from lightning_pipe.planner.costs import LayerSums, stage_peaks
from lightning_pipe.planner.plans import MemoryCapError, Plan, in_mib
from lightning_pipe.planner.problem import Method, Problem
from lightning_pipe.planner.profile import LayerProfile
from lightning_pipe.planner.search import Segment, search, search_depths
from lightning_pipe.planner.topology import Topology

__all__ = ["METHODS", "ROUND_ROBIN", "Method", "plan_pipeline", "smallest_memory_cap"]

METHODS = ("uniform", "parameters", "time", "memory", "profile")
ROUND_ROBIN = "round_robin"
_REFINED_DEPTHS = 3  # refine the plans of this many numbers of stages (the fastest before refining)


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
    problem = Problem(sums, topology, schedule, num_microbatches, memory_cap, schedule_options)
    name = method if isinstance(method, str) else "explicit"
    if replicas == ROUND_ROBIN:
        if method != "profile":
            raise ValueError(f"replicas={ROUND_ROBIN!r} lets method='profile' choose the replicas; use it with that "
                             f"method, or give the replicas")
        problem.round_robin_mode, replicas = True, None
    elif replicas is not None and not isinstance(replicas, int):
        return uneven.plan_per_stage(problem, method, list(replicas), num_stages, refine)
    if method == "profile":  # the fastest in simulation of PipeDream's best plans for each number of stages
        plans = [problem.evaluate(name, segments, shape) for segments, shape in _profile(problem, num_stages, replicas)]
        plans.sort(key=lambda p: (p.step_time, p.bottleneck))
        if refine:
            plans = sorted((problem.refine(p, replicas) for p in plans[:_REFINED_DEPTHS]),
                           key=lambda p: (p.step_time, p.bottleneck))
        plan = plans[0]
    else:
        plan = problem.evaluate(name, *_fixed(problem, method, num_stages, replicas))
    if memory_cap is not None and plan.peak_memory > memory_cap:
        if method == "profile":
            _too_big(problem, plan.peak_memory, num_stages, replicas, method)
        _too_big(problem, plan.peak_memory, len(plan.stages), replicas or 1, method)
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
    problem = Problem(LayerSums(profiles), topology, schedule, num_microbatches, None, schedule_options)
    return _least_memory(problem, num_stages, replicas)


def _profile(problem: Problem, num_stages: int | None, replicas: int | None) -> list[tuple[list[Segment], Schedule]]:
    """PipeDream's best plan for each allowed number of stages (one if ``num_stages`` is given)."""
    problem.one_stage_per_rank("method='profile'")
    if replicas is not None and problem.D % replicas:
        raise ValueError(f"replicas ({replicas}) must divide the topology's {problem.D} devices")
    if num_stages is not None and not 1 <= num_stages <= min(problem.L, problem.D):
        raise ValueError(f"num_stages ({num_stages}) must be between 1 and {min(problem.L, problem.D)} (the fewer of "
                         f"{problem.L} layers and {problem.D} devices)")
    counts = problem.stage_counts(num_stages, replicas)
    if problem.round_robin_mode:
        results = [uneven.search_round_robin(problem, p) for p in counts]
    elif problem.cap is None:
        found = search_depths(problem.L, problem.D, lambda i, j, c, r, k: problem.stage_time(i, j, c, r), problem.cut_time,
                              max_stages=max(counts, default=0), replicas=replicas)
        results = [found[p - 1] for p in counts]
    else:
        results = []
        for p in counts:
            peaks, cap = problem.peaks(p), problem.cap

            def cost(i: int, j: int, c: int, r: int, k: int | None, peaks: list[int] = peaks) -> float:
                if problem.sums.memory_bytes(i, j, peaks[k], r) > cap:  # type: ignore[index]
                    return math.inf
                return problem.stage_time(i, j, c, r)

            results.append(search(problem.L, problem.D, cost, problem.cut_time, num_stages=p, replicas=replicas))
    plans = [(list(r.segments), problem.build(len(r.segments))) for r in results if r is not None]
    if problem.round_robin_mode:  # evaluate() plays each through its own round-robin schedule
        plans = [(segments, shape) for segments, shape in plans if len(segments) == shape.num_ranks]
    if not plans:
        if problem.cap is not None:
            _too_big(problem, None, num_stages, replicas, "profile")
        fitting = [stages for stages in range(min(problem.L, problem.D), 0, -1) if problem.D % stages == 0]
        hint = (f": e.g. num_stages={fitting[0]}, replicas={problem.D // fitting[0]}"
                if fitting and num_stages is None and (replicas or 1) == 1 and fitting[0] < problem.D else "")
        raise ValueError(f"no plan puts {problem.L} layers on {problem.D} devices with num_stages={num_stages}, "
                         f"replicas={replicas}: every stage needs at least one layer and its devices, and "
                         f"num_stages x replicas must use every device{hint}; or use fewer devices")
    return plans

def _fixed(problem: Problem, method: Method, num_stages: int | None, replicas: int | None) -> tuple[list[Segment], Schedule]:
    per_stage = replicas or 1
    if problem.D % per_stage:
        raise ValueError(f"replicas ({per_stage}) must divide the topology's {problem.D} devices")
    shape = problem.build(problem.D // per_stage)
    p = shape.num_stages
    if num_stages is not None and num_stages != p:
        raise ValueError(f"schedule {problem.schedule!r} on {shape.num_ranks} ranks has {p} stages, not "
                         f"num_stages={num_stages}; leave num_stages out for this method")
    if p > problem.L:
        raise ValueError(f"cannot cut {problem.L} layers into {p} stages; use fewer devices or more layers")
    if method == "uniform" or not isinstance(method, str):
        sizes = stage_sizes([None] * problem.L, p, method)  # type: ignore[list-item]
    elif method == "parameters":
        sizes = balance([x.parameters for x in problem.sums.profiles], p)
    elif method == "time":
        sizes = balance([x.compute for x in problem.sums.profiles], p)
    else:  # memory
        if problem.cap is None:
            raise ValueError("method='memory' needs memory_cap= (bytes per device); or use method='time'")
        problem.one_stage_per_rank("method='memory'")
        peaks, cap = stage_peaks(shape), problem.cap

        def cost(i: int, j: int, c: int, r: int, k: int | None) -> float:
            if problem.sums.memory_bytes(i, j, peaks[k], r) > cap:  # type: ignore[index]
                return math.inf
            return problem.sums.compute(i, j)

        result = search(problem.L, problem.D, cost, num_stages=p, replicas=per_stage)
        if result is None:
            _too_big(problem, None, p, per_stage, "memory")
        return list(result.segments), shape  # type: ignore[union-attr]
    starts = [sum(sizes[:s]) for s in range(p)]
    segments = [Segment(starts[s], starts[s] + sizes[s], shape.stage_to_rank[s] * per_stage, per_stage)
                for s in range(p)]
    return segments, shape


def _least_memory(problem: Problem, num_stages: int | None, replicas: int | None) -> float:
    if problem.round_robin_mode:
        found = [uneven.search_round_robin(problem, p, "memory") for p in problem.stage_counts(num_stages, None)]
        return min((result.value for result in found if result is not None), default=math.inf)
    probe = problem.build(1)
    if probe.num_stages != probe.num_ranks:  # several stages per rank: the uniform-count cut's memory
        return float(plan_pipeline(problem.sums.profiles, problem.topology, method="time", schedule=problem.schedule,
                                   num_microbatches=problem.m, replicas=replicas, **problem.options).peak_memory)
    best = math.inf
    for p in problem.stage_counts(num_stages, replicas):
        peaks = problem.peaks(p)
        found = search(problem.L, problem.D, lambda i, j, c, r, k, peaks=peaks: float(
            problem.sums.memory_bytes(i, j, peaks[k], r)), num_stages=p, replicas=replicas)
        if found is not None:
            best = min(best, found.value)
    return best

def _too_big(problem: Problem, needed: float | None, num_stages: int | None, replicas: int | None, method: Method) -> None:
    least = _least_memory(problem, num_stages, replicas)
    probe = problem.build(1)
    searched = "any cut fits" if probe.num_stages == probe.num_ranks else "the time-balanced cut needs"
    what = f"the {method!r} plan needs {needed / 2**20:.1f} MiB on its fullest device; " if needed else ""
    raise MemoryCapError(
        f"no plan of {problem.L} layers on {problem.D} devices fits memory_cap={in_mib(problem.cap)} per device "
        f"with schedule {problem.schedule!r} and {problem.m} micro-batches: {what}the smallest cap {searched} is "
        f"{least / 2**20:.1f} MiB ({least:.0f} bytes). Raise memory_cap to at least that, use more devices, "
        f"use method='memory' or 'profile' to search under the cap, or keep fewer micro-batches in flight "
        f"(schedule='1f1b' instead of 'gpipe', checkpoint_activations=True)", least)
