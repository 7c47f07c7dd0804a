"""Where a captured graph moves the batch's rows so that a row meets another row's values: an index of other rows
(a permutation, a draw, a count of the rows shifted round) picking rows, parts cut along the rows put back in another
order, a roll or flip along them, a slice shifting them, values ordered along them. Each is a check
:func:`.coupling.rows_meet` runs op by op."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .graph_rows import counts_rows, dim_of, has_rows, op_name, part_of_rows, rows_at

__all__ = ["partner_index", "picked_by", "reordered_parts", "ORDERS", "orders_rows", "moves_rows", "shifts_rows"]


def partner_index(node: fx.Node, name: str, rows: set[Any], ranges: dict[fx.Node, bool],
                  partners: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """Where ``node`` is an integer index of other rows than each row's own: a permutation of the rows or a draw
    among them (``randperm(B)``, ``randint(0, B, (B,))``), a count of the rows shifted round (``(arange(B) + k) %
    B``; not ``arange(3 * B) % B``, each row's own), rolled, flipped or paired (``arange(B) ^ 1``), or integers
    computed from such an index; None otherwise."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex():
        return None
    if name == "randperm" and node.args and counts_rows(node.args[0], rows):
        return node
    if name == "randint" and any(counts_rows(arg, rows) for arg in node.args[:2]):
        return node
    source = node.args[0] if node.args else None
    if name in ("remainder", "fmod") and ranges.get(source) and len(node.args) > 1 \
            and counts_rows(node.args[1], rows):
        return node
    if name in ("roll", "flip", "bitwise_xor", "__xor__") and source in ranges:
        return node
    return next((partners[arg] for arg in node.all_input_nodes if arg in partners), None)


def picked_by(node: fx.Node, name: str, rows: set[Any], partners: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The index of other rows (:func:`partner_index`) with which ``node`` picks rows of a value along the batch's
    rows (``h[index]``, ``index_select(h, 0, index)``, ``gather`` along them), if any."""
    source = node.args[0] if node.args else None
    if name in ("index_copy", "index_add") and len(node.args) > 3:  # (rows written at the index's places)
        source = node.args[3]
    elif name == "index_put" and len(node.args) > 2:
        source = node.args[2]
    if not isinstance(source, fx.Node) or not rows_at(source, 0, rows):
        return None
    if name in ("index", "index_put") and len(node.args) > 1 and isinstance(node.args[1], (list, tuple)) \
            and node.args[1]:
        index = node.args[1][0]
    elif name in ("index_select", "gather", "index_copy", "index_add") and len(node.args) > 2 \
            and dim_of(node.args[1], node.args[0]) == 0:
        index = node.args[2]
    elif name == "embedding" and len(node.args) > 1:  # F.embedding(index, h): h's rows looked up
        index = node.args[1]
    else:
        return None
    return partners.get(index) if isinstance(index, fx.Node) else None


def reordered_parts(node: fx.Node, name: str, rows: set[Any]) -> bool:
    """Whether ``node`` puts parts of a value cut along the batch's rows (``chunk``, ``split`` or slices along them)
    back in another order (``torch.cat([b, a])`` of ``a, b = h.chunk(2)``, ``torch.cat([h[B // 2:], h[:B // 2]])``),
    or combines two parts of it with each other (each row of one half meets a row of the other)."""
    if name == "cat":
        parts = node.args[0] if node.args else ()
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or not parts or dim_of(dim, parts[0]) != 0:
            return False
        places = [_part_of(part, rows) for part in parts]
        sources = {place[0] for place in places if place is not None}
        return len(sources) == 1 and None not in places and [place[1] for place in places] != sorted(
            place[1] for place in places)
    if name in _ELEMENTWISE:
        places = [_part_of(arg, rows) for arg in node.args[:2]]
        return all(places) and places[0][0] is places[1][0] and places[0][1] != places[1][1]
    return False


_ELEMENTWISE = {"add", "sub", "mul", "div", "maximum", "minimum", "rsub"}


def _slice_of(node: fx.Node, rows: set[Any]) -> tuple[fx.Node, int] | None:
    """``(value, first row)`` where the ``slice`` ``node`` keeps a part of its value's rows along dim 0, as many as
    some number of the rows smaller than them (``h[:B // 2]``; not ``h[:B]``, all of them), the first row as in the
    capture's example; else None."""
    source, value = (node.args[0] if node.args else None), node.meta.get("val")
    dim = node.args[1] if len(node.args) > 1 else 0
    if not isinstance(source, fx.Node) or dim_of(dim, source) != 0 or not rows_at(source, 0, rows) \
            or not isinstance(value, torch.Tensor) or not part_of_rows(value.shape[0], rows):
        return None
    start = node.args[2] if len(node.args) > 2 else 0
    if isinstance(start, fx.Node):
        start = start.meta.get("val")
    first = start.node.hint if isinstance(start, torch.SymInt) else start if isinstance(start, int) else 0
    if not isinstance(first, int):
        return None
    return source, first + int(source.meta["val"].shape[0].node.hint) if first < 0 else first


def _part_of(node: Any, rows: set[Any]) -> tuple[fx.Node, int] | None:
    """``(value, place)`` where ``node`` is a part of a value cut along its batch's rows, ``place`` its order among
    the parts: part ``place`` of a ``chunk`` or ``split`` along dim 0, or a slice along dim 0 whose size is a part of
    the rows (``h[B // 2:]``), starting at row ``place`` of the example; else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and op_name(node) == "slice":
        return _slice_of(node, rows)
    if not isinstance(node, fx.Node) or node.target is not operator.getitem or len(node.args) < 2:
        return None
    cut, number = node.args[0], node.args[1]
    if not isinstance(cut, fx.Node) or cut.op != "call_function" or not isinstance(number, int):
        return None
    if op_name(cut) not in ("chunk", "split", "split_with_sizes", "tensor_split"):
        return None
    dim = cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0)
    source = cut.args[0] if cut.args else None
    return (source, number) if dim_of(dim, source) == 0 and isinstance(source, fx.Node) \
        and rows_at(source, 0, rows) else None


ORDERS = {"sort": 1, "argsort": 1, "msort": None, "topk": 2, "kthvalue": 2}
"""Ops that order values along a dim, and the index of that dim among their arguments (None: always dim 0)."""


def orders_rows(node: fx.Node, name: str, rows: set[Any]) -> bool:
    """Whether ``node`` (a sort, topk or kthvalue: :data:`ORDERS`) orders floating values along the batch's rows and
    its ordered values are read (not only the order: tokens grouped by expert with argsort and put back, rows sorted
    by length and unsorted, leave each row its own)."""
    source = node.args[0] if node.args else None
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    if not any(user.target is operator.getitem and len(user.args) > 1 and user.args[1] == 0 for user in node.users):
        return False
    index = ORDERS[name]
    if index is None:
        dim = 0
    elif len(node.args) > index and isinstance(node.args[index], int):
        dim = node.args[index]
    elif isinstance(node.kwargs.get("dim"), int):
        dim = node.kwargs["dim"]
    else:
        dim = -1
    return rows_at(source, dim, rows)


def moves_rows(node: fx.Node, rows: set[Any]) -> bool:
    """Whether a ``roll`` or ``flip`` moves values along the batch's rows (a roll without dims: the whole tensor's)."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node) or not isinstance(source.meta.get("val"), torch.Tensor):
        return False
    index = 2 if op_name(node) == "roll" else 1
    dims = node.args[index] if len(node.args) > index else node.kwargs.get("dims")
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    if not dims:
        return op_name(node) == "roll" and has_rows(source.meta["val"], rows)
    return any(rows_at(source, dim, rows) for dim in dims)


def shifts_rows(node: fx.Node, rows: set[Any]) -> bool:
    """Whether a ``slice`` along the batch's rows keeps all but some of them (``z[1:]``, ``z[:-1]``: a size of the rows
    and a number apart), not a share of a batch put together from several (``torch.cat([a, b])[:rows]``)."""
    source, value = (node.args[0] if node.args else None), node.meta.get("val")
    dim = node.args[1] if len(node.args) > 1 else 0
    if not isinstance(source, fx.Node) or not isinstance(dim, int) or not isinstance(value, torch.Tensor) \
            or not rows_at(source, dim, rows, counted=True) or not value.dim() > max(dim, -dim - 1):
        return False
    size = value.shape[dim]
    if not isinstance(size, torch.SymInt) or not (size.node.expr.free_symbols & rows):
        return False
    constant, _ = size.node.expr.as_coeff_add()
    return constant != 0
