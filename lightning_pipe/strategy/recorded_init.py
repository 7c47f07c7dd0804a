"""What a module's construction computed on the meta device, recorded so that each rank computes it again for its share.

A module built in ``configure_model()`` (or ``Trainer.init_module()``) under the strategy is built on the meta device:
every value its ``__init__`` computed is lost, and torch's layers' defaults would not bring back what the model's own
code computed: a rope table in a complex buffer (Meta's reference Llama, torchtitan), a sinusoidal position table
(torch's transformer tutorial), a causal mask, a class token made with ``nn.Parameter(torch.zeros(...))``, what an
enclosing model's ``__init__`` did to its layers (nanoGPT's ``self.apply(self._init_weights)`` and its scaled
projections, a ViT's ``trunc_normal_`` position embedding), a Hugging Face model's initialization (which Hugging Face
skips on the meta device: it is run there while recording, so that it lands in its place, after the model's
construction and before what the project's code does to the model next).

So while the block runs, every operation with a meta result is recorded, in order (a dispatch mode): the aten op, its
arguments, the layouts of its meta inputs then, the default dtype. :func:`replay` takes meta tensors and computes
their values again on the CPU, running only the recorded operations they depend on: the ones that made or changed
their storage, and, before each, the ones its inputs depend on (views and in-place writes replay as views and writes
of the new tensors; ``.data = ...`` and ``set_`` moving a tensor to another storage are followed). Each random draw
is seeded by the agreed seed, the named tensor it draws into and how many draws into it came before (a draw into a
temporary: the first named tensor it flows into): the model's own distributions, the same on every rank and layout
and whatever else was recorded, and a value copied from another tensor (a target network loaded from its online
network, one random matrix copied into several layers) has that tensor's draws; not the draws of an eager build.
A Hugging Face model whose initialization fails on meta is left to the materializer's Hugging Face pass. A draw
from the project's own ``torch.Generator`` uses one of the replay's, leaving the project's alone. Host tensors an
operation read (a NumPy table, a staging buffer copied in and refilled) are copied when recorded, up to 1 MiB; a
larger one (a checkpoint's tensor) is kept by reference until
:func:`forget_recording` and refused if it changed since. What is built on the host (``from_pretrained``, PEFT's
adapters, torchmetrics: :mod:`~.host_built`) is not recorded (:func:`paused`).

No value is guessed: none is given where an input was not recorded (a tensor made before the block), or where the
storage holds what nothing wrote since an ``empty``, which replays as NaN, also when a comparison or a count of it would
hide the NaN (an initialization that skips meta tensors and was not seen; a value that is NaN on purpose is refused
too). Three things that never reach the dispatcher are recorded by hand: ``torch.tensor(data)`` on meta (made on the
CPU, then moved), and torch's ``trunc_normal_``, ``orthogonal_``, ``dirac_`` and ``sparse_``, which return at once
for a meta tensor (called through ``torch.nn.init`` or Hugging Face's table of them; a name bound before the block,
``from torch.nn.init import orthogonal_``, is not seen: its tensor keeps what was written before, a layer's default
initialization, or, made with ``torch.empty``, is refused as unwritten). A meta tensor's value that the construction
reads into Python (``.item()``, ``.tolist()``, ``bool()``, ``torch.allclose``: timm's stochastic-depth rates from
``torch.linspace``, the orthogonal parametrization's check of its weight) is computed from the recording where it
can be (a number drawn at random is refused: the materialization would draw it otherwise), and an op without a meta
kernel (``torch.geqrf``) runs on its inputs' values for its results' layouts, instead of failing as on meta.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.init as init
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from lightning_pipe.strategy.randomness import derive_seed

__all__ = ["forget_recording", "not_replayed", "paused", "recorded", "recording", "replay", "storage_names"]

_EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default,
          torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default}
_EMPTY_STRIDED = torch.ops.aten.empty_strided.default
_COPIED_BYTES = 1 << 20  # a host tensor an operation reads is copied up to this size, else kept by reference
_DRAW_STREAM = 14  # derived seeds of the replayed random draws (see strategy/randomness.Stream)
_FLOW_SCAN = 10_000  # how far on a draw into a temporary is followed to the named tensor it flows into
_LITERALS = {torch.tensor, torch.as_tensor, torch.asarray}
_SCALAR = torch.ops.aten._local_scalar_dense.default
_TO_PYTHON = {_SCALAR, torch.ops.aten.allclose.default,
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
    hosts: list[tuple[torch.Tensor, int]]  # the large host tensors it reads, by reference, and their versions then
    draws: bool  # it draws random numbers
    writes: frozenset[int]  # the meta storages it makes, views or changes
    reads: frozenset[int]  # the meta storages it reads


_TAPE: list[_Entry] = []
_WRITERS: dict[int, list[int]] = {}  # meta storage -> the entries that made, viewed or changed it, in order
_DEPTH = [0]
_PAUSED = [0]
_UNINITIALIZED: weakref.WeakSet = weakref.WeakSet()  # Hugging Face models whose initialization failed on meta


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _layout(tensor: torch.Tensor) -> _Layout:
    return _storage(tensor), tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype


def _meta_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, _Layout]:
    return {id(t): _layout(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta}


def _record(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], inputs: dict[int, _Layout],
            outputs: list[torch.Tensor], written: list[torch.Tensor], draws: bool) -> None:
    index = len(_TAPE)
    results = [_layout(t) if t.is_meta else None for t in outputs]
    hosts: list[tuple[torch.Tensor, int]] = []

    def kept(value: Any) -> Any:  # a host tensor: as it is now (a staging buffer may be refilled for the next layer)
        if not isinstance(value, torch.Tensor) or value.is_meta:
            return value
        if value.untyped_storage().nbytes() <= _COPIED_BYTES:
            return value.clone()
        hosts.append((value, value._version))  # a checkpoint's tensor: not copied, its version checked at the replay
        return value

    args, kwargs = tree_map(kept, (args, kwargs))
    writes = frozenset(_storage(t) for t in [*outputs, *written] if t.is_meta)
    reads = frozenset(layout[0] for layout in inputs.values())
    _TAPE.append(_Entry(call, args, kwargs, outputs, torch.get_default_dtype(), inputs, results, hosts, draws, writes,
                        reads))
    for key in writes:
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
        if _PAUSED[0]:
            return func(*args, **kwargs)
        if func in _TO_PYTHON:  # .item(), bool(), torch.allclose: a value read into Python
            numbers = func is _SCALAR  # a number read (else a yes or no: a check, such as torch.allclose's)
            values = [_value_of(t, numbers) if isinstance(t, torch.Tensor) and t.is_meta else t for t in args]
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
            _record(func, args, kwargs, inputs, outputs, written, torch.Tag.nondeterministic_seeded in func.tags)
        return out


class _Functions(TorchFunctionMode):
    """``torch.tensor([...])`` on the meta device reaches no aten op: made on the CPU, then moved (recorded). A meta
    tensor's ``.tolist()`` (timm's stochastic-depth rates, ``torch.linspace(0, rate, depth).tolist()``), which a meta
    tensor cannot give, is computed from the recording where it can be, as ``.item()`` is below."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if _PAUSED[0]:
            return func(*args, **kwargs)
        device = kwargs.get("device")
        if (func in _LITERALS and args and not isinstance(args[0], torch.Tensor)
                and (device is None or torch.device(device).type == "meta")):
            return func(*args, **{**kwargs, "device": _HOST}).to(_META)
        if func is torch.Tensor.tolist and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            value = _value_of(args[0], True)
            if value is not None:
                return value.tolist()
        return func(*args, **kwargs)


