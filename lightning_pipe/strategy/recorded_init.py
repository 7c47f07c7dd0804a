"""What a module's construction computed on the meta device, recorded so that each rank computes it again for its share.

A module built in ``configure_model()`` (or ``Trainer.init_module()``) under the strategy is built on the meta device:
every value its ``__init__`` computed is lost. Most come back from the modules' initializers (Hugging Face's
``_init_weights``, ``reset_parameters()``), but not what no initializer recomputes: a rope table in a complex buffer
(Meta's reference Llama, torchtitan), a sinusoidal position table (torch's transformer tutorial), a causal mask, a
class token made with ``nn.Parameter(torch.zeros(...))``, and what an enclosing model's ``__init__`` did to its layers
(nanoGPT's ``self.apply(self._init_weights)`` and its scaled projections, a ViT's ``trunc_normal_`` position
embedding), which torch's defaults would replace with other distributions.

So while the block runs, every operation with a meta result is recorded, in order (a dispatch mode): the aten op, its
arguments, the default dtype. :func:`replay` takes meta tensors and computes their values again on the CPU, running
only the recorded operations they depend on: the ones that made or changed their storage, and, before each, the ones
its inputs depend on (views and in-place writes replay as views and writes of the new tensors). Random draws come
from the generators the caller forked (the materializer: a seed per module name), so they follow the model's own
distributions but are not the draws of an eager build. Host tensors an operation read (a NumPy table, a tensor
copied in with ``.data.copy_``) are kept by reference until :func:`forget_recording`, as the loads of
:mod:`~.host_built` are. No value is guessed: none is given where an input was not recorded (a tensor made before the
block), or where the storage holds what nothing wrote since an ``empty``, which replays as NaN (an initialization
that skips meta tensors and was not seen). Three things that never reach the dispatcher are recorded by hand:
``torch.tensor(data)`` on meta (made on the CPU, then moved), and torch's ``trunc_normal_``, ``orthogonal_``,
``dirac_`` and ``sparse_``, which return at once for a meta tensor (called through ``torch.nn.init``; a name bound
before the block, ``from torch.nn.init import orthogonal_``, is not seen). And a meta tensor's value that the
construction reads into Python (``.item()``, ``.tolist()``, ``bool()``, ``torch.allclose``: timm's stochastic-depth
rates from ``torch.linspace``, the orthogonal parametrization's check of its weight) is computed from the recording
where it can be, instead of failing as a meta tensor does.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.init as init
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["recording", "replay", "forget_recording"]

_EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default,
          torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default}
_EMPTY_STRIDED = torch.ops.aten.empty_strided.default
_LITERALS = {torch.tensor, torch.as_tensor, torch.asarray}
_TO_PYTHON = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.allclose.default,
              torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}  # ops whose results leave torch
_SKIPPING_META = ("_no_grad_trunc_normal_", "orthogonal_", "dirac_", "sparse_")  # torch.nn.init's, no-ops on meta
_META = torch.device("meta")
_HOST = torch.device("cpu")


_Layout = tuple[int, tuple[int, ...], tuple[int, ...], int, torch.dtype]  # storage, shape, stride, offset, dtype


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One recorded operation: ``call(*args, **kwargs)`` gave ``outputs`` (its tensor results, meta or not)."""

    call: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]
    dtype: torch.dtype  # the default dtype then (factories read it inside the op)
    inputs: dict[int, _Layout]  # by id, each meta input's layout before the op (``set_`` moves a tensor's storage)
    results: list[_Layout | None]  # the outputs' layouts after it (None: not meta)

    @property
    def reads(self) -> set[int]:
        """The meta storages it reads."""
        return {layout[0] for layout in self.inputs.values()}


_TAPE: list[_Entry] = []
_WRITERS: dict[int, list[int]] = {}  # meta storage -> the entries that made, viewed or changed it, in order
_DEPTH = [0]


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _layout(tensor: torch.Tensor) -> _Layout:
    return _storage(tensor), tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype


