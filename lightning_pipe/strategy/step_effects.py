"""What a step changes on the LightningModule besides its result (outputs collected for an epoch-end hook), made
on every rank what one device makes.

Lightning 2 has steps keep their outputs themselves: ``self.validation_step_outputs.append(loss)`` in the step, a
``torch.stack`` of them in ``on_validation_epoch_end``. Under a pipeline the whole step runs only on the last stage,
once per micro-batch; the first stage runs it up to the model, the others not at all. So the other ranks' lists stayed
empty (the epoch-end hook failed there, or logged something else on rank 0, the rank that logs), and the last stage's
held one entry per micro-batch.

Here every rank notes, at the start of a step, the module's own attributes (those Lightning and torch do not set):
their values, a list's length, a dict's entries, the fields of a plain object of the user's (a running-average meter's
sum and count; not a library's object). When the last stage's micro-batches changed any, it undoes their
changes and runs the step once more, without gradients, on the whole batch's model output (the micro-batches' put
back together along dim 0), so that its changes are one device's: one entry per batch, a counter raised once. What
that run changed (a list's new entries, an attribute's new value) travels to every rank with the step's result; each
other rank undoes what its part of the step changed and makes the same changes. Where the whole output cannot be put
back together, or the run fails, the micro-batches' own changes travel instead, with a warning. This module follows
the changes (note, compare, undo, make); :mod:`.effect_runs` makes the step's runs change the module as one device's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.stored import NotKept

__all__ = ["LIBRARIES", "StepEffects", "Snapshot", "Patch", "Sent", "own_attributes"]

# A change: (kind, attribute, key in a dict attribute or None, value). Kinds: "set" (bind the attribute or the
# dict's key to value), "extend" (add value's items to the list there), "del" (remove the attribute or the key),
# "object" (bind the attribute to a new object of its object's class, value: (class name, fields)).
Patch = tuple[str, str, Any, Any]
Sent = tuple[str, str, Any, Any, bool]  # a change as sent: and whether its tensors were on the CPU

_MISSING = object()
_SHOULD_STOP = "trainer:should_stop"  # the Trainer's flag a step may raise, tracked with the module's attributes
# an optimizer's group's setting ("optimizer:0:1:lr") and a scheduler's plain state ("scheduler:0:last_epoch"), which a
# step may change (a warm-up written in training_step, self.lr_schedulers().step())
_OPTIMIZER, _SCHEDULER = "optimizer:", "scheduler:"
# the strategy's own stand-ins, and nn.Module's mode
_IGNORED = frozenset({"log", "print", "forward", "training", "_pipelined_model"})
_SAVED_NUMEL = 1 << 16  # a tensor attribute up to this size is copied at a step's start, so that it can be put back
_NESTED = 64  # a list of up to this many items is looked into (one list per dataloader); longer ones: their length
_ENTRIES = 4096  # a dict of up to this many entries is looked into; a larger one (a vocabulary): its size
_FIELD = "::"  # "meter::sum": the field "sum" of a plain object held in the attribute "meter", followed as attributes
_FIELD_TYPES = (bool, int, float, str, type(None), torch.Tensor, list, tuple, dict)
_FIELD_NUMEL = 1024  # a larger tensor in an object's field is not copied at a step's start (not undone in place)
LIBRARIES = frozenset({"builtins", "torch", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics",
                        "numpy", "logging", "enum", "functools", "types", "typing", "collections"})


@dataclass
class _Entry:
    value: Any
    length: int = -1  # a list's length
    # a dict's entries, or a short list's items that are lists: key or index -> (value, a list's length or -1)
    items: dict[Any, tuple[Any, int]] | None = None
    size: int = -1  # a large dict's size
    version: int = -1  # a tensor's version counter (it counts changes in place)
    saved: torch.Tensor | None = None  # a small tensor's values


Snapshot = dict[str, _Entry]


def _length(value: Any) -> int:
    return len(value) if type(value) is list else -1


def _entry(value: Any, save: bool = True, always: bool = False) -> _Entry:
    if type(value) is list:
        nested = {index: (item, len(item)) for index, item in enumerate(value) if type(item) is list} \
            if len(value) <= _NESTED else None
        return _Entry(value, len(value), items=nested or None)
    if isinstance(value, dict):
        if len(value) > _ENTRIES:
            return _Entry(value, size=len(value))
        return _Entry(value, items={key: (item, _length(item)) for key, item in value.items()})
    if isinstance(value, torch.Tensor) and not isinstance(value, (nn.Parameter, NotKept)) and not value.is_inference():
        # (a tensor made under inference_mode, in validation, has no version counter: known by identity alone)
        saved = value.detach().clone() if save and (always or value.numel() <= _SAVED_NUMEL) else None
        return _Entry(value, version=value._version, saved=saved)
    return _Entry(value)


def _changed_in_place(before: _Entry, value: torch.Tensor) -> bool:
    """Whether the tensor ``value`` changed in place since ``before``: its version counter moved, or (a small one) its
    values differ; a batch norm's kernel updates the running statistics without moving the counter."""
    return value._version != before.version or (before.saved is not None and not value.is_meta
                                                 and not torch.equal(value, before.saved))


