"""What is made real while a module is built on the meta device (``configure_model()``, ``Trainer.init_module()``).

Under :class:`~lightning_pipe.strategy.pipeline.PipelineStrategy` the module is built on the meta device, and each
rank materializes its own layers after the cut (:mod:`~lightning_pipe.strategy.materialize`). A few things made in
that block need real values that no initializer could give back later; :func:`built_on_host` keeps them, as they
would be in ``__init__``:

- torchmetrics (a metric made beside the layers): a metric keeps its states' initial values in tensors of its own,
  outside parameters and buffers; it is built on the CPU;
- Hugging Face's ``from_pretrained`` (which refuses a meta device: it has weights to load) runs on the CPU: the model's
  tensors point into the checkpoint files mapped into memory, read where touched, so each rank reads its own layers
  once the cut is made;
- PEFT's adapters (``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``, ``load_adapter``) are built on
  the CPU and initialized as PEFT initializes them (LoRA's B at zero), as on one device: beside a ``from_pretrained``
  base, and beside a base built on the meta device too (PEFT then moves them to the base's meta device; their values
  are recorded, below, where the materializer would otherwise give them seeded ones);
- ``load_state_dict`` into layers just built: copying into a meta tensor does nothing (torch only warns); each value
  it would copy into a meta tensor is recorded instead (:func:`loaded_values`), and the materializer gives it to the
  tensors this rank keeps; so are the values of real tensors a ``module.to("meta")`` moves there (PEFT moves the
  adapters it made to its base layers' device). A move of the module to a real device leaves its meta tensors on
  meta (``load_from_checkpoint`` ends with one) for the ranks to materialize on their own devices;
- ``copy.deepcopy`` of layers built on meta (an EMA teacher of its student, PEFT's ``modules_to_save``): the copies
  follow their source (:func:`copy_sources`): its recorded values, else its initialization, so they start equal, as
  on one device.

Those classes' own ``__init__`` and the listed methods run under ``torch.device("cpu")`` while the block runs (the
dtype default stays; Lightning moves the module to its device afterwards).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import itertools
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.recorded_init import paused

__all__ = ["built_on_host", "copy_sources", "forget_loads", "loaded_values", "MetaBuildError", "own_tensors"]

# module -> {name: [(order of the load, value, the tensor it was loaded into)]}; weak: a module that goes takes its
# values with it. Kept until a materializer gives them (a setup that failed keeps them for the next fit).
_LOADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ORDER = itertools.count()
# id(copy) -> (copy, the meta tensor it was deep-copied from), while the copy lives
_COPIES: dict[int, tuple[weakref.ref, weakref.ref, int]] = {}  # ..., and when it was copied

# (module, class, methods): each subclass' own methods of those names run on the host while the model is built
_ON_HOST = (("torchmetrics", "Metric", ("__init__",)),
            ("peft.peft_model", "PeftModel", ("__init__", "add_adapter", "load_adapter")),
            ("peft.tuners.tuners_utils", "BaseTuner", ("__init__", "inject_adapter")))


@contextlib.contextmanager
def built_on_host() -> Iterator[None]:
    """The block in which a module is built on the meta device: see the module's docstring."""
    wrapped: list[tuple[type, str, Any]] = []
    try:
        original_load = nn.Module.__dict__["_load_from_state_dict"]
        wrapped.append((nn.Module, "_load_from_state_dict", original_load))
        nn.Module._load_from_state_dict = _recording_loads(original_load)  # type: ignore[method-assign]
        original_to = nn.Module.__dict__["to"]
        wrapped.append((nn.Module, "to", original_to))
        nn.Module.to = _recording_moves(original_to)  # type: ignore[method-assign]
        for tensor_class in (torch.Tensor, nn.Parameter):
            original_copy = tensor_class.__dict__["__deepcopy__"]
            wrapped.append((tensor_class, "__deepcopy__", original_copy))
            tensor_class.__deepcopy__ = _recording_copies(original_copy)  # type: ignore[method-assign]
        for module, name, methods in _ON_HOST:
            root = _imported(module, name)
            if root is not None:
                wrapped.extend(_wrap(root, methods, _on_host))
        layer = _imported("peft.tuners.tuners_utils", "BaseTunerLayer")
        if layer is not None:
            wrapped.extend(_wrap(layer, ("_move_adapter_to_device_of_base_layer",), _off_meta))
        pretrained = _imported("transformers.modeling_utils", "PreTrainedModel")
        if pretrained is not None:
            loader = pretrained.__dict__["from_pretrained"]
            wrapped.append((pretrained, "from_pretrained", loader))
            pretrained.from_pretrained = classmethod(_on_host(loader.__func__))
        yield
    finally:
        for cls, name, original in reversed(wrapped):
            setattr(cls, name, original)


