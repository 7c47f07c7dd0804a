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


class _ZerosBeside(nn.Module):
    """``x -> (x, zeros_like(x))``: a buffer for the next layer to add into (PyG's message passing makes one)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.zeros_like(x)


class _AddInto(nn.Module):
    """``(h, z) -> h + z.index_add_(0, rows, linear(h))``: writes the received buffer in place, while ``linear`` keeps
    ``h`` (received in the same message) for its backward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, z = pair
        return h + z.index_add_(0, torch.arange(len(h)), self.linear(h))


class _PreActivated(nn.Module):
    """A pre-activation block of the user's: ``x.relu_()`` first (no ``inplace`` attribute to tell it by)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.relu_())


def in_place_model(width: int = 16, seed: int = 0) -> nn.Sequential:
    """Layers that write their input in place where a 2- or 4-stage uniform cut starts a stage (at 2, 4 and 6):
    ``nn.ReLU(inplace=True)`` after a Linear, as torchvision's VGG has them, a block of the user's starting with
    ``x.relu_()``, and a buffer made on one stage and added into on the next."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), _ZerosBeside(), _AddInto(width), nn.Linear(width, width),
                         _PreActivated(width), nn.Linear(width, width), nn.ReLU(inplace=True),
                         nn.Linear(width, width))


def mse_loss(output: torch.Tensor, microbatch: tuple) -> torch.Tensor:
    return F.mse_loss(output, microbatch[1])


def make_batch(rows: int, width: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator), torch.randn(rows, width, generator=generator)