def _differs(before: _Entry | None, value: Any) -> bool:
    """Whether ``value`` changed since ``before`` (what :meth:`StepEffects.changes` would list, without listing it)."""
    if before is None or before.value is not value:
        return True
    if before.length >= 0:
        return len(value) != before.length or (before.items is not None and any(
            index >= len(value) or value[index] is not item or len(value[index]) != length
            for index, (item, length) in before.items.items()))
    if before.items is not None:
        return len(value) != len(before.items) or any(
            value.get(key, _MISSING) is not item or (length >= 0 and len(item) != length)
            for key, (item, length) in before.items.items())
    if before.size >= 0:
        return len(value) != before.size
    return before.version >= 0 and _changed_in_place(before, value)


class StepEffects:
    """What a step may change on ``module``: its own plain attributes and buffers, and the buffers of its submodules
    outside the pipelined model (``pipelined()``: the modules of this rank's share of the model, found once the
    model is cut), such as the running statistics of a normalizer the step runs before the model. What they hold now,
    what changed since, undoing and making changes."""

    def __init__(self, module: nn.Module, pipelined: Callable[[], Iterable[nn.Module]] = lambda: ()) -> None:
        self.module = module
        self._pipelined = pipelined
        self._outside: list[tuple[str, nn.Module]] | None = None
        # large tensors found changed in place where they could not be put back (a memory bank): copied from now on
        self.saved_always: set[str] = set()

    def _outside_modules(self) -> list[tuple[str, nn.Module]]:
        if self._outside is None:
            from torchmetrics import Metric  # its states are the metric tracker's (.logs)

            inside = {id(m) for m in self._pipelined()}
            self._outside = [(path, child) for path, child in self.module.named_modules(remove_duplicate=True)
                             if path and id(child) not in inside and child._buffers
                             and not issubclass(type(child), Metric)]  # (a part of the model answers as its class)
        return self._outside

    def _tracked(self) -> dict[str, Any]:
        attributes = own_attributes(self.module)
        followed: set[int] = set()  # an object held by two attributes: its fields once, under the first
        for name, value in list(attributes.items()):
            if id(value) not in followed and followed_object(value):
                followed.add(id(value))
                attributes.update((f"{name}{_FIELD}{field}", item) for field, item in vars(value).items())
        trainer = self.module.__dict__.get("_trainer")
        if trainer is not None:  # a step may stop the fit (the last stage's step alone sees it)
            attributes[_SHOULD_STOP] = trainer.should_stop
            attributes.update(_optimizer_settings(trainer))
        if "_pipelined_model" not in self.module.__dict__:  # its own buffers are not the model's (its forward's)
            attributes.update((name, value) for name, value in self.module._buffers.items() if value is not None)
        for path, child in self._outside_modules():
            attributes.update((f"{path}.{name}", value) for name, value in child._buffers.items() if value is not None)
        return attributes

    def _owner(self, name: str) -> tuple[dict[str, Any], str]:
        """Where ``name`` is bound: a plain object's fields for ``attribute::field``, a submodule's buffers for a
        dotted name; else the module's buffers or attributes."""
        if name == _SHOULD_STOP:
            return _TrainerFlag(self.module._trainer), name
        if name.startswith((_OPTIMIZER, _SCHEDULER)):
            return _settings_of(self.module._trainer, name)
        if _FIELD in name:  # an object gone, or no longer one with fields: a dict of its own, which nothing reads
            attribute, field = name.split(_FIELD, 1)
            fields = getattr(self.module.__dict__.get(attribute), "__dict__", None)
            return (fields if type(fields) is dict else {}), field
        if "." in name:
            path, leaf = name.rsplit(".", 1)
            return self.module.get_submodule(path)._buffers, leaf
        return (self.module._buffers if name in self.module._buffers else self.module.__dict__), name

    def _bind(self, name: str, value: Any) -> None:
        where, leaf = self._owner(name)
        where[leaf] = value

    def _unbind(self, name: str) -> None:
        where, leaf = self._owner(name)
        where.pop(leaf, None)
        if "." not in name:
            self.module.__dict__.pop(name, None)

    def snapshot(self) -> Snapshot:
        """What the module's own attributes hold now (the values of small tensors too, but not of the buffers of
        modules in eval mode, which keep them)."""
        resting = {f"{path}.{name}" for path, child in self._outside_modules() if not child.training
                   for name in child._buffers}
        return {name: _entry(value, save=name in self.saved_always or (
                    name not in resting and not (_FIELD in name and isinstance(value, torch.Tensor)
                                                 and value.numel() > _FIELD_NUMEL)), always=name in self.saved_always)
                for name, value in self._tracked().items()}

    def changes(self, since: Snapshot) -> list[Patch]:
        """What changed since ``since``, as changes that make it again from there."""
        patches: list[Patch] = []
        now = self._tracked()
        for name in since.keys() - now.keys():
            if _FIELD in name:
                patches.extend(self._field_left(name, since))
            else:
                patches.append(("del", name, None, None))
        for name, value in now.items():
            before = since.get(name) or (self._aliased(name, since) if _FIELD in name else None)
            if before is None or before.value is not value:
                patches.append(("set", name, None, list(value) if type(value) is list else value))
            elif before.length >= 0:
                patches.extend(_list_changes(name, None, value, before.length))
                for index, (item, length) in (before.items or {}).items():  # a list per dataloader
                    if index < min(len(value), before.length):
                        patches.extend(_item_changes(name, index, value[index], item, length))
            elif before.items is not None:
                patches.extend(_dict_changes(name, value, before.items))
            elif before.size >= 0 and len(value) != before.size:  # a large dict: whole
                patches.append(("set", name, None, value))
            elif before.version >= 0 and _changed_in_place(before, value):
                patches.append(("set", name, None, value.detach().clone()))
        # an object bound or unbound itself: its fields go with it (or it cannot go, and a warning says so); they
        # are not made on another rank's object, which may be another attribute's too. A plain object made anew in
        # place of one of its class (a meter reset by a new one) goes as its class' name and fields.
        rebound = {name for kind, name, key, _ in patches
                   if key is None and kind in ("set", "del") and _FIELD not in name}
        patches = [patch for patch in patches if _FIELD not in patch[1] or patch[1].split(_FIELD, 1)[0] not in rebound]
        return [("object", name, None, (type(value).__qualname__, dict(vars(value))))
                if kind == "set" and key is None and name in rebound and followed_object(value) and name in since
                and type(since[name].value) is type(value) else (kind, name, key, value)
                for kind, name, key, value in patches]

    def _aliased(self, name: str, since: Snapshot) -> _Entry | None:
        """The entry at the start of a field now followed under another attribute holding the same object (the one
        it was followed under was unbound)."""
        attribute, field = name.split(_FIELD, 1)
        holder = self.module.__dict__.get(attribute)
        for other, entry in since.items():
            if _FIELD not in other and entry.value is holder and f"{other}{_FIELD}{field}" in since:
                return since[f"{other}{_FIELD}{field}"]
        return None

    def _field_left(self, name: str, since: Snapshot) -> list[Patch]:
        """The change of a field followed at the start and not now: deleted, if its object is still there and still
        the attribute's; else, if the object is no longer followed (it took a value not followed), its new value."""
        attribute, field = name.split(_FIELD, 1)
        holder = self.module.__dict__.get(attribute, _MISSING)
        if attribute not in since or since[attribute].value is not holder:
            return []  # the object itself was unbound or replaced: that change says it
        fields = vars(holder) if hasattr(holder, "__dict__") else {}
        if field not in fields:
            return [("del", name, None, None)]
        if _differs(since[name], fields[field]):
            value = fields[field]
            return [("set", name, None, value.detach().clone() if isinstance(value, torch.Tensor) else value)]
        return []

    def changed(self, since: Snapshot) -> bool:
        """Whether anything changed since ``since`` (stops at the first change)."""
        now = self._tracked()
        return now.keys() != since.keys() or any(_differs(since[name], value) for name, value in now.items())

    @contextmanager
    def undone(self) -> Iterator[None]:
        """What changes inside is undone after (a run of the step's code that must leave no trace)."""
        start = self.snapshot()
        try:
            yield
        finally:
            self.restore(start)

    def restore(self, since: Snapshot) -> bool:
        """Undo what changed since ``since``; whether all of it could be (a list emptied in place stays empty, a
        large tensor changed in place stays changed)."""
        undone = True
        now = self._tracked()
        for name in now.keys() - since.keys():
            self._unbind(name)
        for name, before in since.items():
            if now.get(name, _MISSING) is not before.value:
                self._bind(name, before.value)
            elif before.length >= 0:
                undone = undone and len(before.value) >= before.length
                del before.value[before.length:]
                for index, (item, length) in (before.items or {}).items():
                    if index >= len(before.value):
                        undone = False
                        continue
                    if before.value[index] is not item:
                        before.value[index] = item
                    undone = undone and len(item) >= length
                    del item[length:]
            elif before.items is not None:
                _restore_dict(before.value, before.items)
            elif before.version >= 0 and _changed_in_place(before, before.value):
                if before.saved is None:
                    undone = False
                    self.saved_always.add(name)
                    continue
                with torch.no_grad():
                    before.value.copy_(before.saved)
        return undone

    def apply(self, patches: Sequence[Sequence[Any]],
              place: Callable[[Any, bool], Any] = lambda value, on_cpu: value, start: Snapshot | None = None) -> None:
        """Make ``patches`` (from :meth:`changes`, or as sent: with a fifth item saying whether the value's tensors
        were on the CPU), each value passed through ``place`` (to this rank's device, or the CPU); a tensor attribute
        given a value of its shape takes it in place where it holds the module's own tensor: the one it held at
        ``start``, where given (not a run's output the step kept, ``self.last = out.detach()``, which shares its
        storage with the output the runs on the whole batch put together)."""
        now = self._tracked()
        for patch in patches:
            kind, name, key, value = patch[:4]
            value = None if kind == "del" else place(value, bool(patch[4]) if len(patch) > 4 else False)
            if kind == "object":
                self._renew(name, *value)
                continue
            if key is None:
                if kind == "del":
                    self._unbind(name)
                elif kind == "extend":
                    where, leaf = self._owner(name)
                    if leaf in where:  # (not the field of an object this rank does not hold)
                        where[leaf].extend(value)
                elif not ((start is None or name in start and now.get(name) is start[name].value)
                          and _set_tensor(now.get(name), value)):
                    self._bind(name, value)
                continue
            if name not in now and _FIELD in name:
                continue  # the field of an object this rank does not follow
            target = now[name]
            if kind == "del":
                target.pop(key, None)
            elif kind == "set":
                target[key] = value
            else:
                target[key].extend(value)

    def _renew(self, name: str, class_name: str, fields: dict[str, Any]) -> None:
        """Bind ``name`` to a new object of this rank's object's class holding ``fields`` (as the last stage's step
        made one): a shallow copy of this rank's object, its fields replaced; other references keep the old one."""
        old = self.module.__dict__.get(name)
        if old is None or type(old).__qualname__ != class_name or not hasattr(old, "__dict__"):
            return  # this rank holds no object of that class there: it keeps what it has
        new = copy.copy(old)
        vars(new).clear()
        vars(new).update(fields)
        self._bind(name, new)


