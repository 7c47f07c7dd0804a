"""What a step writes into its batch, given to the batch the hooks after it read, on every rank.

anomalib's ``test_step`` puts its predictions into the batch (``batch.update(pred_score=...)``, in place) and its
``Evaluator`` callback reads them from the batch ``on_test_batch_end`` is given (found by review: every anomalib
model's test failed; a step writing ``batch["pred"].copy_(...)`` gave its callback the loader's zeros, silently). On one
device the hooks get the batch the step changed. Under a pipeline the step runs on copies of the micro-batches, on
the last stage's rank, so the entries it set or changed at the batch's top level (a dict's or mapping's keys, a
dataclass's or an object's attributes) are put together from the micro-batches' (tensors and per-row lists by their
rows, in order; a value every micro-batch wrote alike as it is), sent with the step's result, and set on every rank's
batch: a tensor the step wrote in place is written in place there too, anything else set anew. So too a training
step's, for ``on_train_batch_end`` (a prediction the step keeps on its batch for a callback's accuracy).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from lightning_pipe.strategy.values import sendable

__all__ = ["BatchWrites", "apply_writes", "read_after"]


def read_after(module: Any, hook: str) -> bool:
    """Whether a ``hook`` after the step (``on_train_batch_end``) may read its batch: the module's or a callback's of
    one's own (not Lightning's, whose hooks read no batch). A training step's writes travel only then: a step
    normalizing its images in place (``x.div_(255)``) would otherwise send them to every rank at every step."""
    trainer = getattr(module, "_trainer", None)
    for owner in [module, *(getattr(trainer, "callbacks", None) or [])]:
        method = getattr(type(owner), hook, None)
        if method is not None and (getattr(method, "__module__", "") or "").split(".")[0] not in _OWN:
            return True
    return False


_OWN = ("lightning", "pytorch_lightning", "lightning_pipe")


def _entries(batch: Any) -> dict[str, Any] | None:
    """The top-level entries of ``batch`` a step can set, by name: a mapping's keys, a dataclass's fields and an
    object's attributes, a tuple's or list's tensors by position ("0", "1", ...); None for a batch with none."""
    if isinstance(batch, Mapping):
        return {key: value for key, value in batch.items() if isinstance(key, str)}
    if isinstance(batch, (list, tuple)):
        return {str(index): value for index, value in enumerate(batch) if isinstance(value, torch.Tensor)}
    entries = {field.name: getattr(batch, field.name, None) for field in dataclasses.fields(batch)} \
        if dataclasses.is_dataclass(batch) and not isinstance(batch, type) else {}  # (slots=True: no __dict__)
    if not isinstance(batch, torch.Tensor) and hasattr(batch, "__dict__"):
        entries.update((key, value) for key, value in vars(batch).items() if not key.startswith("_"))
    return entries if entries or hasattr(batch, "__dict__") else None


def _version(value: Any) -> int:
    """A tensor's version (none for an inference tensor, which keeps no counter)."""
    try:
        return value._version if isinstance(value, torch.Tensor) else 0
    except RuntimeError:
        return 0


def _changed(before: tuple[Any, int] | None, value: Any) -> bool:
    """Whether an entry was set anew (another object: the one before is kept alive, so that its id is not reused) or
    written in place (its version)."""
    return before is None or before[0] is not value or before[1] != _version(value)


class BatchWrites:
    """The micro-batches of one step, as the step found them (:meth:`found`), for what it wrote: given at once (an
    evaluation step's) or one by one as their runs start (:meth:`add`: a training step's, run inside the schedule)."""

    def __init__(self, microbatches: Sequence[Any] = (), rows: Sequence[int] = ()) -> None:
        self.parts: dict[int, tuple[Any, int, dict[str, tuple[Any, int]]]] = {}
        for index, (part, count) in enumerate(zip(microbatches, rows)):
            self.add(index, part, count)

    def add(self, index: int, part: Any, rows: int) -> None:
        """Micro-batch ``index`` (``part``, of ``rows`` rows), before the step runs on it."""
        self.parts[index] = (part, rows, {name: (value, _version(value))
                                          for name, value in (_entries(part) or {}).items()})

    def found(self, step: str) -> dict[str, Any] | None:
        """The entries the step set or changed in place, put together over the micro-batches, each with whether it
        was written in place; None where none."""
        parts = [self.parts[index] for index in sorted(self.parts)]
        afters = [_entries(part) for part, _, _ in parts]
        if any(after is None for after in afters):
            return None
        names = [name for after, (_, _, before) in zip(afters, parts) for name, value in after.items()  # type: ignore
                 if _changed(before.get(name), value)]
        writes: dict[str, Any] = {}
        for name in dict.fromkeys(names):
            whole = _whole([after.get(name) for after in afters], [rows for _, rows, _ in parts])  # type: ignore
            if whole is _UNKNOWN or not sendable(whole):
                warnings.warn(f"{step} set {name!r} on its batch to values that are neither one per row nor alike in "
                              f"every micro-batch, or cannot travel between ranks (tensors, numbers, strings and "
                              f"lists or dicts of them can): the hooks after it (on_*_batch_end) get the batch without "
                              f"it. Return it from {step} instead (its outputs are put together over the "
                              f"micro-batches)", stacklevel=3)
                continue
            # written in place (the same tensor, changed) or set anew: set anew, the loader's tensor is not written
            in_place = all(name in before and before[name][0] is after[name]  # type: ignore[index]
                           for after, (_, _, before) in zip(afters, parts))
            writes[name] = [whole, in_place]
        return writes or None


def _whole(values: list[Any], rows: list[int]) -> Any:
    """The micro-batches' ``values`` of an entry (of ``rows`` rows each) as the batch's: per-row tensors and lists
    joined, a value alike in all as it is; else :data:`_UNKNOWN`."""
    if all(isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == count
           for value, count in zip(values, rows)):
        return torch.cat(values)
    if all(isinstance(value, list) and len(value) == count for value, count in zip(values, rows)):
        return [item for value in values for item in value]
    first = values[0]
    same = all(value is first or isinstance(value, (str, int, float, bool, type(None))) and value == first
               or isinstance(value, torch.Tensor) and isinstance(first, torch.Tensor)
               and value.shape == first.shape and bool(torch.equal(value, first)) for value in values)
    return first if same else _UNKNOWN


_UNKNOWN = object()


def apply_writes(batch: Any, writes: dict[str, Any]) -> None:
    """Set ``writes`` (:meth:`BatchWrites.found`) on ``batch``: a tensor the step wrote in place is written in place
    (the step's ``copy_``), anything else set anew, on the device of the batch's tensors."""
    entries = _entries(batch) or {}
    device = next((value.device for value in entries.values() if isinstance(value, torch.Tensor)), None)
    for name, (value, in_place) in writes.items():
        held = entries.get(name)
        if in_place and isinstance(held, torch.Tensor) and isinstance(value, torch.Tensor) \
                and held.shape == value.shape and held.dtype == value.dtype:
            held.copy_(value.to(held.device))
            continue
        if isinstance(value, torch.Tensor) and (isinstance(held, torch.Tensor) or device is not None):
            value = value.to(held.device if isinstance(held, torch.Tensor) else device)  # (the batch's device)
        if isinstance(batch, MutableMapping):
            batch[name] = value
        elif isinstance(batch, list):
            batch[int(name)] = value
        elif not isinstance(batch, (Mapping, tuple)):  # (a tuple's item is only ever written in place)
            object.__setattr__(batch, name, value)
