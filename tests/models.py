"""Small models for the tests: a plain MLP, one whose stages pass tuples, and a loss for each."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["mlp", "TupleIn", "TupleOut", "tuple_model", "mse_loss", "make_batch"]


def mlp(num_layers: int = 8, width: int = 16, seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """``num_layers`` Linear+Tanh blocks (with dropout, to test re-materialization's RNG replay)."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        block = [nn.Linear(width, width), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else [])
        layers.append(nn.Sequential(*block))
    return nn.Sequential(*layers)


class TupleOut(nn.Module):
    """Turns one tensor into (features, skip, a float scale that needs no gradient, an int tensor)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.linear(x), x * 2.0, torch.arange(x.shape[0]), 0.5


class TupleIn(nn.Module):
    """Passes a tuple through, mixing its parts; the last one of a chain collapses it back to a tensor."""

    def __init__(self, width: int, collapse: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.collapse = collapse

    def forward(self, inputs: tuple) -> torch.Tensor | tuple:
        h, skip, index, scale = inputs
        assert index.dtype == torch.int64 and isinstance(scale, float)
        h = torch.tanh(self.linear(h)) + scale * skip
        return h if self.collapse else (h, skip, index, scale)


def tuple_model(width: int = 16, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(TupleOut(width), TupleIn(width), TupleIn(width), TupleIn(width), TupleIn(width),
                         TupleIn(width, collapse=True), nn.Linear(width, width))


def mse_loss(output: torch.Tensor, microbatch: tuple) -> torch.Tensor:
    return F.mse_loss(output, microbatch[1])


def make_batch(rows: int, width: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator), torch.randn(rows, width, generator=generator)
