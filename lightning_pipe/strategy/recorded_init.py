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
temporary: the first named tensor it flows into and how many such draws reached it before, :func:`flows`): the
model's own distributions, the same on every rank and layout
and whatever else was recorded, and a value copied from another tensor (a target network loaded from its online
network, one random matrix copied into several layers) has that tensor's draws; not the draws of an eager build.
A Hugging Face model whose initialization fails on meta is left to the materializer's Hugging Face pass (which
warns of the changes made to it afterwards, which are then lost). A draw
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
for a meta tensor: while the block runs, their function objects run code that records the call, so that they are seen
by whatever name they are called (``torch.nn.init``'s, Hugging Face's table of them, or a name bound at import, ``from
torch.nn.init import orthogonal_``). A project's own initialization that skips meta tensors is not seen: its tensor
keeps what was written before (a layer's default initialization), or, made with ``torch.empty``, is refused as
unwritten. A meta tensor's value that the construction
reads into Python (``.item()``, ``.tolist()``, ``bool()``, ``torch.allclose``: timm's stochastic-depth rates from
``torch.linspace``, the orthogonal parametrization's check of its weight) is computed from the recording where it
can be (a value drawn at random is refused, a number, a yes or no or a list: the materialization would draw it
otherwise, unless a later write overwrote the draw whole; a check comparing it, ``torch.allclose``, runs), and an op
without a meta
kernel (``torch.geqrf``) runs on its inputs' values for its results' layouts, instead of failing as on meta.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.init as init
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from lightning_pipe.strategy.init_replay import replay
from lightning_pipe.strategy.init_tape import (EMPTY, HOST, TAPE, WRITERS, counted_draw, meta_inputs, needed, record,
                                               storage_key, truncate, written_arguments)

__all__ = ["forget_recording", "not_replayed", "paused", "recorded", "recording"]

_EMPTY_STRIDED = torch.ops.aten.empty_strided.default
_LITERALS = {torch.tensor, torch.as_tensor, torch.asarray}
_SCALAR = torch.ops.aten._local_scalar_dense.default
_CHECKS = {torch.ops.aten.allclose.default, torch.ops.aten.equal.default}  # compare values: read, but not taken
_TO_PYTHON = {_SCALAR, torch.ops.aten.allclose.default,
              torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}  # ops whose results leave torch
_META = torch.device("meta")
# torch.nn.init's functions that are no-ops on meta: torch's own objects (whatever wraps or replaces them later in
# torch.nn.init calls them in the end)
_SKIPPING_META = [getattr(init, name, None) for name in ("_no_grad_trunc_normal_", "orthogonal_", "dirac_", "sparse_")]
_DEPTH = [0]
_PAUSED = [0]
# Hugging Face models whose initialization failed on meta -> the recording's length then
_UNINITIALIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Operations(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if _PAUSED[0]:
            return func(*args, **kwargs)
        if func in _TO_PYTHON:  # .item(), bool(), torch.allclose: a value read into Python
            read = func not in _CHECKS  # a value read (else a check of one, such as torch.allclose's)
            values = [_value_of(t, read) if isinstance(t, torch.Tensor) and t.is_meta else t for t in args]
            if all(v is not None for v in values):
                return func(*values, **kwargs)
        inputs = meta_inputs(args, kwargs)
        try:
            out = func(*args, **kwargs)
        except NotImplementedError:  # no meta kernel (torch.geqrf, in the orthogonal parametrization's set-up)
            out = _on_host_then_meta(func, args, kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        written = [t for t in written_arguments(func, args, kwargs) if t.is_meta]
        if func in EMPTY and isinstance(out, torch.Tensor) and out.is_meta:
            # only the result's layout counts: no reference to the tensor it was made like (a meta stand-in of a
            # host tensor, strategy/conversion.py, would keep the original alive)
            func, args, kwargs = _EMPTY_STRIDED, (out.shape, out.stride()), {"dtype": out.dtype, "device": _META}
        if written or any(t.is_meta for t in outputs):
            record(func, args, kwargs, inputs, outputs, written, torch.Tag.nondeterministic_seeded in func.tags)
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
            return func(*args, **{**kwargs, "device": HOST}).to(_META)
        if func is torch.Tensor.tolist and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            value = _value_of(args[0], True)
            if value is not None:
                return value.tolist()
        return func(*args, **kwargs)


def _on_host_then_meta(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An op without a meta kernel, run on the values of its inputs (from the recording) for its results' layouts;
    the error stands where an input's value is unknown or the op changes its inputs."""
    if written_arguments(func, args, kwargs):
        raise
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta]
    values = {id(t): _value_of(t, False) for t in inputs}
    if any(value is None for value in values.values()):
        raise
    real_args, real_kwargs = tree_map(
        lambda v: values[id(v)] if isinstance(v, torch.Tensor) and v.is_meta else
        HOST if isinstance(v, torch.device) and v.type == "meta" else v, (args, kwargs))
    return tree_map(lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=_META)
                    if isinstance(v, torch.Tensor) else v, func(*real_args, **real_kwargs))


def _value_of(tensor: torch.Tensor, read: bool) -> torch.Tensor | None:
    """The value of a meta tensor the construction reads into Python, from the recording (``None`` if unknown). With
    ``read``, one that depends on a random draw is refused (a check that compares it, such as whether a random
    matrix is orthogonal, is not): the draw is made again, otherwise, when the tensors are materialized. A draw that
    a later write overwrote whole (``ones_`` after a layer's default initialization) does not count."""
    keys = {storage_key(tensor)}
    if read and all(key in WRITERS for key in keys) and any(counted_draw(index) for index in needed(keys)):
        raise ValueError(
            "a value drawn at random is read into Python (.item(), .tolist(), bool()) while the module is built on the "
            "meta device (configure_model() or Trainer.init_module() under PipelineStrategy), where nothing is drawn "
            "yet; draw it with Python's random module, or build the module in __init__")
    return replay([tensor])[0]


def _recorded_call(function: Callable[..., Any], thread: int) -> Callable[..., Any]:
    """``function`` recording its calls on meta tensors made by ``thread`` (the one building the model)."""
    def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta and threading.get_ident() == thread:
            record(function, (tensor, *args), kwargs, meta_inputs((tensor, *args), kwargs), [tensor], [tensor], True)
        return function(tensor, *args, **kwargs)

    return call


def _redirected(*args: Any, _lightning_pipe_call: Any = None, **kwargs: Any) -> Any:
    """The code an initialization function that skips meta tensors runs while the block records."""
    return _lightning_pipe_call(*args, **kwargs)


@contextlib.contextmanager
def _recorded_calls() -> Iterator[None]:
    """Each function of ``_SKIPPING_META`` runs :func:`_redirected`'s code while the block runs, calling a
    recording wrapper of a copy of itself: so every reference to the function object is seen, also a name bound
    before the block."""
    functions = [f for f in _SKIPPING_META if isinstance(f, types.FunctionType) and not f.__code__.co_freevars]
    kept = [(f, f.__code__, f.__defaults__, f.__kwdefaults__) for f in functions]
    try:
        for function, code, defaults, kwdefaults in kept:
            original = types.FunctionType(code, function.__globals__, function.__name__, defaults,
                                          function.__closure__)
            original.__kwdefaults__ = kwdefaults
            function.__code__, function.__defaults__ = _redirected.__code__, None
            function.__kwdefaults__ = {"_lightning_pipe_call": _recorded_call(original, threading.get_ident())}
        yield
    finally:
        for function, code, defaults, kwdefaults in kept:
            function.__code__, function.__defaults__, function.__kwdefaults__ = code, defaults, kwdefaults


def _initialized_on_meta(init_weights: Callable[..., Any]) -> Callable[..., Any]:
    """Hugging Face's ``init_weights`` skips the initialization on the meta device: run it there, to be recorded in
    its place (after the model's construction, before what the project's code does to the model next)."""
    def initialized(self: Any) -> Any:
        if torch.get_default_device().type == "meta" and not _PAUSED[0]:  # not from_pretrained's skeleton
            try:
                self.initialize_weights()
            except Exception:  # an initialization that cannot run on meta: the materializer's Hugging Face pass
                _UNINITIALIZED[self] = len(TAPE)
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
    pretrained = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", None)
    init_weights = pretrained.__dict__.get("init_weights") if pretrained is not None else None
    _DEPTH[0] = 1
    begun = len(TAPE)
    try:
        if init_weights is not None:
            pretrained.init_weights = _initialized_on_meta(init_weights)
        with _recorded_calls(), _Functions(), _Operations():
            yield
    except BaseException:
        truncate(begun)  # a failed build is built again; what earlier blocks recorded stays
        raise
    finally:
        _DEPTH[0] = 0
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


def not_replayed(module: nn.Module) -> dict[int, str]:
    """The meta tensors of the Hugging Face models in ``module`` whose initialization failed on meta (the
    materializer's Hugging Face pass initializes them, and only then the replay gives what is left), by id: the names
    of those that the project's code changed after building the model (changes that are lost)."""
    found: dict[int, str] = {}
    for child in module.modules():
        if child not in _UNINITIALIZED:
            continue
        mark = _UNINITIALIZED[child]
        for name, tensor in (*child.named_parameters(), *child.named_buffers()):
            if tensor.is_meta:
                changed = any(index >= mark for index in WRITERS.get(storage_key(tensor), ()))
                found[id(tensor)] = f"{type(child).__name__}.{name}" if changed else ""
    return found


def recorded() -> bool:
    """Whether some operation was recorded since the last :func:`forget_recording`."""
    return bool(TAPE)


def forget_recording() -> None:
    """Drop the tape (after the materialization: it holds small host tensors and every intermediate meta tensor)."""
    truncate(0)
    _UNINITIALIZED.clear()
