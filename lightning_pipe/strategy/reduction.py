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
rule from then on. A loss that is neither (a mean normalized by a count over the whole batch: ``ignore_index`` or
padding labels, class weights, a mask) cannot be made good from its micro-batches' losses: the mean stays, with a
warning that says how to make the step exact.

That way is a function: ``loss_reduction=lambda batch: (batch["labels"] != -100).sum()`` says the loss is a mean over
what the function counts in a micro-batch (its tokens that have labels, the sum of its class weights). Each
micro-batch's loss is then weighted by its count's share of the batch's, which is one device's mean over the whole
batch, and so are the values it logs (:class:`Counts`).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.engine.microbatch import batch_rows, split_batch
from lightning_pipe.engine.tree import tree_flatten, tree_map_tensors
from lightning_pipe.strategy.loss_graph import ignored_label, mean_count
from lightning_pipe.strategy.step_values import OutputKinds, apart_reason, whole_output

__all__ = ["LOSS_REDUCTIONS", "LOSS_TOLERANCE", "check_loss_reduction", "Counts", "Probe", "verdict", "DRAWS"]

LOSS_REDUCTIONS = ("auto", "mean", "sum")
LOSS_TOLERANCE = 1e-4  # relative: the whole batch's loss against the micro-batches' mean and sum (float32 sums)


def check_loss_reduction(value: Any) -> str | Callable[[Any], Any]:
    """``value`` checked: one of :data:`LOSS_REDUCTIONS`, a function, or a function's dotted name (from a config:
    ``loss_reduction: my_project.losses.count_labels``)."""
    if callable(value):
        return value
    if isinstance(value, str) and "." in value:
        module, _, name = value.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"loss_reduction={value!r} names no function ({error}); give the dotted path of a "
                             f"function of a micro-batch, e.g. my_project.losses.count_labels") from None
        if not callable(found):
            raise ValueError(f"loss_reduction={value!r} is a {type(found).__name__}, not a function of a micro-batch")
        return found
    if value not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {', '.join(map(repr, LOSS_REDUCTIONS))} or a function of a "
                         f"micro-batch, got {value!r}: 'mean' if training_step returns a mean over the batch's rows "
                         f"(F.mse_loss, F.cross_entropy), 'sum' if it returns a sum (loss.sum()), 'auto' to let the "
                         f"first batch tell, or a function counting what the loss is a mean over "
                         f"(lambda batch: (batch['labels'] != -100).sum())")
    return value


@dataclass
class Counts:
    """A batch's micro-batches counted by a ``loss_reduction`` function: what each one's loss is a mean over; and,
    with data-parallel replicas, the count over every replica's share of the batch."""

    counts: list[float]
    total: float  # over the whole batch: every replica's share
    replicas: int = 1

    @classmethod
    def of(cls, count: Callable[[Any], Any], microbatches: Sequence[Any], training: bool = True,
           group: Any = None, device: torch.device | None = None) -> Counts | None:
        """The counts of ``microbatches`` (read from the device once; in training with replicas, ``group``, their
        total is summed over the replicas on ``device``). A micro-batch that counts nothing weighs nothing: its loss
        (a mean over nothing, NaN) gives no gradients and its logged values are left out, as one device's mean over
        the batch leaves out its rows (:meth:`empty`). A batch that counts nothing at all, or a count that is negative
        or not a number, is an error in training, raised on every replica alike; in evaluation, where the counts only
        weigh the logged values, the batch's logs weigh by rows then (``None``)."""
        values = [torch.as_tensor(count(microbatch)).detach().sum().to(torch.float64) for microbatch in microbatches]
        local = torch.stack([value.to(values[0].device) for value in values])
        wrong = ~(local >= 0)  # negative, or NaN
        replicas, summary = 1, torch.stack([local.sum(), wrong.sum().to(torch.float64)])
        if training and group is not None:
            replicas = dist.get_world_size(group)
            summary = summary.to(device or torch.device("cpu"))
            dist.all_reduce(summary, group=group)
        numbers = local.tolist()
        total, wrongs = summary.tolist()
        if wrongs or not total > 0:
            if not training:
                return None
            if not wrongs:
                raise ValueError(f"loss_reduction's function counted nothing in the whole batch (its micro-batches: "
                                 f"{numbers}): its loss would be a mean over nothing (NaN), as on one device. Leave "
                                 f"out batches without anything to count (every label ignored)")
            index = int(wrong.nonzero()[0]) if bool(wrong.any()) else None
            where = "a micro-batch of another data-parallel replica" if index is None else \
                f"micro-batch {index} of {len(microbatches)} ({numbers[index]})"
            raise ValueError(f"loss_reduction's function counted a negative number or NaN in {where}: a count must "
                             f"be a number of at least 0")
        return cls(numbers, total, replicas)

    def empty(self, index: int) -> bool:
        """Whether micro-batch ``index`` counts nothing (every label of its rows ignored): it weighs nothing."""
        return self.counts[index] == 0

    def scale(self, index: int, rows: int, microbatch_rows: int) -> float:
        """What micro-batch ``index``'s loss is multiplied by, so that the engine's weighting by rows gives it its
        count's share of the whole batch (the replicas then average: each replica's share counts ``replicas``
        times)."""
        return self.counts[index] * self.replicas / self.total * rows / microbatch_rows


