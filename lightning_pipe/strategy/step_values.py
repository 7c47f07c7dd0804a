"""What a step takes and gives under the pipeline: the batch's rows, the loss it returns, its outputs put together
over micro-batches, and the error for ranks that read different batches."""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import PackedSequence

from lightning_pipe.capture.scalars import ALIKE, SELECTED
from lightning_pipe.engine.calls import Calls
from lightning_pipe.engine.microbatch import batch_rows
from lightning_pipe.engine.rows import tolerance
from lightning_pipe.engine.tree import rebuild_mapping, tree_flatten, tree_map_tensors, tree_unflatten
from lightning_pipe.strategy.loss_graph import leaves_reached

__all__ = ["apart_reason", "OutputKinds", "ROW_MEAN", "output_structure", "check_rows", "different_batches", "loss_of",
           "combine_outputs", "whole_output", "input_needs_grad", "needs_whole_batch", "PerMicroBatch", "listed",
           "same_output", "without_gradients", "as_in_training", "output_gradients", "sizes_apart"]


def check_rows(batch: Any, step: str) -> int:
    """The batch's rows; an empty batch is refused here, on every rank alike, before any rank waits for another."""
    rows = batch_rows(batch)
    if rows == 0:
        raise ValueError(f"{step} got an empty batch (0 rows); a pipeline splits every batch into micro-batches along "
                         f"dim 0 and cannot run an empty one: drop empty batches in the dataloader (drop_last=True, or a "
                         f"sampler / collate_fn that never yields 0 rows)")
    return rows


def different_batches(step: str, fingerprints: list[int], group: dist.ProcessGroup, first: bool = False,
                      streamed: bool = False) -> str:
    """Why the ranks of a pipeline read different batches, and what to do; ``first``: at the first step the ranks
    shared, where data made from unseeded random numbers is the likeliest cause, which comes first, or, where a loader
    ``streamed`` (an IterableDataset), a stream each rank reads its own shard of, as DDP's recipes shard it."""
    ranks = [dist.get_global_rank(group, rank) for rank in range(len(fingerprints))]
    groups: dict[int, list[int]] = {}
    for rank, fingerprint in zip(ranks, fingerprints):
        groups.setdefault(fingerprint, []).append(rank)
    readings = "; ".join(f"ranks {members} read batch {fingerprint:#x}" for fingerprint, members in groups.items())
    likeliest = ("At the first step, the likeliest cause: every rank runs your script, so data made from random "
                 "numbers without a seed (torch.randn(...) for a toy dataset, a random split) differs between the "
                 "ranks: call L.seed_everything(seed) before making the data, or make it from a seeded "
                 "torch.Generator. Otherwise: e" if first else "E")
    if first and streamed:  # (found by review: Hugging Face's split_dataset_by_node, told to seed the script)
        likeliest = ("At the first step, with a streamed dataset (an IterableDataset), the likeliest cause: the "
                     "stream is split between the processes, as DDP's recipes split it (Hugging Face's "
                     "split_dataset_by_node(ds, rank=..., world_size=...), webdataset's split_by_node, an __iter__ "
                     "reading torch.distributed.get_rank()), so each stage reads its own share. The stages of a "
                     "pipeline must read the same stream: split it by the data-parallel replica, "
                     "rank=trainer.strategy.distributed_sampler_kwargs['rank'], world_size=...['num_replicas'] (with "
                     "one pipeline: not at all). Or data made from random numbers without a seed differs between "
                     "the ranks: call L.seed_everything(seed) before making it. Otherwise: e")
    return (f"the ranks of the pipeline read different batches in this {step} ({readings}): the first stage's inputs "
            f"and the last stage's targets would come from different rows. {likeliest}very rank of a pipeline must "
            f"load the same batch: a sampler, a batch sampler, a dataset or DataLoader workers that draw from a "
            f"per-process random "
            f"generator (the global one is consumed differently on each stage), or that depend on the rank, make them "
            f"differ. PipelineStrategy gives torch's samplers and the workers' seeds the same generator on every rank; "
            f"give any other random source a generator seeded the same on every rank (e.g. torch.Generator()"
            f".manual_seed(seed)), or derive it from the epoch. Or the step's code changed the data: the step's "
            f"code after the model runs on the last stage only, so a dataset or sampler it changes (a curriculum's "
            f"difficulty, per-sample weights for a WeightedRandomSampler, a replay buffer it fills and the dataset "
            f"samples) changes there alone; make such changes in a "
            f"hook every rank runs (on_train_batch_end, from the step's outputs; on_train_epoch_start). Or the ranks "
            f"run different steps: a flag set on one rank only (trainer.should_stop = True in a callback under `if "
            f"trainer.is_global_zero:`, which Lightning does not share) ends the epoch on that rank alone; set it on "
            f"every rank")



