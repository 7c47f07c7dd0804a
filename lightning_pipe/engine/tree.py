"""Flatten nested tuples, lists and dicts of tensors into leaves and a plain structure, and back (in one process;
between ranks, :mod:`.wire` describes trees)."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TreeSpec", "tree_flatten", "tree_unflatten", "tree_map_tensors", "rebuild_mapping", "dataclass_values",
           "copied_dataclass", "dataclass_part"]

# A TreeSpec is plain data so that it pickles cheaply and compares with ==:
#   None                      -> a tensor leaf (taken from the leaves list in order)
#   ("v", value)              -> a non-tensor leaf carried inside the spec itself
#   ("t", (child, ...))       -> tuple, ("l", ...) -> list, ("d", ((key, child), ...)) -> dict
#   ("m", (cls, ((key, child), ...))) -> another Mapping (BatchEncoding, UserDict), rebuilt as cls(dict)
#   ("c", (cls, ((field, child), ...))) -> a dataclass, rebuilt as cls(**fields) from its __init__ fields
#   ("n", (cls, children))    -> a namedtuple of type cls
TreeSpec = Any


def tree_flatten(tree: Any) -> tuple[list[torch.Tensor], TreeSpec]:
    """Return the tensor leaves of ``tree`` in depth-first order and a spec that rebuilds it."""
    leaves: list[torch.Tensor] = []
    return leaves, _flatten(tree, leaves)


def _flatten(tree: Any, leaves: list[torch.Tensor]) -> TreeSpec:
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return None
    if type(tree) is torch.Size:  # a shape: a value, kept a torch.Size
        return ("v", tree)
    if isinstance(tree, tuple):
        children = tuple(_flatten(child, leaves) for child in tree)
        return ("n", (type(tree), children)) if hasattr(tree, "_fields") else ("t", children)
    if isinstance(tree, list):
        return ("l", tuple(_flatten(child, leaves) for child in tree))
    if type(tree) in (dict, OrderedDict):
        return ("d", tuple((key, _flatten(child, leaves)) for key, child in tree.items()))
    if isinstance(tree, Mapping):  # another mapping (Hugging Face's BatchEncoding, a UserDict, a ModelOutput)
        return ("m", (type(tree), tuple((key, _flatten(child, leaves)) for key, child in tree.items())))
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):  # rebuilt from its fields given to __init__
        return ("c", (type(tree), tuple((f.name, _flatten(getattr(tree, f.name), leaves))
                                        for f in dataclasses.fields(tree) if f.init)))
    return ("v", tree)


def tree_unflatten(leaves: list[torch.Tensor], spec: TreeSpec) -> Any:
    """Inverse of :func:`tree_flatten`."""
    iterator = iter(leaves)
    tree = _unflatten(iterator, spec)
    if next(iterator, None) is not None:
        raise ValueError("tree_unflatten: more leaves than the spec has places for")
    return tree


def _unflatten(leaves: Any, spec: TreeSpec) -> Any:
    if spec is None:
        return next(leaves)
    kind, body = spec
    if kind == "v":
        return body
    if kind == "t":
        return tuple(_unflatten(leaves, child) for child in body)
    if kind == "n":
        cls, children = body
        return cls(*(_unflatten(leaves, child) for child in children))
    if kind == "l":
        return [_unflatten(leaves, child) for child in body]
    if kind == "m":
        cls, items = body
        return rebuild_mapping(cls, {key: _unflatten(leaves, child) for key, child in items})
    if kind == "c":
        cls, items = body
        return cls(**{name: _unflatten(leaves, child) for name, child in items})
    return {key: _unflatten(leaves, child) for key, child in body}


def rebuild_mapping(cls: type, items: dict[Any, Any]) -> Any:
    """A mapping of ``cls`` holding ``items`` (``cls(items)``, as a BatchEncoding or a UserDict is made), or the dict
    itself where ``cls`` cannot be made that way."""
    try:
        return cls(items)
    except Exception:  # noqa: BLE001 - a mapping type with another constructor: its items still travel
        return items


def tree_map_tensors(fn: Any, tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``tree`` (depth first); other leaves are kept as they are. A dataclass is
    copied with its fields mapped, not made again by its constructor (:func:`copied_dataclass`)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if type(tree) is torch.Size:
        return tree
    if isinstance(tree, tuple):
        children = [tree_map_tensors(fn, child) for child in tree]
        return type(tree)(*children) if hasattr(tree, "_fields") else tuple(children)
    if isinstance(tree, list):
        return [tree_map_tensors(fn, child) for child in tree]
    if type(tree) in (dict, OrderedDict):
        return {key: tree_map_tensors(fn, child) for key, child in tree.items()}
    if isinstance(tree, Mapping):
        return rebuild_mapping(type(tree), {key: tree_map_tensors(fn, child) for key, child in tree.items()})
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return copied_dataclass(tree, {name: tree_map_tensors(fn, child)
                                       for name, child in dataclass_values(tree).items()})
    return tree


def dataclass_values(value: Any) -> dict[str, Any]:
    """The fields of the dataclass instance ``value`` (those its constructor does not take too), by name."""
    return {field.name: getattr(value, field.name) for field in dataclasses.fields(value) if hasattr(value, field.name)}


def copied_dataclass(value: Any, fields: dict[str, Any]) -> Any:
    """``value`` holding ``fields``: a shallow copy, made without its constructor as Lightning moves a dataclass batch
    between devices, so that its ``__post_init__`` does not run again (a scale applied twice) and what was set after
    it is kept."""
    made = copy.copy(value)
    for name, item in fields.items():
        object.__setattr__(made, name, item)
    return made


def dataclass_part(whole: Any, parts: dict[str, Any], known: dict[int, Any] | None = None) -> Any:
    """A part of the dataclass instance ``whole`` (a micro-batch of a batch) from ``parts``, its fields' rows.

    Made by its constructor from the fields it takes, so that a field its ``__post_init__`` derives from them (a row
    count, a mask) is the part's; a field it transforms (one the constructor does not make again as ``whole`` holds
    it: a scale) is then set back to the part of the value already transformed once (as on one device), and so is a
    field set after the constructor. A constructor that refuses the
    part (a check of a fixed size): a copy holding ``parts``. Attributes outside the fields are kept (those in
    ``parts`` as given there)."""
    taken = {field.name for field in dataclasses.fields(whole) if field.init}
    try:
        made = dataclasses.replace(whole, **{name: item for name, item in parts.items() if name in taken})
        again = known.get(id(whole)) if known is not None else None
        if again is None:  # (``known``: ``whole`` made again once for all its parts, by id)
            again = dataclass_values(dataclasses.replace(whole))
            if known is not None:
                known[id(whole)] = again
    except Exception as error:  # noqa: BLE001 - a constructor that refuses a part: the fields are copied instead
        kept = [field.name for field in dataclasses.fields(whole)  # (counts not split with the rows)
                if parts.get(field.name, getattr(whole, field.name, None)) is getattr(whole, field.name, None)
                and _count_like(getattr(whole, field.name, None))]
        if kept:  # (found by review: a row count __post_init__ derives was the whole batch's in every part)
            warnings.warn(f"{type(whole).__name__}'s constructor refuses a micro-batch's fields ({type(error).__name__}"
                          f": {error}), so its micro-batches are copies of the batch holding their rows: the fields "
                          f"not split with the rows ({', '.join(kept)}) keep the whole batch's values. Where "
                          f"__post_init__ derives one from the rows (a count), compute it in the step (len(x)), or "
                          f"let the constructor take every field (an InitVar with a default)", stacklevel=2)
        return copied_dataclass(whole, parts)
    for name, item in parts.items():  # a value split with the rows is the part's as given (a scale over the batch,
        # min-max, applied once); one not split that __post_init__ makes again as it was, a count from the rows, is
        # the part's own, taken by the constructor or not (both found by review)
        derived = item is getattr(whole, name, None) and name in again and _same(again[name], item)
        if not derived and getattr(made, name, None) is not item:
            object.__setattr__(made, name, item)
    for name, item in getattr(whole, "__dict__", {}).items():  # an attribute outside the fields, set after it
        if name not in parts and not hasattr(made, name):
            object.__setattr__(made, name, item)
    return made


def _count_like(value: Any) -> bool:
    """Whether ``value`` could be a count of the batch's rows (an int, a 0-dim integer tensor): not a flag, a scale
    or a tensor of constants."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, int) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare: not the same
        return False
