"""What the strategy tells a user whose step's loss does not add up over rows as the pipeline weighs it (a
:func:`~.reduction.verdict` other than a mean or a sum; a captured model's own loss over a count its micro-batches
do not share), each with how to make the step exact."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_pipe.capture.losses import CountedMean, MeanLoss
from lightning_pipe.strategy.reduction import Probe

__all__ = ["count_warning", "constant_warning", "neither_warning", "model_loss_warning", "counted_mean_warning",
           "given_count_warning", "nonlinear_mean_warning", "drawn_count_warning", "untold_warning",
           "graph_count_warning"]


def drawn_count_warning(probe: Probe) -> str | None:
    """What to tell a user whose step draws random numbers (so that :func:`verdict` cannot tell) where each
    micro-batch's loss is a mean over a count (:func:`~.loss_graph.mean_count`: a masked-LM mask's labels) that the
    micro-batches do not share in proportion to their rows; None where they do, or where a loss has no such count."""
    counts = _out_of_proportion(probe, empty=True)
    if counts is None:
        return None
    empty = (" (a micro-batch that counts nothing, whose loss is a mean over nothing, weighs nothing)"
             if 0 in counts else "")
    return (f"training_step's loss is a mean over a count that its micro-batches do not share in proportion to their "
            f"rows ({[round(float(c), 6) for c in counts]} counted in micro-batches of {probe.rows} rows: cross "
            f"entropy's labels not ignored, or what the loss is divided by), and the step draws random numbers (a "
            f"masked-LM mask drawn in the step?), so the pipeline cannot check it on the whole batch. It weighs each "
            f"micro-batch's loss by its rows{empty}, so these gradients differ from one device's mean over the "
            f"batch's count. Draw the mask in the DataLoader's collate_fn (transformers' "
            f"DataCollatorForLanguageModeling does), so that the batch holds the labels, and pass "
            f"PipelineStrategy(loss_reduction=lambda batch: "
            f"(batch['labels'] != -100).sum()), batch[...] naming where your batch holds them; or train with "
            f"num_microbatches=1")


def _out_of_proportion(probe: Probe, empty: bool = False) -> list[float] | None:
    """The counts each micro-batch's loss is a mean over by its graph (:func:`~.loss_graph.mean_count`), where every
    loss has one (of 0 too, where ``empty``) and they are not in proportion to the micro-batches' rows; else None."""
    counts = probe.graph_counts
    if len(counts) < 2 or len(counts) != len(probe.rows) \
            or any(c is None or not (c >= 0 if empty else c > 0) for c in counts):
        return None
    per_row = [float(count) / rows for count, rows in zip(counts, probe.rows)]  # type: ignore[arg-type]
    return None if max(per_row) - min(per_row) <= 1e-6 * max(per_row) else [float(c) for c in counts]  # type: ignore


def graph_count_warning(probe: Probe) -> str | None:
    """What to tell a user whose step's loss is "neither" (:func:`verdict`) where each micro-batch's loss is a mean
    over a count its graph shows (cross entropy's labels not ignored) that the micro-batches do not share in
    proportion to their rows: that count, with the ``loss_reduction`` giving it (the label the loss ignores, 255 for
    segmentation's void pixels: found by review, said to couple the rows, with -100's template); None otherwise."""
    counts = _out_of_proportion(probe)
    if counts is None or len(set(counts)) == 1:  # (one count the micro-batches share: the whole batch's, said apart)
        return None
    ignored = set(probe.ignored)
    label = next(iter(ignored)) if len(ignored) == 1 else None
    what = f"cross entropy's labels other than {label}" if label is not None else "what it is divided by"
    return neither_warning(f"each micro-batch's loss is a mean over {what}, {[round(float(c), 6) for c in counts]} "
                           f"in micro-batches of {probe.rows} rows", count=f"(batch[...] != {label}).sum()"
                           if label is not None else None)