BATCH, ROWS = "batch", "rows"  # a batch handed to the engine, tagged with its row numbers


def without_gradients(attempt: Callable[[Any], Any], output: Any, undo: Callable[[], bool] | None = None) -> Any:
    """``attempt(output)`` (a run of the step's code on the model's output, for a check) under ``torch.no_grad()``;
    where the step takes gradients of its own through the output (``torch.autograd.grad(loss, logits)``: a penalty
    on the logits' gradient), which fails without them, once more with gradients, through a copy of ``output`` cut
    from the model (:func:`_cut_from_model`). Such a step's check failed, and its loss was taken as one the check
    cannot tell (found by review: 3.7e-2 off one device, silently). ``undo`` puts back what the failed attempt
    changed on the module (``self.seen += len(x)`` before the step's own gradient), and says whether it could; where
    it could not, the first attempt's error stands."""
    try:
        with torch.no_grad():
            return attempt(output)
    except RuntimeError as error:
        if "does not require grad" not in str(error) or (undo is not None and not undo()):
            raise
    with torch.enable_grad():
        return attempt(_cut_from_model(output))


def as_in_training(attempt: Callable[[Any], Any], output: Any) -> Any:
    """``attempt(output)`` for a run that stands for one device's training step, whose effects are kept: with
    gradients, through a copy of ``output`` cut from the model, as one device's step sees its output (lightly's memory
    bank enqueues only ``if out.requires_grad``: found by review, never filled under no_grad); what it gives,
    detached."""
    with torch.enable_grad():
        given = attempt(_cut_from_model(output))
    return tree_map_tensors(torch.Tensor.detach, given)


def _cut_from_model(output: Any) -> Any:
    """``output`` with its floating-point (and complex) tensors detached as leaves that require grad."""
    return tree_map_tensors(lambda t: t.detach().requires_grad_(True) if t.is_floating_point() or t.is_complex()
                            else t, output)