def _meta_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, _Layout]:
    return {id(t): _layout(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta}


def _record(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], inputs: dict[int, _Layout],
            outputs: list[torch.Tensor], written: list[torch.Tensor]) -> None:
    index = len(_TAPE)
    results = [_layout(t) if t.is_meta else None for t in outputs]
    _TAPE.append(_Entry(call, args, kwargs, outputs, torch.get_default_dtype(), inputs, results))
    for key in {_storage(t) for t in [*outputs, *written] if t.is_meta}:
        _WRITERS.setdefault(key, []).append(index)


def _written_arguments(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an aten op changes in place (``out=``, ``x.add_``, foreach ops that return nothing)."""
    written: list[torch.Tensor] = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        written.extend(t for t in tree_leaves(value) if isinstance(t, torch.Tensor))
    return written


class _Operations(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _TO_PYTHON:  # .item(), bool(), torch.allclose: a value read into Python
            values = [_value_of(t) if isinstance(t, torch.Tensor) and t.is_meta else t for t in args]
            if all(v is not None for v in values):
                return func(*values, **kwargs)
        inputs = _meta_inputs(args, kwargs)
        try:
            out = func(*args, **kwargs)
        except NotImplementedError:  # no meta kernel (torch.geqrf, in the orthogonal parametrization's set-up)
            out = _on_host_then_meta(func, args, kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        written = [t for t in _written_arguments(func, args, kwargs) if t.is_meta]
        if func in _EMPTY and isinstance(out, torch.Tensor) and out.is_meta:
            # only the result's layout counts: no reference to the tensor it was made like (a meta stand-in of a
            # host tensor, strategy/conversion.py, would keep the original alive)
            func, args, kwargs = _EMPTY_STRIDED, (out.shape, out.stride()), {"dtype": out.dtype, "device": _META}
        if written or any(t.is_meta for t in outputs):
            _record(func, args, kwargs, inputs, outputs, written)
        return out


class _Functions(TorchFunctionMode):
    """``torch.tensor([...])`` on the meta device reaches no aten op: made on the CPU, then moved (recorded). A meta
    tensor's ``.tolist()`` (timm's stochastic-depth rates, ``torch.linspace(0, rate, depth).tolist()``), which a meta
    tensor cannot give, is computed from the recording where it can be, as ``.item()`` is below."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (func in _LITERALS and args and not isinstance(args[0], torch.Tensor)
                and (device is None or torch.device(device).type == "meta")):
            return func(*args, **{**kwargs, "device": _HOST}).to(_META)
        if func is torch.Tensor.tolist and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            value = _value_of(args[0])
            if value is not None:
                return value.tolist()
        return func(*args, **kwargs)


def _on_host_then_meta(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op without a meta kernel, run on the values of its inputs (from the recording) for its results' layouts;
    the error stands where an input's value is unknown or the op changes its inputs."""
    if _written_arguments(func, args, kwargs):
        raise
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta]
    values = {id(t): _value_of(t) for t in inputs}
    if any(value is None for value in values.values()):
        raise
    real_args, real_kwargs = tree_map(
        lambda v: values[id(v)] if isinstance(v, torch.Tensor) and v.is_meta else
        _HOST if isinstance(v, torch.device) and v.type == "meta" else v, (args, kwargs))
    return tree_map(lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=_META)
                    if isinstance(v, torch.Tensor) else v, func(*real_args, **real_kwargs))


def _value_of(tensor: torch.Tensor) -> torch.Tensor | None:
    """The value of a meta tensor the construction reads into Python, from the recording (``None`` if unknown); the
    generators are left as they were."""
    with torch.random.fork_rng(devices=[]):
        return replay([tensor])[0]


