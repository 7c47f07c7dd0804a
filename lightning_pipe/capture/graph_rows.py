"""The batch's rows in a captured graph: the symbols that count them, where a value has them, and how an op is named
and placed when a check describes it (:mod:`.coupling`, :mod:`.row_moves`, :mod:`.scalars`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.fx as fx

from .patterns import fixed_size

__all__ = ["first_sizes", "known_rows", "example_rows", "edge_list", "rows_symbols", "row_dims", "example_size",
           "counts_rows", "dim_of", "op_name", "is_rows", "part_of_rows", "has_rows", "rows_at", "place"]


def first_sizes(user_inputs: Sequence[fx.Node]) -> list[int | torch.SymInt]:
    """Each tensor input's size along dim 0 (the dim every batch is split along)."""
    return [value.shape[0] for node in user_inputs
            if isinstance(value := node.meta.get("val"), torch.Tensor) and value.dim() > 0]


_KNOWN_ROWS: ContextVar[int | None] = ContextVar("known_rows", default=None)


@contextmanager
def known_rows(rows: int | None) -> Iterator[None]:
    """Captures made inside take ``rows`` (the micro-batch's, where the caller knows them) for the model's rows
    where one of its inputs has that many along dim 0: the first input need not (nn.EmbeddingBag's flat ids before
    the rows' offsets)."""
    token = _KNOWN_ROWS.set(rows)
    try:
        yield
    finally:
        _KNOWN_ROWS.reset(token)


def _example(firsts: Sequence[int | torch.SymInt], edges: bool = False) -> object:
    """The rows of a capture's example, from its tensor inputs' sizes along dim 0: the first input's, unless it holds
    no whole number of the rows :func:`known_rows` gives (a flat concatenation of the rows' ids) and another input has
    that many (a first input of rows times a length, flattened, keeps its rows: a side table as long as the rows by
    chance is not taken for them). ``edges``: the inputs hold a graph's edge list, so a first input of other rows is
    the graphs' nodes even where they are a whole number of the rows (found by review: taken for the rows then)."""
    known, first = _KNOWN_ROWS.get(), example_size(firsts[0])
    if known and isinstance(first, int) and (first % known or edges and first != known) \
            and any(example_size(size) == known for size in firsts):
        return known
    return first


def edge_list(user_inputs: Sequence[fx.Node]) -> bool:
    """Whether an input is an integer ``(2, edges)`` tensor, a graph's edge list (PyTorch Geometric's
    ``edge_index``)."""
    return any(isinstance(value := node.meta.get("val"), torch.Tensor) and value.dim() == 2
               and not value.is_floating_point() and example_size(value.shape[0]) == 2
               and example_size(value.shape[1]) != 2 for node in user_inputs)


def example_rows(user_inputs: Sequence[fx.Node]) -> int | None:
    """The model's rows in the capture's example (what :func:`rows_symbols` counts): its first tensor input's size
    along dim 0 (or the rows :func:`known_rows` gives, where an input has them); None without one."""
    firsts = first_sizes(user_inputs)
    return int(_example(firsts, edge_list(user_inputs))) if firsts else None  # type: ignore[call-overload]


def rows_symbols(user_inputs: Sequence[fx.Node]) -> set[Any]:
    """The symbols that count the batch's rows: the tensor inputs' dim 0 (each is split along it) where it stayed
    symbolic and has the example's rows (:func:`example_rows`; export gives inputs their own symbols, CLIP's texts and
    images two; a position tensor or a mask of the sequence's size is left out)."""
    firsts = first_sizes(user_inputs)
    if not firsts:
        return set()
    example = _example(firsts, edge_list(user_inputs))
    return {size.node.expr for size in firsts if fixed_size(size) is None and example_size(size) == example}


def row_dims(outputs: Sequence[Any], rows: set[Any]) -> list[int | None]:
    """For each of a graph's ``outputs`` (its output node's arguments), the one dim along which it has the batch's
    rows (``rows``: :func:`rows_symbols`): 0 for most, 1 for an RNN's last hidden state ``(layers, rows, size)``;
    None for a value without them, with them along several dims, or not a tensor."""
    dims: list[int | None] = []
    for node in outputs:
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        found = [dim for dim, size in enumerate(value.shape) if isinstance(size, torch.SymInt)
                 and size.node.expr in rows] if isinstance(value, torch.Tensor) else []
        dims.append(found[0] if len(found) == 1 else None)
    return dims


def example_size(size: int | torch.SymInt) -> object:
    """The example's value of a size, read without a guard."""
    fixed = fixed_size(size)
    return fixed if fixed is not None else size.node.hint


def counts_rows(arg: Any, rows: set[Any]) -> bool:
    """Whether ``arg`` is a node giving a number of the batch's rows (``h.shape[0]``)."""
    return isinstance(arg, fx.Node) and is_rows(arg.meta.get("val"), rows)


def dim_of(dim: Any, of: Any) -> int | None:
    """``dim`` of the value of node ``of`` as a number from 0 (``-2`` of a matrix: 0); None where not known."""
    value = of.meta.get("val") if isinstance(of, fx.Node) else None
    if not isinstance(dim, int) or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    return dim % value.dim()


def op_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "_overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))


def is_rows(size: Any, rows: set[Any]) -> bool:
    """Whether a size counts the batch's rows: holds a rows symbol, or a data-dependent (unbacked) one."""
    if not isinstance(size, torch.SymInt):
        return False
    return any(symbol in rows or str(symbol).startswith("u") for symbol in size.node.expr.free_symbols)


def part_of_rows(size: Any, rows: set[Any]) -> bool:
    """Whether a size is a number computed from the batch's rows (not unbacked) and, in the capture's example, fewer
    than them: a part of them (``B // 2``, ``B - 1``; not ``B``, nor ``B * T`` tokens)."""
    if not isinstance(size, torch.SymInt) or size.node.expr in rows:
        return False
    counted = size.node.expr.free_symbols & rows
    env = size.node.shape_env
    values = getattr(env, "backed_var_to_val", None) or env.var_to_val  # (renamed in torch 2.13)
    examples = [values.get(symbol) for symbol in counted]
    return bool(counted) and size.node.hint is not None and all(example is not None for example in examples) \
        and int(size.node.hint) < min(int(example) for example in examples)


def has_rows(value: torch.Tensor, rows: set[Any]) -> bool:
    return any(is_rows(size, rows) for size in value.shape)


def rows_at(node: fx.Node, dim: int, rows: set[Any], counted: bool = False) -> bool:
    """Whether ``node``'s value has the batch's rows along ``dim``: a rows symbol; with ``counted``, any size that
    counts them (rows times tokens, once flattened)."""
    value = node.meta.get("val")
    if not (isinstance(value, torch.Tensor) and value.dim() > max(dim, -dim - 1)):
        return False
    size = value.shape[dim]
    return is_rows(size, rows) if counted else isinstance(size, torch.SymInt) and size.node.expr in rows


def place(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    return f"{op_name(node)} in " + (f"module {module!r}" if module else "the model's own forward")