def output_gradients(attempt: Callable[[Any], torch.Tensor], output: Any) -> list[torch.Tensor]:
    """The gradients of ``attempt(output)`` (the step's loss on the model's output) with respect to ``output``'s
    floating-point tensors, in their flattened order (zeros where the loss does not reach one)."""
    leaves = tree_map_tensors(lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t, output)
    flat = [leaf for leaf in tree_flatten(leaves)[0] if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    with torch.enable_grad():
        loss = attempt(leaves)
        found = torch.autograd.grad(loss, flat, allow_unused=True) if flat and loss.requires_grad \
            else [None] * len(flat)
    return [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(flat, found)]


def tagged(batch: Any, rows: int) -> dict[str, Any]:
    """The batch with each row's number beside it: the engine splits both alike, so that each micro-batch says which
    it is (the step code's seeds depend on it, and the schedule decides in which order a rank sees them)."""
    return {BATCH: batch, ROWS: torch.arange(rows)}

def loss_of(result: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """A step's loss (a one-element tensor of any shape, lightly's SwaVLoss's ``(1,)``, as a 0-dim one: found by
    review) and its other outputs."""
    if isinstance(result, torch.Tensor):
        return _scalar(result), {}
    if isinstance(result, Mapping) and isinstance(result.get("loss"), torch.Tensor):
        return _scalar(result["loss"]), {k: _detached(v) for k, v in result.items() if k != "loss"}
    raise ValueError(f"training_step returned {type(result).__name__}; under PipelineStrategy it must return the "
                     f"micro-batch's mean loss as a tensor, or a dict with the loss under 'loss' (a step cannot be "
                     f"skipped by returning None, since every stage takes part in it)")


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    return loss.reshape(()) if loss.dim() > 0 and loss.numel() == 1 else loss


def _detached(value: Any) -> Any:
    return combine_outputs([value], [1])


class PerMicroBatch(list):
    """The micro-batches' values of a tensor a step returns without the batch's rows first (a per-class mean
    ``out.mean(0)``, a confusion matrix): no combination of them gives the whole batch's, which the step run on the
    whole batch gives (:func:`needs_whole_batch`); where it cannot run, they stay listed (:func:`listed`)."""


def needs_whole_batch(value: Any, rows: int | None = None) -> bool:
    """Whether ``value`` (a step's output put together by :func:`combine_outputs`, or one micro-batch's of ``rows``
    rows) holds what only the step run on the whole batch gives as one device does: Python numbers (``len(x)``,
    ``acc.item()``), or tensors without the batch's rows first (:class:`PerMicroBatch`)."""
    if isinstance(value, PerMicroBatch) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return True
    if rows is not None and isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] != rows
    if isinstance(value, Mapping):
        return any(needs_whole_batch(item, rows) for item in value.values())
    if _record(value):
        return any(needs_whole_batch(item, rows) for item in _fields(value))
    if isinstance(value, (list, tuple)):
        per_row = rows is not None and len(value) == rows  # one item per row: a tensor in it is that row's
        return any(needs_whole_batch(item, None if per_row else rows) for item in value)
    return False


def listed(value: Any) -> Any:
    """``value`` with every :class:`PerMicroBatch` in it a plain list of the micro-batches' tensors."""
    if isinstance(value, PerMicroBatch):
        return list(value)
    if isinstance(value, Mapping):
        return _like(value, {key: listed(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(listed(item) for item in value)
    if _record(value):
        return _remade(value, [listed(item) for item in _fields(value)])
    return value


def _record(value: Any) -> bool:
    """Whether ``value`` is a namedtuple or a dataclass instance: a record of named fields (pytorch-forecasting's
    network output, a model's own output class)."""
    if isinstance(value, PackedSequence):  # (a namedtuple whose fields are no rows: time-major, sorted by length)
        return False
    return (isinstance(value, tuple) and hasattr(value, "_fields")) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type) and not isinstance(value, Mapping))


def _fields(value: Any) -> list[Any]:
    return list(value) if isinstance(value, tuple) else [getattr(value, f.name) for f in dataclasses.fields(value)]


def _remade(value: Any, items: list[Any]) -> Any:
    """A record like ``value`` (:func:`_record`) holding ``items``, field by field."""
    if isinstance(value, tuple):
        return type(value)(*items)
    remade = copy.copy(value)
    for field, item in zip(dataclasses.fields(value), items):
        object.__setattr__(remade, field.name, item)  # (a frozen dataclass too)
    return remade


def _like(mapping: Mapping, items: dict[Any, Any]) -> Any:
    """``items`` as a mapping of ``mapping``'s class (a plain dict for a dict)."""
    return items if type(mapping) is dict else rebuild_mapping(type(mapping), items)


def same_output(one: Any, other: Any) -> bool:
    """Whether two outputs of a step (put together by :func:`combine_outputs`) agree: the same structure, equal plain
    values, and tensors equal up to rounding (other row counts sum in other orders). ``one`` is the whole batch's,
    ``other`` the micro-batches'."""
    leaves, spec = tree_flatten(_arrays_as_tensors(one))  # a NumPy array compared as a tensor, up to rounding
    others, other_spec = tree_flatten(_arrays_as_tensors(other))
    if not _equal(spec, other_spec) or len(leaves) != len(others):  # (plain values are in the specs)
        return False
    for a, b in zip(leaves, others):
        if a.shape != b.shape:
            return False
        if a.is_meta or b.is_meta:  # no values to compare
            continue
        if a.is_floating_point() or a.is_complex():
            if not torch.isfinite(a).all():
                continue  # a NaN or an infinity on the whole batch (a diverged step): no telling
            if not torch.isfinite(b).all():
                return False  # finite on the whole batch, not over its micro-batches: the whole batch's is taken
            scale = float(b.abs().max()) if b.numel() else 0.0
            # only the step's own code ran on other rows (the model's outputs are the same): float32's rounding
            rtol = tolerance(a.dtype) if a.dtype in (torch.float16, torch.bfloat16) else 1e-5
            if not torch.allclose(a.cpu(), b.cpu(), rtol=rtol, atol=1e-5 * max(scale, 1.0)):
                return False
        elif not torch.equal(a.cpu(), b.cpu()):
            return False
    return True


def combine_outputs(outputs: list[Any], sizes: list[int], weights: Sequence[float] | None = None) -> Any:
    """The outputs of a step's micro-batches as one output for the whole batch, on CPU.

    Tensors with a batch dimension are concatenated along dim 0, scalar tensors averaged with weights ``sizes`` (the
    micro-batches' rows; ``weights`` instead where given: what ``loss_reduction`` counted in each, as the
    micro-batches' losses combine), others kept as a :class:`PerMicroBatch`; a list or tuple with one item per row
    (names from the batch, ``ids.tolist()``, one dict of boxes per image) is put together as the batch's, others
    (``(logits, labels)``) and dicts entry by entry; other values are kept if all micro-batches agree, else listed.
    (Python numbers and :class:`PerMicroBatch` tensors are the step's on the whole batch: the runner runs it again,
    :func:`needs_whole_batch`.)
    """
    first = outputs[0] if outputs else None
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        tensors = [t.detach().cpu() for t in outputs]
        if first.dim() == 0:
            return _row_mean(tensors, list(weights) if weights is not None else sizes).to(
                first.dtype if first.is_floating_point() else torch.get_default_dtype())
        if len(tensors) > 1 and any(t.dim() == 0 or t.shape[0] != rows for t, rows in zip(tensors, sizes)):
            return PerMicroBatch(tensors)
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1 or len({t.dim() for t in tensors}) > 1:
            raise ValueError(f"the step returns tensors whose sizes past the rows differ between micro-batches "
                             f"({', '.join(str(tuple(t.shape)) for t in tensors)}), so they do not put together as "
                             f"the whole batch's: one device's step saw the whole batch (padding trimmed to its "
                             f"longest row). Pad them to a size every batch shares in the step (the loader's "
                             f"longest), return a list with one tensor per row, or pass num_microbatches=1")
        return torch.cat(tensors)
    if _is_array(first):  # a NumPy array (predict_step's out.cpu().numpy()): as a tensor's rows, else alike
        numpy = sys.modules["numpy"]
        if len(outputs) == 1:
            return first
        if all(_is_array(o) and o.ndim > 0 and o.shape[0] == rows for o, rows in zip(outputs, sizes)):
            return numpy.concatenate(outputs)
    if isinstance(first, Mapping):  # (of its own class: an OrderedDict subclass came back a dict, found by review)
        return _like(first, {key: combine_outputs([o[key] for o in outputs], sizes, weights) for key in first})
    if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
        if _per_row(outputs, sizes):
            return type(first)(combine_outputs([item], [1]) for output in outputs for item in output)
        if all(isinstance(o, (tuple, list)) and len(o) == len(first) for o in outputs):
            return type(first)(combine_outputs([o[i] for o in outputs], sizes, weights) for i in range(len(first)))
    if _record(first) and all(type(o) is type(first) for o in outputs):  # field by field (found by review:
        # pytorch-forecasting's network output, a namedtuple, was listed and said to make the batch's rows meet)
        columns = zip(*(_fields(o) for o in outputs))
        try:
            return _remade(first, [combine_outputs(list(column), sizes, weights) for column in columns])
        except Exception:  # noqa: BLE001 - a class that checks its fields (its __new__ or __post_init__): as before
            pass
    return first if all(_equal(o, first) for o in outputs) else list(outputs)


def _per_row(outputs: list[Any], sizes: list[int]) -> bool:
    """Whether each micro-batch's list or tuple holds one item per row: as many items as its rows, items alike (of
    one type; tensors of one rank), none of them a column (a tensor or list of its rows, as in ``(logits, labels)``,
    ``(probs, names)`` or ``(logits, loss)`` with as many rows as entries)."""
    if len(outputs) < 2 or any(type(o) is not type(outputs[0]) or len(o) != rows for o, rows in zip(outputs, sizes)):
        return False
    items = [item for output in outputs for item in output]
    if len({type(item) for item in items}) > 1 or len({item.dim() for item in items
                                                       if isinstance(item, torch.Tensor)}) > 1:
        return False
    return not any((isinstance(item, torch.Tensor) and item.dim() > 0 and item.shape[0] == rows)
                   or (isinstance(item, (list, tuple)) and len(item) == rows)
                   for output, rows in zip(outputs, sizes) for item in output)


def _arrays_as_tensors(value: Any) -> Any:
    if _is_array(value):
        return torch.from_numpy(value)
    if _record(value) and not isinstance(value, tuple):  # a dataclass: compared as its class and fields
        return (type(value).__qualname__, {f.name: _arrays_as_tensors(getattr(value, f.name))
                                           for f in dataclasses.fields(value)})
    if type(value) in (dict, list, tuple):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        converted = {key: _arrays_as_tensors(item) for key, item in items}
        return converted if isinstance(value, dict) else type(value)(converted.values())
    return value


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ == "ndarray"


def _equal(value: Any, other: Any) -> bool:
    if _is_array(value) or _is_array(other):
        return bool(sys.modules["numpy"].array_equal(value, other))
    try:
        return bool(value == other)
    except (RuntimeError, TypeError, ValueError):  # tensors inside (an ambiguous truth value)
        return False


def _row_mean(scalars: Sequence[torch.Tensor], sizes: Sequence[float]) -> torch.Tensor:
    """The mean of the micro-batches' ``scalars`` (single numbers, or tensors of one shape without rows, element by
    element) weighted by their rows ``sizes`` (or counts: one of 0, a micro-batch that counted nothing, is left out),
    in float64."""
    stacked = torch.stack([scalar.double() for scalar in scalars])
    weights = torch.tensor(sizes, dtype=torch.float64, device=scalars[0].device) / sum(sizes)
    weights = weights.view(-1, *([1] * (stacked.dim() - 1)))
    return torch.where(weights > 0, stacked * weights, 0).sum(0)


# how each tensor of a model output adds up over micro-batches, listed; or a function of the output's structure
# (a captured model's: its calls may give outputs of several structures), None for a structure not known
ROW_MEAN = "row mean"
"""A single number's kind: a mean over rows beside a loss whose micro-batches are weighted by another count (the
labels other than -100 it averages over), which weights it by rows all the same."""
OutputKinds = Union[Sequence[Union[str, int, None]], Callable[[Any], Optional[Sequence[Union[str, int, None]]]]]


Weights = Sequence[Union[float, tuple[float, ...]]]
"""Each micro-batch's weight for its single numbers (what a loss averages over in it): a tuple of one per call where
the step calls the model several times."""


def call_weights(weights: Weights, call: int) -> list[float]:
    """Each micro-batch's weight in ``weights`` for the model's call ``call``."""
    return [weight[call] if isinstance(weight, tuple) else weight for weight in weights]


def whole_output(outputs: list[Any], sizes: list[int], weights: Weights | None = None,
                 kinds: OutputKinds | None = None, fill: int | None = None) -> Any | None:
    """The model's output for the whole batch from its micro-batches' ``outputs`` (of ``sizes`` rows): tensors with a
    batch dimension put together along it (dim 0, or the dim ``kinds`` gives: an RNN's last hidden state has its rows
    along dim 1), scalar ones (a loss the model computed) averaged by rows (or by ``weights``: what
    ``loss_reduction`` counted in each micro-batch, as the micro-batches' losses combine) or summed, as ``kinds``
    says of each tensor (:func:`lightning_pipe.capture.scalars.output_kinds`: "mean", "sum", "other", "alike": one
    micro-batch's where all are equal; :data:`ROW_MEAN` by rows even where ``weights`` are given; without ``kinds``,
    averaged; of a structure the function ``kinds`` does not know, not put together); None where the outputs do not
    show a batch dimension first, hold a number the micro-batches do not share (``len(x)``) or one equal to each
    micro-batch's rows, or a scalar that adds up otherwise. Several calls of
    the model (:class:`Calls`) are put together call by call; a call whose output is the same in every micro-batch
    (the model run on fixed prototypes, not on the batch's rows) gives it once. ``fill``: a tensor the micro-batches'
    do not make the batch's is micro-batch ``fill``'s (a stand-in, for a step that may not read it) rather than
    making the whole output None."""
    if outputs and all(isinstance(output, Calls) and len(output.each) == len(outputs[0].each) for output in outputs):
        calls = []
        for index in range(len(outputs[0].each)):
            each = [output.each[index] for output in outputs]
            if len(each) > 1 and _same(each):
                calls.append(each[0])
                continue
            whole = whole_output(each, sizes, None if weights is None else call_weights(weights, index), kinds,
                                 fill)
            if whole is None:
                return None
            calls.append(whole)
        return Calls(tuple(calls))
    if weights is not None and any(isinstance(weight, tuple) for weight in weights):
        return None  # (weights of several calls, outputs of one)
    flat = [tree_flatten(output) for output in outputs]
    if not flat or any(len(leaves) != len(flat[0][0]) for leaves, _ in flat):
        return None
    try:
        spec = _joined_spec([spec for _, spec in flat], sizes)
    except _Apart:
        return None
    unknown = "mean"  # a scalar's kind where not known: a Sequential's last layer's output, as before
    if callable(kinds):  # a captured model's: by the output's structure; one no capture gives is not known
        kinds, unknown = kinds(output_structure(flat[0][0], flat[0][1])), "other"
    if kinds is not None and len(kinds) != len(flat[0][0]):
        kinds = None
    whole, along_rows = [], False
    for index, column in enumerate(zip(*(leaves for leaves, _ in flat))):
        joined = _joined_column(list(column), sizes, weights, kinds[index] if kinds is not None else None,
                                kinds is not None, unknown)
        if joined is None:  # stood in for only where alike in shape in every micro-batch (a number over the rows)
            if fill is None or any(leaf.shape != column[0].shape for leaf in column):
                return None
            joined = column[fill]
        else:  # (put together along the rows: grown; a mean, a sum or one alike keeps the shape)
            along_rows = along_rows or joined.shape != column[0].shape
        whole.append(joined)
    if fill is not None and not along_rows:  # nothing of the batch's rows put together: no stand-in tells
        return None
    return tree_unflatten(whole, spec)


def _joined_column(column: list[torch.Tensor], sizes: list[int], weights: Sequence[float] | None,
                   kind: str | int | None, known: bool, unknown: str) -> torch.Tensor | None:
    """One tensor of the whole batch's output from its micro-batches' ``column`` (see :func:`whole_output`; ``kind``
    its kind where ``known``, else ``unknown`` for a single number); None where they do not make one."""
    if kind == ALIKE:  # read no input: every micro-batch's is the batch's
        return column[0] if _same(column) else None  # (not a counter the model steps, a draw)
    if kind == SELECTED:  # what a mask selected of each micro-batch's rows, in row order
        shapes = [leaf.shape[1:] for leaf in column]
        return torch.cat(column) if all(shape == shapes[0] for shape in shapes) else None
    scalar = all(leaf.dim() == 0 for leaf in column) and column[0].is_floating_point()
    # a tensor without rows that the model reduced over them (an MoE's tokens per expert): as a single number
    reduced = not scalar and known and isinstance(kind, str)
    if scalar or reduced:
        kind = kind if known else unknown
        if reduced and any(leaf.shape != column[0].shape for leaf in column):
            return None
        if kind == "sum":
            return torch.stack(column).sum(0).to(column[0].dtype)
        if kind not in ("mean", ROW_MEAN) or not column[0].is_floating_point():
            return None
        by = list(weights) if weights is not None and kind != ROW_MEAN else sizes
        return _row_mean(column, by).to(column[0].dtype)
    dim = kind if known and isinstance(kind, int) else _rows_dim(column, sizes)
    if dim is None or not all(leaf.dim() > dim and leaf.shape[dim] == rows for leaf, rows in zip(column, sizes)):
        return None
    rest = {leaf.shape[:dim] + leaf.shape[dim + 1:] for leaf in column}  # (a time length each micro-batch trimmed
    return torch.cat(column, dim) if len(rest) == 1 else None  # to its own longest row: no batch's output)


def sizes_apart(outputs: list[Any], sizes: list[int]) -> bool:
    """Whether the micro-batches' model ``outputs`` (of ``sizes`` rows), alike in structure, hold a tensor whose size
    in a dim that is not the rows' differs between them: a length each micro-batch's input was trimmed to by the
    step's code (``x[:, :lengths.max()]``), where one device's batch has one."""
    flat = [tree_flatten(output)[0] for output in outputs]
    if len(flat) < 2 or any(len(leaves) != len(flat[0]) for leaves in flat):
        return False
    for column in zip(*flat):
        if not all(isinstance(leaf, torch.Tensor) and leaf.dim() == column[0].dim() >= 2 for leaf in column):
            continue
        along = [dim for dim in range(column[0].dim()) if all(leaf.shape[dim] == rows for leaf, rows in
                                                               zip(column, sizes))]
        varies = [dim for dim in range(column[0].dim()) if len({leaf.shape[dim] for leaf in column}) > 1]
        if along and any(dim not in along for dim in varies):  # (not a detector's boxes: a tensor per image)
            return True
    return False


def _rows_dim(column: Sequence[torch.Tensor], sizes: Sequence[int]) -> int | None:
    """Where the graph does not say: the dim of the micro-batches' tensors ``column`` holding their rows (``sizes``):
    dim 0 where it does, else the one other dim that does in every micro-batch, the rest alike, in a tensor of 3 dims
    or more (a time-major ``(time, rows, classes)`` output, as CTC takes it; an RNN's ``(layers, rows, size)`` state);
    None if none or several."""
    shapes = [tuple(leaf.shape) for leaf in column]
    if any(len(shape) != len(shapes[0]) for shape in shapes):
        return None
    if len(shapes[0]) < 3:
        return 0
    found = [dim for dim in range(len(shapes[0])) if all(shape[dim] == rows for shape, rows in zip(shapes, sizes))
             and all(shape[:dim] + shape[dim + 1:] == shapes[0][:dim] + shapes[0][dim + 1:] for shape in shapes)]
    return 0 if 0 in found else found[0] if len(found) == 1 else None


def output_structure(leaves: Sequence[torch.Tensor], spec: Any) -> tuple[Any, tuple[int, ...]]:
    """What tells a model's outputs apart for :data:`OutputKinds`: their tree spec and each tensor's number of dims
    (a tagger returns a summed loss one way, its best tags the other: one tensor each)."""
    return spec, tuple(leaf.dim() for leaf in leaves)


class _Apart(Exception):
    """Micro-batches' output structures that make no whole batch's."""


def _joined_spec(specs: list[Any], sizes: list[int]) -> Any:
    """The whole batch's tree spec (:mod:`lightning_pipe.engine.tree`) from its micro-batches' (of ``sizes`` rows):
    alike, but a number may be each one's rows (``x.shape[0]``), or a multiple of them (its tokens), which the whole
    batch's is of its own rows. Raises :class:`_Apart` for any other difference, and for a number equal to the rows of
    micro-batches of equal rows (the batch's count, or a constant: no telling)."""
    first = specs[0]
    if not isinstance(first, tuple):
        if any(other != first for other in specs[1:]):
            raise _Apart
        return first
    kind, body = first
    if any(not isinstance(other, tuple) or other[0] != kind for other in specs[1:]):
        raise _Apart
    bodies = [other[1] for other in specs]
    if kind == "v":
        return ("v", _joined_number(bodies, sizes))
    if kind in ("t", "l"):
        return (kind, _joined_children(bodies, sizes))
    if kind == "d":
        return (kind, _joined_items(bodies, sizes))
    if any(other[0] != body[0] for other in bodies[1:]):  # the class of a namedtuple, mapping or dataclass
        raise _Apart
    parts = [other[1] for other in bodies]
    return (kind, (body[0], _joined_children(parts, sizes) if kind == "n" else _joined_items(parts, sizes)))


def _joined_children(bodies: list[Any], sizes: list[int]) -> tuple:
    if any(len(other) != len(bodies[0]) for other in bodies[1:]):
        raise _Apart
    return tuple(_joined_spec(list(column), sizes) for column in zip(*bodies))


def _joined_items(bodies: list[Any], sizes: list[int]) -> tuple:
    keys = [key for key, _ in bodies[0]]
    if any([key for key, _ in other] != keys for other in bodies[1:]):
        raise _Apart
    return tuple((key, _joined_spec([other[index][1] for other in bodies], sizes)) for index, key in enumerate(keys))


def _joined_number(values: list[Any], sizes: list[int]) -> Any:
    first = values[0]
    if type(first) not in (int, float) or any(type(value) is not type(first) for value in values):
        if any(value != first for value in values[1:]):
            raise _Apart
        return first
    if len(set(sizes)) == 1:  # a number of micro-batches of equal rows: alike, and not their rows
        if any(value != first for value in values[1:]) or (len(values) > 1 and first == sizes[0]):
            raise _Apart
        return first
    if all(value == first for value in values):
        return first
    per_row = first / sizes[0]
    if all(value == per_row * size for value, size in zip(values, sizes)):
        return type(first)(per_row * sum(sizes))  # each one's rows, or a multiple of them: the batch's
    raise _Apart


def apart_reason(outputs: list[Any], sizes: list[int]) -> str:
    """Why the micro-batches' model ``outputs`` (of ``sizes`` rows) make no whole batch's (:func:`whole_output` gave
    None), for a warning: a number equal to each one's rows (``x.shape[0]`` returned beside the logits), which
    micro-batches of equal rows cannot tell from a constant (found by review: said to be outputs without the rows
    first), or outputs without the batch's rows first."""
    def numbers(value: Any) -> list[Any]:
        if type(value) is int:
            return [value]
        if isinstance(value, Mapping):
            value = list(value.values())
        elif isinstance(value, Calls):
            value = list(value.each)
        elif _record(value):
            value = _fields(value)
        return [n for item in value for n in numbers(item)] if isinstance(value, (list, tuple)) else []

    if len(set(sizes)) == 1 and any(number == sizes[0] for output in outputs[:1] for number in numbers(output)):
        return (f"the model returns a number equal to each micro-batch's rows, {sizes[0]} (x.shape[0]?), which "
                f"micro-batches of one size cannot tell from a constant; count the rows in the step (len(x)) "
                f"rather than return the count from the model")
    return "the model's outputs do not hold the batch's rows first"


def _same(values: list[Any]) -> bool:
    """Whether every one of ``values`` holds the same tensors as the first (and the same structure)."""
    first, spec = tree_flatten(values[0])
    for value in values[1:]:
        leaves, other = tree_flatten(value)
        if other != spec or any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first, leaves)):
            return False
    return bool(first)