def _on_host_then_meta(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op without a meta kernel, run on the values of its inputs (from the recording) for its results' layouts;
    the error stands where an input's value is unknown or the op changes its inputs."""
    if _written_arguments(func, args, kwargs):
        raise
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta]
    values = {id(t): _value_of(t, False) for t in inputs}
    if any(value is None for value in values.values()):
        raise
    real_args, real_kwargs = tree_map(
        lambda v: values[id(v)] if isinstance(v, torch.Tensor) and v.is_meta else
        _HOST if isinstance(v, torch.device) and v.type == "meta" else v, (args, kwargs))
    return tree_map(lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=_META)
                    if isinstance(v, torch.Tensor) else v, func(*real_args, **real_kwargs))


def _value_of(tensor: torch.Tensor, numbers: bool) -> torch.Tensor | None:
    """The value of a meta tensor the construction reads into Python, from the recording (``None`` if unknown). With
    ``numbers``, one that depends on a random draw is refused (not a yes or no, which a check reads: whether a random
    matrix is orthogonal): the draw is made again, otherwise, when the tensors are materialized."""
    keys = {_storage(tensor)}
    if (numbers and tensor.dtype != torch.bool and all(key in _WRITERS for key in keys)
            and any(_TAPE[index].draws for index in _needed(keys))):
        raise ValueError(
            "a value drawn at random is read into Python (.item(), .tolist(), bool()) while the module is built on the "
            "meta device (configure_model() or Trainer.init_module() under PipelineStrategy), where nothing is drawn "
            "yet; draw it with Python's random module, or build the module in __init__")
    return replay([tensor])[0]