def loaded_values(module: nn.Module) -> dict[int, torch.Tensor]:
    """The values recorded for ``module``'s meta tensors, by tensor id: each tensor's latest load (as the copies
    would have left it); a deep copy's, what its source held when it was copied (a copy made before its source's load
    keeps the initial values, as on one device); then, for a tensor that replaced a loaded one at the same name and
    shape since (a precision's conversion makes new buffers), by name. A name tied since to another loaded tensor
    keeps that one's value, as the tie does on one device."""
    history: dict[int, list[tuple[int, torch.Tensor]]] = {}  # id of the tensor loaded into -> [(order, value)]
    latest: list[tuple[nn.Module, str, torch.Tensor]] = []  # each name's latest load, for the fallback by name
    for child in module.modules():
        for key, loads in _LOADS.get(child, {}).items():
            for order, value, into in loads:
                if (target := into()) is not None:
                    history.setdefault(id(target), []).append((order, value))
            latest.append((child, key, max(loads, key=lambda load: load[0])[1]))

    def value_at(tensor: torch.Tensor, when: float) -> torch.Tensor | None:
        loads = [load for load in history.get(id(tensor), ()) if load[0] < when]
        if loads:
            return max(loads, key=lambda load: load[0])[1]
        entry = _COPIES.get(id(tensor))
        if entry is not None and entry[0]() is tensor and (source := entry[1]()) is not None:
            return value_at(source, min(when, entry[2]))
        return None

    values: dict[int, torch.Tensor] = {}
    for child in module.modules():
        for _, tensor in own_tensors(child):
            if tensor.is_meta and (value := value_at(tensor, float("inf"))) is not None:
                values[id(tensor)] = value
    for child, key, value in latest:
        tensor = _tensor(child, key)
        if (tensor is not None and tensor.is_meta and id(tensor) not in values and id(tensor) not in history
                and _copy_of(tensor) is None and tensor.shape == value.shape):
            values[id(tensor)] = value
    return values


def copy_sources(module: nn.Module) -> dict[str, str]:
    """For each submodule of ``module`` whose tensors are all copies of one other submodule's, key by key, of the same
    class and under the same kind of enclosing model (``copy.deepcopy`` in the block: an EMA teacher, PEFT's
    ``modules_to_save``), that one's name, by the copy's name: the copy is initialized as its source is."""
    holders: dict[int, set[tuple[str, str]]] = {}  # id of a tensor -> {(module name, key)}
    modules = dict(module.named_modules(remove_duplicate=False))
    for name, child in modules.items():
        for key, tensor in own_tensors(child):
            holders.setdefault(id(tensor), set()).add((name, key))
    found = {}
    for name, child in modules.items():
        candidates: set[str] | None = None
        for key, tensor in own_tensors(child):
            copied = _copy_of(tensor)
            names = {holder for holder, held in holders.get(id(copied[0]), ()) if held == key} if copied else set()
            candidates = names if candidates is None else candidates & names
        matching = sorted(source for source in candidates or () if source != name
                          and type(modules[source]) is type(child) and _enclosing(modules, source) ==
                          _enclosing(modules, name))
        if matching:
            found[name] = matching[0]
    for name in list(found):  # a copy of a copy starts as the first source
        seen, target = {name}, found[name]
        while target in found and target not in seen:
            seen.add(target)
            target = found[target]
        found[name] = target
    return found


