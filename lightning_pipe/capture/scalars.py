"""How a captured model's single-number outputs add up over a batch's rows, read from its graph.

A model may return numbers besides its per-row outputs: Hugging Face's ``loss`` (a mean over the tokens with labels),
a VAE's KL term summed over the batch, a count of masked tokens. The last stage sometimes needs the whole batch's
output from its micro-batches' (a run of the step on the whole batch, for its logs or a check of its loss), and such a
number is the micro-batches' mean for one kind and their sum for another. :func:`scalar_kinds` follows each 0-dim
floating output back through scalings and casts to the reduction that made it: ``"mean"`` (``mean``, a loss reduced by
its mean, a sum divided by a sum: a mean over a count), ``"sum"`` (``sum``, a loss reduced by its sum, a sum of sums),
or ``"other"`` where it cannot tell (then no whole batch's output is made from the micro-batches'); an output that
reads none of the model's inputs (open_clip's ``logit_scale.exp()`` beside the embeddings) is ``"alike"``: every
micro-batch gives the batch's value, taken once. A tensor's
micro-batches are put together along the dim of its rows (:func:`output_kinds`): dim 0 for most, dim 1 for an RNN's
last hidden state, ``(layers, rows, size)``, which a step may keep to give the next batch.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind

from .graph_rows import row_dims

__all__ = ["scalar_kinds", "output_kinds", "output_dims", "output_markers", "user_outputs", "MEAN", "SUM", "OTHER",
           "ALIKE", "SELECTED"]

MEAN, SUM, OTHER, ALIKE = "mean", "sum", "other", "alike"
SELECTED = "selected rows"
"""A tensor whose dim 0 holds the elements a mask over the batch's rows selected, in row order (an MLM's logits at the
masked tokens, ``h[mask]``): the micro-batches' put together along dim 0 are the batch's."""

_aten = torch.ops.aten


def _ops(*names: str) -> set[Any]:
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(_aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            found.add(getattr(op, overload or "default"))
    return found


_MEANS = _ops("mean", "mean.dim")
_SUMS = _ops("sum", "sum.dim_IntList")
_SAME = _ops("clone", "detach", "alias", "_to_copy", "to.dtype", "to.dtype_layout", "to.device", "view", "reshape",
             "squeeze", "squeeze.dim", "contiguous", "lift_fresh_copy", "neg", "type_as")
_SCALED = _ops("mul.Tensor", "mul.Scalar", "div.Tensor", "div.Scalar")
_ADDED = _ops("add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar")
_DIVIDED = _ops("div.Tensor")
_PRODUCTS = _ops("mm", "matmul")
_REDUCTION = {1: MEAN, 2: SUM}  # torch's Reduction::Mean and ::Sum
_DEPTH = 64


def scalar_kinds(program: ExportedProgram, rows: set[Any] = frozenset(),
                 fixed: frozenset[int] = frozenset()) -> list[str | None]:
    """For each user output of ``program``, in its output spec's order: :data:`MEAN`, :data:`SUM` or :data:`OTHER`
    for a 0-dim floating value, None for anything else (a tensor with dimensions, a number). With ``rows`` (the
    symbols counting the batch's rows), the reduction that reads is the one over the rows: a KL averaged over the rows
    and summed over the latent dims (``.mean(0).sum()``) is a mean, one summed over the rows and averaged over the
    latent dims (``.sum(0).mean()``) a sum. In a capture of fixed sizes, ``fixed`` holds the sizes its inputs' rows
    may have (their dim 0): a sum divided by one of those is a mean over the rows (a detector's per-image losses
    summed over a loop of the batch's images and divided by their number) as much as a scaled sum, so it is
    :data:`OTHER`."""
    return [_kind(node, rows, 0, fixed) if _is_scalar(node) else None for node in user_outputs(program)]


def output_kinds(program: ExportedProgram, rows: set[Any],
                 fixed: frozenset[int] = frozenset()) -> list[str | int | None]:
    """How the micro-batches' values of each user output of ``program`` make the whole batch's: a single number's
    kind (:func:`scalar_kinds`), a tensor's dim of the batch's rows (``rows``, the symbols counting them:
    :func:`~.graph_rows.row_dims`; an RNN's last hidden state has them along dim 1), a tensor's kind where it has no
    dim of rows but was reduced over them (an MoE's tokens per expert, ``one_hot(choice).sum(0)``: a sum, element by
    element), :data:`ALIKE` for one that reads none of the model's inputs (a function of the weights: a learned
    temperature), None where none is known."""
    outputs = user_outputs(program)
    reading = _reading_inputs(program)
    kinds: list[str | int | None] = []
    for node, kind, dim in zip(outputs, scalar_kinds(program, rows, fixed), row_dims(outputs, rows)):
        if isinstance(node, fx.Node) and node not in reading:
            kinds.append(ALIKE)
            continue
        if kind is None and dim is None and rows and _selected(program, node, rows):
            kind = SELECTED
        if kind is None and dim is None and rows and _without_rows(node, rows) and not _fixed_rows(node, fixed):
            kind = _kind(node, rows, 0, fixed)
        kinds.append(kind if kind is not None else dim)
    return kinds


def _selected(program: ExportedProgram, node: Any, rows: set[Any]) -> bool:
    """Whether ``node``'s dim 0 is a data-dependent size made by a mask's selection over the batch's rows, in row
    order (:data:`SELECTED`): ``h[mask]`` (``index`` by a boolean mask), ``masked_select``, or indices from
    ``nonzero`` of a tensor with the rows along dim 0."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or not isinstance(value.shape[0], torch.SymInt) \
            or not value.is_floating_point():  # (indices, nonzero's own, count from 0 in each micro-batch)
        return False
    symbols = value.shape[0].node.expr.free_symbols
    if not symbols or not all(str(symbol).startswith("u") for symbol in symbols):
        return False
    for origin in program.graph.nodes:  # the op that made the size
        made = origin.meta.get("val")
        if not (isinstance(made, torch.Tensor) and made.dim() > 0 and isinstance(made.shape[0], torch.SymInt)
                and made.shape[0].node.expr.free_symbols & symbols):
            continue
        source = origin.args[0] if origin.op == "call_function" and origin.args else None
        taken = source.meta.get("val") if isinstance(source, fx.Node) else None
        if not isinstance(taken, torch.Tensor) or taken.dim() == 0 or not _counts_rows(taken.shape[0], rows):
            return False
        name = getattr(getattr(origin.target, "_overloadpacket", None), "__name__", "")
        if name == "index" and len(origin.args) > 1 and isinstance(origin.args[1], (list, tuple)):
            first = origin.args[1][0] if origin.args[1] else None
            mask = first.meta.get("val") if isinstance(first, fx.Node) else None
            return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
        return name in ("nonzero", "masked_select")
    return False


def _reading_inputs(program: ExportedProgram) -> set[fx.Node]:
    """The nodes of ``program``'s graph that read one of its model inputs (the batch's tensors)."""
    names = {spec.arg.name for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT}
    reading: set[fx.Node] = set()
    for node in program.graph.nodes:
        if (node.op == "placeholder" and node.name in names) or any(arg in reading for arg in node.all_input_nodes):
            reading.add(node)
    return reading


def output_dims(program: ExportedProgram) -> list[int | None]:
    """The number of dims of each user output of ``program`` (None for a number): a single number's kind is known
    for outputs of these dims (a model called two ways returns a summed loss one way and best tags the other)."""
    return [value.dim() if isinstance(value := node.meta.get("val") if isinstance(node, fx.Node) else None,
                                      torch.Tensor) else None for node in user_outputs(program)]


def user_outputs(program: ExportedProgram) -> list[Any]:
    """The nodes (or constants) of ``program``'s model outputs, in its output spec's order."""
    output = next(node for node in program.graph.nodes if node.op == "output")
    return [node for node, spec in zip(output.args[0], program.graph_signature.output_specs)
            if spec.kind == OutputKind.USER_OUTPUT]


def output_markers(program: ExportedProgram) -> list[Any]:
    """Stand-ins for ``program``'s user outputs, in its output spec's order, that rebuild an output of its structure
    (``tree_unflatten(markers, out_spec)``): a 1-element tensor holding each tensor output's index, a number output
    (a constant of the graph) as itself, so that another flattening of tensors finds each tensor's index."""
    markers: list[Any] = []
    specs = [spec for spec in program.graph_signature.output_specs if spec.kind == OutputKind.USER_OUTPUT]
    for index, spec in enumerate(specs):
        constant = isinstance(spec.arg, ConstantArgument)
        markers.append(spec.arg.value if constant else torch.full((1,), float(index)))
    return markers


def _is_scalar(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()


def _kind(node: Any, rows: set[Any] = frozenset(), depth: int = 0, fixed: frozenset[int] = frozenset()) -> str:
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth > _DEPTH:
        return OTHER
    target, args = node.target, node.args
    if target is operator.getitem:  # a loss op that returns (loss, total weight): NLL's
        source = args[0]
        return _reduced_by_argument(source) if isinstance(source, fx.Node) and args[1] == 0 else OTHER
    if target in _MEANS or target in _SUMS:
        return _over_rows(node, MEAN if target in _MEANS else SUM, rows, depth, fixed)
    reduced = _reduced_by_argument(node)
    if reduced != OTHER:
        return reduced
    if target in _PRODUCTS:  # x.T @ y over the rows: a sum over them of each row's outer product
        left, right = (arg.meta.get("val") if isinstance(arg, fx.Node) else None for arg in args[:2])
        if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor) and left.dim() == right.dim() == 2 \
                and _counts_rows(left.shape[1], rows) and _counts_rows(right.shape[0], rows) \
                and not _counts_rows(left.shape[0], rows) and not _counts_rows(right.shape[1], rows):
            return SUM
        return OTHER
    if target in _SAME:
        return _kind(args[0], rows, depth + 1, fixed)
    if target in _SCALED:
        left, right = args[0], args[1]
        if not isinstance(right, fx.Node) or _constant(right):
            kind = _kind(left, rows, depth + 1, fixed)
            if kind == SUM and target in _DIVIDED and isinstance(right, (int, float)) and right in fixed:
                return OTHER  # divided by the rows, fixed: a mean over them, or a sum scaled by a number alike
            return kind
        if not isinstance(left, fx.Node) or _constant(left):
            return _kind(right, rows, depth + 1, fixed) if target not in _DIVIDED else OTHER
        if target in _DIVIDED and _kind(left, rows, depth + 1, fixed) == SUM \
                and _kind(right, rows, depth + 1, fixed) == SUM:
            return MEAN  # a sum over a count: a mean over what it counts (Hugging Face's loss over its tokens)
        return OTHER
    if target in _ADDED:
        kinds = {_kind(arg, rows, depth + 1, fixed) for arg in args[:2]
                 if isinstance(arg, fx.Node) and not _constant(arg)}
        return kinds.pop() if len(kinds) == 1 else OTHER
    return OTHER


def _over_rows(node: fx.Node, own: str, rows: set[Any], depth: int, fixed: frozenset[int] = frozenset()) -> str:
    """The kind a ``mean`` or ``sum`` (``own``) gives: its own where it reduces the rows (or where the rows are not
    known: a capture of fixed sizes); where its input has no rows left (reduced before), the kind of that input, which
    a mean or sum over other dims keeps; :data:`OTHER` where it leaves some of the rows."""
    source = node.args[0] if node.args else None
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not rows or not isinstance(value, torch.Tensor):
        return own
    carrying = {dim for dim, size in enumerate(value.shape) if _counts_rows(size, rows)}
    if not carrying:
        return _kind(source, rows, depth + 1, fixed)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    reduced = set(range(value.dim())) if not dims else {dim % max(value.dim(), 1) for dim in dims}
    return own if carrying <= reduced else OTHER


def _counts_rows(size: int | torch.SymInt, rows: set[Any]) -> bool:
    """Whether a size counts the batch's rows: their symbol, or an expression of it (rows x tokens, flattened)."""
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols & rows)


def _fixed_rows(node: Any, fixed: frozenset[int]) -> bool:
    """Whether ``node`` is a tensor of 2 dims or more whose dim 0 is the rows the graph fixed for some input (a
    recurrent layer's output, where the capture holds the batch's rows fixed and other inputs' symbolic: not
    reduced over the rows, found by review: a summed CTC loss over 1-row micro-batches was not told a sum)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and isinstance(value.shape[0], int) \
        and value.shape[0] in fixed


def _without_rows(node: Any, rows: set[Any]) -> bool:
    """Whether ``node`` is a tensor none of whose sizes counts the batch's rows (a single number too, where it is not
    floating: a count, ``(logits > 0).sum()``; a floating one's kind is :func:`scalar_kinds`')."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and (value.dim() > 0 or not value.is_floating_point()) \
        and not any(_counts_rows(size, rows) for size in value.shape)


def _reduced_by_argument(node: fx.Node) -> str:
    """MEAN or SUM for an op with a ``reduction`` argument (a loss: cross entropy, NLL, MSE, BCE, smooth L1)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return OTHER
    for index, argument in enumerate(schema.arguments):
        if argument.name == "reduction":
            value = node.args[index] if len(node.args) > index else node.kwargs.get("reduction", argument.default_value)
            return _REDUCTION.get(value, OTHER) if isinstance(value, int) else OTHER
    return OTHER


def _constant(node: fx.Node) -> bool:
    """Whether ``node`` is a value the batch does not make: a lifted constant, or computed from constants only."""
    if node.op == "placeholder":
        return False  # an input, a parameter or a buffer: perhaps the batch's
    if node.op == "get_attr":
        return True
    if node.op != "call_function":
        return False
    return all(_constant(arg) for arg in node.all_input_nodes)