def _setting(value: Any) -> bool:
    """A number, a flag, or a list or tuple of numbers (a group's ``betas``, a scheduler's ``base_lrs``)."""
    return type(value) in (bool, int, float) or (type(value) in (list, tuple) and all(
        type(item) in (bool, int, float) for item in value))


def _optimizer_settings(trainer: Any) -> dict[str, Any]:
    """The settings of every optimizer's parameter groups and the plain state of every learning-rate scheduler, under
    names :func:`_settings_of` finds them by."""
    found: dict[str, Any] = {}
    for index, optimizer in enumerate(getattr(trainer.strategy, "optimizers", None) or ()):
        for number, group in enumerate(optimizer.param_groups):
            found.update((f"{_OPTIMIZER}{index}:{number}:{key}", value) for key, value in group.items()
                         if key != "params" and _setting(value))
    for index, config in enumerate(getattr(trainer.strategy, "lr_scheduler_configs", None) or ()):
        found.update((f"{_SCHEDULER}{index}:{key}", value) for key, value in vars(config.scheduler).items()
                     if _setting(value))
    return found


def _settings_of(trainer: Any, name: str) -> tuple[dict[str, Any], str]:
    """Where an optimizer's or scheduler's setting named by :func:`_optimizer_settings` is bound, and its key."""
    if name.startswith(_OPTIMIZER):
        index, number, key = name[len(_OPTIMIZER):].split(":", 2)
        return trainer.strategy.optimizers[int(index)].param_groups[int(number)], key
    index, key = name[len(_SCHEDULER):].split(":", 1)
    return vars(trainer.strategy.lr_scheduler_configs[int(index)].scheduler), key