def nothing_counted(output: Any, loss: torch.Tensor, told: bool = True) -> torch.Tensor:
    """What the engine takes as the loss of a micro-batch that counted nothing (every label of its rows ignored): 0,
    whose gradients are 0 for the model's finite ``output`` tensors, as one device's mean over the batch gives those
    rows nothing. Not through the step's ``loss`` itself: a mean over nothing is NaN, and so would its gradients be
    (``(loss * mask).sum() / mask.sum()``). Where the model gives no floating output with gradients: an error if a
    ``loss_reduction`` function counted (``told``), else ``loss`` ("auto" checks that its gradients are finite)."""
    outputs = [value for value in tree_flatten(output)[0] if isinstance(value, torch.Tensor) and value.requires_grad
               and value.is_floating_point()]
    if not outputs and not told:
        return loss
    if not outputs:
        raise ValueError("loss_reduction's function counted nothing in a micro-batch, and the model gives no output "
                         "but the step's loss, a mean over nothing (NaN), for its gradients of 0. Use fewer "
                         "micro-batches or batches with more rows that have labels")
    # Through the outputs that are finite: one that is not may be a mean over nothing itself (a loss the model
    # computes), whose graph gives NaN gradients even for a gradient of 0. Where none is (masked logits holding -inf,
    # found by review), their entries not finite are taken as 0 first (0 times -inf is NaN).
    finite = [value for value in outputs if bool(torch.isfinite(value).all())]
    zero = [(value * 0).sum() for value in finite] or \
        [(torch.nan_to_num(value, 0.0, 0.0, 0.0) * 0).sum() for value in outputs]
    return sum(zero[1:], zero[0]).to(loss.dtype)


@dataclass
class Probe:
    """What the last stage keeps of a batch's micro-batches to check how the step's loss adds up."""

    batch: Any  # the whole batch, as the step takes it
    outputs: list[Any] = field(default_factory=list)  # the pipeline's outputs, detached
    losses: list[torch.Tensor] = field(default_factory=list)  # each micro-batch's loss as the step returned it
    rows: list[int] = field(default_factory=list)
    counts: list[float] | None = None  # what a loss_reduction function counted in each micro-batch, if one is given
    scalar_kinds: list[str | None] | None = None  # found by :func:`verdict`: an nn.Sequential's single numbers summed
    graph_counts: list[float | None] = field(default_factory=list)  # what each loss's graph says it is a mean over
    ignored: list[int | None] = field(default_factory=list)  # the label each loss's cross entropy ignores, if any

    def add(self, output: Any, loss: torch.Tensor, rows: int) -> None:
        """Keep a micro-batch's output and loss (before its backward, which frees what its graph saved)."""
        self.outputs.append(tree_map_tensors(torch.Tensor.detach, output))
        self.losses.append(loss)
        self.rows.append(rows)
        self.graph_counts.append(mean_count(loss))
        self.ignored.append(ignored_label(loss))


DRAWS = "the step's loss draws random numbers (it changes with the seed)"  # a verdict's reason for telling nothing


