"""Whether a stage's layers let the rows of a batch meet, tried on two of its micro-batches.

A pipeline runs each micro-batch through the layers alone. Layers that mix the rows of their input (attention or a
recurrence along dim 0, as torch's ``batch_first=False`` layers do with a time-major batch; a statistic over the rows
brought back into them, as a minibatch-standard-deviation layer does) then compute something else than they would
on the whole batch, and nothing fails. :func:`rows_meet` runs the layers in eval mode without gradients on two
micro-batches' inputs, apart and joined along dim 0, and compares: rows that do not meet give each micro-batch's
output either way. Eval mode keeps dropout and batch norms' batch statistics out of it (those are per micro-batch by
design); :func:`rows_meet_in_training` tries the training modes too, with those two kinds in eval mode, for layers
that mix rows only in training. What the layers hold is restored afterwards and the global random generators are
left untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .calls import each_call
from .kept import kept_buffers, kept_modes
from .rng import forked

__all__ = ["rows_meet", "rows_meet_in_training", "rows_verdict", "parts_differ"]

_LOW, _AUTOCAST, _FULL = 5e-2, 2e-2, 1e-3  # relative: half-precision values; float32 computed under autocast (from
# half-precision products, whose kernels may differ with the number of rows); float32 and float64
_SEED = 0x5EED


class _CannotTell(Exception):
    pass


def rows_meet(module: nn.Module, first: Any, second: Any, device: torch.device | None = None) -> float | None:
    """The largest relative difference between ``module``'s outputs for the inputs ``first`` and ``second`` (two
    micro-batches' inputs) run together and run apart, if beyond rounding; ``None`` when they agree, or when it
    cannot be told (inputs that do not join along dim 0, outputs without rows, layers that draw random numbers even
    in eval mode, a layer that fails on the joined input). A floating-point value without rows in the outputs (a
    value over the whole input passed on beside the rows) counts where it is neither the micro-batches' values'
    mean weighted by rows nor their sum."""
    return _joined_and_apart(module, first, second, device, _evaluating)


_PER_DESIGN = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)  # per micro-batch by design


def rows_meet_in_training(module: nn.Module, first: Any, second: Any,
                          device: torch.device | None = None) -> float | None:
    """As :func:`rows_meet`, in the modes the layers train in (without gradients; dropout and torch's batch norms in
    eval mode, which are per micro-batch by design): a layer of the user's that mixes rows in training only (a
    mean-only or ghost batch norm normalizing by the batch's statistics) differs joined and apart. None when they
    agree, or when it cannot be told (layers that draw random numbers in training, ...). Buffers and modes are put
    back."""
    return _joined_and_apart(module, first, second, device, _training)


def _joined_and_apart(module: nn.Module, first: Any, second: Any, device: torch.device | None,
                      modes: Callable[[nn.Module], AbstractContextManager[None]]) -> float | None:
    """:func:`rows_meet` in the ``modes`` given."""
    try:
        joins = _joins(first, second)
        with modes(module), torch.no_grad(), warnings.catch_warnings():
            # (a reentrant checkpoint in a layer warns that no input needs a gradient: here none does, on purpose;
            # one device never says it: found by review)
            warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
            apart = [_run(module, first, device, _SEED), _run(module, second, device, _SEED)]
            again = _run(module, first, device, _SEED + 1)
            if _difference(zip(_leaves(again), _leaves(apart[0]))) is not None:
                return None  # random in these modes: no telling
            togethers = [_run(module, joined, device, _SEED) for joined in joins]
        rows = [_rows(first), _rows(second)]
        found = []
        for together in togethers:  # the least difference: rows meet only where no reading of the input agrees
            scalar = _scalar_difference(_scalars(apart, together), rows, _size(together))
            try:
                difference = _difference(_pairs(apart, together))
            except _CannotTell:
                if scalar is None:
                    raise
                difference = None
            found.append(max(difference or 0.0, scalar or 0.0))
        return min(found) or None
    except _CannotTell:
        return None
    except Exception:  # noqa: BLE001 - a layer refusing the joined input (fixed sizes): no telling either
        return None


def _joins(first: Any, second: Any) -> list[Any]:
    """Two micro-batches' inputs joined as one (:func:`_join`): once, or where they hold values over their rows that
    differ between them or a number that may count their rows, twice: such values as their mean (weighted by rows)
    and numbers as given where equal, then as their sum (a summed auxiliary loss passed on; a count of the rows)."""
    rows, chose = (_rows(first), _rows(second)), [False]
    joins = [_join(first, second, *rows, False, chose)]
    if chose[0]:
        joins.append(_join(first, second, *rows, True, chose))
    return joins


def rows_verdict(module: nn.Module, first: Any, second: Any, device: torch.device | None = None
                 ) -> tuple[str, float]:
    """Whether ``module``'s rows meet, told by running two micro-batches' inputs joined and apart, in eval mode and
    then in its training modes (dropout and torch's batch norms in eval): ``("meet", difference)`` where the outputs
    differ beyond rounding; ``("apart", 0.0)`` where they agree in both modes and every tensor of the output has the
    rows along dim 0 (so nothing was left out of the comparison); ``("unknown", 0.0)`` otherwise (random layers, an
    output over the whole input such as a single loss, inputs that do not join, a layer refusing the joined input).
    Buffers and modes are put back; the global random generators are left untouched."""
    try:
        joins = _joins(first, second)
        for modes in (_evaluating, _training):
            with modes(module), torch.no_grad():
                apart = [_run(module, first, device, _SEED), _run(module, second, device, _SEED)]
                again = _run(module, first, device, _SEED + 1)
                if _difference(zip(_leaves(again), _leaves(apart[0]))) is not None:
                    return "unknown", 0.0
                togethers = [_run(module, joined, device, _SEED) for joined in joins]
            differences = []
            for together in togethers:
                pairs = list(_pairs(apart, together))
                if len(pairs) != sum(1 for _ in _leaves(together)):
                    return "unknown", 0.0  # a tensor without the rows (a loss): the comparison leaves it out
                differences.append(_difference(pairs))
            if all(difference is not None for difference in differences):
                return "meet", min(differences)  # type: ignore[type-var]
        return "apart", 0.0
    except Exception:  # noqa: BLE001 - _CannotTell, or a layer refusing the joined input: no telling
        return "unknown", 0.0


def parts_differ(parts: list[Any], whole: Any) -> float | None:
    """The largest relative difference between ``whole`` (a value computed from a whole batch) and ``parts`` (the
    same computed from each of its micro-batches) put together along dim 0, if beyond rounding (1 for integer tensors
    that differ); ``None`` when they agree, or when no tensor of ``whole`` holds the parts' rows."""
    try:
        return _difference(_pairs(parts, whole))
    except _CannotTell:
        return None


def _run(module: nn.Module, inputs: Any, device: torch.device | None, seed: int) -> Any:
    with forked(seed, device):
        return each_call(module, inputs)


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode, its buffers and every submodule's mode restored afterwards."""
    with kept_modes([module]), kept_buffers([module]):
        module.eval()
        yield


@contextmanager
def _training(module: nn.Module) -> Iterator[None]:
    """``module`` in its modes but dropout and torch's batch norms in eval mode, its buffers and every submodule's
    mode restored afterwards."""
    with kept_modes([module]), kept_buffers([module]):
        for part in module.modules():
            if isinstance(part, _PER_DESIGN):
                part.eval()
        yield


def _rows(tree: Any) -> int:
    """The rows of a micro-batch's input: the most common size along dim 0 of its tensors; of sizes as common, that
    of the tensor of most dims (the activations', not a value over them passed on beside, ``(h, h.mean(0))``, nor a
    table, ``(positions, h)``), then the smallest."""
    leaves = [leaf for leaf in _leaves(tree) if leaf.dim() > 0]
    if not leaves:
        raise _CannotTell
    sizes = [leaf.shape[0] for leaf in leaves]
    return max(sizes, key=lambda size: (sizes.count(size), max(leaf.dim() for leaf in leaves if leaf.shape[0] == size),
                                        -size))


def _leaves(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, PackedSequence):  # (its data is time-major: its rows are those of the padded batch)
        yield _padded(tree)
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _leaves(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _leaves(item)


def _join(a: Any, b: Any, rows_a: int, rows_b: int, total: bool = False, chose: list[bool] | None = None) -> Any:
    """``a`` and ``b`` as one input: tensors of their rows concatenated along dim 0, what they share kept once; a value
    over their rows that differs between them, as the stage before passed it on, as the whole input's: a float
    tensor or number (``h.mean()``, ``h.mean(0)``) as their mean weighted by rows (``total``: their sum, an auxiliary
    loss summed over the rows), different counts of their rows or of one multiple of them (``x.shape[0]``, tokens) as
    their sum (``total``: equal ones too, which may be a constant). (Layers that use such a value on their rows give
    other outputs joined than apart: a statistic over the batch brought back into its rows across a cut, found by
    review.) ``chose`` is set where a value was read one of those ways."""
    chose = chose if chose is not None else [False]
    if _counts(a, b, rows_a, rows_b):
        chose[0] = True
        if total or not _same(a, b):
            return a + b
    if isinstance(a, PackedSequence) and isinstance(b, PackedSequence):  # the rows' sequences packed together
        length = max(_length(a), _length(b))
        (x, x_lengths), (y, y_lengths) = (pad_packed_sequence(p, batch_first=True, total_length=length) for p in (a, b))
        return pack_padded_sequence(torch.cat([x, y]), torch.cat([x_lengths, y_lengths]), batch_first=True,
                                    enforce_sorted=False)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() > 0 and a.shape[0] == rows_a and b.shape[0] == rows_b and a.shape[1:] == b.shape[1:]:
            return torch.cat([a, b])
        if a.shape == b.shape and torch.equal(a, b):
            return a
        if a.shape == b.shape and a.dtype == b.dtype and (a.is_floating_point() or a.is_complex()):
            return _over_rows(a, b, rows_a, rows_b, total, chose)
        raise _CannotTell
    if isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        items = [_join(x, y, rows_a, rows_b, total, chose) for x, y in zip(a, b)]
        return type(a)(*items) if hasattr(a, "_fields") else type(a)(items)
    if isinstance(a, dict) and type(a) is type(b) and a.keys() == b.keys():
        return type(a)((key, _join(a[key], b[key], rows_a, rows_b, total, chose)) for key in a)
    if not isinstance(a, torch.Tensor) and type(a) is type(b) and _same(a, b):
        return a
    if type(a) is float and type(b) is float:
        return _over_rows(a, b, rows_a, rows_b, total, chose)
    raise _CannotTell


def _over_rows(a: Any, b: Any, rows_a: int, rows_b: int, total: bool, chose: list[bool]) -> Any:
    """Two micro-batches' values over their rows (floats) as the whole input's: their sum where ``total``, else
    their mean weighted by rows; ``chose`` set."""
    chose[0] = True
    return a + b if total else (a * rows_a + b * rows_b) / (rows_a + rows_b)


def _counts(a: Any, b: Any, rows_a: int, rows_b: int) -> bool:
    """Whether ``a`` and ``b`` are counts of two micro-batches' rows, or of one multiple of them: Python ints or
    integer tensors of one number."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() or b.dim() or a.dtype != b.dtype or a.is_floating_point() or a.is_complex() \
                or a.dtype == torch.bool:
            return False
        a, b = int(a), int(b)
    elif type(a) is not int or type(b) is not int:
        return False
    return a > 0 and b > 0 and a % rows_a == 0 and b % rows_b == 0 and a // rows_a == b // rows_b


def _length(packed: PackedSequence) -> int:
    return len(packed.batch_sizes)


def _padded(packed: PackedSequence, length: int | None = None) -> torch.Tensor:
    """``packed`` as a padded batch, rows first, in the rows' order, ``length`` steps long (its longest's if None)."""
    return pad_packed_sequence(packed, batch_first=True, total_length=length)[0]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that do not compare (arrays): not the same
        return False


def _matched(parts: list[Any], together: Any) -> Iterator[tuple[torch.Tensor, list[Any]]]:
    """(joined output's tensor, the micro-batches' outputs ``parts`` at the same place) for each tensor of the joined
    output, through lists, tuples and dicts of the same structure in every part."""
    if isinstance(together, torch.Tensor):
        yield together, parts
    elif isinstance(together, PackedSequence) and all(isinstance(part, PackedSequence) for part in parts):
        # a PackedSequence's data is time-major and sorted by length: compared as the padded batches (rows first)
        yield _padded(together), [_padded(part, _length(together)) for part in parts]
    elif isinstance(together, (list, tuple)) and all(isinstance(part, (list, tuple)) and len(part) == len(together)
                                                     for part in parts):
        for index, item in enumerate(together):
            yield from _matched([part[index] for part in parts], item)
    elif isinstance(together, dict) and all(isinstance(part, dict) and part.keys() == together.keys()
                                            for part in parts):
        for key, item in together.items():
            yield from _matched([part[key] for part in parts], item)


def _pairs(parts: list[Any], together: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(joined output, the micro-batches' outputs ``parts`` concatenated) for each tensor of the outputs that has their
    rows along dim 0; others (a value over the whole input, as a recurrence's last state) are left out."""
    for joined, column in _matched(parts, together):
        if all(isinstance(part, torch.Tensor) and part.dim() > 0 and part.shape[1:] == joined.shape[1:]
               and part.dtype == joined.dtype for part in column) \
                and joined.shape[0] == sum(part.shape[0] for part in column):
            yield joined, torch.cat(column)


def _scalars(parts: list[Any], together: Any) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(joined output, the micro-batches' outputs ``parts``) for each floating-point tensor of the outputs without
    rows (0-dim: a value over the whole input, passed on beside the activations)."""
    for joined, column in _matched(parts, together):
        if joined.dim() == 0 and joined.is_floating_point() and all(
                isinstance(part, torch.Tensor) and part.dim() == 0 and part.dtype == joined.dtype for part in column):
            yield joined, list(column)


def _size(output: Any) -> float:
    """The largest magnitude among the floating-point tensors with rows in ``output`` (0 without any)."""
    sizes = [float(leaf.detach().abs().max()) for leaf in _leaves(output)
             if leaf.dim() > 0 and leaf.numel() and leaf.is_floating_point()]
    return max(sizes, default=0.0)


def _scalar_difference(scalars: Iterable[tuple[torch.Tensor, list[torch.Tensor]]], rows: list[int],
                       size: float = 0.0) -> float | None:
    """The largest relative difference between a value over the whole input run joined and the nearest of the
    micro-batches' values put together, by their mean weighted by rows (a mean over rows) or by their sum (a sum or
    a count), if beyond rounding: a value neither (a product of two batch means, as a load-balancing loss is, or a
    maximum) differs under a pipeline, which combines each micro-batch's as a mean. ``size``: that of the values it
    was made from (the outputs' rows), a tenth of a thousandth of which is rounding (a mean near zero of large
    values, each row centred, differs joined and apart by its rounding alone; found by review)."""
    worst = 0.0
    for joined, parts in scalars:
        values = torch.stack([part.double() for part in parts])
        weights = torch.tensor(rows, dtype=torch.float64, device=values.device)
        candidates = ((values * weights).sum() / weights.sum(), values.sum())
        scale = max(float(max(joined.double().abs().max(), values.abs().max())), 1e-4 * size, 1e-6)
        relative = min(float((joined.double() - candidate).abs()) for candidate in candidates) / scale
        if relative > tolerance(joined.dtype):
            worst = max(worst, relative)
    return worst or None


def tolerance(dtype: torch.dtype) -> float:
    """The relative difference that rounding may make between values of ``dtype`` computed for other row counts."""
    if dtype in (torch.float16, torch.bfloat16):
        return _LOW
    if any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")):
        return _AUTOCAST
    return _FULL


def _difference(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """The largest relative difference between the tensors of each pair, if beyond rounding (1 for integer tensors
    that differ)."""
    worst, compared = 0.0, False
    for got, expected in pairs:
        if got.shape != expected.shape:
            raise _CannotTell
        if got.numel() == 0:
            continue
        compared = True
        if got.is_complex():  # an FFT's output: its real and imaginary parts, as floats
            got, expected = torch.view_as_real(got.resolve_conj()), torch.view_as_real(expected.resolve_conj())
        if not got.is_floating_point():
            worst = worst if torch.equal(got, expected) else max(worst, 1.0)
            continue
        scale = expected.abs().max().float().clamp_min(1e-6)
        relative = float((got.float() - expected.float()).abs().max() / scale)
        if relative > tolerance(got.dtype):
            worst = max(worst, relative)
    if not compared:
        raise _CannotTell
    return worst or None