class _TrainerFlag(dict):  # type: ignore[type-arg]
    """The trainer's ``should_stop`` as the one entry of a dict, so that it is bound like an attribute."""

    def __init__(self, trainer: Any) -> None:
        super().__init__()
        self._trainer = trainer

    def __setitem__(self, key: str, value: Any) -> None:
        self._trainer.should_stop = bool(value)

    def pop(self, key: str, default: Any = None) -> Any:
        return default


def followed_object(value: Any) -> bool:
    """Whether ``value`` is a plain object of the user's whose fields hold data (a running-average meter: its sum and
    count), followed field by field; library objects (loggers, metrics, enums) are not."""
    if isinstance(value, (nn.Module, torch.Tensor, type)) or type(value).__module__.split(".")[0] in LIBRARIES:
        return False
    fields = getattr(value, "__dict__", None)
    return type(fields) is dict and 0 < len(fields) <= _NESTED and all(
        isinstance(field, _FIELD_TYPES) for field in fields.values())


def _set_tensor(target: Any, value: Any) -> bool:
    """Copy ``value`` into the tensor ``target`` where both are tensors of one shape and dtype; whether it did."""
    if not (isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor) and target.shape == value.shape
            and target.dtype == value.dtype and not target.is_inference() and not isinstance(target, nn.Parameter)):
        return False
    with torch.no_grad():
        target.copy_(value)
    return True


