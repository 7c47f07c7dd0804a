"""PipeDream's dynamic program: contiguous stages and a replica count for each, minimising the slowest stage or link.

Layers ``0 .. L-1`` go to devices ``0 .. D-1`` in order: each stage takes the next run of layers and the next
run of devices (its data-parallel replicas), every device is used. A plan's value is its slowest part, the
quantity that bounds a pipeline's throughput (PipeDream, SOSP'19, section 3.1)::

    value = max(max over stages of stage_cost(first, end, first_device, replicas, index),
                max over cuts of boundary_cost(end, first_device of the next stage))

For a prefix of ``j`` layers on ``d`` devices the best value only depends on the prefix's last stage and the best
value of what precedes it, so ``best[j][d] = min over (i, c) of max(best[i][c], boundary(i, c), stage(i, j, c, d-c))``:
O(L^2 D^2) steps. With the number of stages as a third index (``num_stages``, :func:`search_depths`) it costs a
factor of stages more, gives the best plan of every depth in one pass, and lets the stage cost depend on the
stage's index (micro-batches in flight, for memory). Ties go to the plan whose parts add up to less (its fill
and drain are shorter). The tests check the value against brute force over every plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Segment", "SearchResult", "search", "search_depths"]

StageCost = Callable[[int, int, int, int, "int | None"], float]
"""(first layer, end layer, first device, replicas, stage index or None) -> cost; ``math.inf`` if not allowed."""
BoundaryCost = Callable[[int, int], float]
"""(end layer of the earlier stage, first device of the later stage) -> cost of the cut."""


@dataclass(frozen=True)
class Segment:
    """One stage of a plan: layers ``[first, end)`` on devices ``[first_device, first_device + replicas)``."""

    first: int
    end: int
    first_device: int
    replicas: int


@dataclass(frozen=True)
class SearchResult:
    value: float
    """The plan's slowest stage or cut."""
    total: float
    """Sum of its stage and cut costs (the tie-breaker)."""
    segments: tuple[Segment, ...]


_NONE = (math.inf, math.inf)


def search(
    num_layers: int,
    num_devices: int,
    stage_cost: StageCost,
    boundary_cost: BoundaryCost = lambda end, device: 0.0,
    *,
    num_stages: int | None = None,
    replicas: int | None = None,
) -> SearchResult | None:
    """The best plan of ``num_layers`` layers on all ``num_devices`` devices, or ``None`` if no plan is allowed.

    ``num_stages``: exactly that many stages (stage costs then see the stage index); ``None``: any number (the
    index passed is ``None``). ``replicas``: every stage gets exactly that many devices; ``None``: any.
    """
    if num_layers < 1 or num_devices < 1:
        raise ValueError(f"need at least one layer and one device (got {num_layers} layers, {num_devices} devices)")
    if replicas is not None and (replicas < 1 or num_devices % replicas):
        raise ValueError(f"replicas ({replicas}) must divide the {num_devices} devices")
    if num_stages is not None:
        return _fixed_stages(num_layers, num_devices, stage_cost, boundary_cost, num_stages, replicas)
    return _any_stages(num_layers, num_devices, stage_cost, boundary_cost, replicas)


def _any_stages(num_layers: int, num_devices: int, stage_cost: StageCost, boundary_cost: BoundaryCost,
                replicas: int | None) -> SearchResult | None:
    L, D = num_layers, num_devices
    # best[j][d]: (value, total) of layers [0, j) on devices [0, d); choice[j][d] = (i, c) of its last stage.
    best = [[_NONE] * (D + 1) for _ in range(L + 1)]
    choice: list[list[tuple[int, int] | None]] = [[None] * (D + 1) for _ in range(L + 1)]
    for j in range(1, L + 1):
        for d in range(1, D + 1):
            top = _NONE
            pick = None
            for c in range(d - 1, -1, -1):
                r = d - c
                if replicas is not None and r != replicas:
                    continue
                for i in range(j - 1, -1, -1):
                    if (i == 0) != (c == 0):  # the first stage starts at layer 0 and device 0
                        continue
                    before = best[i][c] if i else (0.0, 0.0)
                    if before is _NONE or before[0] > top[0]:  # unreachable, or cannot beat the best so far
                        continue
                    stage = stage_cost(i, j, c, r, None)
                    if stage == math.inf:
                        continue
                    cut = boundary_cost(i, c) if i else 0.0
                    candidate = (max(before[0], cut, stage), before[1] + cut + stage)
                    if candidate < top:
                        top, pick = candidate, (i, c)
            best[j][d], choice[j][d] = top, pick
    if best[L][D] is _NONE:
        return None
    segments, j, d = [], L, D
    while j > 0:
        i, c = choice[j][d]  # type: ignore[misc]
        segments.append(Segment(i, j, c, d - c))
        j, d = i, c
    return SearchResult(best[L][D][0], best[L][D][1], tuple(reversed(segments)))


