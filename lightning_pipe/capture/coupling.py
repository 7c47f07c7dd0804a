"""Where a captured forward lets the rows of a batch meet, which a pipeline, running each micro-batch alone, cannot
give as one device does:

- a value with the batch's rows along two dimensions (CLIP's image-text similarity logits, ``rows x rows``): a
  contrastive loss over it pairs a row with the others of its micro-batch only;
- attention or a recurrence along the rows (a time-major batch, ``(T, B)``, given to torch's ``batch_first=False``
  layers: the split into micro-batches cuts the sequences in time);
- a statistic over the rows that comes back into the rows (``x - x.mean(0)``), or two such statistics multiplied
  (a mixture of experts' load-balancing loss, the fraction of tokens routed to each expert times their mean router
  probability): the mean of the micro-batches' values is not the batch's. (Torch's batch norms are deferred apart.)
- a running count along the rows compared (an expert's capacity: the tokens routed to it counted in order, those past
  it dropped): which rows pass depends on the rows before them;
- the rows moved (``z.roll(1, 0)``, ``z.flip(0)``: in-batch negatives taken from another row) or shifted
  (``z[1:] - z[:-1]``, ``torch.diff`` along them): a row meets the row its micro-batch puts there;
- a running sum, product or extreme of floating-point values along the rows (a Cox partial likelihood's
  ``exp(risk).cumsum(0)``): each row takes in the rows before it;
- in training, an embedding scaling each token's gradient by its count in the batch (``scale_grad_by_freq``).

A capture whose batch size stayed symbolic shows these: there the rows are symbols. One that fixed the rows (the
forward took their number as an int) is reported as that, but for a loss over ``(rows, rows)`` logits with labels
``torch.arange(len(logits))``, a contrastive loss (Hugging Face's CLIP), said as the rows meeting.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .graph_rows import (
    counts_rows, example_size, first_sizes, has_rows, op_name, part_of_rows, place, rows_at, rows_symbols,
)
from .patterns import fixed_size
from .row_moves import ORDERS, moves_rows, orders_rows, partner_index, picked_by, reordered_parts, shifts_rows

__all__ = ["rows_meet", "FIXED_ROWS", "COUNTS_ROWS"]

FIXED_ROWS = "the graph fixes the batch's rows"
COUNTS_ROWS = " and keeps a running count along them (cumsum over dim 0)"  # not to be told apart by a first batch


def _along_dim_zero(node: fx.Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 0


def rows_meet(nodes: Sequence[fx.Node], user_inputs: Sequence[fx.Node], training: bool = True) -> str | None:
    """The first op among ``nodes`` that makes a value with the batch's rows along two dimensions, described (its
    module, op and shape); else the first that mixes rows otherwise (:func:`_mixed`); else, where the capture fixed
    the rows of an input, that (an RNN's loop over them, or the forward taking their number); else None.

    The rows are :func:`rows_symbols`. Ops inside a region the forward runs under ``torch.no_grad()`` or autocast
    (a higher-order op calling a subgraph: SwAV's Sinkhorn targets, normalized over the batch without gradients) are
    looked at as if inlined."""
    firsts = first_sizes(user_inputs)
    if not firsts:
        return None
    nodes, user_inputs = _inlined(nodes, user_inputs)
    nodes = _read(nodes)
    example = example_size(firsts[0])
    rows = rows_symbols(user_inputs)
    for node in nodes if rows else ():
        value = node.meta.get("val")
        if node.op != "call_function" or not isinstance(value, torch.Tensor):
            continue
        if sum(isinstance(size, torch.SymInt) and size.node.expr in rows or part_of_rows(size, rows)
               for size in value.shape) >= 2:
            shape = ", ".join(_rows_named(size, rows) for size in value.shape)
            return (f"{place(node)} makes a ({shape}) value. If the rows of a batch meet there (each row's "
                    f"similarity with every other, as a contrastive loss takes it)")
    scaled = next((node for node in nodes if training and _scales_by_frequency(node, rows)), None) if rows else None
    if scaled is not None:
        return (f"{place(scaled)} scales each token's gradient by how often the token occurs in the batch "
                f"(nn.Embedding(scale_grad_by_freq=True)), so each row's gradient depends on the whole batch (in a "
                f"pipeline: on its micro-batch only)")
    mixed = _mixed(nodes, rows) if rows else None
    if mixed is not None:
        return mixed
    # an input with the rows along another dim (an RNN's state, (layers, rows, size)) has no rows along dim 0: its
    # number of layers, equal to the rows by chance, fixes nothing
    fixed = [value.shape[0] for node in user_inputs if isinstance(value := node.meta.get("val"), torch.Tensor)
             and value.dim() > 0 and not any(isinstance(size, torch.SymInt) and size.node.expr in rows
                                             for size in value.shape[1:])]
    if not any(fixed_size(size) == example for size in fixed):
        return None
    for node in nodes:  # an RNN's loop over time fixes its length: here the rows (so may a pooling's windows)
        name = op_name(node) if node.op == "call_function" else ""
        if name in _RECURRENCES and _along_time(node, lambda size: fixed_size(size) == example):
            return _RECURRENCE.format(place=place(node))
        if _windows_rows(node, name, lambda size: fixed_size(size) == example):
            return _windows(node, name)
    contrastive = next((node for node in nodes if _pairs_rows(node, example, rows)), None)
    if contrastive is not None:  # (its (rows, rows) logits have fixed sizes, no symbols: found by their labels)
        return (f"{place(contrastive)} takes ({example}, {example}) logits, each row's similarity with every other, "
                f"with labels torch.arange({example}), as a contrastive loss does: the rows of a batch meet there")
    scans = any(node.op == "call_function" and op_name(node) in _FLOAT_SCANS and _along_dim_zero(node)
                for node in nodes)  # (an expert's capacity counts tokens in order: it may drop none at first)
    return (f"{FIXED_ROWS} to {example}{COUNTS_ROWS if scans else ''}: the forward takes their number as a Python int "
            f"(len(x), int(...)), as "
            f"torch.arange(len(logits)) does for a contrastive loss's labels, a Python loop over them does (for t in "
            f"range(x.shape[0]): a recurrence over a time-major batch's time steps, which micro-batches cut), or an "
            f"expert capacity computed from the tokens (int(capacity_factor * tokens / experts)) does (each "
            f"micro-batch size is captured anew)")


_LABELLED_LOSSES = {"cross_entropy_loss", "nll_loss", "nll_loss_nd", "nll_loss2d"}
_LABELS_KEPT = {"to", "_to_copy", "type", "long", "contiguous", "clone", "add"}  # labels + an offset: still arange's


def _pairs_rows(node: fx.Node, example: int, rows: set[Any]) -> bool:
    """Whether ``node`` is a loss over ``(rows, rows)`` logits with labels ``torch.arange(example)``: a contrastive
    loss (CLIP's, InfoNCE's), row i's target its own column, the graph's rows fixed to ``example`` by
    ``len(logits)`` (one tower's; the other's may have stayed one of the symbols ``rows``)."""
    if node.op != "call_function" or op_name(node) not in _LABELLED_LOSSES or len(node.args) < 2:
        return False
    logits, labels = node.args[:2]
    value = logits.meta.get("val") if isinstance(logits, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not all(
            fixed_size(size) == example or isinstance(size, torch.SymInt) and size.node.expr in rows
            for size in value.shape):
        return False
    while isinstance(labels, fx.Node) and labels.op == "call_function" and op_name(labels) in _LABELS_KEPT:
        labels = labels.args[0]
    value = labels.meta.get("val") if isinstance(labels, fx.Node) else None
    return (isinstance(labels, fx.Node) and labels.op == "call_function" and op_name(labels) == "arange"
            and isinstance(value, torch.Tensor) and value.shape == (example,))


def _rows_named(size: Any, rows: set[Any]) -> str:
    """A size for a message: "rows" for the batch's rows, "part of the rows" for a number of them fewer."""
    if isinstance(size, torch.SymInt) and size.node.expr in rows:
        return "rows"
    return "part of the rows" if part_of_rows(size, rows) else str(size)


def _inlined(nodes: Sequence[fx.Node], user_inputs: Sequence[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """``nodes`` (a graph's, in order) and ``user_inputs`` copied into a graph of their own where every call of a
    subgraph (a higher-order op: ``wrap_with_set_grad_enabled``, ``wrap_with_autocast``) is replaced by the
    subgraph's ops, its outputs read through the call's ``getitem`` s; the nodes themselves where there is none."""
    if not any(_subgraph(node) is not None for node in nodes):
        return list(nodes), list(user_inputs)
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    _copy_into(graph, nodes, env)
    return list(graph.nodes), [env[node] for node in user_inputs]


def _subgraph(node: fx.Node) -> tuple[fx.Graph, list[Any]] | None:
    """The subgraph a higher-order op ``node`` calls and the values it passes it, if it is one."""
    if node.op != "call_function":
        return None
    for index, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            module = getattr(node.graph.owning_module, str(arg.target), None)
            if isinstance(module, fx.GraphModule):
                return module.graph, list(node.args[index + 1:])
    return None


def _copy_into(graph: fx.Graph, nodes: Sequence[fx.Node], env: dict[fx.Node, Any], inner: bool = False) -> list[Any]:
    """Copy ``nodes`` into ``graph`` (``env``: each node's copy; a subgraph's inputs given), subgraphs inlined; for an
    ``inner`` (inlined) one, the copies of what it returns, its output node left out."""
    returned: list[Any] = []
    for node in nodes:
        called = _subgraph(node)
        if called is not None:
            subgraph, operands = called
            inputs = [n for n in subgraph.nodes if n.op == "placeholder"]
            inner_env = {placeholder: env[operand] if isinstance(operand, fx.Node) else operand
                         for placeholder, operand in zip(inputs, operands)}
            env[node] = _copy_into(graph, [n for n in subgraph.nodes if n.op != "placeholder"], inner_env, True)
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), list):
            env[node] = env[node.args[0]][node.args[1]]  # a subgraph's output
        elif node.op == "get_attr" and isinstance(getattr(node.graph.owning_module, str(node.target), None),
                                                   fx.GraphModule):
            continue  # a subgraph: inlined where it is called
        elif node.op == "output" and inner:
            returned = list(fx.node.map_arg(node.args[0], lambda arg: env[arg]))
        else:
            env[node] = graph.node_copy(node, lambda arg: env[arg])
    return returned


def _scales_by_frequency(node: fx.Node, rows: set[Any]) -> bool:
    """Whether ``node`` is an embedding whose backward divides each token's gradient by its count among the indices
    (``scale_grad_by_freq``), indices holding the batch's rows."""
    if node.op != "call_function" or op_name(node) != "embedding":
        return False
    scales = node.args[3] if len(node.args) > 3 else node.kwargs.get("scale_grad_by_freq", False)
    indices = node.args[1] if len(node.args) > 1 else None
    return scales is True and isinstance(indices, fx.Node) and isinstance(indices.meta.get("val"), torch.Tensor) \
        and has_rows(indices.meta["val"], rows)


def _read(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """Those of ``nodes`` that the graph's output depends on: a value the forward only stores on a module (a
    load-balancing loss kept as ``self.aux``, which the captured graph does not store) lets no rows meet in training."""
    live, waiting = set(), [node for node in nodes if node.op == "output"]
    if not waiting:
        return list(nodes)
    while waiting:
        node = waiting.pop()
        if node not in live:
            live.add(node)
            waiting.extend(node.all_input_nodes)
    return [node for node in nodes if node in live]


_ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention"}
_RECURRENCES = {"lstm", "gru", "rnn_tanh", "rnn_relu"}  # aten's, batch_first their 9th argument
_CONVOLUTIONS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d"}  # (input, weight, ...): the weight's dims after the second are the kernel's
_POOLS = {f"{kind}{n}d{suffix}": n for n in (1, 2, 3) for kind, suffix in (
    ("max_pool", ""), ("max_pool", "_with_indices"), ("avg_pool", ""), ("adaptive_avg_pool", ""),
    ("_adaptive_avg_pool", ""), ("adaptive_max_pool", ""), ("lp_pool", ""))}  # -> its spatial dims
_SHAPE_ONLY = {"new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like",
               "sym_size", "sym_numel", "sym_stride", "scalar_tensor", "_assert_tensor_metadata"}
_PRODUCTS = {"mul", "matmul", "mm", "bmm", "dot", "einsum", "outer"}  # of two statistics: not linear in the rows
# of one statistic: not linear in the rows (a sparsity penalty's KL of the batch's mean activation)
_CURVED = {"log", "log2", "log10", "log1p", "exp", "exp2", "expm1", "sqrt", "rsqrt", "sigmoid", "tanh", "softplus",
           "xlogy", "special_entr", "logit", "special_xlog1py", "square", "abs", "relu"}  # (and pow: _curves; not a
# clamp, which guards a count's division: mask.sum().clamp(min=1))
_SCANS = {"cumsum", "cumprod"}  # a running count along a dim
_FLOAT_SCANS = {"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"}  # of floating values along the rows
_COMPARISONS = {"lt", "le", "gt", "ge", "eq", "ne"}
_EXTREMES = {"max", "amax", "min", "amin", "aminmax", "maximum", "minimum"}


def _mixed(nodes: Sequence[fx.Node], rows: set[Any]) -> str | None:
    """Attention or a recurrence along the rows, a statistic over the rows brought back into them, or a product of
    two statistics over the rows (module docstring), described; else None. A statistic is a floating-point value
    without the rows that some value with them went into (a mean, a sum; not a count or offsets of tokens routed to
    experts, which only place rows), also as a number read out of it (``.item()``): the rows of a data-dependent
    selection (``nonzero``, unbacked sizes) count as rows. An extreme over the rows (``h.abs().max()``) is one where
    it scales or bounds the rows, not where it shifts them into an exponential or a softmax (``exp(z - z.max())``,
    where it cancels, also when added back: ``m + log(exp(z - m).sum(-1))``). A product of statistics computed from
    integers alone (a codebook's usage and its perplexity, logged) carries no gradient, and a sum times a reciprocal
    is a mean: neither is counted as a product."""
    statistics: set[fx.Node] = set()
    shifts: set[fx.Node] = set()  # an extreme over the rows, and values made from it alone
    divisors: set[fx.Node] = set()  # reciprocals of statistics
    counted: set[fx.Node] = set()  # values computed from integers alone (one_hot(codes).float()): no gradient's
    ranked: dict[fx.Node, fx.Node] = {}  # values from a running count along the rows (each row's place among them)
    # -> that count
    ranges: dict[fx.Node, bool] = {}  # integers counting the rows (arange(B)), and arithmetic on them -> whether
    # shifted by a number (arange(B) + 1)
    partners: dict[fx.Node, fx.Node] = {}  # indices of other rows (randperm(B), (arange(B) + 1) % B) -> their source
    for node in nodes:
        value = node.meta.get("val")
        name = op_name(node) if node.op == "call_function" else ""
        if name in _FLOAT_SCANS and isinstance(node.args[0], fx.Node) and len(node.args) > 1 \
                and isinstance(node.args[1], int) and rows_at(node.args[0], node.args[1], rows) \
                and node.args[0].meta["val"].is_floating_point():  # (cummax's value: a pair)
            return (f"{place(node)} runs along the batch's rows ({name}: each row's value takes in the rows before "
                    f"it, as a Cox partial likelihood's risk sets do), so each row depends on the rows before it in "
                    f"the batch (in a pipeline: in its micro-batch only)")
        if name in ORDERS and orders_rows(node, name, rows):
            return (f"{place(node)} orders the batch's rows ({name} along them: each row's value goes where the "
                    f"other rows' values put it, as a sliced Wasserstein distance's sorted projections or hard "
                    f"examples mined with topk over the batch are), so what each row meets depends on the whole batch "
                    f"(in a pipeline: on its micro-batch only)")
        if node.op == "call_function" and isinstance(value, (torch.SymFloat, torch.SymInt, float, int)):
            # a number read out of a tensor (.item()) and Python arithmetic on it keep what the tensor was
            for kind in (statistics, shifts):
                if any(arg in kind for arg in node.all_input_nodes):
                    kind.add(node)
                    break
            continue
        if node.op != "call_function" or not isinstance(value, torch.Tensor):
            continue
        read = [arg for arg in node.all_input_nodes if arg not in _metadata_only(node, name)]
        inputs = [arg for arg in read if isinstance(arg.meta.get("val"), torch.Tensor)]
        source = node.args[0] if node.target is operator.getitem and node.args else None
        if isinstance(source, fx.Node) and source.op == "call_function" \
                and not isinstance(source.meta.get("val"), torch.Tensor):
            # a part of an op's tuple (var_mean's mean, median(0)'s values): that op, of the op's own inputs
            name = op_name(source)
            inputs = [arg for arg in source.all_input_nodes if isinstance(arg.meta.get("val"), torch.Tensor)]
        if name in _SOFTMAXES and isinstance(node.args[0], fx.Node) and len(node.args) > 1 \
                and isinstance(node.args[1], int) and rows_at(node.args[0], node.args[1], rows):
            return (f"{place(node)} normalizes along the batch's rows ({name} over them: each row's weight depends "
                    f"on every other row's), so each row depends on the whole batch (in a pipeline: on its "
                    f"micro-batch only)")
        if _normalizes_rows(node, name, rows):
            return (f"{place(node)} normalizes over dims that hold the batch's rows ({name} of a value whose rows "
                    f"are not its first dim: a layer norm or instance norm of a transposed batch, a batch norm "
                    f"without running statistics), so each row depends on the whole batch (in a pipeline: on its "
                    f"micro-batch only)")
        if name == "batch_norm" and len(node.args) > 5 and node.args[5] is True and node.args[3] is None \
                and not _in_batch_norm_module(node) and isinstance(node.args[0], fx.Node) \
                and rows_at(node.args[0], 0, rows):
            return (f"{place(node)} normalizes by the batch's statistics in training (F.batch_norm without running "
                    f"statistics), so each row depends on the whole batch (in a pipeline: on its micro-batch only)")
        if name in _SCANS and isinstance(node.args[0], fx.Node) and len(node.args) > 1 \
                and isinstance(node.args[1], int) and rows_at(node.args[0], node.args[1], rows, counted=True):
            ranked[node] = node
        elif any(arg in ranked for arg in inputs):
            count = ranked[next(arg for arg in inputs if arg in ranked)]
            if name in _COMPARISONS:
                return (f"{place(node)} compares each row's place among the batch's rows (a running count along "
                        f"them, {place(count)}: the tokens routed to an expert counted against its capacity, which "
                        f"drops those past it), so which rows pass depends on the rows before them in the batch (in "
                        f"a pipeline: in their micro-batch only)")
            ranked[node] = count
        if name in _ATTENTION and len(node.args) >= 2:
            if any(rows_at(arg, -2, rows) for arg in node.args[:2] if isinstance(arg, fx.Node)):
                return (f"{place(node)} attends along the batch's rows (a sequence whose positions are the rows: "
                        f"a time-major batch, (T, B), given to torch's batch_first=False layers? The pipeline "
                        f"splits every batch along dim 0, so micro-batches would cut the sequences in time: give "
                        f"batches with their rows first and build the layers with batch_first=True)")
        if name in _RECURRENCES and _along_time(node, lambda size: isinstance(size, torch.SymInt)
                                                and size.node.expr in rows):
            return _RECURRENCE.format(place=place(node))
        if _windows_rows(node, name, lambda size: isinstance(size, torch.SymInt) and size.node.expr in rows):
            return _windows(node, name)
        if name == "slice" and shifts_rows(node, rows) or name == "diff" and isinstance(node.args[0], fx.Node) \
                and rows_at(node.args[0], node.args[2] if len(node.args) > 2 else -1, rows):
            return (f"{place(node)} takes the batch's rows shifted (z[1:] - z[:-1], torch.diff along them: each row "
                    f"meets its neighbour), so which rows meet depends on the whole batch (in a pipeline: on its "
                    f"micro-batch only, and the rows at a micro-batch's edge meet none)")
        made = partner_index(node, name, rows, ranges, partners)
        if made is not None:
            partners[node] = made
        elif name == "arange" and any(counts_rows(arg, rows) for arg in node.args[:2]):
            ranges[node] = False
        elif inputs and any(arg in ranges for arg in inputs) and not value.is_floating_point():
            ranges[node] = any(ranges.get(arg, False) for arg in inputs) or (
                name in ("add", "sub") and any(isinstance(arg, int) and arg != 0 for arg in node.args[1:2]))
        picked = picked_by(node, name, rows, partners)
        if picked is not None:
            return (f"{place(node)} picks other rows of the batch by an index ({place(picked)}: each row meets "
                    f"the row the index names, as manifold mixup's or MixStyle's permutation of the batch does), so "
                    f"which rows meet depends on the whole batch (in a pipeline: each row meets rows of its "
                    f"micro-batch only)")
        if reordered_parts(node, name, rows):
            return (f"{place(node)} puts parts of a value cut along the batch's rows (chunk, split, slices) together "
                    f"in another order, or one part with another (each row meets a row of another part of the batch), "
                    f"so which rows meet depends on the whole batch (in a pipeline: on its micro-batch only)")
        if name in ("roll", "flip") and moves_rows(node, rows):
            return (f"{place(node)} moves the batch's rows ({name} along them: each row meets another row's values, "
                    f"as in-batch negatives taken from the next row do), so which rows meet depends on the whole "
                    f"batch (in a pipeline: on its micro-batch only)")
        if name in _SHAPE_ONLY or "batch_norm" in name:
            continue
        if inputs and all(arg in counted or not (arg.meta["val"].is_floating_point() or arg.meta["val"].is_complex())
                          for arg in inputs):
            counted.add(node)
        if name in _EXTREMES and not has_rows(value, rows) and any(has_rows(arg.meta["val"], rows)
                                                                   for arg in inputs):
            shifts.add(node)  # an extreme over the rows: a shift (exp(z - z.max())) cancels, a scale does not
            continue
        carried = [arg for arg in read if arg in statistics]
        shifted = [arg for arg in read if arg in shifts]
        if has_rows(value, rows):
            if carried or shifted and not (name in ("sub", "add", "rsub")
                                           and (_normalized(node) or _added_back(node, shifts))):
                kind = "a statistic" if carried else "an extreme"
                return (f"{place(node)} brings {kind} over the batch's rows ({place((carried or shifted)[0])}) back "
                        f"into its rows, so each row depends on the whole batch (in a pipeline: on its micro-batch "
                        f"only)")
        elif (value.is_floating_point() or value.is_complex()) and (
                carried or any(has_rows(arg.meta["val"], rows) and not _no_elements(arg.meta["val"])
                               for arg in inputs)):
            # (a value of no elements, h[:, :0], gives nothing of its rows: its sum is 0, found by review)
            statistics.add(node)
            if name == "reciprocal" or name == "pow" and _exponent(node) == -1:  # a divisor: a sum times it is a
                # mean, not a product of two statistics
                divisors.add(node)
            carried = [arg for arg in carried if arg not in divisors]
            if _curves(node, name) and carried and not all(arg in counted or arg in divisors for arg in carried):
                return (f"{place(node)} takes {name} of a statistic over the batch's rows ({place(carried[0])}: the "
                        f"log of a batch mean, as a sparsity penalty's KL or an entropy of the batch's mean "
                        f"prediction takes; the square of a cross-correlation over the batch, as Barlow Twins' loss "
                        f"takes), which is not linear in the rows, so the batch's value is not the mean of its "
                        f"micro-batches' values")
            uses = [arg for arg in _node_args(node) if arg in statistics and arg not in divisors]  # (c * c: twice)
            if name in _PRODUCTS and len(uses) >= 2 and not all(arg in counted for arg in uses):
                return (f"{place(node)} multiplies two statistics over the batch's rows (as a mixture of experts' "
                        f"load-balancing loss does: the fraction of tokens routed to each expert times their mean "
                        f"router probability), so the batch's value is not the mean of its micro-batches' values")
        elif shifted:
            shifts.add(node)
    return None


def _no_elements(value: torch.Tensor) -> bool:
    """Whether ``value`` has a dim of size 0 whatever its rows (a symbolic size is never taken for 0 here)."""
    return any(type(size) is int and size == 0 for size in value.shape)


def _curves(node: fx.Node, name: str) -> bool:
    """Whether ``node`` is a function that is not linear (nor affine) in its first input: a log, an exponential, a
    square (``pow`` to another power than 1), an absolute value, a clamp."""
    if name == "pow":
        return _exponent(node) not in (1, -1)  # (-1: a divisor)
    return name in _CURVED


def _exponent(node: fx.Node) -> Any:
    """A ``pow`` node's exponent where it is a number, else None."""
    exponent = node.args[1] if len(node.args) > 1 else None
    return exponent if isinstance(exponent, (int, float)) else None


def _node_args(node: fx.Node) -> list[fx.Node]:
    """The nodes among ``node``'s arguments, each as often as it is given (``c * c``: twice; einsum's list)."""
    found: list[fx.Node] = []
    for arg in (*node.args, *node.kwargs.values()):
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(item, fx.Node):
                found.append(item)
    return found


def _normalizes_rows(node: fx.Node, name: str, rows: set[Any]) -> bool:
    """Whether a normalization op takes its statistics over a dim holding the batch's rows: a layer norm (or RMS
    norm) over trailing dims, an instance norm over dims after the channels, a group norm over the channels and
    after (each of ``(N, C, ...)``'s samples normalized alone: rows at dim 0 are not among them)."""
    source = node.args[0] if node.args else None
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return False
    if name in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm") and len(node.args) > 1 \
            and isinstance(node.args[1], (list, tuple)):
        normalized = range(value.dim() - len(node.args[1]), value.dim())
    elif name == "instance_norm":
        normalized = range(2, value.dim())
    elif name in ("group_norm", "native_group_norm"):
        normalized = range(1, value.dim())
    else:
        return False
    return any(rows_at(source, dim, rows) for dim in normalized)


def _metadata_only(node: fx.Node, name: str) -> tuple[Any, ...]:
    """The arguments of ``node`` whose dtype and device alone it reads (``table.to(h)``, ``table.type_as(h)``)."""
    if name in ("to", "type_as") and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        return (node.args[1],)
    return ()


_SOFTMAXES = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}  # (input, dim, ...)


def _in_batch_norm_module(node: fx.Node) -> bool:
    """Whether ``node`` runs inside a batch norm module (torch's, or a subclass: warned of by the strategy)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    kind = list(stack.values())[-1][1]
    if isinstance(kind, type):
        return issubclass(kind, torch.nn.modules.batchnorm._BatchNorm)
    return "BatchNorm" in str(kind)


_NORMALIZING = _SOFTMAXES | {"exp", "logsumexp"}  # where a shift by an extreme cancels


def _normalized(node: fx.Node) -> bool:
    """Whether every use of ``node`` (a value shifted by an extreme) exponentiates or normalizes it, where the shift
    cancels (a softmax made stable by the batch's maximum)."""
    return bool(node.users) and all(user.op == "call_function" and op_name(user) in _NORMALIZING
                                    for user in node.users)


_VIEWS = {"squeeze", "unsqueeze", "view", "reshape", "_unsafe_view", "expand", "alias"}
_LOGSUMEXP_PATH = {"log", "sum", "mean", "add", "exp"} | _VIEWS


def _added_back(node: fx.Node, shifts: set[fx.Node]) -> bool:
    """Whether ``node`` adds an extreme ``m`` back to ``log(sum(exp(x - m)))``: a logsumexp written by hand with the
    batch's maximum for stability, where the shift cancels (``m`` itself, or a view of it, on both sides; a mean for
    the sum, an epsilon added inside the log)."""
    if op_name(node) != "add":
        return False
    added = [arg for arg in node.args[:2] if isinstance(arg, fx.Node) and arg in shifts]
    others = [arg for arg in node.args[:2] if isinstance(arg, fx.Node) and arg not in shifts]
    if len(added) != 1 or len(others) != 1:
        return False
    root, logged = _extreme_of(added[0]), others[0]
    if logged.op != "call_function" or op_name(logged) != "log":
        return False
    seen, frontier = set(), [logged]
    while frontier:  # back through the log, the sum and the exp, to the subtraction of the same extreme
        value = frontier.pop()
        if value in seen or value.op != "call_function":
            continue
        seen.add(value)
        name = op_name(value)
        if name == "sub" and value.args and any(
                user.op == "call_function" and op_name(user) == "exp" for user in value.users) \
                and isinstance(value.args[1], fx.Node) and value.args[1] in shifts \
                and _extreme_of(value.args[1]) is root:
            return True
        if name in _LOGSUMEXP_PATH:
            frontier.extend(arg for arg in value.all_input_nodes if arg not in shifts)
    return False


def _extreme_of(node: fx.Node) -> fx.Node:
    """The extreme a shift was made from through views and detaches (``m.detach().unsqueeze(-1)``: ``m``)."""
    while node.op == "call_function" and (op_name(node) in _VIEWS or op_name(node) == "detach") \
            and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


_RECURRENCE = ("{place} runs its recurrence along the batch's rows (a time-major batch, (T, B), given to an RNN with "
               "batch_first=False? The pipeline splits every batch along dim 0, so micro-batches would cut the "
               "sequences in time: give batches with their rows first and build the RNN with batch_first=True)")


def _along_time(node: fx.Node, is_rows: Any) -> bool:
    """Whether a recurrence's (aten.lstm's, gru's, rnn's) time dimension is the rows (``is_rows`` of its size)."""
    first = node.args[0] if node.args else None
    value = first.meta.get("val") if isinstance(first, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    batch_first = bool(node.args[8]) if len(node.args) > 8 else False
    return bool(is_rows(value.shape[1 if batch_first else 0]))


def _windows(node: fx.Node, name: str) -> str:
    return (f"{place(node)} {'convolves' if name in _CONVOLUTIONS else 'pools'} along the batch's rows (a time-major "
            f"batch, (T, B, ...), whose time the model moves to a convolution's length: the pipeline splits every "
            f"batch along dim 0, so micro-batches would cut the sequences in time and each window at a cut sees "
            f"padding for the rows of the next micro-batch: give batches with their rows first)")


def _windows_rows(node: fx.Node, name: str, counts_rows: Callable[[Any], bool]) -> bool:
    """Whether ``node`` (op ``name``) is a convolution or pooling that slides a window wider than one along a dim of
    its input whose size ``counts_rows`` (one of its spatial dims, the last ones)."""
    source = node.args[0] if node.args and (name in _CONVOLUTIONS or name in _POOLS) else None
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return False
    size = node.args[1] if len(node.args) > 1 else None  # a weight, a kernel, or an adaptive pool's output size
    if name in _CONVOLUTIONS:
        weight = size.meta.get("val") if isinstance(size, fx.Node) else None
        if not isinstance(weight, torch.Tensor) or weight.dim() < 3:
            return False
        kernel: list[Any] = list(weight.shape[2:])
    elif isinstance(size, int | list | tuple) and not name.startswith(("adaptive", "_adaptive")):
        kernel = [size] * _POOLS[name] if isinstance(size, int) else list(size)
    else:  # an adaptive pool: any output size other than the rows' own pools them together
        kernel = [None] * _POOLS[name]
    if value.dim() < len(kernel) + 2 or counts_rows(value.shape[0]):
        return False  # unbatched, or batch-first: a spatial size equal to the rows by chance (8 rows of 8x8 maps)
    return any(counts_rows(value.shape[dim]) and width != 1 for dim, width in zip(range(-len(kernel), 0), kernel))