def verdict(probe: Probe, run_whole: Callable[[Any, Any, int], torch.Tensor],
            kinds: OutputKinds | None = None,
            gradients: Callable[[Any, Any], list[torch.Tensor]] | None = None) -> tuple[str | None, str]:
    """``("sum" | "mean" | "neither" | "lacking" | None, why)``: how the step's loss adds up over rows, from
    ``run_whole(output, batch, draw)``, the step's loss on the whole batch with random numbers of stream ``draw``;
    None when this batch cannot tell (one micro-batch, equal mean and sum, a step whose loss draws random numbers:
    diffusion noise, masks; a step that fails on the whole batch's outputs put together, as one indexing a rows x rows
    output of the model's, CLIP's similarity logits, whose micro-batches' blocks do not make the batch's). A probe
    with the ``counts`` of a ``loss_reduction`` function checks that count instead: ``"counted"`` when the batch's loss
    is its micro-batches' losses weighted by their counts, ``"neither"`` when it is not. A loss whose value is the
    micro-batches' mean is a mean only where its gradient through the model's output is theirs too (``gradients``:
    of the step's loss on an output, with respect to its tensors): a Dice loss over the batch's pixels has nearly
    the mean's value on balanced labels, and another gradient (:func:`_gradients_apart`)."""
    if len(probe.losses) < 2:
        return None, "one micro-batch"
    # (a loss the model computed itself: its micro-batches' values combined as told, by the counts)
    output, batch = whole_output(probe.outputs, probe.rows, probe.counts, kinds=kinds), probe.batch
    if output is None:  # some output the micro-batches' do not make the batch's: told apart if the loss reads it
        output, why = _stood_in(probe, run_whole, kinds)
        if output is None:
            return None, why
    tolerance = _tolerance(probe)
    losses = torch.stack([loss.detach().double().cpu() for loss in probe.losses])
    weights = torch.tensor(probe.counts if probe.counts is not None else probe.rows, dtype=torch.float64)
    counted = weights > 0  # a micro-batch that counts nothing weighs nothing (its mean over nothing is NaN)
    mean = float((losses[counted] * weights[counted]).sum() / weights.sum())
    total = float(losses.sum())
    try:
        whole = float(run_whole(output, batch, 0).detach().double().cpu())
    except Exception as error:  # noqa: BLE001 - any failure of the user's step here only means: cannot tell
        return None, f"the step fails on the micro-batches' outputs put together ({type(error).__name__}: {error})"
    if not math.isfinite(whole):
        return None, "the loss is not finite (a NaN or an infinity)"
    if not math.isfinite(mean):  # finite on the whole batch, not on a micro-batch: a mean over what one can lack
        lacking = [index for index, value in enumerate(losses.tolist()) if not math.isfinite(value)]
        drawn = abs(float(run_whole(output, batch, 1).detach().double().cpu()) - whole) > tolerance * abs(whole)
        return "lacking", (f"on the whole batch the step's loss is {whole:.6g}, but on micro-batch"
                           f"{'es' if len(lacking) > 1 else ''} {', '.join(map(str, lacking))} of its "
                           f"{len(probe.losses)} it is not finite: a mean over something a micro-batch can lack (every "
                           f"label of its rows ignored, a class without a row in it, as prototypes or other "
                           f"per-class statistics of the batch take it)" + (f"; {DRAWS}" if drawn else ""))
    if whole != 0 and all(abs(value - whole) <= LOSS_TOLERANCE * abs(whole) for value in losses.tolist()) \
            and _constant_anyway(probe, run_whole, kinds):
        return "constant", (f"{whole:.6g} on the whole batch and on each of its {len(probe.losses)} micro-batches, "
                            f"whose rows differ")
    if probe.counts is not None:  # told a mean over a count: is the batch's loss its micro-batches' counted mean?
        why = (f"on the whole batch the step's loss is {whole:.6g}; its {len(probe.losses)} micro-batches' losses, "
               f"weighted by the counts {[round(count, 6) for count in probe.counts]} of loss_reduction's function, "
               f"give {mean:.6g}")
        if abs(whole - mean) <= tolerance * max(abs(mean), abs(whole), 1e-12):
            return "counted", why
        if abs(float(run_whole(output, batch, 1).detach().double().cpu()) - whole) > tolerance * abs(whole):
            return None, DRAWS
        return "neither", why
    if not math.isfinite(total):
        return None, "the loss is not finite (a NaN or an infinity)"
    scale = max(abs(mean), abs(total), abs(whole), 1e-12)
    alike = abs(total - mean) <= 10 * tolerance * scale  # (micro-batches' losses of 0: a batch-hard triplet loss
    # whose micro-batches hold one identity each; against a whole batch's that is not, the answer is "neither")
    if alike and abs(whole - mean) <= tolerance * scale:
        return None, "the micro-batches' mean and sum are equal"
    why = (f"on the whole batch the step's loss is {whole:.6g}; its {len(probe.losses)} micro-batches' losses have the "
           f"mean {mean:.6g} and the sum {total:.6g}")
    if not alike and abs(whole - total) <= tolerance * scale:
        return "sum", why
    if not alike and abs(whole - mean) <= tolerance * scale:
        apart = _gradients_apart(probe, gradients, output) if gradients is not None else None
        if apart is not None:  # (found by review: smp's DiceLoss, 0.47% off in its gradients, said nothing)
            return "neither", (f"{why}, but its gradient through the model's output is not theirs ({apart:.2g} "
                               f"apart, relative): the loss couples the rows, its value near their mean by chance")
        return "mean", why
    if abs(float(run_whole(output, batch, 1).detach().double().cpu()) - whole) > tolerance * scale:
        return None, DRAWS
    summed = _scalars_summed(probe, kinds)
    if summed is not None:  # single numbers an nn.Sequential returns (a VAE's KL summed over its rows): as sums?
        try:
            again = float(run_whole(whole_output(probe.outputs, probe.rows, probe.counts, kinds=summed), batch,
                                    0).detach().double().cpu())
        except Exception:  # noqa: BLE001 - the step fails on them: no telling
            again = math.nan
        for rule, value in (("sum", total), ("mean", mean)):
            if not alike and abs(again - value) <= tolerance * max(abs(value), abs(again), 1e-12):
                probe.scalar_kinds = summed
                return rule, (f"{why}, with the single numbers the model returns summed over the micro-batches: on "
                              f"the whole batch {again:.6g}")
    return "neither", why


