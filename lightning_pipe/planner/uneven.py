"""Planning for uneven replication (PipeDream's "3-1"): cuts for given replicas per stage, PipeDream's program choosing
the replicas among the layouts PipelineStrategy runs (the last stage on one device), and the round-robin schedule
those plans are played through (:mod:`lightning_pipe.engine.schedules.replicated`). Used by :mod:`.partition`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from lightning_pipe.engine.cut import balance, stage_sizes
from lightning_pipe.engine.schedules import schedule_kind
from lightning_pipe.engine.schedules.replicated import check_replicas, replicated
from lightning_pipe.planner.costs import stage_peaks
from lightning_pipe.planner.plans import MemoryCapError, Plan, in_mib
from lightning_pipe.planner.problem import Method, Problem
from lightning_pipe.planner.search import SearchResult, Segment, search

__all__ = ["plan_per_stage", "search_round_robin"]


def plan_per_stage(ctx: Problem, method: Method, counts: list[int], num_stages: int | None, refine: bool) -> Plan:
    """The plan of ``method`` whose stage ``s`` has ``counts[s]`` replicas, played through the round-robin
    schedule those replicas run."""
    counts = check_replicas(counts)
    p = len(counts)
    if sum(counts) != ctx.D:
        raise ValueError(f"replicas={counts} places {sum(counts)} devices, but the topology has {ctx.D}")
    if num_stages is not None and num_stages != p:
        raise ValueError(f"num_stages={num_stages} but replicas={counts} lists {p} stages; drop num_stages")
    if p > ctx.L:
        raise ValueError(f"cannot cut {ctx.L} layers into {p} stages; use fewer stages or more layers")
    if not schedule_kind(ctx.schedule).replicated or ctx.options:
        raise ValueError(f"replicas={counts} runs schedule '1f1b' or 'gpipe' without options, not "
                         f"{ctx.schedule!r}")
    shape = replicated(counts, ctx.m, ctx.schedule)
    held = stage_peaks(shape)  # per replica (evaluate() plays every plan with these counts through it)
    name = method if isinstance(method, str) else "explicit"

    def fits(i: int, j: int, k: int) -> bool:
        return ctx.cap is None or ctx.sums.memory_bytes(i, j, held[k] * counts[k], counts[k]) <= ctx.cap

    def planned(cost: Callable[[int, int, int, int], float]) -> list[Segment]:
        found = search(ctx.L, ctx.D, lambda i, j, c, r, k: cost(i, j, c, r)
                       if r == counts[k] and fits(i, j, k) else math.inf, ctx.cut_time, num_stages=p)
        if found is None:
            _too_big(ctx, counts, held, method)
        return list(found.segments)  # type: ignore[union-attr]

    if method == "profile":
        segments = planned(ctx.stage_time)
    elif method in ("time", "memory"):
        if method == "memory" and ctx.cap is None:
            raise ValueError("method='memory' needs memory_cap= (bytes per device); or use method='time'")
        segments = planned(lambda i, j, c, r: ctx.sums.compute(i, j) / r)
    else:
        sizes = (balance([x.parameters for x in ctx.sums.profiles], p, counts) if method == "parameters"
                 else stage_sizes([None] * ctx.L, p, method, counts))  # type: ignore[list-item]
        starts = [sum(sizes[:s]) for s in range(p)]
        segments = [Segment(starts[s], starts[s] + sizes[s], sum(counts[:s]), counts[s]) for s in range(p)]
    plan = ctx.evaluate(name, segments, shape)
    if method == "profile" and refine:
        plan = ctx.refine(plan, counts)
    if ctx.cap is not None and plan.peak_memory > ctx.cap:
        _too_big(ctx, counts, held, method, plan.peak_memory)
    return plan


def search_round_robin(ctx: Problem, p: int, objective: str = "time") -> SearchResult | None:
    """PipeDream's program over ``p`` stages whose last has one device, minimising the slowest stage (or, with
    ``objective="memory"``, the fullest device). A replica holds at most its own ``ceil(m / r)`` micro-batches,
    and in 1F1B at most ``ceil((D - c) / r)`` (the stages from its first device ``c`` on: PipeDream's limit)."""
    def held(c: int, r: int) -> int:
        own = math.ceil(ctx.m / r)
        return min(own, math.ceil((ctx.D - c) / r)) if ctx.schedule == "1f1b" else own

    def cost(i: int, j: int, c: int, r: int, k: int | None) -> float:
        if j == ctx.L and r != 1:
            return math.inf
        memory = ctx.sums.memory_bytes(i, j, held(c, r) * r, r)
        if objective == "memory":
            return float(memory)
        if ctx.cap is not None and memory > ctx.cap:
            return math.inf
        return ctx.stage_time(i, j, c, r)

    return search(ctx.L, ctx.D, cost, ctx.cut_time if objective == "time" else lambda i, c: 0.0,
                  num_stages=p)


def _too_big(ctx: Problem, counts: list[int], held: list[int], method: Method, needed: float | None = None) -> None:
    found = search(ctx.L, ctx.D, lambda i, j, c, r, k: float(ctx.sums.memory_bytes(i, j, held[k] * r, r))
                   if r == counts[k] else math.inf, num_stages=len(counts))
    least = found.value if found is not None else math.inf
    what = f"the {method!r} plan needs {needed / 2**20:.1f} MiB on its fullest device; " if needed else ""
    raise MemoryCapError(
        f"no plan of {ctx.L} layers with replicas={counts} fits memory_cap={in_mib(ctx.cap)} per "
        f"device: {what}the smallest cap any cut fits is {least / 2**20:.1f} MiB ({least:.0f} bytes). Raise "
        f"memory_cap, or change the replicas", least)
