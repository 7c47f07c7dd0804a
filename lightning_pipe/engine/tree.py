"""Flatten nested tuples, lists and dicts of tensors into leaves and a plain structure, and back (in one process;
between ranks, :mod:`.wire` describes trees)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TreeSpec", "tree_flatten", "tree_unflatten", "tree_map_tensors", "rebuild_mapping"]

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
    """Apply ``fn`` to every tensor leaf of ``tree``; other leaves are kept as they are."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([fn(leaf) for leaf in leaves], spec)