def _list_changes(name: str, key: Any, value: list, length: int) -> list[Patch]:
    if len(value) > length:
        return [("extend", name, key, value[length:])]
    if len(value) < length:  # emptied or shortened in place
        return [("set", name, key, list(value))]
    return []


def _item_changes(name: str, key: Any, item: Any, before: Any, length: int) -> list[Patch]:
    """The changes of one entry (a dict's, or a list's item that is a list) at ``key``."""
    if before is not item:
        return [("set", name, key, list(item) if type(item) is list else item)]
    return _list_changes(name, key, item, length) if length >= 0 else []


def _dict_changes(name: str, value: dict, items: dict[Any, tuple[Any, int]]) -> list[Patch]:
    patches: list[Patch] = [("del", name, key, None) for key in items.keys() - value.keys()]
    for key, item in value.items():
        before, length = items.get(key, (_MISSING, -1))
        patches.extend(_item_changes(name, key, item, before, length))
    return patches


def _restore_dict(value: dict, items: dict[Any, tuple[Any, int]]) -> None:
    for key in list(value):
        if key not in items:
            del value[key]
    for key, (item, length) in items.items():
        if value.get(key, _MISSING) is not item:
            value[key] = item
        elif length >= 0:
            del item[length:]


_KEYS: dict[type, frozenset[str]] = {}


def own_attributes(module: nn.Module) -> dict[str, Any]:
    """``module``'s own attributes: those neither torch nor Lightning gives it, other than submodules."""
    skipped = _lightning_keys(type(module))
    return {name: value for name, value in module.__dict__.items()
            if name not in skipped and not isinstance(value, nn.Module)}


def _lightning_keys(cls: type) -> frozenset[str]:
    """The attributes torch and Lightning give a module of ``cls`` (a bare LightningModule's, for a LightningModule)."""
    if cls not in _KEYS:
        from lightning.pytorch import LightningModule

        base = LightningModule() if issubclass(cls, LightningModule) else nn.Module()
        _KEYS[cls] = frozenset(base.__dict__) | _IGNORED
    return _KEYS[cls]