def count_warning(why: str) -> str:
    """What to tell a user whose ``loss_reduction`` function does not count what the step's loss is a mean over (a
    :func:`verdict` of "neither" for a probe with counts)."""
    return (f"training_step's loss is not a mean over what loss_reduction's function counts ({why}), so these "
            f"gradients differ from one device's. A loss that adds terms averaged over different counts (a "
            f"classification term over the rows that have a label beside a regression term over the rows that have a "
            f"target, or over every row) has no single count: compute each term's count over the whole batch (in the "
            f"collate_fn, passed with the batch as a 0-dim tensor, which every micro-batch gets whole), return the sum "
            f"of each term's per-row losses divided by its count, and pass loss_reduction='sum'; or train with "
            f"num_microbatches=1")


def constant_warning(why: str) -> str:
    """What to tell a user whose step's loss has the same value on the batch and each micro-batch (a :func:`verdict`
    of "constant")."""
    return (f"training_step's loss has the same value on every part of the batch ({why}), so its value does not tell "
            f"how its gradients add up over the rows. A loss divided by its own detached value (l / l.detach(), "
            f"balancing task losses by their magnitudes) is such a loss, and its gradient on the batch, grad(l) / l, "
            f"is not the mean of its micro-batches' grad(l_m) / l_m: with micro-batches it trains otherwise than one "
            f"device. Divide by a value that is the whole batch's (a running average kept on the module), or pass "
            f"num_microbatches=1 for one device's gradients")


def untold_warning(why: str) -> str:
    """What to tell a user whose step's loss the first batches could not tell a mean or a sum over rows (``why``)."""
    return (f"training_step's loss could not be checked on its first batches for how it adds up over the batch's rows "
            f"({why}), so the pipeline takes it for a mean over rows and weighs each micro-batch's loss by its rows. "
            f"If it is a sum over rows (reduction='sum', a loss not divided by the batch's size), that divides its "
            f"gradients by the micro-batches: pass PipelineStrategy(loss_reduction='sum'). If it is a mean, pass "
            f"loss_reduction='mean' to say so")


def neither_warning(why: str, step: str = "training_step", count: str | None = None, given: str | None = None) -> str:
    """What to tell a user whose step's loss is neither a mean nor a sum over rows (a :func:`verdict` of "neither");
    ``count``: the function of a micro-batch to suggest, where known; ``given``: the model input that is the count,
    where the user's code computes it."""
    differ = ("these gradients differ from one device's (as they do under accumulate_grad_batches or DDP). For one "
              "device's gradients" if step == "training_step" else
              "the loss this step logs and returns differs from one device's. For one device's")
    return (f"{step}'s loss is neither a mean nor a sum over the batch's rows ({why}): it is normalized by "
            f"something counted over the whole batch (ignore_index or padding labels, class weights, a mask), adds "
            f"a term summed over the rows to one averaged over them (a VAE's KL summed over the batch beside a mean "
            f"reconstruction error: average both, or sum both and pass loss_reduction='sum'), adds terms "
            f"averaged over different counts (tasks whose labels are missing on different rows: divide each term's "
            f"sum by its count over the whole batch, passed with the batch as a 0-dim tensor, and pass "
            f"loss_reduction='sum'), or it couples the "
            f"rows (a contrastive loss over the batch, which no split into micro-batches computes: "
            f"num_microbatches=1 gives one device's result, the stages then running in turn; or targets mixed "
            f"across the batch's rows by the step's code, timm's Mixup or CutMix: mix in the DataLoader's "
            f"collate_fn instead, and no count is needed). The "
            f"pipeline weights each micro-batch's loss by its rows, so {differ} with a count, say what the "
            f"loss is a mean over with a function of a micro-batch: " + (
                f"PipelineStrategy(loss_reduction=lambda batch: ...) computing from a micro-batch the {given} your "
                f"code passes the model (for a causal LM's labels ignored at -100: (batch['labels'][:, 1:] != -100)"
                f".sum(), batch[...] naming where your batch holds them)" if given else
                f"PipelineStrategy(loss_reduction=lambda batch: {count}), batch[...] naming where your batch holds "
                f"those model inputs" if count else
                "PipelineStrategy(loss_reduction=lambda batch: (batch['labels'] != -100).sum()) for labels ignored "
                "at -100, or the sum of the class weights of its labels"))


