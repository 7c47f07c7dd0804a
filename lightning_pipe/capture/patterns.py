"""What values must look like to reuse a captured graph: dtypes and sizes (symbolic sizes match any), and autocast."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

__all__ = ["Pattern", "pattern_of", "fixed_size", "matches", "all_match", "overlap", "autocast_state", "describe",
           "with_values"]

Pattern = tuple
"""``("t", dtype, sizes)`` for a tensor (a size is ``None`` where the capture kept it symbolic), ``("int",)`` for a
symbolic int, ``("v", value)`` for any other value (baked into the graph: it must be equal)."""

_AUTOCAST_DEVICES = ("cpu", "cuda")


def pattern_of(value: Any) -> Pattern:
    """The pattern of a captured value (a fake tensor or symbolic int from a node's ``meta["val"]``) or a real one."""
    if isinstance(value, torch.Tensor):
        return ("t", value.dtype, tuple(fixed_size(d) for d in value.shape))
    if isinstance(value, torch.SymInt):
        return ("int",)
    return ("v", value)


def fixed_size(size: int | torch.SymInt) -> int | None:
    """A size the graph holds fixed, or None where it stays symbolic. A symbol the trace specialized (a Python loop
    over a sequence length, as Mamba's scan runs without its kernels) is a SymInt whose value is fixed: the graph
    serves that size only."""
    if isinstance(size, int):
        return size
    return int(size) if is_concrete_int(size) else None


def matches(pattern: Pattern, value: Any) -> bool:
    """Whether a real ``value`` fits ``pattern``."""
    kind = pattern[0]
    if kind == "t":
        if not isinstance(value, torch.Tensor) or value.dtype != pattern[1]:
            return False
        sizes = pattern[2]
        shape = value.shape
        return len(shape) == len(sizes) and all(s is None or s == d for s, d in zip(sizes, shape))
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(value, torch.Tensor) and type(value) is type(pattern[1]) and _same(value, pattern[1])


def _same(value: Any, kept: Any) -> bool:
    """Whether a plain ``value`` is the one a pattern ``kept``: tensors inside it (a list of a layer's parameters
    given to a custom autograd Function) by identity, where ``==`` would compare them element by element."""
    if value is kept:
        return True
    if isinstance(value, torch.Tensor) or isinstance(kept, torch.Tensor):
        return False
    if isinstance(value, (list, tuple)) and type(value) is type(kept):
        return len(value) == len(kept) and all(_same(a, b) for a, b in zip(value, kept))
    try:
        return bool(value == kept)
    except Exception:  # noqa: BLE001 - values that do not compare to one truth value: not the same
        return False


def all_match(patterns: Sequence[Pattern], values: Sequence[Any]) -> bool:
    """Whether every value fits the pattern in its place."""
    return len(patterns) == len(values) and all(matches(p, v) for p, v in zip(patterns, values))


def overlap(a: Sequence[Pattern], b: Sequence[Pattern]) -> bool:
    """Whether some values fit both pattern lists (two captures could then both claim them)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x[0] != y[0]:
            return False
        if x[0] == "v" and (type(x[1]) is not type(y[1]) or x[1] != y[1]):
            return False
        if x[0] == "t" and (x[1] != y[1] or len(x[2]) != len(y[2])
                            or any(s is not None and t is not None and s != t for s, t in zip(x[2], y[2]))):
            return False
    return True


def autocast_state() -> tuple:
    """The autocast regions active now: export traces autocast's casts (and dtype asserts) into the graph, so a
    graph captured without autocast fails under it (and the other way round)."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d))


def describe(patterns: Sequence[Pattern]) -> str:
    """``[float32(None, 16, 64), int64(None, 16), True]``: patterns for messages."""
    parts = []
    for p in patterns:
        if p[0] == "t":
            parts.append(f"{str(p[1]).replace('torch.', '')}{tuple('*' if s is None else s for s in p[2])}")
        else:
            parts.append("int" if p[0] == "int" else repr(p[1]))
    return "[" + ", ".join(parts) + "]"


def with_values(patterns: Sequence[Any], flat: Sequence[Any]) -> list[Any] | None:
    """A capture's flattened inputs from a micro-batch's ``flat`` model inputs as the pipeline takes them (tensors,
    without the constant arguments the capture keeps: ``return_dict=True``), those put back in their places from the
    capture's ``patterns``; None where ``flat`` does not fill the other places."""
    if len(flat) == len(patterns):
        return list(flat)
    if len(flat) != sum(1 for pattern in patterns if pattern[0] != "v"):
        return None
    given = iter(flat)
    return [pattern[1] if pattern[0] == "v" else next(given) for pattern in patterns]
