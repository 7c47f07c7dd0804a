"""Losses inside a captured model that are means over a count: cross entropy or NLL with class weights or an ignored
label (Hugging Face's ``labels`` with -100), whose micro-batch means do not average to the batch's."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

__all__ = ["MeanLoss", "mean_losses"]

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

            def argument(index: int, name: str, default: object) -> object:
                return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)

            if argument(3, "reduction", _MEAN) == _MEAN:
                name = getattr(node.target, "_opname", str(node.target))
                ignored = argument(4, "ignore_index", -100)
                found.append(MeanLoss(name, argument(2, "weight", None) is not None,
                                      ignored if isinstance(ignored, int) else None))
    return found
