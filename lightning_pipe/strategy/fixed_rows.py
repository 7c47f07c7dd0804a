"""Whether a captured model whose graph fixed the batch's rows lets them meet, measured.

A forward that takes the rows' number as a Python int (``b = x.shape[0]`` handed to einops, as x-transformers does;
``h.new_zeros(len(x), d)``) is captured for that number, and the graph cannot tell whether the number only sizes
tensors (one device's training) or pairs or limits the rows (labels ``torch.arange(len(logits))``, an expert's
capacity: a micro-batch's rows meet only each other). :func:`measured_rows` runs the model itself, eagerly, on the
first two micro-batches' inputs joined and apart (:func:`~lightning_pipe.engine.rows.rows_verdict`): outputs that
agree, every tensor of them holding the rows, need no warning (found by review: every einops model was warned);
outputs that differ are a measured difference. The model's parameters, buffers, modes and attributes are put back,
and a model built on meta, a very large one, or one whose forward stores tensors for the step, is not run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.engine.kept import kept_buffers, kept_modes
from lightning_pipe.engine.microbatch import owned
from lightning_pipe.engine.rows import rows_verdict
from lightning_pipe.engine.tree import tree_flatten, tree_map_tensors, tree_unflatten
from lightning_pipe.strategy.capture_keeping import no_logging
from lightning_pipe.strategy.captured import CapturedModule

__all__ = ["measured_rows"]

_UNKNOWN = ("unknown", 0.0)
_LARGEST = 1 << 26  # elements of a model run so (its parameters copied aside and put back): above, not run


class _Called(nn.Module):
    """A model called with one call's ``(args, kwargs)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, call: tuple[tuple, dict[str, Any]]) -> Any:
        args, kwargs = call
        return self.model(*args, **kwargs)


def measured_rows(captured: CapturedModule, step: str, microbatches: Sequence[Any],
                  device: torch.device | None) -> tuple[str, float]:
    """:func:`~lightning_pipe.engine.rows.rows_verdict` of ``captured``'s model on the model's call of ``step`` for
    the first two ``microbatches``: ``("meet", difference)``, ``("apart", 0.0)`` or ``("unknown", 0.0)``."""
    model = captured.model
    tensors = [*model.parameters(), *model.buffers()]
    if len(microbatches) < 2 or captured.stored or any(t.is_meta for t in tensors) \
            or sum(t.numel() for t in tensors) > _LARGEST:
        return _UNKNOWN
    device = tensors[0].device if tensors else device  # (the model is moved to the rank's device after the cut)
    calls = []
    try:
        with torch.random.fork_rng(devices=[]), no_logging(captured.module), \
                kept_buffers([captured.module], skip=model), kept_modes([captured.module, model]):
            for microbatch in microbatches[:2]:
                found = captured.model_calls(step, owned(microbatch), (0,), {})
                if len(found) != 1:  # several calls per step: their outputs are not one tensor's rows
                    return _UNKNOWN
                calls.append(found[0])
    except Exception:  # noqa: BLE001 - the capture said what it had to; no telling here
        return _UNKNOWN
    calls = _padded_alike(*[tree_map_tensors(lambda t: t.to(device), call) for call in calls])
    with _attributes_kept(model), _parameters_kept(model), torch.random.fork_rng(devices=[]):
        return rows_verdict(_Called(model), calls[0], calls[1], device)


def _padded_alike(first: Any, second: Any) -> list[Any]:
    """Two calls' inputs with each pair of tensors that differ past dim 0 padded with zeros at the ends of those dims
    to the larger sizes, so that they join along the rows (a step that pads each micro-batch to its own longest
    sequence: found by review, a false warning), both run so apart and joined."""
    leaves, spec = tree_flatten(first)
    others, other_spec = tree_flatten(second)
    if spec != other_spec:
        return [first, second]
    padded: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for a, b in zip(leaves, others):
        if a.dim() == b.dim() >= 2 and a.shape[1:] != b.shape[1:]:
            sizes = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]
            a, b = (_pad_to(t, sizes) for t in (a, b))
        padded[0].append(a)
        padded[1].append(b)
    return [tree_unflatten(padded[0], spec), tree_unflatten(padded[1], spec)]


def _pad_to(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    out = tensor.new_zeros((tensor.shape[0], *sizes))
    out[(slice(None), *(slice(0, size) for size in tensor.shape[1:]))] = tensor
    return out


@contextmanager
def _parameters_kept(model: nn.Module) -> Iterator[None]:
    """``model``'s parameters' values as they were, afterwards (a forward that updates one in training, an EMA
    codebook kept as a parameter)."""
    kept = [(parameter, parameter.detach().clone()) for parameter in model.parameters()]
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, value in kept:
                parameter.copy_(value)


@contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Each of ``model``'s modules' plain attributes as they were, afterwards (a step counter, a cache the forward
    sets); its parameters, buffers and children are not replaced by a forward."""
    kept = [(module, {key: value for key, value in vars(module).items()
                      if key not in ("_parameters", "_buffers", "_modules")}) for module in model.modules()]
    try:
        yield
    finally:
        for module, attributes in kept:
            for key in [key for key in vars(module) if key not in attributes
                        and key not in ("_parameters", "_buffers", "_modules")]:
                delattr(module, key)
            vars(module).update(attributes)
