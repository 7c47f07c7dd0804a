"""Where a captured forward lets the rows of a batch meet: a value with the batch's rows along two dimensions.

A pipeline runs each micro-batch alone, so such a value (CLIP's image-text similarity logits, ``rows x rows``) pairs a
row with the others of its micro-batch only, and a contrastive loss over it is not the one a device running the whole
batch computes. A capture whose batch size stayed symbolic shows it: there the rows are symbols. One that fixed the
rows (the forward took their number as an int, as a contrastive loss's labels do) is reported as that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from .patterns import fixed_size

__all__ = ["rows_meet"]


def rows_meet(nodes: Sequence[fx.Node], user_inputs: Sequence[fx.Node]) -> str | None:
    """The first op among ``nodes`` that makes a value with the batch's rows along two dimensions, described (its
    module, op and shape); else, where the capture fixed the rows of an input, that; else None.

    The rows are the tensor inputs' dim 0 (each is split along it) of the first input's example size: export gives
    inputs their own symbols (CLIP's texts and images two), and a position tensor or a mask of the sequence's size
    is left out."""
    firsts = [value.shape[0] for node in user_inputs
              if isinstance(value := node.meta.get("val"), torch.Tensor) and value.dim() > 0]
    if not firsts:
        return None
    example = _example(firsts[0])
    rows = {size.node.expr for size in firsts if fixed_size(size) is None and _example(size) == example}
    for node in nodes if rows else ():
        value = node.meta.get("val")
        if node.op != "call_function" or not isinstance(value, torch.Tensor):
            continue
        if sum(isinstance(size, torch.SymInt) and size.node.expr in rows for size in value.shape) >= 2:
            stack = node.meta.get("nn_module_stack") or {}
            module = next(reversed(stack.values()))[0] if stack else ""
            shape = ", ".join("rows" if isinstance(s, torch.SymInt) and s.node.expr in rows else str(s)
                              for s in value.shape)
            where = f"module {module!r}" if module else "the model's own forward"
            return f"{getattr(node.target, '__name__', node.target)} in {where} makes a ({shape}) value"
    if not any(fixed_size(size) == example for size in firsts):
        return None
    return (f"the graph fixes the batch's rows to {example}: the forward takes their number as a Python int, as "
            f"torch.arange(len(logits)) does for a contrastive loss's labels (each micro-batch size is captured anew)")


def _example(size: int | torch.SymInt) -> object:
    """The example's value of a size, read without a guard."""
    fixed = fixed_size(size)
    return fixed if fixed is not None else size.node.hint