def search_depths(
    num_layers: int,
    num_devices: int,
    stage_cost: StageCost,
    boundary_cost: BoundaryCost = lambda end, device: 0.0,
    *,
    max_stages: int | None = None,
    replicas: int | None = None,
) -> list[SearchResult | None]:
    """The best plan with exactly ``p`` stages for every ``p`` in ``1..max_stages`` (default: as many as fit), from
    one pass of the dynamic program: entry ``p - 1``, ``None`` where no plan has ``p`` stages. Stage costs see the
    stage's index from the start, so they must not depend on how many stages follow."""
    top = min(num_layers, num_devices) if max_stages is None else max_stages
    best, choice = _table(num_layers, num_devices, stage_cost, boundary_cost, top, replicas, fixed=False)
    return [_extract(best, choice, p, num_layers, num_devices) for p in range(1, top + 1)]


def _fixed_stages(num_layers: int, num_devices: int, stage_cost: StageCost, boundary_cost: BoundaryCost,
                  num_stages: int, replicas: int | None) -> SearchResult | None:
    L, D, P = num_layers, num_devices, num_stages
    if P < 1 or P > L or P > D or (replicas is not None and P * replicas != D):
        return None
    best, choice = _table(L, D, stage_cost, boundary_cost, P, replicas, fixed=True)
    return _extract(best, choice, P, L, D)


def _table(L: int, D: int, stage_cost: StageCost, boundary_cost: BoundaryCost, P: int, replicas: int | None,
           fixed: bool) -> tuple[list, list]:
    """best[k][j][d]: stages 0..k cover layers [0, j) and devices [0, d); with ``fixed``, exactly ``P`` stages in
    all (so a prefix leaves a layer and a device for each stage still to come)."""
    best = [[[_NONE] * (D + 1) for _ in range(L + 1)] for _ in range(P)]
    choice: list[list[list[tuple[int, int] | None]]] = [[[None] * (D + 1) for _ in range(L + 1)] for _ in range(P)]
    for k in range(P):
        left = P - 1 - k if fixed else 0  # stages still to come, each needing a layer and a device
        for j in range(k + 1, L - left + 1):
            for d in range(k + 1, D - left + 1):
                if k == 0:
                    if replicas is None or d == replicas:
                        stage = stage_cost(0, j, 0, d, 0)
                        if stage != math.inf:
                            best[0][j][d], choice[0][j][d] = (stage, stage), (0, 0)
                    continue
                top = _NONE
                pick = None
                previous = best[k - 1]
                for c in range(k, d):
                    r = d - c
                    if replicas is not None and r != replicas:
                        continue
                    for i in range(k, j):
                        before = previous[i][c]
                        if before is _NONE or before[0] > top[0]:  # cannot beat the best so far
                            continue
                        stage = stage_cost(i, j, c, r, k)
                        if stage == math.inf:
                            continue
                        cut = boundary_cost(i, c)
                        candidate = (max(before[0], cut, stage), before[1] + cut + stage)
                        if candidate < top:
                            top, pick = candidate, (i, c)
                best[k][j][d], choice[k][j][d] = top, pick
    return best, choice


def _extract(best: list, choice: list, P: int, L: int, D: int) -> SearchResult | None:
    if P > len(best) or best[P - 1][L][D] is _NONE:
        return None
    final = best[P - 1][L][D]
    segments, j, d = [], L, D
    for k in range(P - 1, -1, -1):
        i, c = choice[k][j][d]
        segments.append(Segment(i, j, c, d - c))
        j, d = i, c
    return SearchResult(final[0], final[1], tuple(reversed(segments)))
