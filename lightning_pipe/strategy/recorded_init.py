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
before the block, ``from torch.nn.init import orthogonal_``, is not seen).
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
_SKIPPING_META = ("_no_grad_trunc_normal_", "orthogonal_", "dirac_", "sparse_")  # torch.nn.init's, no-ops on meta
_META = torch.device("meta")
_HOST = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One recorded operation: ``call(*args, **kwargs)`` gave ``outputs`` (its tensor results, meta or not)."""

    call: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]
    dtype: torch.dtype  # the default dtype then (factories read it inside the op)
    reads: frozenset[int]  # the meta storages it reads


_TAPE: list[_Entry] = []
_WRITERS: dict[int, list[int]] = {}  # meta storage -> the entries that made, viewed or changed it, in order
_DEPTH = [0]


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _record(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], outputs: list[torch.Tensor],
            written: list[torch.Tensor]) -> None:
    reads = frozenset(_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta)
    index = len(_TAPE)
    _TAPE.append(_Entry(call, args, kwargs, outputs, torch.get_default_dtype(), reads))
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
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        written = [t for t in _written_arguments(func, args, kwargs) if t.is_meta]
        if func in _EMPTY and isinstance(out, torch.Tensor) and out.is_meta:
            # only the result's layout counts: no reference to the tensor it was made like (a meta stand-in of a
            # host tensor, strategy/conversion.py, would keep the original alive)
            func, args, kwargs = _EMPTY_STRIDED, (out.shape, out.stride()), {"dtype": out.dtype, "device": _META}
        if written or any(t.is_meta for t in outputs):
            _record(func, args, kwargs, outputs, written)
        return out


class _Literals(TorchFunctionMode):
    """``torch.tensor([...])`` on the meta device reaches no aten op: made on the CPU, then moved (recorded)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if (func in _LITERALS and args and not isinstance(args[0], torch.Tensor)
                and (device is None or torch.device(device).type == "meta")):
            return func(*args, **{**kwargs, "device": _HOST}).to(_META)
        return func(*args, **kwargs)


def _recorded_call(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            _record(function, (tensor, *args), kwargs, [tensor], [tensor])
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
        with _Literals(), _Operations():
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
        self.made: dict[int, list[torch.Tensor]] = {}  # meta storage -> the recorded meta tensors on it

    def add(self, recorded_tensor: torch.Tensor, result: torch.Tensor) -> None:
        self.real[id(recorded_tensor)] = result
        if recorded_tensor.is_meta:
            self.made.setdefault(_storage(recorded_tensor), []).append(recorded_tensor)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The new tensor for ``tensor``: itself recorded, else a tensor on the same storage (a parameter made of a
        recorded tensor, which no operation returned) seen through ``tensor``'s geometry. KeyError if unknown."""
        found = self.real.get(id(tensor))
        if found is not None:
            return found
        on_storage = self.made.get(_storage(tensor), [])
        same = [t for t in on_storage if (t.shape, t.stride(), t.storage_offset(), t.dtype) ==
                (tensor.shape, tensor.stride(), tensor.storage_offset(), tensor.dtype)]
        if same:
            return self.real[id(same[-1])]
        if on_storage and on_storage[-1].dtype == tensor.dtype:
            return torch.as_strided(self.real[id(on_storage[-1])], tensor.shape, tensor.stride(),
                                    tensor.storage_offset())
        raise KeyError(id(tensor))

    def host(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_meta:
            return self.of(value)
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
            args, kwargs = tree_map(replayed.host, (entry.args, entry.kwargs))
            torch.set_default_dtype(entry.dtype)
            with torch.no_grad():
                out = entry.call(*args, **kwargs)
            if entry.call in _EMPTY and (out.is_floating_point() or out.is_complex()):
                out.fill_(float("nan"))  # what nothing writes afterwards stays unknown
            results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            for recorded_tensor, result in zip(entry.outputs, results):
                replayed.add(recorded_tensor, result)
        values = [replayed.of(target).detach() for target in targets]
    except KeyError:  # made outside the tape
        return unknown
    finally:
        torch.set_default_dtype(previous)
    if any((v.is_floating_point() or v.is_complex()) and bool(torch.isnan(v).any()) for v in values):
        return unknown  # unwritten since an empty: an initialization the tape did not see
    return values
