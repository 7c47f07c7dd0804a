"""Cut a sequence of layers into contiguous stages: by explicit counts, uniformly, or balanced by parameters."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Union

import torch.nn as nn

__all__ = ["Partition", "stage_sizes", "balance", "cut"]

Partition = Union[str, Sequence[int]]  # "uniform", "parameters", or layer counts per stage


def stage_sizes(layers: Sequence[nn.Module], num_stages: int, partition: Partition = "uniform",
                replicas: Sequence[int] | None = None) -> list[int]:
    """Number of layers in each stage, for ``partition`` = "uniform", "parameters" or explicit counts.

    ``replicas`` (ranks per stage, uneven replication) makes "uniform" and "parameters" give each stage a share in
    proportion to its ranks: with ``[3, 1]``, stage 0 gets about three quarters of the layers (or parameters)."""
    num_layers = len(layers)
    if num_stages < 1:
        raise ValueError(f"num_stages ({num_stages}) must be >= 1")
    if num_stages > num_layers:
        raise ValueError(
            f"cannot cut {num_layers} layer{'s' if num_layers != 1 else ''} into {num_stages} stages: every stage "
            f"needs at least one layer; "
            f"use at most {num_layers} devices, or split the model into more layers"
        )
    if isinstance(partition, str):
        if partition == "uniform" and (replicas is None or len(set(replicas)) == 1):
            return [len(part) for part in _uniform(num_layers, num_stages)]
        if partition == "uniform":
            return balance([1.0] * num_layers, num_stages, replicas)
        if partition == "parameters":
            weights = [sum(p.numel() for p in layer.parameters()) for layer in layers]
            return balance(weights, num_stages, replicas)
        raise ValueError(f"unknown partition {partition!r}; use 'uniform', 'parameters' or a list of layer counts")
    sizes = [int(n) for n in partition]
    if len(sizes) != num_stages:
        raise ValueError(f"partition {sizes} gives {len(sizes)} stages but the pipeline has {num_stages}; "
                         f"give one layer count per stage")
    if any(n < 1 for n in sizes):
        raise ValueError(f"partition {sizes} has an empty stage; every stage needs at least one layer")
    if sum(sizes) != num_layers:
        raise ValueError(f"partition {sizes} adds up to {sum(sizes)} layers but the model has {num_layers}; "
                         f"make the counts add up to {num_layers}")
    return sizes


def _uniform(num_layers: int, num_stages: int) -> list[range]:
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(num_stages)]


def balance(weights: Sequence[float], num_stages: int, capacities: Sequence[float] | None = None) -> list[int]:
    """Contiguous stage sizes (each >= 1) minimising the heaviest stage; ties go to the most even counts.

    ``capacities`` (e.g. each stage's replicas) divide each stage's weight, and the even counts are in proportion
    to them. Exact dynamic program over prefix sums: O(stages * layers^2), instant for thousands of layers.
    """
    shares = [1.0] * num_stages if capacities is None else [float(c) for c in capacities]
    if len(shares) != num_stages or not all(c > 0 for c in shares):
        raise ValueError(f"capacities {capacities} must give one positive number per stage ({num_stages})")
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    inf = (float("inf"), float("inf"))
    # best[k][j]: (heaviest stage, spread of layer counts) for the first j layers in k stages
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    choice = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    even = [n * c / sum(shares) for c in shares]
    for k in range(1, num_stages + 1):
        for j in range(k, n - (num_stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                heavy = max(best[k - 1][i][0], (prefix[j] - prefix[i]) / shares[k - 1])
                spread = max(best[k - 1][i][1], abs((j - i) - even[k - 1]))
                if (heavy, spread) < best[k][j]:
                    best[k][j] = (heavy, spread)
                    choice[k][j] = i
    sizes, j = [], n
    for k in range(num_stages, 0, -1):
        i = choice[k][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def cut(layers: Sequence[nn.Module], sizes: Sequence[int]) -> list[nn.Sequential]:
    """The layers of each stage as an ``nn.Sequential`` (the modules are shared, not copied).

    Each layer keeps its name in ``layers`` ("3" for the fourth layer of a plain ``nn.Sequential``), so a
    stage's ``state_dict`` keys are the full model's keys.
    """
    if isinstance(layers, nn.Sequential):
        named = [(name, layer) for name, layer in layers._modules.items() if layer is not None]  # repeats too
    else:
        named = [(str(i), layer) for i, layer in enumerate(layers)]
    stages, start = [], 0
    for size in sizes:
        stages.append(nn.Sequential(OrderedDict(named[start : start + size])))
        start += size
    return stages
