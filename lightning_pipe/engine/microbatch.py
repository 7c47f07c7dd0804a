"""Split a batch into micro-batches along dim 0, and weight their losses so the sum is the batch mean."""

from __future__ import annotations

from typing import Any

import torch

from .tree import tree_flatten, tree_unflatten

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
    """Split ``batch`` (a tensor or a tuple/list/dict tree of them) into micro-batches along dim 0.

    Uneven batches give uneven micro-batches (10 rows into 4: 3, 3, 2, 2). A batch with fewer rows than
    ``num_microbatches`` gives one micro-batch per row. 0-dim tensors and non-tensor leaves are given to
    every micro-batch as they are.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches ({num_microbatches}) must be >= 1")
    rows = batch_rows(batch)
    count = max(1, min(num_microbatches, rows))
    leaves, spec = tree_flatten(batch)
    pieces = [torch.tensor_split(t, count, dim=0) if t.dim() > 0 else (t,) * count for t in leaves]
    return [tree_unflatten([piece[i] for piece in pieces], spec) for i in range(count)]


def microbatch_weights(microbatches: list[Any]) -> list[float]:
    """Weight of each micro-batch's mean loss so that their weighted sum is the mean loss over the batch."""
    rows = [batch_rows(mb) for mb in microbatches]
    total = sum(rows)
    return [r / total for r in rows]
