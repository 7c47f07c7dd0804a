"""What the partition benchmark needs: its models (sleeping layers with profiled costs, and a real CNN).

Not imported from ``tests/`` (benchmarks are run by users, tests by CI). Its layers are
:class:`benchmarks.common.SleepLayer`, the one sleeping layer every benchmark uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from benchmarks.common import SleepCosts, SleepLayer, run_ranks

__all__ = ["sleeping_layer", "LayerSpec", "MODELS", "build_model", "sample_batch", "loss_fn", "is_real", "run_ranks",
           "rank_threads"]


# -- ranks ------------------------------------------------------------------------------------------------------------
def rank_threads(ranks: int) -> int:
    """Each rank's share of the cores, at least one thread."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // ranks)


# -- models -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """One layer of a sleeping model: forward milliseconds (backward is twice that) and parameters."""

    name: str
    forward_ms: float
    parameters: int


def _gpt_like() -> list[LayerSpec]:
    """GPT-2 small's shape (vocab 50257, width 768, 12 blocks, 1024 tokens): per token a block costs ~17 MFLOP
    forward (projections 14.2, attention 3.1), the untied head 77 MFLOP (4.5 blocks), the embedding next to nothing.
    Times at 3 ms per block; parameters divided by 100 (38.6M in the embedding and in the head, 7.1M per block)."""
    block = LayerSpec("block", 3.0, 70_800)
    return [LayerSpec("embed", 0.15, 386_000), *[block] * 12, LayerSpec("head", 13.4, 386_000)]


def _cnn_like() -> list[LayerSpec]:
    """A CNN on 32x32 images whose channels grow slower than its resolution falls (64, 64 | 96, 96 | 128, 128 |
    192, 192, halving the resolution between pairs), so early layers cost most and late layers hold the parameters:
    3x3 convolution MACs 1.8M, 37.7M, 14.2M, 21.2M, 7.1M, 9.4M, 3.5M, 5.3M, then a linear classifier;
    4M MACs per millisecond."""
    channels = [(3, 64, 32), (64, 64, 32), (64, 96, 16), (96, 96, 16), (96, 128, 8), (128, 128, 8), (128, 192, 4),
                (192, 192, 4)]
    specs = [LayerSpec(f"conv{i + 1}", c_in * c_out * 9 * side * side / 4e6, c_in * c_out * 9 + c_out)
             for i, (c_in, c_out, side) in enumerate(channels)]
    return [*specs, LayerSpec("fc", 0.05, 1930)]


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, pool: bool) -> None:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        super().__init__(*layers, *([nn.MaxPool2d(2)] if pool else []))


def _real_cnn() -> nn.Sequential:
    """The CNN's shape at a quarter of the channels, with real convolutions (32x32 RGB in, 10 classes out)."""
    c = [16, 16, 24, 24, 32, 32, 48, 48]
    blocks: list[nn.Module] = []
    c_in = 3
    for i, c_out in enumerate(c):
        blocks.append(_ConvBlock(c_in, c_out, pool=i % 2 == 1))
        c_in = c_out
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(48 * 2 * 2, 10)))
    return nn.Sequential(*blocks)


MODELS: dict[str, Callable[[], Any]] = {"gpt_sleep": _gpt_like, "cnn_sleep": _cnn_like, "cnn_real": _real_cnn}


def build_model(name: str, seed: int = 0, scale: float = 1.0) -> nn.Sequential:
    """The named model, the same on every rank; sleeping layers sleep ``scale`` times their costs."""
    torch.manual_seed(seed)
    made = MODELS[name]()
    if isinstance(made, nn.Sequential):
        return made
    return nn.Sequential(*[sleeping_layer(scale * s.forward_ms / 1e3, scale * 2 * s.forward_ms / 1e3, s.parameters)
                           for s in made])


def sleeping_layer(forward_s: float, backward_s: float, num_parameters: int = 0) -> SleepLayer:
    """The benchmarks' one sleeping layer (:class:`benchmarks.common.SleepLayer`) with these costs and parameters."""
    return SleepLayer(SleepCosts.of(forward_s, backward_s), num_parameters=num_parameters)


def is_real(name: str) -> bool:
    """Whether the model computes (its time depends on the cores) rather than sleeps."""
    return isinstance(MODELS[name](), nn.Module)


def sample_batch(name: str, rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of ``rows`` rows for the named model."""
    generator = torch.Generator().manual_seed(seed)
    if name == "cnn_real":
        return torch.randn(rows, 3, 32, 32, generator=generator), torch.randint(0, 10, (rows,), generator=generator)
    return torch.randn(rows, 4, generator=generator), torch.zeros(rows, 4)


def loss_fn(name: str) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    if name == "cnn_real":
        return _cross_entropy
    return _square


def _cross_entropy(output: torch.Tensor, microbatch: Any) -> torch.Tensor:
    return nn.functional.cross_entropy(output, microbatch[1])


def _square(output: torch.Tensor, microbatch: Any) -> torch.Tensor:
    return output.pow(2).mean()

