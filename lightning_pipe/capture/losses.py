"""Losses inside a captured model that are means over a count, whose micro-batch means do not average to the batch's:
cross entropy or NLL with class weights or an ignored label (Hugging Face's ``labels`` with -100), and a mean over a
count of the inputs' elements (a loss over the tokens an attention mask keeps, :func:`counted_means`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, is_concrete_int

__all__ = ["MeanLoss", "mean_losses", "CountedMean", "counted_means"]

_LOSSES = {getattr(torch.ops.aten, name).default for name in ("cross_entropy_loss", "nll_loss", "nll_loss_nd",
                                                             "nll_loss_forward", "nll_loss2d", "nll_loss2d_forward")
           if hasattr(torch.ops.aten, name)}
_MEAN = 1  # torch's Reduction::Mean


@dataclass(frozen=True)
class MeanLoss:
    """A loss op that averages over its targets: by their class weights (``weighted``), leaving out ``ignore_index``
    (None where the graph computes it: BERT's question answering ignores the positions past the sequence's length)."""

    op: str
    weighted: bool
    ignore_index: int | None


def mean_losses(graphs: Iterable[fx.GraphModule]) -> list[MeanLoss]:
    """The cross-entropy and NLL ops of ``graphs`` that reduce by their mean (the default)."""
    found = []
    for graph_module in graphs:
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or node.target not in _LOSSES:
                continue
            if _argument(node, 3, "reduction", _MEAN) == _MEAN:
                name = getattr(node.target, "_opname", str(node.target))
                ignored = _argument(node, 4, "ignore_index", -100)
                found.append(MeanLoss(name, _argument(node, 2, "weight", None) is not None,
                                      ignored if isinstance(ignored, int) else None))
    return found


# -- means over a count of the inputs' elements ------------------------------------------------------------------------

_MEAN_OPS = {getattr(torch.ops.aten, name).default: index for name, index in (
    ("mean", None), ("binary_cross_entropy_with_logits", 4), ("binary_cross_entropy", 3), ("mse_loss", 2),
    ("l1_loss", 2), ("smooth_l1_loss", 2), ("huber_loss", 2), ("soft_margin_loss", 2), ("kl_div", 2),
    ("cross_entropy_loss", 3), ("nll_loss", 3), ("nll_loss_nd", 3)) if hasattr(torch.ops.aten, name)}
_MEAN_OPS[torch.ops.aten.mean.dim] = None
_SELECTIONS = {torch.ops.aten.index.Tensor, torch.ops.aten.masked_select.default, torch.ops.aten.nonzero.default}
_RELATIONS = {"eq": "==", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_PASSED = {"view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze", "clone", "contiguous", "alias",
           "expand", "clamp", "clamp_min", "detach", "detach_", "lift_fresh_copy", "type_as"}


@dataclass(frozen=True)
class CountedMean:
    """A mean the model takes over a count of its inputs' elements that its rows do not share alike (HF ELECTRA's
    discriminator loss over ``attention_mask == 1``): a reduction over a boolean selection (``loss[mask].mean()``, a
    loss of ``logits[active]``), a division by a sum over inputs (``(loss * mask).sum() / mask.sum()``), or a cross
    entropy over labels made from the inputs, some ignored (``torch.where(mask, labels, -100)``, a causal LM's shift).
    :attr:`count` computes that count from the model's flattened inputs at :attr:`inputs`."""

    op: str
    inputs: tuple[int, ...]
    count: fx.GraphModule
    expression: str | None
    """The count written over ``batch[...]``, named as the model's inputs (where its ops are simple ones)."""
    given: str | None = None
    """The model input that is the count itself, where one is (Hugging Face's ``num_items_in_batch``, which the
    user's code computes)."""
    linear: bool = True
    """Whether the mean reaches the output through sums and scalings only; else (a square root of it, its square: a
    scale-invariant log loss) no weighting of micro-batches' values makes the batch's."""
    outputs: frozenset[int] = frozenset()
    """The model's outputs (by index among ``user_outputs`` of :func:`counted_means`) that the mean reaches: the loss,
    not a mean over rows returned beside it."""

    def counted(self, flat: Sequence[Any]) -> float | None:
        """The count for one micro-batch's flattened model inputs (None where it cannot be computed)."""
        try:
            with torch.no_grad():
                return float(self.count(*(flat[index] for index in self.inputs)))
        except Exception:  # noqa: BLE001 - inputs this count was not made for: no telling
            return None


def counted_means(graph: fx.Graph, user_inputs: Sequence[fx.Node],
                  constants: Mapping[fx.Node, torch.Tensor] | None = None,
                  user_outputs: Sequence[Any] = ()) -> list[CountedMean]:
    """The means over counts of its inputs' elements that ``graph`` (a whole captured forward, ``user_inputs`` its
    model inputs' placeholders, ``constants`` the values of its lifted constants: ``torch.tensor(-100)``,
    ``user_outputs`` the nodes of its model outputs) takes on the way to its outputs (:class:`CountedMean`)."""
    position: dict[fx.Node, Any] = {node: index for index, node in enumerate(user_inputs)}
    position.update({node: value for node, value in (constants or {}).items() if value.numel() <= 64})
    reaches = _reaching_output(graph)
    found: dict[str, CountedMean] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node not in reaches:
            continue
        count: tuple[str, Any, int | None] | None = None
        if node.target in _MEAN_OPS:
            index = _MEAN_OPS[node.target]
            reduction = node.args[index] if index is not None and len(node.args) > index else \
                node.kwargs.get("reduction", 1)
            ignored = _ignore_index(node) if reduction == 1 else None
            if isinstance(ignored, fx.Node) and not _inputs_only(ignored, position):
                ignored = None  # (an ignored label computed from the model's weights: not countable from inputs)
            if ignored is not None and _inputs_only(node.args[1], position):  # its targets other than ignored ones
                count = ("ignored", node.args[1], ignored)  # (labels masked by torch.where(mask, labels, -100))
            elif reduction == 1 and _data_sized(node.args[0]):
                count = ("sum", _selection(node.args[0]), None)
        elif node.target is torch.ops.aten.div.Tensor and _is_scalar(node) and isinstance(node.args[1], fx.Node) \
                and _is_scalar(node.args[1]) and not _inputs_only(node.args[0], position) \
                and not _one_row(node.args[0]):  # (one image's loss over its own boxes: a row's value)
            count = ("value", node.args[1], None)
        if count is None or not _inputs_only(count[1], position):
            continue
        after = _after(node, reaches)
        mean = _counting(node, *count, position, _linear_to_output(node, after))
        if mean is not None:
            mean = replace(mean, outputs=frozenset(
                index for index, output in enumerate(user_outputs) if output in after))
            found.setdefault(mean.expression or str(len(found)), mean)
    return list(found.values())


def _counting(node: fx.Node, how: str, value: fx.Node, ignored: int | fx.Node | None,
              position: dict[fx.Node, int], linear: bool = True) -> CountedMean | None:
    """The count ``value`` (``how``: "value" itself, "sum" of a mask: its true elements, "ignored": its elements other
    than ``ignored``, a number or one the graph computes from the inputs' sizes) as a graph of the model inputs it
    reads."""
    ancestors = _ancestors(value) | (_ancestors(ignored) if isinstance(ignored, fx.Node) else set())
    used = sorted((n for n in ancestors if isinstance(position.get(n), int)), key=position.__getitem__)
    if not used:
        return None
    graph, root = fx.Graph(), torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for placeholder in used:
        env[placeholder] = graph.placeholder(placeholder.name)
    for constant in (n for n in ancestors if isinstance(position.get(n), torch.Tensor)):
        root.register_buffer(constant.name, position[constant].detach().clone())
        env[constant] = graph.get_attr(constant.name)
    for original in value.graph.nodes:
        if original in ancestors and original not in env:
            env[original] = graph.node_copy(original, env.__getitem__)
    result = env[value]
    if how == "ignored":
        result = graph.call_function(torch.ops.aten.ne.Scalar, (result, env.get(ignored, ignored)))
    if how != "value":
        result = graph.call_function(torch.ops.aten.sum.default, (result,))
    graph.output(result)
    expression = _written(value, {n: v for n, v in position.items() if isinstance(v, torch.Tensor)})
    if expression is not None and how == "ignored":
        other = _written(ignored, {}) if isinstance(ignored, fx.Node) else ignored
        expression = None if other is None else f"({expression} != {other}).sum()"
    elif expression is not None and how != "value":
        expression = f"{expression}.sum()"
    given = None
    while how == "value" and given is None and isinstance(value, fx.Node):  # through .to(device), views
        if value.op == "placeholder":
            given = value.name
        elif value.op == "call_function" and value.args and \
                getattr(value.target, "__name__", "").split(".")[0] in (*_PASSED, "to", "_to_copy"):
            value = value.args[0]
        else:
            break
    return CountedMean(getattr(node.target, "_opname", str(node.target)), tuple(position[n] for n in used),
                       fx.GraphModule(root, graph), expression, given, linear)


_LINEAR = (_PASSED - {"clamp", "clamp_min"}) | {"add", "sub", "rsub", "neg", "sum", "mean", "stack", "cat", "select",
                                                "getitem", "to", "_to_copy", "mul", "div"}


def _after(mean: fx.Node, reaches: set[fx.Node]) -> set[fx.Node]:
    """``mean`` and what it reaches on the way to the graph's output (``reaches``: what reaches the output)."""
    after, todo = {mean}, [mean]
    while todo:
        for user in todo.pop().users:
            if user in reaches and user not in after and user.op != "output":
                after.add(user)
                todo.append(user)
    return after


def _linear_to_output(mean: fx.Node, after: set[fx.Node]) -> bool:
    """Whether ``mean`` reaches the graph's output only through sums and scalings (``after``: what it reaches, itself
    too), so that a mean of micro-batch means weighted by their counts is the batch's: not a scale-invariant log
    loss's ``sqrt(mean(d**2) - mean(d)**2)``, which no weighting makes the batch's."""
    for node in after - {mean}:
        name = getattr(node.target, "__name__", "").split(".")[0]
        if name in ("add_", "sub_", "mul_", "div_"):  # in place (`loss += 0.4 * aux_loss`, as HF's UperNet writes)
            name = name[:-1]
        if name not in _LINEAR:
            return False
        operands = [arg for arg in node.args[:2] if isinstance(arg, fx.Node)]
        if name in ("mul", "div") and (sum(arg in after for arg in operands) > 1 or (
                name == "div" and len(node.args) > 1 and node.args[1] in after)):
            return False  # (a product of two of its values, or a division by it)
    return True


def _ignore_index(node: fx.Node) -> int | fx.Node | None:
    """A cross entropy's or NLL's ignored label, where it has no class weights (those :func:`mean_losses` finds): a
    number, or the node computing it (Hugging Face's question answering ignores the positions past the sequence:
    ``input_ids.size(1)``)."""
    if node.target not in _LOSSES:
        return None
    ignored = _argument(node, 4, "ignore_index", -100)
    return ignored if isinstance(ignored, (int, fx.Node)) and _argument(node, 2, "weight", None) is None else None


def _argument(node: fx.Node, index: int, name: str, default: object) -> object:
    """A call's argument, given by position or by name."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _one_row(node: fx.Node) -> bool:
    """Whether ``node`` is computed from one row of the batch: from ``x[b]`` of a tensor whose rows the graph fixed (a
    detector's loop over its images), and from no other value with rows."""
    selects = [n for n in _ancestors(node) if n.target is torch.ops.aten.select.int and len(n.args) == 3
               and n.args[1] == 0 and isinstance(n.args[0], fx.Node)]
    if not selects:
        return False
    sizes = [n.args[0].meta["val"].shape[0] for n in selects if isinstance(n.args[0].meta.get("val"), torch.Tensor)]
    return len({n.args[2] for n in selects}) == 1 and all(is_concrete_int(size) and size > 1 for size in sizes)


def _selection(node: Any) -> fx.Node | None:
    """The boolean mask whose selected elements ``node``'s first dim counts (``x[mask]``, ``masked_select``), found
    back through the ops that keep the selection's elements."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 64:
        seen += 1
        if node.target in _SELECTIONS:
            if node.target is torch.ops.aten.nonzero.default:
                return node.args[0]
            masks = node.args[1] if node.target is torch.ops.aten.index.Tensor else [node.args[1]]
            masks = [mask for mask in masks if isinstance(mask, fx.Node) and _dtype(mask) == torch.bool]
            return masks[0] if len(masks) == 1 else None
        if node.op != "call_function" or not node.args:
            return None
        name = getattr(node.target, "__name__", "").split(".")[0]
        if name == "getitem" and isinstance(node.args[0], fx.Node):  # broadcast_tensors(...)[i]
            node = node.args[0].args[0][node.args[1]] if isinstance(node.args[0].args[0], (list, tuple)) else None
            continue
        node = node.args[0]
    return None


def _inputs_only(node: Any, position: dict[fx.Node, int]) -> bool:
    """Whether ``node`` is computed from the model's inputs alone (no parameter, buffer or random draw)."""
    if not isinstance(node, fx.Node):
        return False
    for ancestor in _ancestors(node):
        if ancestor.op == "placeholder" and ancestor not in position:
            return False
        if ancestor.op != "placeholder" and (ancestor.op != "call_function" or torch.Tag.nondeterministic_seeded in
                                             getattr(ancestor.target, "tags", ())):
            return False
    return True


def _ancestors(node: fx.Node) -> set[fx.Node]:
    found, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(current.all_input_nodes)
    return found


def _reaching_output(graph: fx.Graph) -> set[fx.Node]:
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    return _ancestors(output)


def _is_scalar(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 0


def _data_sized(node: Any) -> bool:
    """Whether ``node``'s size depends on its values (a selection's count: an unbacked symbol of the trace)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and bool(free_unbacked_symbols(value))


def _dtype(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None


def _written(node: Any, constants: Mapping[fx.Node, torch.Tensor], depth: int = 0) -> str | None:
    """``node`` written as Python over ``batch[name]`` (the model inputs' names) and single-number ``constants``, for
    the few ops a count is made of; None for any other."""
    if not isinstance(node, fx.Node) or depth > 16:
        return repr(node) if isinstance(node, (int, float, bool)) else None
    if node in constants:
        value = constants[node]
        return repr(value.item()) if value.numel() == 1 else None
    if node.op == "placeholder":
        return f"batch[{node.name!r}]"
    name = getattr(node.target, "__name__", "").split(".")[0]
    if name == "where" and len(node.args) == 3:
        parts = [_written(arg, constants, depth + 1) for arg in node.args]
        return None if None in parts else f"torch.where({', '.join(map(str, parts))})"
    first = _written(node.args[0], constants, depth + 1) if node.args else None
    if first is None:
        return None
    if name == "slice" and len(node.args) >= 2 and all(isinstance(arg, int) for arg in node.args[1:]):
        dim, start, end, step = (*node.args[1:], *(0, 2**63 - 1, 1)[len(node.args) - 2:])
        if start == 0 and end >= 2**62 and step == 1:
            return first
        if dim < 0 and dim != -1:
            return None
        cut = f"{start or ''}:{'' if end >= 2**62 else end}{'' if step == 1 else f':{step}'}"
        return f"{first}[{'..., ' if dim == -1 else ':, ' * dim}{cut}]"
    if name in ("constant_pad_nd", "pad") and len(node.args) >= 2:  # aten.pad: (input, pad, mode, value)
        mode, value = ("constant", node.args[2] if len(node.args) > 2 else 0) if name == "constant_pad_nd" else \
            (*node.args[2:4], *("constant", None)[len(node.args) - 2:])[:2]
        if mode != "constant":
            return None
        value = int(value) if isinstance(value, float) and value.is_integer() else value
        return f"torch.nn.functional.pad({first}, {list(node.args[1])}, value={value!r})"
    if name in _RELATIONS and len(node.args) == 2 or name in ("logical_and", "bitwise_and", "mul"):
        other = _written(node.args[1], constants, depth + 1) if len(node.args) == 2 else None
        sign = _RELATIONS.get(name, "*" if name == "mul" else "&")
        return None if other is None else f"({first} {sign} {other})"
    if name == "sum" and len(node.args) == 1:
        return f"{first}.sum()"
    if name in ("to", "_to_copy"):
        return f"{first}.bool()" if _dtype(node) == torch.bool else first
    if name == "sym_size" and len(node.args) == 2:
        return f"{first}.shape[{node.args[1]}]"
    if name in ("clamp", "clamp_min") and len(node.args) > 1:  # (positions clamped to the sequence's length)
        bounds = ["None" if arg is None else _written(arg, constants, depth + 1) for arg in node.args[1:]]
        return None if None in bounds else f"{first}.clamp({', '.join(map(str, bounds))})"
    return first if name in _PASSED else None
