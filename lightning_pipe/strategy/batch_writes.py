"""What an evaluation step writes into its batch, given to the batch the hooks after it read, on every rank.

anomalib's ``test_step`` puts its predictions into the batch (``batch.update(pred_score=...)``, in place) and its
``Evaluator`` callback reads them from the batch ``on_test_batch_end`` is given (found by review: every anomalib
model's test failed; a step writing ``batch["pred"].copy_(...)`` gave its callback the loader's zeros, silently). On one
device the hooks get the batch the step changed. Under a pipeline the step runs on copies of the micro-batches, on
the last stage's rank, so the entries it set or changed at the batch's top level (a dict's or mapping's keys, a
dataclass's or an object's attributes) are put together from the micro-batches' (tensors and per-row lists by their
rows, in order; a value every micro-batch wrote alike as it is), sent with the step's result, and set on every rank's
batch: a tensor the batch already held of that shape is written in place, as the step did.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

__all__ = ["BatchWrites", "apply_writes"]


def _entries(batch: Any) -> dict[str, Any] | None:
    """The top-level entries of ``batch`` a step can set, by name; None for a batch with none (a tensor, a tuple)."""
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if isinstance(key, str)}
    if isinstance(batch, (torch.Tensor, list, tuple)) or not hasattr(batch, "__dict__"):
        return None
    return {key: value for key, value in vars(batch).items() if not key.startswith("_")}


def _mark(value: Any) -> tuple[int, int]:
    return id(value), value._version if isinstance(value, torch.Tensor) else 0


class BatchWrites:
    """The micro-batches of one evaluation step, as the step found them (:meth:`found`), for what it wrote."""

    def __init__(self, microbatches: list[Any], rows: list[int]) -> None:
        self.microbatches, self.rows = microbatches, rows
        self.before = [{name: _mark(value) for name, value in (_entries(part) or {}).items()} for part in microbatches]

    def found(self, step: str) -> dict[str, Any] | None:
        """The entries the step set or changed in place, put together over the micro-batches; None where none."""
        afters = [_entries(part) for part in self.microbatches]
        if any(after is None for after in afters):
            return None
        names = [name for after, before in zip(afters, self.before) for name, value in after.items()  # type: ignore
                 if before.get(name) != _mark(value)]
        writes: dict[str, Any] = {}
        for name in dict.fromkeys(names):
            values = [after.get(name) for after in afters]  # type: ignore[union-attr]
            whole = self._whole(values)
            if whole is _UNKNOWN:
                warnings.warn(f"{step} set {name!r} on its batch to values that are neither one per row nor alike in "
                              f"every micro-batch: the hooks after it (on_*_batch_end) get the batch without it. "
                              f"Return it from {step} instead (its outputs are put together over the micro-batches)",
                              stacklevel=3)
                continue
            writes[name] = whole
        return writes or None

    def _whole(self, values: list[Any]) -> Any:
        if all(isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == rows
               for value, rows in zip(values, self.rows)):
            return torch.cat(values)
        if all(isinstance(value, list) and len(value) == rows for value, rows in zip(values, self.rows)):
            return [item for value in values for item in value]
        first = values[0]
        same = all(value is first or isinstance(value, (str, int, float, bool, type(None))) and value == first
                   or isinstance(value, torch.Tensor) and isinstance(first, torch.Tensor)
                   and value.shape == first.shape and bool(torch.equal(value, first)) for value in values)
        return first if same else _UNKNOWN


_UNKNOWN = object()


def apply_writes(batch: Any, writes: dict[str, Any]) -> None:
    """Set ``writes`` (:meth:`BatchWrites.found`) on ``batch``: a tensor it holds of the same shape and dtype is written
    in place (the step's ``copy_``), anything else set."""
    entries = _entries(batch) or {}
    for name, value in writes.items():
        held = entries.get(name)
        if isinstance(held, torch.Tensor) and isinstance(value, torch.Tensor) and held.shape == value.shape \
                and held.dtype == value.dtype:
            held.copy_(value.to(held.device))
            continue
        if isinstance(value, torch.Tensor) and isinstance(held, torch.Tensor):
            value = value.to(held.device)
        if isinstance(batch, MutableMapping):
            batch[name] = value
        elif not isinstance(batch, Mapping):
            object.__setattr__(batch, name, value)