def _recorded_call(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            _record(function, (tensor, *args), kwargs, _meta_inputs((tensor, *args), kwargs), [tensor], [tensor], True)
        return function(tensor, *args, **kwargs)

    return call


def _initialized_on_meta(init_weights: Callable[..., Any]) -> Callable[..., Any]:
    """Hugging Face's ``init_weights`` skips the initialization on the meta device: run it there, to be recorded in
    its place (after the model's construction, before what the project's code does to the model next)."""
    def initialized(self: Any) -> Any:
        if torch.get_default_device().type == "meta" and not _PAUSED[0]:  # not from_pretrained's skeleton
            try:
                self.initialize_weights()
            except Exception:  # an initialization that cannot run on meta: the materializer's Hugging Face pass
                _UNINITIALIZED.add(self)
        return init_weights(self)

    return initialized


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
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    init_weights = pretrained.__dict__.get("init_weights") if pretrained is not None else None
    # Hugging Face's initialization functions call torch's through a table taken at import
    table = getattr(sys.modules.get("transformers.initialization"), "TORCH_INIT_FUNCTIONS", None)
    tabled = {name: table[name] for name in _SKIPPING_META if name in table} if isinstance(table, dict) else {}
    _DEPTH[0] = 1
    try:
        for name, function in originals.items():
            setattr(init, name, _recorded_call(function))
        for name, function in tabled.items():
            table[name] = _recorded_call(function)
        if init_weights is not None:
            pretrained.init_weights = _initialized_on_meta(init_weights)
        with _Functions(), _Operations():
            yield
    except BaseException:
        forget_recording()  # a failed build is built again
        raise
    finally:
        _DEPTH[0] = 0
        for name, function in originals.items():
            setattr(init, name, function)
        for name, function in tabled.items():
            table[name] = function
        if init_weights is not None:
            pretrained.init_weights = init_weights


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Nothing recorded while the block runs (what is built on the host, such as ``from_pretrained``'s model)."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def not_replayed(module: nn.Module) -> set[int]:
    """The ids of the meta tensors of the Hugging Face models in ``module`` whose initialization failed on meta (the
    materializer's Hugging Face pass initializes them, and only then the replay gives what is left)."""
    return {id(t) for child in module.modules() if child in _UNINITIALIZED
            for t in (*child.parameters(), *child.buffers()) if t.is_meta}


def recorded() -> bool:
    """Whether some operation was recorded since the last :func:`forget_recording`."""
    return bool(_TAPE)


def forget_recording() -> None:
    """Drop the tape (after the materialization: it holds small host tensors and every intermediate meta tensor)."""
    _TAPE.clear()
    _WRITERS.clear()
    _UNINITIALIZED.clear()


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
        self.real: dict[int, tuple[_Layout, torch.Tensor]] = {}  # id(meta tensor) -> its layout then, new tensor
        self.made: dict[int, list[tuple[_Layout, torch.Tensor]]] = {}  # meta storage -> (layout, new tensor)

    def add(self, recorded_tensor: torch.Tensor, layout: _Layout | None, result: torch.Tensor) -> None:
        if layout is not None:
            self.real[id(recorded_tensor)] = layout, result
            self.made.setdefault(layout[0], []).append((layout, result))

    def of(self, tensor: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """The new tensor for ``tensor`` (of ``layout`` then): itself recorded with that layout (``.data = ...``
        gives a tensor another storage under the same object), else a tensor on the same storage (a parameter made
        of a recorded tensor, which no operation returned) seen through its geometry. KeyError if unknown."""
        found = self.real.get(id(tensor))
        if found is not None and found[0] == layout:
            return found[1]
        on_storage = self.made.get(layout[0], [])
        for seen, result in reversed(on_storage):
            if seen[1:] == layout[1:]:
                return result
        if on_storage and on_storage[-1][0][4] == layout[4]:
            return torch.as_strided(on_storage[-1][1], layout[1], layout[2], layout[3])
        raise KeyError(id(tensor))

    def host(self, value: Any, inputs: dict[int, _Layout], generator: torch.Generator | None) -> Any:
        if isinstance(value, torch.Tensor) and value.is_meta:
            return self.of(value, inputs[id(value)])
        if isinstance(value, torch.device) and value.type == "meta":
            return _HOST
        if isinstance(value, torch.Generator) and generator is not None:
            return generator  # a draw seeded as the others are, the user's generator left alone
        return value


class _Unknown(Exception):
    """A value the replay cannot know."""


def _unknown_if_unwritten(inputs: list[Any], out: Any) -> None:
    """A value derived from what nothing wrote (NaN since an ``empty``) without carrying the NaN (a comparison, a count)
    would pass for known."""
    if any(isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())
           for t in tree_leaves(out)) and any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
                                               and bool(torch.isnan(t).any()) for t in inputs):
        raise _Unknown


def storage_names(module: nn.Module) -> dict[int, str]:
    """The names of ``module``'s meta tensors by storage (the first of a tied tensor's names), for :func:`replay`."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    names: dict[int, str] = {}
    for name, tensor in named:
        if tensor.is_meta:
            names.setdefault(_storage(tensor), name)
    return names


def _draw_seed(seed: int, entry: _Entry, index: int, names: dict[int, str], label: str, others: list[int]) -> int:
    """A draw into a named tensor (``names``) is seeded by that name and how many draws into it came before; a draw
    into a temporary (``torch.randn(...) * scale``, one matrix copied into several layers) by the first named tensor
    it flows into and how far on in the recording that happens, else by ``label`` (the tensor replayed) and a count
    (``others``) of such draws in the replay.
    So every replay that needs a draw makes it alike, on every rank and whatever else was recorded (a target network
    loaded from its online network has the online network's draws)."""
    named = sorted((names[key], key) for key in entry.writes if key in names)
    if named:
        name, key = named[0]
        earlier = sum(1 for other in _WRITERS[key] if other < index and _TAPE[other].draws)
        return derive_seed(seed, _DRAW_STREAM, _digest(name), earlier)
    flowed = set(entry.writes)
    for later in range(index + 1, min(len(_TAPE), index + _FLOW_SCAN)):
        if _TAPE[later].reads & flowed:
            reached = sorted(names[key] for key in _TAPE[later].writes if key in names)
            if reached:
                return derive_seed(seed, _DRAW_STREAM, _digest(reached[0]), 1 << 32, later - index)
            flowed |= _TAPE[later].writes
    others[0] += 1
    return derive_seed(seed, _DRAW_STREAM, _digest(label), 1 << 33, others[0])


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def replay(targets: Sequence[torch.Tensor], seed: int = 0,
           names: dict[int, str] | None = None) -> list[torch.Tensor | None]:
    """The values the recorded operations computed for the meta tensors ``targets``, computed again on the CPU; each
    random draw seeded by ``seed`` and the tensor it draws into (:func:`_draw_seed`, with ``names`` from
    :func:`storage_names`), so the values do not depend on which tensors a rank holds, nor on what else was recorded;
    ``None`` for all if some value they depend on cannot be known (see the docstring)."""
    unknown: list[torch.Tensor | None] = [None] * len(targets)
    keys = {_storage(t) for t in targets}
    if not _TAPE or not all(key in _WRITERS for key in keys):
        return unknown
    names = names or {}
    label = names.get(_storage(targets[0]), "") if targets else ""
    others = [0]
    replayed = _Replayed()
    previous = torch.get_default_dtype()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for index in _needed(keys):
                entry = _TAPE[index]
                if any(tensor._version != version for tensor, version in entry.hosts):
                    raise _Unknown  # a host tensor changed since (its value then is gone)
                generator = None
                if entry.draws:
                    drawn = _draw_seed(seed, entry, index, names, label, others)
                    torch.default_generator.manual_seed(drawn)  # the CPU's only: the device's are the run's
                    generator = torch.Generator().manual_seed(drawn)
                args, kwargs = tree_map(lambda value: replayed.host(value, entry.inputs, generator),
                                        (entry.args, entry.kwargs))
                torch.set_default_dtype(entry.dtype)
                out = entry.call(*args, **kwargs)
                if entry.call in _EMPTY and (out.is_floating_point() or out.is_complex()):
                    out.fill_(float("nan"))  # what nothing writes afterwards stays unknown
                _unknown_if_unwritten(tree_leaves((args, kwargs)), out)
                results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                for recorded_tensor, layout, result in zip(entry.outputs, entry.results, results):
                    replayed.add(recorded_tensor, layout, result)
        values = [replayed.of(target, _layout(target)).detach() for target in targets]
    except (KeyError, _Unknown):  # made outside the tape, or derived from what nothing wrote
        return unknown
    finally:
        torch.set_default_dtype(previous)
    if any((v.is_floating_point() or v.is_complex()) and bool(torch.isnan(v).any()) for v in values):
        return unknown  # unwritten since an empty: an initialization the tape did not see
    return values
