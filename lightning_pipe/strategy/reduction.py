"""How a step's loss adds up over rows: a mean (what the pipeline assumes) or a sum, told or detected.

A pipeline runs ``training_step`` once per micro-batch and weights each micro-batch's loss by its share of the rows,
which gives one device's gradient when the step returns a *mean* over its rows. A step that returns a *sum* over rows
(Lightning's bug-report template: ``self(batch).sum()``) would so get its gradient divided by the number of
micro-batches, silently. ``loss_reduction="sum"`` says the loss is a sum: each micro-batch's loss then counts whole,
and the logged loss adds up too. ``"auto"`` (the default) checks on the first training batch that has several
micro-batches: the last stage runs the step once more, without gradients, on the whole batch with the pipeline's
outputs put together, and compares that loss with the mean and with the sum of the micro-batches' losses. A sum is
then made good for that batch (every rank scales its gradients by the number of micro-batches, which is exact when
they have equal rows; with unequal rows it is an error that says to pass ``loss_reduction="sum"``) and taken as the
rule from then on; anything else leaves the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_pipe.engine.tree import tree_flatten, tree_unflatten

__all__ = ["LOSS_REDUCTIONS", "check_loss_reduction", "Probe", "verdict"]

LOSS_REDUCTIONS = ("auto", "mean", "sum")
_TOLERANCE = 1e-4  # relative: the whole batch's loss against the micro-batches' mean and sum (float32 sums)


def check_loss_reduction(value: Any) -> str:
    if value not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {', '.join(map(repr, LOSS_REDUCTIONS))}, got {value!r}: "
                         f"'mean' if training_step returns a mean over the batch's rows (F.mse_loss, "
                         f"F.cross_entropy), 'sum' if it returns a sum (loss.sum()), 'auto' to let the first batch tell")
    return value


@dataclass
class Probe:
    """What the last stage keeps of a batch's micro-batches to check how the step's loss adds up."""

    outputs: list[Any] = field(default_factory=list)  # the pipeline's outputs, detached
    microbatches: list[Any] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)  # each micro-batch's loss as the step returned it
    rows: list[int] = field(default_factory=list)

    def add(self, output: Any, microbatch: Any, loss: torch.Tensor, rows: int) -> None:
        leaves, spec = tree_flatten(output)
        self.outputs.append(tree_unflatten([t.detach() for t in leaves], spec))
        self.microbatches.append(microbatch)
        self.losses.append(loss)
        self.rows.append(rows)


def _whole(parts: list[Any]) -> Any | None:
    """The micro-batches' trees put back together along dim 0, or None where a leaf has no batch dimension."""
    flat = [tree_flatten(part) for part in parts]
    spec = flat[0][1]
    if any(len(leaves) != len(flat[0][0]) for leaves, _ in flat):
        return None
    columns = list(zip(*(leaves for leaves, _ in flat)))
    if any(t.dim() == 0 for column in columns for t in column):
        return None
    return tree_unflatten([torch.cat(column) for column in columns], spec)


def verdict(probe: Probe, run_whole: Callable[[Any, Any], torch.Tensor]) -> tuple[str | None, str]:
    """``("sum" | "mean" | None, why)``: how the step's loss adds up over rows, from ``run_whole(output, batch)``,
    the step's loss on the whole batch; None when this batch cannot tell (one micro-batch, equal mean and sum, a
    value that is neither)."""
    if len(probe.losses) < 2:
        return None, "one micro-batch"
    output, batch = _whole(probe.outputs), _whole(probe.microbatches)
    if output is None or batch is None:
        return "mean", "the outputs have no batch dimension to put together"
    losses = torch.stack([loss.detach().double().cpu() for loss in probe.losses])
    weights = torch.tensor(probe.rows, dtype=torch.float64) / sum(probe.rows)
    mean, total = float((losses * weights).sum()), float(losses.sum())
    whole = float(run_whole(output, batch).detach().double().cpu())
    scale = max(abs(mean), abs(total), abs(whole), 1e-12)
    if abs(total - mean) <= 10 * _TOLERANCE * scale:
        return None, "the micro-batches' mean and sum are equal"
    why = (f"on the whole batch the step's loss is {whole:.6g}; its {len(probe.losses)} micro-batches' losses have the "
           f"mean {mean:.6g} and the sum {total:.6g}")
    if abs(whole - total) <= _TOLERANCE * scale:
        return "sum", why
    return "mean", why