def input_needs_grad(step: str, where: str, outside_trainable: list[str], fix: str, inputs: Any = None,
                     module: torch.nn.Module | None = None) -> str:
    """The error for a model input that requires grad: computed with trainable parameters outside the model (``fix``
    says where to put them), or made to require grad by the step itself (input gradients). ``inputs`` and the
    ``module`` naming its parameters: those of ``outside_trainable`` the inputs' graph reaches are named, not a head
    the step runs after the model (found by review: the advice to freeze them named the classifier)."""
    if inputs is not None and module is not None:
        named = {id(param): name for name, param in module.named_parameters() if name in outside_trainable}
        starts = [leaf.grad_fn for leaf in tree_flatten(inputs)[0] if isinstance(leaf, torch.Tensor)]
        reached = {named[found] for found in leaves_reached(starts, set(named), set())}
        outside_trainable = [name for name in outside_trainable if name in reached] or outside_trainable
    if not outside_trainable:
        return (f"{step} makes the input of {where} require grad (x.requires_grad_(): gradients with respect to the "
                f"input, such as a gradient penalty or a saliency map); a pipeline differentiates the loss with "
                f"respect to the stages' weights only, so torch.autograd.grad cannot reach the model's input. Train "
                f"such terms with the whole model on each device (strategy='ddp', or one device), or leave them "
                f"out under PipelineStrategy")
    return (f"{step} computes the input of {where} with parameters outside it that require grad "
            f"({', '.join(outside_trainable)}); the first stage takes the model's input without a path back for "
            f"gradients, so what computes it cannot train (parameters the step reads after the model can): {fix}")

