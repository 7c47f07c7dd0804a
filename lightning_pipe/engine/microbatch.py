"""Split a batch into micro-batches along dim 0, and weight their losses so the sum is the batch mean."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from .tree import rebuild_mapping, tree_flatten

__all__ = ["batch_rows", "split_batch", "microbatch_weights"]


def batch_rows(batch: Any) -> int:
    """The number of rows (size of dim 0) shared by every tensor of ``batch`` that has a dim 0."""
    leaves, _ = tree_flatten(batch)
    sizes = {tuple(t.shape[:1]) for t in leaves if t.dim() > 0}
    if not sizes:
        raise ValueError("cannot split a batch without tensors (of at least one dimension) into micro-batches")
    if len(sizes) > 1:
        shapes = [tuple(t.shape) for t in leaves]
        raise ValueError(
            f"every tensor of a batch must have the same size along dim 0 to be split into micro-batches; "
            f"got shapes {shapes}. Put per-batch constants in a 0-dim tensor or a non-tensor value."
        )
    return sizes.pop()[0]


def split_batch(batch: Any, num_microbatches: int) -> list[Any]:
    """Split ``batch`` (a tensor or a tuple/list/dict/mapping/dataclass tree of them) into micro-batches along dim 0.

    Uneven batches give uneven micro-batches (10 rows into 4: 3, 3, 2, 2). A batch with fewer rows than
    ``num_microbatches`` gives one micro-batch per row. A list or tuple of non-tensor items (strings, ids, dicts
    without tensors) as long as the batch has rows is per-row data and is split with the rows (a list of 8 file names
    in a batch of 8 rows gives each micro-batch its own names); 0-dim tensors and other non-tensor values are given to
    every micro-batch as they are. A container that holds tensors, such as the batch's ``(x, y)`` tuple, is always
    a container, whatever its length.

    Raises ``ValueError`` for a batch of 0 rows: every rank is given the same batch, so each raises it before any
    rank waits for another.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) must be >= 1")
    rows = batch_rows(batch)
    if rows == 0:
        raise ValueError("the batch has 0 rows: a pipeline step needs at least one; skip empty batches before the "
                         "step (e.g. drop_last=True in the DataLoader, or a filter in the dataset)")
    count = max(1, min(num_microbatches, rows))
    base, extra = divmod(rows, count)  # the first `extra` micro-batches get one row more, as torch.tensor_split does
    starts = [i * base + min(i, extra) for i in range(count + 1)]
    return [_take(batch, rows, slice(starts[i], starts[i + 1])) for i in range(count)]


def _take(tree: Any, rows: int, part: slice) -> Any:
    """The rows ``part`` of ``tree``."""
    if isinstance(tree, torch.Tensor):
        return tree[part] if tree.dim() > 0 else tree
    if _is_per_row(tree, rows):
        return tree[part]
    if isinstance(tree, tuple):
        children = [_take(child, rows, part) for child in tree]
        return type(tree)(*children) if hasattr(tree, "_fields") else tuple(children)
    if isinstance(tree, list):
        return [_take(child, rows, part) for child in tree]
    if isinstance(tree, dict):
        return {key: _take(child, rows, part) for key, child in tree.items()}
    if isinstance(tree, Mapping):  # Hugging Face's BatchEncoding, a UserDict: split as a dict, kept of its type
        return rebuild_mapping(type(tree), {key: _take(child, rows, part) for key, child in tree.items()})
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # each field split, the rest kept
        return dataclasses.replace(tree, **{f.name: _take(getattr(tree, f.name), rows, part)
                                            for f in dataclasses.fields(tree) if f.init})
    return tree


def _is_per_row(tree: Any, rows: int) -> bool:
    """A plain list or tuple of ``rows`` items none of which holds a tensor: one item per row."""
    return (type(tree) in (list, tuple) and len(tree) == rows
            and not any(tree_flatten(item)[0] for item in tree))


def microbatch_weights(microbatches: list[Any]) -> list[float]:
    """Weight of each micro-batch's mean loss so that their weighted sum is the mean loss over the batch."""
    rows = [batch_rows(mb) for mb in microbatches]
    total = sum(rows)
    return [r / total for r in rows]