GRADIENT_TOLERANCE = 1e-3  # relative: a mean's gradient through the output against the micro-batches' (rounding)


def _gradients_apart(probe: Probe, gradients: Callable[[Any, Any], list[torch.Tensor]], output: Any) -> float | None:
    """How far (relative) the whole batch's loss's gradient with respect to the model's ``output`` (its tensors with
    the batch's rows along dim 0) lies from its micro-batches' gradients weighted by their rows, as a mean's are; None
    where it lies within rounding, or cannot be told (no such tensor; a step that fails on a micro-batch alone; out of
    memory). One micro-batch's gradients are held at a time beside the whole batch's."""
    microbatches = split_batch(probe.batch, len(probe.outputs))
    total = sum(probe.rows)
    if [batch_rows(microbatch, microbatch=True) for microbatch in microbatches] != probe.rows:
        return None
    try:
        whole = gradients(output, probe.batch)
        compared = [grad.dim() > 0 and grad.shape[0] == total for grad in whole]
        differences, offset = [0.0] * len(whole), 0
        for part, microbatch, rows in zip(probe.outputs, microbatches, probe.rows):
            pieces = gradients(part, microbatch)
            for index, grad in enumerate(whole):
                piece = pieces[index] if index < len(pieces) else None
                if not compared[index] or piece is None or piece.dim() == 0 or piece.shape[0] != rows:
                    compared[index] = False
                    continue
                mine = grad[offset:offset + rows].double()
                differences[index] += float((mine - piece.double() * (rows / total)).pow(2).sum())
            offset += rows
    except Exception:  # noqa: BLE001 - the step fails on a micro-batch alone, takes no gradient, or runs out of
        return None  # memory: no telling
    difference = sum(value for value, kept in zip(differences, compared) if kept)
    norm = sum(float(grad.double().pow(2).sum()) for grad, kept in zip(whole, compared) if kept)
    eps = max([GRADIENT_TOLERANCE, *(10 * torch.finfo(grad.dtype).eps for grad, kept in zip(whole, compared)
                                     if kept)])
    if not norm > 0 or not math.isfinite(difference):
        return None
    apart = math.sqrt(difference / norm)
    return apart if apart > eps else None


