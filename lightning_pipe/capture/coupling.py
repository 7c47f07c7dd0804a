"""Where a captured forward lets the rows of a batch meet: a value with the batch's rows along two dimensions.

A pipeline runs each micro-batch alone, so such a value (CLIP's image-text similarity logits, ``rows x rows``) pairs a
row with the others of its micro-batch only, and a contrastive loss over it is not the one a device running the whole
batch computes. Only a capture whose batch size stayed symbolic can tell: there the rows are one symbol.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

__all__ = ["rows_meet"]


def rows_meet(nodes: Sequence[fx.Node], user_inputs: Sequence[fx.Node]) -> str | None:
    """The first op among ``nodes`` that makes a value with the batch's rows along two dimensions, described (its
    module, op and shape); else, where the capture fixed the rows of an input, that; else None."""
    rows = _rows_symbols(user_inputs)
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
    fixed = _fixed_rows(user_inputs)
    if fixed is None:
        return None
    return (f"the graph fixes the batch's rows to {fixed}: the forward takes their number as a Python int, as "
            f"torch.arange(len(logits)) does for a contrastive loss's labels (each micro-batch size is captured anew)")


def _firsts(user_inputs: Sequence[fx.Node]) -> list[int | torch.SymInt]:
    """The size of each tensor input's dim 0 (the inputs are split along it)."""
    return [value.shape[0] for node in user_inputs
            if isinstance(value := node.meta.get("val"), torch.Tensor) and value.dim() > 0]


def _fixed(size: int | torch.SymInt) -> bool:
    return isinstance(size, int) or is_concrete_int(size)


def _rows_symbols(user_inputs: Sequence[fx.Node]) -> set[object]:
    """The symbols of the batch's rows: those of the tensor inputs' dim 0 whose example size is the first input's
    (export gives inputs their own symbols, CLIP's texts and images two; a position tensor or a mask of the sequence's
    size is left out); empty where the capture fixed them."""
    firsts = _firsts(user_inputs)
    if not firsts:
        return set()
    example = _example(firsts[0])
    return {size.node.expr for size in firsts if not _fixed(size) and _example(size) == example}


def _example(size: int | torch.SymInt) -> object:
    """The example's value of a size, read without a guard."""
    return int(size) if _fixed(size) else size.node.hint


def _fixed_rows(user_inputs: Sequence[fx.Node]) -> int | None:
    """The rows a symbolic capture fixed some tensor input's dim 0 to (the example's rows, read off the first
    input's), or None."""
    firsts = _firsts(user_inputs)
    if not firsts:
        return None
    example = _example(firsts[0])
    return int(example) if any(_fixed(size) and int(size) == example for size in firsts) else None
