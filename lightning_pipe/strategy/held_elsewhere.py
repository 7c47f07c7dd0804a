"""A parameter another rank holds, as a method of the model run in a hook sees it on a rank holding none of its
module's parameters: lightly's ``SwaVPrototypes.normalize()`` in ``on_train_batch_start``, which every rank runs,
divides each prototype's weight by its norm in place. The rank holding the weight does that; elsewhere the method runs
on :class:`HeldElsewhere` tensors (shape and dtype only, on the meta device), whose in-place changes change nothing.
A value computed from them that would leave the method (returned, read as a number, moved to a device, mixed with a
tensor holding values in place) is refused with the refusal of the parameter it came from: this rank cannot compute
it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["HeldElsewhere", "methods_in_hooks", "in_a_method", "refuse_escaped"]

_DEPTH = [0]  # how deep this process is in methods of the model run on stand-ins outside a step's code
# reads of a value, or moves of it to where values are, that a tensor without values cannot give
_READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu",
                    "cuda", "to", "__array__", "__format__"})


class HeldElsewhere(torch.Tensor):
    """A tensor with a parameter's shape and dtype and no values (meta), standing for a parameter another rank holds;
    ``refusal`` says why a value made from it cannot be had here."""

    refusal: str

    @staticmethod
    def of(parameter: torch.Tensor, refusal: str) -> HeldElsewhere:
        made = torch.Tensor._make_subclass(HeldElsewhere, torch.empty(parameter.shape, dtype=parameter.dtype,
                                                                       device="meta"))
        made.refusal = refusal
        return made

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        leaves = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        refusal = next((leaf.refusal for leaf in leaves if isinstance(leaf, HeldElsewhere)), "")
        name = getattr(func, "__name__", "")
        with torch._C.DisableTorchFunctionSubclass():  # (its own attributes read as a plain tensor's)
            if name in _READS and not (name == "to" and not _moves(args, kwargs)):
                raise RuntimeError(refusal)
            target = args[0] if args else None
            writes = name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))
            if writes and isinstance(target, torch.Tensor) and not isinstance(target, HeldElsewhere) \
                    and not target.is_meta:  # a tensor with values written from values this rank lacks
                raise RuntimeError(refusal)
            # tensors with values beside it (a buffer, a constant: weight.mul_(mask)) take part by their shapes
            args, kwargs = pytree.tree_map(lambda leaf: torch.empty_like(leaf, device="meta") if isinstance(
                leaf, torch.Tensor) and not isinstance(leaf, HeldElsewhere) and not leaf.is_meta else leaf,
                (args, kwargs))
        out = super().__torch_function__(func, types, args, kwargs)
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, HeldElsewhere):
                leaf.refusal = refusal
        return out


def _moves(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to(...)`` call names a device (or a tensor on one), not only a dtype."""
    given = [*args[1:], *kwargs.values()]
    return any(isinstance(item, (str, torch.device)) or isinstance(item, torch.Tensor) for item in given)


def in_a_method() -> bool:
    """Whether a method of the model runs on a stand-in outside a step's code (a hook's call of it)."""
    return _DEPTH[0] > 0


@contextmanager
def methods_in_hooks(active: bool) -> Iterator[None]:
    """Inside (where ``active``), a method of the model runs on a stand-in outside a step's code."""
    _DEPTH[0] += int(active)
    try:
        yield
    finally:
        _DEPTH[0] -= int(active)


def refuse_escaped(result: Any) -> Any:
    """``result`` of such a method, where no tensor in it stands for a parameter held elsewhere; else the refusal."""
    for leaf in pytree.tree_leaves(result):
        if isinstance(leaf, HeldElsewhere):
            raise RuntimeError(leaf.refusal)
    return result