def model_loss_warning(losses: Sequence[MeanLoss], inputs: Sequence[Sequence[Any]],
                       step: str = "training_step") -> str | None:
    """What to tell a user whose captured model computes its loss inside (a Hugging Face model given ``labels``) as
    a mean its micro-batches do not share alike: by class weights, or over the labels other than an ignored one
    (-100) when the micro-batches (``inputs``: each one's flattened inputs of the model) hold different shares of
    those; None if none does."""
    for loss in losses:
        if loss.weighted:
            return neither_warning(f"the model's {loss.op} averages over its labels' class weights", step)
    if len(inputs) < 2:
        return None
    # A negative ignored label (-100, torch's and Hugging Face's default) is no token id or mask value; a
    # non-negative one (a pad id) could be, so the inputs cannot tell labels from the rest: not checked.
    for ignore_index in sorted({loss.ignore_index for loss in losses
                                if loss.ignore_index is not None and loss.ignore_index < 0}):
        for column in _label_columns(inputs):
            counts = [int((leaf != ignore_index).sum()) for leaf in column]
            shares = [count / max(leaf.numel(), 1) for count, leaf in zip(counts, column)]
            if max(shares) - min(shares) > 1e-9:
                causal = (f" (for a causal LM, which predicts the next token: (batch['labels'][:, 1:] != "
                          f"{ignore_index}).sum())") if column[0].dim() == 2 else ""  # (rows, tokens) labels
                return neither_warning(f"the model's {loss.op} is a mean over the labels other than {ignore_index}, "
                                       f"and this batch's micro-batches hold {counts} of them", step) + causal
    return None


