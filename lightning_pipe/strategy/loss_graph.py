"""What the autograd graph of a training step's loss shows about the step's own code after the model.

The strategy looks through it on the last stage: for the pipelined model's parameters the code reads beside the
model's output (:func:`parameters_reached`: a penalty over ``self.parameters()``, which there covers the last stage's
alone), for its form (:func:`loss_form`: a term that joins the loss after a warm-up changes it), and for the count
it is a mean over (:func:`mean_count`: cross entropy's labels not ignored, a mask's sum it is divided by).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_pipe.engine.tree import tree_flatten

__all__ = ["parameters_reached", "leaves_reached", "loss_form", "mean_count", "ignored_label"]

_GRAPH_NODES = 2048  # the most autograd nodes of the step's own code walked for its loss's form


def parameters_reached(loss: torch.Tensor, output: Any, parameters: set[int]) -> set[int]:
    """The ids in ``parameters`` that ``loss``'s autograd graph reaches both through ``output``'s tensors (the
    model's output: its layers' weights) and other than through them (the step's own code): a penalty over the
    layers' parameters; not a parameter only the step's code uses (a learned temperature after the model)."""
    ends = [t.grad_fn for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    direct = leaves_reached([loss.grad_fn], parameters, set(ends))
    return direct & leaves_reached(ends, direct, set()) if direct else set()


def leaves_reached(starts: list[Any], parameters: set[int], stops: set[Any]) -> set[int]:
    """The ids in ``parameters`` whose gradient accumulators the autograd graph from ``starts`` reaches, not walking
    through the ``stops``."""
    found: set[int] = set()
    seen: set[Any] = set()
    pending = list(starts)
    while pending:
        node = pending.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:  # a leaf's gradient accumulator
            if id(variable) in parameters:
                found.add(id(variable))
            continue
        pending.extend(function for function, _ in node.next_functions)
    return found


def loss_form(loss: torch.Tensor, output: Any) -> tuple[str, ...]:
    """The form of the step's own code's part of ``loss``'s autograd graph (its operations' names in walking
    order, up to the model's ``output``): a term that joins the loss later (a decorrelation penalty from step
    1000) changes it; the same code on other values does not. A graph larger than :data:`_GRAPH_NODES` gives its
    first nodes' form."""
    stops = {t.grad_fn for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None}
    names: list[str] = []
    seen: set[Any] = set()
    pending = [loss.grad_fn]
    while pending and len(names) < _GRAPH_NODES:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append("output" if node in stops else type(node).__name__)
        if node not in stops:
            pending.extend(function for function, _ in node.next_functions)
    return tuple(names)


_PASSED = {"MulBackward0", "MulBackward1", "DivBackward1", "NegBackward0", "CloneBackward0", "ToCopyBackward0",
           "AliasBackward0", "ViewBackward0", "SqueezeBackward0", "SqueezeBackward1", "UnsqueezeBackward0"}


def mean_count(loss: torch.Tensor) -> float | None:
    """What ``loss`` is a mean over, read at the root of its autograd graph (before its backward frees what the graph
    saved), through scalings by constants: cross entropy's (``nll_loss``'s) labels not ignored (or their class
    weights' sum), the elements of a ``.mean()``, the 0-dim tensor without gradient that a sum is divided by (a
    mask's sum); None for any other form (a sum of terms)."""
    return _root_count(loss)[0]


def ignored_label(loss: torch.Tensor) -> int | None:
    """The label that ``loss``, a cross entropy's mean over the labels not ignored (see :func:`mean_count`), ignores
    (its ``ignore_index``: -100, or 255 for segmentation's void pixels); None for any other loss."""
    return _root_count(loss)[1]


def _root_count(loss: torch.Tensor) -> tuple[float | None, int | None]:
    """:func:`mean_count` and :func:`ignored_label` of ``loss``, read in one walk."""
    node = getattr(loss, "grad_fn", None)
    for _ in range(16):
        name = type(node).__name__ if node is not None else ""
        try:
            if name.startswith("NllLoss"):
                if node._saved_reduction != 1:
                    return None, None
                ignored = int(node._saved_ignore_index)  # (saved unsigned: -100 reads back as 2**64 - 100)
                return float(node._saved_total_weight), ignored - 2**64 if ignored >= 2**63 else ignored
            if name == "MeanBackward0":
                return float(node._saved_self_sym_numel), None
            if name == "DivBackward0":
                other = node._saved_other
                return (float(other) if isinstance(other, torch.Tensor) and other.dim() == 0
                        and not other.requires_grad and node.next_functions[1][0] is None else None), None
        except (AttributeError, RuntimeError):  # (a saved value freed, or a node of another version of torch)
            return None, None
        if name not in _PASSED:
            return None, None
        onward = [function for function, _ in node.next_functions if function is not None]
        if len(onward) != 1:  # a product of two terms with gradients: no count
            return None, None
        node = onward[0]
    return None, None