def _constant_anyway(probe: Probe, run_whole: Callable[[Any, Any, int], torch.Tensor],
                     kinds: OutputKinds | None) -> bool:
    """Whether a loss alike on the whole batch and on every micro-batch stays alike on other model outputs (each
    micro-batch's floating outputs moved by noise): a loss divided by its own detached value does; a mean over
    outputs that were alike does not (a head initialized to zeros, or to 2e-5 as MAE's fine-tuning does, gives every
    row log C until it trains). False where that cannot be told (the step fails on a micro-batch alone)."""
    generator = torch.Generator().manual_seed(0)

    def moved(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        return value + (noise * (float(value.abs().max()) + 1.0)).to(value.device, value.dtype)

    parts = [tree_map_tensors(moved, output) for output in probe.outputs]
    microbatches = split_batch(probe.batch, len(parts))
    if [batch_rows(microbatch, microbatch=True) for microbatch in microbatches] != probe.rows:
        return False
    try:
        whole = float(run_whole(whole_output(parts, probe.rows, probe.counts, kinds=kinds), probe.batch, 0))
        values = [float(run_whole(part, microbatch, 0)) for part, microbatch in zip(parts, microbatches)]
    except Exception:  # noqa: BLE001 - the step fails on such outputs, or on a micro-batch alone: no telling
        return False
    return math.isfinite(whole) and all(abs(value - whole) <= LOSS_TOLERANCE * abs(whole) for value in values)


def _tolerance(probe: Probe) -> float:
    """How far (relative) the whole batch's loss may be from its micro-batches' mean or sum by rounding alone:
    :data:`LOSS_TOLERANCE`, or two epsilons of the coarsest float among the losses (a loss in bfloat16, as
    ``precision="bf16-true"`` computes it, differs by ~2e-3 where the batch's rows are added otherwise; under
    ``bf16-mixed`` the loss is float32, though the outputs are not)."""
    epsilons = [torch.finfo(loss.dtype).eps for loss in probe.losses if loss.is_floating_point()]
    return max([LOSS_TOLERANCE, *(2 * eps for eps in epsilons)])


def _stood_in(probe: Probe, run_whole: Callable[[Any, Any, int], torch.Tensor],
              kinds: OutputKinds | None) -> tuple[Any, str]:
    """The whole batch's model output for a probe whose micro-batches' outputs hold something they do not make the
    batch's (a number over the rows that is no mean or sum, as a VQ-VAE's codebook perplexity; a tensor of another
    length): that part is one micro-batch's, where the step's loss on the whole batch does not read it (the same with
    the first micro-batch's and with the last's); else None, and why."""
    stand_ins = [whole_output(probe.outputs, probe.rows, probe.counts, kinds=kinds, fill=fill)
                 for fill in (0, len(probe.outputs) - 1)]
    apart = apart_reason(probe.outputs, probe.rows)
    if any(output is None for output in stand_ins):  # the model ran on something else than the batch's rows
        return None, apart
    try:
        first, last = (float(run_whole(output, probe.batch, 0).detach().double().cpu()) for output in stand_ins)
    except Exception:  # noqa: BLE001 - a step that fails on such outputs: no telling
        return None, apart
    if abs(first - last) > LOSS_TOLERANCE * max(abs(first), abs(last), 1e-12):
        return None, ("the step's loss reads an output of the model that its micro-batches' outputs do not make the "
                      "batch's (a number over the rows that is neither a mean nor a sum of them)")
    return stand_ins[0], ""


def _scalars_summed(probe: Probe, kinds: OutputKinds | None) -> list[str | None] | None:
    """For an output whose single numbers' kinds are not known (an ``nn.Sequential``'s): the kinds that sum them over
    the micro-batches and put the rest together by rows; None where it holds no single number or kinds are known."""
    if kinds is not None or not probe.outputs:
        return None
    leaves = tree_flatten(probe.outputs[0])[0]
    scalars = [isinstance(leaf, torch.Tensor) and leaf.dim() == 0 and leaf.is_floating_point() for leaf in leaves]
    return ["sum" if scalar else None for scalar in scalars] if any(scalars) else None