def _recorded_call(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            _record(function, (tensor, *args), kwargs, _meta_inputs((tensor, *args), kwargs), [tensor], [tensor])
        return function(tensor, *args, **kwargs)

    return call


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Record the operations with meta results while the block runs (a nested block records into the same tape)."""
    if _DEPTH[0]:
        _DEPTH[0] += 1
        try:
            yield
        finally:
            _DEPTH[0] -= 1
        return
    originals = {name: getattr(init, name) for name in _SKIPPING_META}
    _DEPTH[0] = 1
    try:
        for name, function in originals.items():
            setattr(init, name, _recorded_call(function))
        with _Functions(), _Operations():
            yield
    finally:
        _DEPTH[0] = 0
        for name, function in originals.items():
            setattr(init, name, function)


def recorded() -> bool:
    """Whether some operation was recorded since the last :func:`forget_recording`."""
    return bool(_TAPE)


def forget_recording() -> None:
    """Drop the tape (after the materialization: it holds small host tensors and every intermediate meta tensor)."""
    _TAPE.clear()
    _WRITERS.clear()


def _needed(keys: set[int]) -> list[int]:
    """The entries the final contents of storages ``keys`` depend on, in order."""
    limits: dict[int, int] = {}
    chosen: set[int] = set()
    work = [(key, len(_TAPE)) for key in keys]
    while work:
        key, limit = work.pop()
        start = limits.get(key, 0)
        if limit <= start:
            continue
        limits[key] = limit
        writers = _WRITERS.get(key, [])
        for index in writers[bisect.bisect_left(writers, start):bisect.bisect_left(writers, limit)]:
            if index in chosen:
                continue
            chosen.add(index)
            work.extend((read, index) for read in _TAPE[index].reads)
    return sorted(chosen)


class _Replayed:
    """The new tensors of a replay, by the recorded meta tensor they stand for."""

    def __init__(self) -> None:
        self.real: dict[int, torch.Tensor] = {}
        self.made: dict[int, list[tuple[_Layout, torch.Tensor]]] = {}  # meta storage -> (layout, new tensor)

    def add(self, recorded_tensor: torch.Tensor, layout: _Layout | None, result: torch.Tensor) -> None:
        self.real[id(recorded_tensor)] = result
        if layout is not None:
            self.made.setdefault(layout[0], []).append((layout, result))

    def of(self, tensor: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """The new tensor for ``tensor`` (of ``layout`` then): itself recorded, else a tensor on the same storage (a
        parameter made of a recorded tensor, which no operation returned) seen through its geometry. KeyError if
        unknown."""
        found = self.real.get(id(tensor))
        if found is not None:
            return found
        on_storage = self.made.get(layout[0], [])
        for seen, result in reversed(on_storage):
            if seen[1:] == layout[1:]:
                return result
        if on_storage and on_storage[-1][0][4] == layout[4]:
            return torch.as_strided(on_storage[-1][1], layout[1], layout[2], layout[3])
        raise KeyError(id(tensor))

    def host(self, value: Any, inputs: dict[int, _Layout]) -> Any:
        if isinstance(value, torch.Tensor) and value.is_meta:
            return self.of(value, inputs[id(value)])
        if isinstance(value, torch.device) and value.type == "meta":
            return _HOST
        return value


def replay(targets: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """The values the recorded operations computed for the meta tensors ``targets``, computed again on the CPU with
    torch's current generators; ``None`` for all if some value they depend on cannot be known (see the docstring)."""
    unknown: list[torch.Tensor | None] = [None] * len(targets)
    keys = {_storage(t) for t in targets}
    if not _TAPE or not all(key in _WRITERS for key in keys):
        return unknown
    order = _needed(keys)
    replayed = _Replayed()
    previous = torch.get_default_dtype()
    try:
        for index in order:
            entry = _TAPE[index]
            args, kwargs = tree_map(lambda value: replayed.host(value, entry.inputs), (entry.args, entry.kwargs))
            torch.set_default_dtype(entry.dtype)
            with torch.no_grad():
                out = entry.call(*args, **kwargs)
            if entry.call in _EMPTY and (out.is_floating_point() or out.is_complex()):
                out.fill_(float("nan"))  # what nothing writes afterwards stays unknown
            results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            for recorded_tensor, layout, result in zip(entry.outputs, entry.results, results):
                replayed.add(recorded_tensor, layout, result)
        values = [replayed.of(target, _layout(target)).detach() for target in targets]
    except KeyError:  # made outside the tape
        return unknown
    finally:
        torch.set_default_dtype(previous)
    if any((v.is_floating_point() or v.is_complex()) and bool(torch.isnan(v).any()) for v in values):
        return unknown  # unwritten since an empty: an initialization the tape did not see
    return values