def _label_columns(inputs: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """The model inputs that could be labels, each as its micro-batches' values (``inputs``: each micro-batch's
    flattened inputs): integer tensors with dims, in every micro-batch."""
    return [column for column in zip(*inputs) if all(
        isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and not leaf.is_floating_point() and not leaf.is_complex()
        and leaf.dtype != torch.bool for leaf in column)]


def counted_mean_warning(means: Sequence[CountedMean], inputs: Sequence[Sequence[Any]], rows: Sequence[int],
                         step: str = "training_step", whole: Sequence[Any] | None = None) -> str | None:
    """What to tell a user whose captured model takes a mean over a count of its inputs' elements (``means``: the
    tokens an attention mask keeps) that its micro-batches (``inputs``: each one's flattened model inputs, ``rows``
    rows each) do not hold in proportion to their rows, or that each of them gives as the whole batch's (``whole``:
    its flattened model inputs, where known); None if neither (or it cannot be counted)."""
    if len(inputs) < 2 or len(inputs) != len(rows):
        return None
    for mean in means:
        if not mean.linear:
            return nonlinear_mean_warning(mean, step)
        counts = [mean.counted(flat) for flat in inputs]
        if any(count is None or not math.isfinite(count) for count in counts):
            continue
        total = mean.counted(whole) if whole is not None else None
        if total and all(abs(count - total) <= 1e-9 * abs(total) for count in counts):
            return _whole_count_warning(mean, total, len(counts), step)
        shares = [count / max(size, 1) for count, size in zip(counts, rows)]
        if max(shares) - min(shares) <= 1e-9 * max(abs(share) for share in shares):
            continue
        why = (f"the model's {mean.op} is a mean over the {mean.given} your code passes it, {_numbers(counts)} for "
               f"this batch's micro-batches of {list(rows)} rows" if mean.given else
               f"the model's {mean.op} is a mean over a count of its inputs' elements"
               f"{f', {mean.expression},' if mean.expression else ''} and this batch's micro-batches of {list(rows)} "
               f"rows hold {_numbers(counts)} of them")
        return neither_warning(why, step, mean.expression, mean.given)
    return None


def given_count_warning(losses: Sequence[MeanLoss], means: Sequence[CountedMean], inputs: Sequence[Sequence[Any]],
                        given: Sequence[float]) -> str | None:
    """What to tell a user whose ``loss_reduction`` function counts ``given`` in each micro-batch while their
    captured model's own loss takes a mean over another count (a multi-task model's terms over the rows each task
    has labels for): a count the graph shows (``means``) that the micro-batches (``inputs``: their flattened model
    inputs) do not hold in proportion to ``given``; or, where the graph shows none, a cross entropy leaving out an
    ignored label that no integer input of the model holds in that proportion. None if none."""
    if len(inputs) < 2 or len(inputs) != len(given):
        return None

    def apart(counts: Sequence[float]) -> bool:
        if any((count == 0) != (share == 0) for count, share in zip(counts, given)):
            return True
        ratios = [count / share for count, share in zip(counts, given) if share]
        return bool(ratios) and max(ratios) - min(ratios) > 1e-9 * max(abs(ratio) for ratio in ratios)

    for mean in means:
        if not mean.linear:
            return nonlinear_mean_warning(mean, "training_step")
        counts = [mean.counted(flat) for flat in inputs]
        if any(count is None or not math.isfinite(count) for count in counts) or not apart(counts):  # type: ignore
            continue
        what = mean.given or mean.expression or "a count of its inputs' elements"
        return count_warning(f"the model's {mean.op} is a mean over {what}: {_numbers(counts)} in this batch's "
                             f"micro-batches, where loss_reduction's function counts {_numbers(given)}")
    columns = _label_columns(inputs)
    for loss in losses if not means else ():
        if loss.ignore_index is None or loss.weighted or not columns:
            continue
        if all(apart([int((leaf != loss.ignore_index).sum()) for leaf in column]) for column in columns):
            return count_warning(f"the model's {loss.op} is a mean over its labels other than {loss.ignore_index}, "
                                 f"which no input of the model holds in proportion to the counts of loss_reduction's "
                                 f"function, {_numbers(given)} in this batch's micro-batches")
    return None


def nonlinear_mean_warning(mean: CountedMean, step: str) -> str:
    """What to tell a user whose captured model's loss is a nonlinear function of a mean over a count of its inputs'
    elements (a scale-invariant log loss over the valid pixels: ``sqrt(mean(d**2) - 0.85 * mean(d)**2)``)."""
    effect = "these gradients differ" if step == "training_step" else "the loss it logs and returns differs"
    what = f", {mean.expression}," if mean.expression else ""
    return (f"{step}'s loss is neither a mean nor a sum over the batch's rows, nor a mean over a count: the model's "
            f"{mean.op} over a count of its inputs' elements{what} reaches its loss through a square root or a "
            f"product with itself (a scale-invariant log loss, sqrt(mean(d**2) - lambda * mean(d)**2)). Each "
            f"micro-batch's loss is then a nonlinear function of its own means, which no weighting of the "
            f"micro-batches' losses makes the batch's, so {effect} from one device's. num_microbatches=1 gives one "
            f"device's; a loss that is a mean over rows or over a count (the mean of d**2) pipelines exactly")


def _whole_count_warning(mean: CountedMean, total: float, microbatches: int, step: str) -> str:
    """What to tell a user whose model divides its loss by a count over the whole batch, which every micro-batch
    passes it (Hugging Face's ``num_items_in_batch`` as its Trainer counts it, before the step)."""
    what = f"the {mean.given} your code passes it" if mean.given else "a count of its inputs' elements" + (
        f", {mean.expression}," if mean.expression else "")
    effect = "the gradients are" if step == "training_step" else "the loss it logs and returns is"
    return (f"{step}'s loss is divided by a count over the whole batch: the model's {mean.op} divides by {what}, "
            f"{_numbers([total])[0]} in each of the batch's {microbatches} micro-batches as in the whole batch "
            f"(Hugging Face's num_items_in_batch, as its Trainer counts it before the step). Each micro-batch's loss "
            f"is then its share of a sum over the batch's rows, which the pipeline averages as it would means, so "
            f"{effect} 1/{microbatches} of one device's. Pass PipelineStrategy(loss_reduction='sum'): each "
            f"micro-batch's loss then counts whole, and they add up to one device's")


def _numbers(values: Sequence[float]) -> list[int | float]:
    return [int(value) if float(value).is_integer() else value for value in values]