def _enclosing(modules: dict[str, nn.Module], name: str) -> type | None:
    """The class of the nearest module enclosing ``name`` that defines ``_init_weights`` (whose initialization the
    materializer runs first), if any."""
    while name:
        name = name.rpartition(".")[0]
        if callable(getattr(modules.get(name), "_init_weights", None)):
            return type(modules[name])
    return None


def _copy_of(tensor: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(the tensor ``tensor`` was deep-copied from while a module was built, when), if it is such a copy."""
    entry = _COPIES.get(id(tensor))
    if entry is None or entry[0]() is not tensor or (source := entry[1]()) is None:
        return None
    return source, entry[2]


def own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s own parameters and buffers (not its children's), by name."""
    return [(key, t) for table in (module._parameters, module._buffers) for key, t in table.items() if t is not None]


def forget_loads(module: nn.Module) -> None:
    """Drop the values recorded for ``module`` and its submodules (given to this rank's tensors; the rest go)."""
    for child in module.modules():
        _LOADS.pop(child, None)


def _tensor(module: nn.Module, key: str) -> torch.Tensor | None:
    if key in module._parameters:
        return module._parameters[key]
    return module._buffers.get(key)


def _recording_loads(load: Callable) -> Callable:
    """``nn.Module._load_from_state_dict`` that records each value it would copy into a meta tensor (after the load's
    pre-hooks, which edit the state dict in place; ``assign=True`` puts the values themselves in place instead)."""
    @functools.wraps(load)
    def recording(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():  # torch's "copying ... to a meta parameter ... is a no-op": not any more
            warnings.filterwarnings("ignore", message=r".*copying from a non-meta parameter in the checkpoint to a "
                                                      r"meta parameter")
            result = load(module, state_dict, prefix, *args, **kwargs)
        for key, tensor in own_tensors(module):
            value = state_dict.get(prefix + key)
            if (key in module._non_persistent_buffers_set or not tensor.is_meta or not isinstance(value, torch.Tensor)
                    or value.is_meta):
                continue
            if tensor.dim() == 0 and value.shape == (1,):  # torch loads a one-element value into a scalar
                value = value[0]
            if value.shape == tensor.shape:
                # the value itself, not a copy: a memory-mapped checkpoint is then read only where a rank keeps it
                _record(module, key, value.detach(), tensor)
        return result
    return recording


def _recording_moves(to: Callable) -> Callable:
    """``nn.Module.to`` that records the values of the real tensors it moves to the meta device (PEFT puts the
    adapters it made and initialized beside a base built on meta there), for the ranks that keep them."""
    @functools.wraps(to)
    def recording(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        device, dtype = torch._C._nn._parse_to(*args, **kwargs)[:2]
        if device is not None and torch.device(device).type == "meta":
            for child in module.modules():
                for key, tensor in own_tensors(child):
                    if not tensor.is_meta:
                        _record(child, key, tensor.detach(), tensor)
        elif device is not None:
            # a module built on meta moved to a device (load_from_checkpoint's last step, a configure_model that
            # moves its layers): its meta tensors stay there, for the ranks to materialize on their own devices
            return _moved_but_meta(module, lambda: to(module, *args, **kwargs), dtype)
        return to(module, *args, **kwargs)
    return recording


def _moved_but_meta(module: nn.Module, move: Callable[[], Any], dtype: torch.dtype | None) -> Any:
    """Run ``move`` (a ``.to`` of ``module``) with its meta tensors set aside, then put them back in their places; if
    the move succeeded and changes the dtype, their floating ones follow it."""
    aside: list[tuple[dict, list[str], dict[str, torch.Tensor]]] = []
    for child in module.modules():
        for table in (child._parameters, child._buffers):
            meta = {key: t for key, t in table.items() if t is not None and t.is_meta}
            if meta:
                aside.append((table, list(table), meta))
                for key in meta:
                    del table[key]
    try:
        result = move()
    finally:
        for table, order, meta in aside:
            moved = dict(table)
            table.clear()
            table.update((key, meta[key] if key in meta else moved[key]) for key in order)
    if dtype is not None:
        for table, _, meta in aside:
            for key, tensor in meta.items():
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.to(dtype)
                    else:
                        table[key] = tensor.to(dtype)
    return result


def _recording_copies(deepcopy: Callable) -> Callable:
    """A tensor class' ``__deepcopy__`` that notes which meta tensor each copy comes from."""
    @functools.wraps(deepcopy)
    def recording(tensor: torch.Tensor, memo: dict) -> Any:
        copy = deepcopy(tensor, memo)
        if tensor.is_meta and isinstance(copy, torch.Tensor) and copy is not tensor:
            key = id(copy)
            _COPIES[key] = (weakref.ref(copy, lambda _: _COPIES.pop(key, None)), weakref.ref(tensor), next(_ORDER))
        return copy
    return recording


def _record(module: nn.Module, key: str, value: torch.Tensor, into: torch.Tensor) -> None:
    _LOADS.setdefault(module, {}).setdefault(key, []).append((next(_ORDER), value, weakref.ref(into)))


def _wrap(root: type, methods: Sequence[str], wrapper: Callable[[Callable], Callable]) -> list[tuple[type, str, Any]]:
    """Wrap ``methods`` of ``root`` and of every subclass that defines its own with ``wrapper``; returns (class,
    name, original) for putting them back."""
    wrapped: list[tuple[type, str, Any]] = []
    classes, seen = [root], set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        classes.extend(cls.__subclasses__())
        for method in methods:
            original = cls.__dict__.get(method)
            if callable(original):
                wrapped.append((cls, method, original))
                setattr(cls, method, wrapper(original))
    return wrapped


def _imported(module: str, name: str) -> Any:
    """``module.name`` if the package is installed (imported here if not yet: the block may import it first)."""
    if module not in sys.modules and importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # noqa: BLE001 - an installed package that fails to import is not the user's model's concern
        return None


def _on_host(function: Callable) -> Callable:
    @functools.wraps(function)
    def on_host(*args: Any, **kwargs: Any) -> Any:
        with torch.device("cpu"), paused():  # its own meta tensors (from_pretrained's skeleton) are not the model's
            try:
                return function(*args, **kwargs)
            except MetaBuildError:
                raise
            except Exception as error:
                model = next((a for a in args if isinstance(a, nn.Module)), None)
                if model is None or not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                    raise
                raise MetaBuildError(
                    f"{getattr(function, '__qualname__', function)} failed on a model built on the meta device "
                    f"(configure_model() or Trainer.init_module() under PipelineStrategy): {type(error).__name__}: "
                    f"{error}. If it reads the base model's weights (as PEFT's PiSSA and OLoRA initializations do), "
                    f"it cannot run there: load the base with from_pretrained (or build it in __init__), or "
                    f"initialize otherwise") from error
    return on_host


class MetaBuildError(ValueError):
    """Something run on the host while the module was built failed because the module it read is on meta."""


def _off_meta(move: Callable) -> Callable:
    """PEFT's move of an adapter to its base layer's device: to the CPU where that device is meta (the adapter keeps
    the values PEFT gave it; the base's layers get theirs when materialized)."""
    @functools.wraps(move)
    def off_meta(layer: nn.Module, adapter_name: str, device: torch.device | None = None, *args: Any,
                 **kwargs: Any) -> Any:
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
        if device is None and base is not None and any(t.is_meta for t in base.parameters(recurse=False)):
            device = torch.device("cpu")
        return move(layer, adapter_name, device, *args, **kwargs)
    return off_meta
