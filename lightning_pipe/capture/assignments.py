"""What a forward assigns to its modules' attributes, which a captured graph would not do at each run.

- **A buffer given a new tensor** (``self.ema = 0.9 * self.ema + 0.1 * x.mean(0)``): torch's export keeps that for
  the root module's buffers only; a submodule's assignment was dropped, so the buffer kept its first value at every
  step, silently. While export runs, the new value is copied into the buffer when the module's forward returns, an
  in-place op that the graph keeps.
- **A computed tensor kept as an attribute** (``self.attention = weights``, an intermediate output for an auxiliary
  loss): the graph does not store it at each run; after the capture the attribute holds what it held before. Warned
  (:func:`stored_advice`), since such a value is often only logged.
- **A plain Python value changed** (a call counter, ``self.calls += 1``, a flag guarding a first-call
  initialization): export runs the forward once, so the graph keeps what the forward computed from the value at
  capture. Where the graph depends on it (another graph when exported again from the values set), it is refused,
  with the place.
- **A plain Python value the forward reads** (a temperature ``logits / self.tau``, a dropout's ``p``, a flag): the
  graph keeps the value it had at capture. Each one is noted with that value (:attr:`Assignments.read`), so that a
  change made later from outside the forward (an annealed temperature, a scheduled drop rate) is refused rather than
  silently ignored (:func:`changed_reads`).

:class:`Assignments` says how.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .errors import listed, locate_frame

__all__ = ["Assignments", "PLAIN_VALUES", "Read", "Fields", "plain_list", "tensor_tree", "changed_fields",
           "fields_warning", "appended_refusal",
           "assignment_advice", "carried_advice", "changed_reads", "read_advice", "stored_advice", "stored_attributes",
           "stored_refusal"]

_PLAIN = (bool, int, float)
PLAIN_VALUES = (bool, int, float, str)  # plain values whose reads are noted (a None, a tuple of sizes: never changed)
_MISSING = object()  # an attribute the forward created
_STORED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()  # module -> its stored names


def stored_attributes(module: nn.Module) -> frozenset[str]:
    """The attributes of ``module`` in which a captured forward stored computed tensors (:func:`stored_advice`)."""
    return frozenset(_STORED.get(module, ()))


def stored_refusal(name: str, where: str) -> str:
    """The error for a step reading ``where``'s attribute ``name``, a tensor its forward stored
    (:func:`stored_advice`)."""
    return (f"{name!r} of {where!r} is a tensor that its forward stores at each call (an auxiliary loss, attention "
            f"maps); under PipelineStrategy the forward runs as a captured graph, which does not store it, and that "
            f"layer may run on another rank. Return it from the model's forward (return logits, aux) and read it from "
            f"the model's output in the step")


class Assignments:
    """What the forward assigned in each export run (:meth:`watch`).

    A buffer of a submodule given a new tensor of its shape and dtype keeps it for the rest of the call (reads after
    the assignment see the new value, and a reference taken before it the old one, as eagerly); once the module's
    forward returns (or the forward of the module holding it, for an assignment made from outside its own), the new
    value is copied into the original buffer, an in-place op of that module that the graph keeps. One of another
    shape or dtype is ``refused``, except where the buffer was empty (a table filled on the first call: its value
    cannot depend on the buffer's, and the graph computes it at each run).

    Plain attributes (bool, int, float) given a new value, or created, are ``changed``: the graph may depend on them
    (a call counter scaling the output, a flag guarding a data-dependent initialization), or not (Hugging Face's
    flag that its output hooks are installed; Swin's shift, set afresh from the input's size at each call).
    :meth:`settle` sets them to the values the first run gave them for a second run, whose graph must be the first's:
    then the graph does not depend on them; else they are refused. One put back before the call returns is no change.
    :meth:`restore` puts the values back as they were before the first run (created ones stay).

    Tensors that need a gradient kept as plain attributes (an intermediate output for deep supervision, attention
    maps) are ``stored``: the graph does not keep them (:func:`stored_advice`)."""

    def __init__(self, model: nn.Module, names: dict[int, str]) -> None:
        self.model, self.names = model, names
        self.mine = {id(module) for module in model.modules()}
        self.refused: list[str] = []
        self.changed: dict[tuple[int, str], tuple[nn.Module, Any, Any, str]] = {}  # -> (module, before, after, place)
        self.settled: dict[tuple[int, str], tuple[nn.Module, Any, Any, str]] | None = None
        self.first_code: str | None = None  # the first run's graph, which the second must repeat
        self.pending: dict[tuple[int, str], tuple[nn.Module, torch.Tensor]] = {}  # buffers to copy into
        self.stored: list[str] = []  # tensors with a gradient kept as plain attributes (deep supervision's outputs)
        self.carried: list[str] = []  # tensors without one kept where the forward read them (a state, or a cache)
        self.looked: set[tuple[int, str]] = set()  # attributes holding None or a tensor that the forward read
        self.read: dict[tuple[int, str], Read] = {}  # plain values the forward read from its modules' attributes
        self.assigned: set[tuple[int, str]] = set()  # plain attributes the forward assigned, in any run (:meth:`watch`)
        self.appended: list[str] = []  # lists of the modules the forward appends tensors to (a memory bank)

    def reads(self) -> list[Read]:
        """The plain attributes the forward read and never assigns (Swin's shift, set afresh from the input at each
        call, is the forward's own), with the values the graph keeps."""
        return [read._replace(value=read.value.settled()) if isinstance(read.value, Fields) else read
                for key, read in self.read.items() if key not in self.assigned and read.name != "training"
                and not (plain_list(read.value) and read.module.__dict__.get(read.name) != read.value)]  # (a list the
        # forward itself changed in place: its own record)

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        self.refused, self.changed, self.pending, self.stored, self.read = [], {}, {}, [], {}
        self.appended = []
        self.carried, self.looked = [], set()
        setattr_ = nn.Module.__setattr__
        getattribute = object.__getattribute__
        mine, read, looked = self.mine, self.read, self.looked
        dicts: dict[tuple[int, str], tuple[nn.Module, dict, dict[Any, int]]] = {}  # plain dicts read, as first read
        lists: dict[tuple[int, str], tuple[nn.Module, list, int]] = {}  # lists read, with their first lengths
        # every list the modules hold, with its items: put back after the run, the same list object on each module
        # (torch's export puts back a list's items it found assigned as new lists, one per module, which parts
        # sharing one list, MONAI's DynUNet's deep-supervision heads, then no longer share: found by review)
        held = [(module, name, value, list(value)) for module in self.model.modules()
                for name, value in vars(module).items() if type(value) is list]

        def reading(module: nn.Module, name: str) -> Any:
            value = getattribute(module, name)
            if id(module) not in mine or name not in getattribute(module, "__dict__"):
                return value
            key, listed = (id(module), name), plain_list(value)
            if type(value) in PLAIN_VALUES or isinstance(value, torch.Tensor) or value is None or listed:
                if value is None or isinstance(value, torch.Tensor):
                    looked.add(key)
                # None and lists of plain values (which blocks run, as progressive growing lists them) too, but not
                # torch's own (a module's _compiled_call_impl)
                if key not in read and (value is not None and not listed or not name.startswith("_")):
                    read[key] = Read(module, name, copy.copy(value) if listed else value,
                                     _name(self.names, module, name))
            elif key not in read and not name.startswith("_") and _config_like(value):
                read[key] = Read(module, name, Fields.of(value), _name(self.names, module, name))
            elif not name.startswith("_") and tensor_tree(value):  # a state per layer: [(h, c), ...]
                looked.add(key)
            if type(value) is dict and key not in dicts and not name.startswith("_"):  # (items written: _in_place)
                dicts[key] = (module, value, {item: id(held) for item, held in value.items()})
            if type(value) is list and key not in lists and not name.startswith("_"):  # (items added: _appended)
                lists[key] = (module, value, len(value))
            return value
        buffers = torch.nn.modules.module.register_module_buffer_registration_hook(self._buffer_assigned)
        returns = torch.nn.modules.module.register_module_forward_hook(self._returned)

        def watched(module: nn.Module, name: str, value: Any) -> None:
            mine_ = id(module) in self.mine
            if mine_:
                self.assigned.add((id(module), name))
            # a list, tuple or dict of tensors (a state per layer, auxiliary losses per layer) as a tensor is
            tree = tensor_tree(value) if mine_ and not isinstance(value, torch.Tensor) and not name.startswith("_") \
                else []
            tensor = isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
            if mine_ and name != "training" and type(value) in _PLAIN:
                self._plain_assigned(module, name, value)
            elif mine_ and (tensor and value.requires_grad and name not in module._buffers
                            and not any(key.startswith(f"{name}_") for key in module._parameters)
                            or any(item.requires_grad for item in tree)):
                # (not a weight recomputed from its parameters at each call: pruning's weight_orig, weight_norm's
                # weight_g and weight_v set module.weight in a pre-hook, which the graph computes)
                self._note_stored(module, name, f"'{_name(self.names, module, name)}' in "
                                                f"{locate_frame(_caller(), self.names)}")
            elif mine_ and (tensor or tree) and (id(module), name) in self.looked and name not in module._buffers:
                # read, then given a tensor computed now: a state kept for the next call (a stateful RNN's hidden
                # state), which the graph does not carry; or a cache made on first use, which it recomputes
                self._note_carried(f"'{_name(self.names, module, name)}' in {locate_frame(_caller(), self.names)}")
            setattr_(module, name, value)

        nn.Module.__setattr__ = watched  # type: ignore[method-assign]
        nn.Module.__getattribute__ = reading  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.__setattr__ = setattr_  # type: ignore[method-assign]
            del nn.Module.__getattribute__  # object's again
            buffers.remove()
            returns.remove()
            for (_, name), (module, original) in self.pending.items():  # a run that failed midway: originals back
                module._buffers[name] = original
            self._in_place(dicts)
            self._appended(lists)
            for module, name, value, items in held:
                module.__dict__[name] = value
                value[:] = items

    def _appended(self, lists: dict[tuple[int, str], tuple[nn.Module, list, int]]) -> None:
        """Tensors the forward appended to a list it keeps as an attribute (anomalib's Padim and PatchCore collect
        each training batch's features in ``self.memory_bank``): the graph never appends, so the list would stay as
        the capture left it (found by review: anomalib's own "Memory bank is empty" at the first validation)."""
        for (_, name), (module, value, length) in lists.items():
            if len(value) > length and any(isinstance(item, torch.Tensor) or tensor_tree(item)
                                           for item in value[length:]):
                self.appended.append(f"'{_name(self.names, module, name)}'")
                del value[length:]  # (the capture's fakes)

    def _in_place(self, dicts: dict[tuple[int, str], tuple[nn.Module, dict, dict[Any, int]]]) -> None:
        """Tensors the forward wrote into a dict it keeps as an attribute (``self.cache["hc"] = (h, c)``, a forward
        storing features in ``self.inter[name]``): as a tensor assigned to an attribute, a state carried to the next
        call (no gradient) or a value stored for the step (found by review: a carried pair 8e-3 off, said nothing; a
        stored feature a bare KeyError)."""
        for (_, name), (module, value, before) in dicts.items():
            for item, held in value.items():
                tensors = [held] if isinstance(held, torch.Tensor) else tensor_tree(held)
                if before.get(item) == id(held) or not tensors or any(isinstance(t, nn.Parameter) for t in tensors):
                    continue
                place = f"'{_name(self.names, module, name)}[{item!r}]' (a dict the forward writes into)"
                if any(tensor.requires_grad for tensor in tensors):
                    self._note_stored(module, name, place)
                else:  # (or a cache made on first use: the warning says both)
                    self._note_carried(place)

    def _note_stored(self, module: nn.Module, name: str, place: str) -> None:
        """A tensor with a gradient the forward keeps in ``module``'s attribute ``name`` (at ``place``)."""
        _STORED.setdefault(module, set()).add(name)
        if place not in self.stored:
            self.stored.append(place)

    def _note_carried(self, place: str) -> None:
        """A tensor without one the forward keeps where it read it (at ``place``): a state, or a cache."""
        if place not in self.carried:
            self.carried.append(place)

    def settle(self, code: str) -> None:
        """After the first run that changed plain attributes (its graph's ``code``): sets them to the values it gave
        them, for a second run."""
        self.settled, self.first_code = dict(self.changed), code
        for (_, name), (module, _, after, _) in self.settled.items():
            module.__dict__[name] = after

    def depends(self, code: str) -> bool:
        """After the second run (its graph's ``code``): whether the graph depends on the values (it changed)."""
        return code != self.first_code

    def restore(self) -> None:
        """The values that were there before the first run, back (as torch's export puts back what it finds); created
        ones stay, as after torch's export: a library's flag that it installed its hooks (Hugging Face's output
        capture) must stay set, or the next capture installs them twice."""
        for (_, name), (module, before, _, _) in (self.settled or {}).items():
            if before is not _MISSING:
                module.__dict__[name] = before
        for (_, name), (module, original) in list(self.pending.items()):
            if original is None:  # (a forward that failed after building a table registered as None)
                module._buffers[name] = None

    def problems(self) -> list[str]:
        """What cannot be captured: buffers given another shape, plain values the graph depends on."""
        return self.refused + [place for _, _, _, place in (self.settled or {}).values()]

    def _plain_assigned(self, module: nn.Module, name: str, value: Any) -> None:
        key = (id(module), name)
        if name in module.__dict__:
            old = module.__dict__[name]
            if type(old) not in _PLAIN:
                return
        elif name in module._parameters or name in module._buffers or name in module._modules:
            return
        else:
            old = _MISSING
        before = self.changed[key][1] if key in self.changed else old
        if before is not _MISSING and before == value:  # put back (a flag set and cleared within the call)
            self.changed.pop(key, None)
            return
        if old is not _MISSING and old == value:
            return
        shown = "unset" if before is _MISSING else repr(before)
        place = f"'{_name(self.names, module, name)}' ({shown} -> {value!r}) in {locate_frame(_caller(), self.names)}"
        self.changed[key] = (module, before, value, place)

    def _buffer_assigned(self, module: nn.Module, name: str, value: Any) -> Any:
        old = module._buffers.get(name)
        key = (id(module), name)
        if module is self.model or id(module) not in self.mine or value is old:
            return None  # torch's export keeps the root's own
        original = self.pending[key][1] if key in self.pending else old
        if original is None:  # a table registered as None and built on first use (a rotary cache): computed by the
            # graph at each run, and None again after the capture (found by review: the capture's stand-in was kept)
            self.pending.setdefault(key, (module, None))
            return None
        if not isinstance(value, torch.Tensor) or value.shape != original.shape or value.dtype != original.dtype:
            if original.numel() == 0:  # a table filled on the first call: computed by the graph at each run
                return None
            got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            entry = (f"buffer '{_name(self.names, module, name)}' assigned {got} in place of "
                     f"{tuple(original.shape)} {original.dtype} in {locate_frame(_caller(), self.names)}")
            if entry not in self.refused:
                self.refused.append(entry)
            return None
        self.pending.setdefault(key, (module, original))
        return None

    def _returned(self, module: nn.Module, args: Any, output: Any) -> None:
        """At the end of a module's forward: the new values of the buffers it holds, or that modules inside it hold,
        copied into the original buffers."""
        if not self.pending or id(module) not in self.mine:
            return
        prefix = self.names.get(id(module), "")
        for key, (owner, original) in list(self.pending.items()):
            owner_name = self.names.get(id(owner), "")
            if owner is not module and prefix and not owner_name.startswith(prefix + "."):
                continue
            name = key[1]
            current = owner._buffers.get(name)
            if isinstance(current, torch.Tensor) and original is not None and current is not original:
                original.copy_(current.detach())
            owner._buffers[name] = original
            del self.pending[key]


class Read(NamedTuple):
    """A plain attribute a captured forward read: ``module``'s ``name`` (``place``, its path) held ``value`` (a
    number, a flag, a string, or a tensor kept as a plain attribute, not a buffer)."""

    module: nn.Module
    name: str
    value: Any
    place: str


class Fields(NamedTuple):
    """A config object a captured forward read (``self.config``, a ``SimpleNamespace`` or dataclass of settings), and
    its plain fields as they were then: the graph keeps what the forward read of them."""

    holder: Any
    values: dict[str, Any]

    @classmethod
    def of(cls, holder: Any) -> Fields:
        return cls(holder, {key: copy.copy(value) for key, value in vars(holder).items() if not key.startswith("_")
                            and (type(value) in PLAIN_VALUES or value is None or plain_list(value))})

    def settled(self) -> Fields:
        """Without the fields that changed while the capture ran (set for it and put back after: Hugging Face's
        ``use_cache``, which every capture turns off)."""
        changed = {key for key, _, _ in self.changed()}
        return Fields(self.holder, {key: value for key, value in self.values.items() if key not in changed})

    def changed(self) -> list[tuple[str, Any, Any]]:
        """The fields that hold another value now: (name, then, now)."""
        now = {key: vars(self.holder).get(key, _MISSING) for key in self.values}
        return [(key, value, None if now[key] is _MISSING else now[key]) for key, value in self.values.items()
                if now[key] is not value and now[key] != value]


def _config_like(value: Any) -> bool:
    """A settings object a forward reads fields of (Hugging Face's ``self.config``, a ``SimpleNamespace``, a dataclass
    instance)."""
    if isinstance(value, (nn.Module, torch.Tensor, type)) or not hasattr(value, "__dict__"):
        return False
    return isinstance(value, types.SimpleNamespace) or dataclasses.is_dataclass(value) or \
        type(value).__name__.endswith(("Config", "Configuration"))


def tensor_tree(value: Any) -> list[torch.Tensor]:
    """The tensors of a list, tuple or dict (nested) holding tensors (none a parameter) and Nones only: a state kept
    per layer (``[(h, c), ...]``, a key-value cache), or auxiliary losses; else none."""
    if type(value) not in (list, tuple, dict):
        return []
    found: list[torch.Tensor] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, nn.Parameter) or len(found) > 4096:
            return []
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif type(item) in (list, tuple):
            pending.extend(item)
        elif type(item) is dict:
            pending.extend(item.values())
        elif item is not None:
            return []
    return found


def plain_list(value: Any) -> bool:
    """A short list or tuple of plain values (``self.active = [0, 1]``)."""
    return type(value) in (list, tuple) and len(value) <= 64 and all(type(item) in PLAIN_VALUES for item in value)


def changed_reads(reads: Iterable[Read], live: Callable[[nn.Module], nn.Module] = lambda module: module) -> list[str]:
    """The reads (:class:`Read`) whose attribute holds another value now (on ``live(module)``, the object that the
    user's code sets it on), each as ``"place (value at capture -> now)"``."""
    found = []
    for read in reads:
        if isinstance(read.value, Fields):  # a config's fields: warned of, not refused (:func:`changed_fields`)
            continue
        now = live(read.module).__dict__.get(read.name, read.value)
        if isinstance(read.value, torch.Tensor):  # the graph keeps the tensor it read as a constant
            if now is not read.value:  # (in place, the same tensor: an alias of a buffer loaded from a checkpoint)
                found.append(f"{read.place} (a tensor kept as a plain attribute, replaced)")
        elif now is not read.value and (type(now) is not type(read.value) or now != read.value):
            found.append(f"{read.place} ({read.value!r} at its capture, now {now!r})")
    return found


def changed_fields(reads: Iterable[Read]) -> list[str]:
    """The fields of config objects the captured forward read (:class:`Fields`) that hold another value now, each as
    ``"place.field (value at capture -> now)"``."""
    found: dict[tuple[int, str], str] = {}  # one holder read by several modules (Hugging Face's config): said once
    for read in reads:
        if isinstance(read.value, Fields):
            for key, then, now in read.value.changed():
                found.setdefault((id(read.value.holder), key), f"{read.place}.{key} ({then!r} at its capture, now "
                                                               f"{now!r})")
    return list(found.values())


def fields_warning(model_name: str, found: list[str]) -> str:
    """The warning for changed config fields (:func:`changed_fields`)."""
    return (f"fields of a config object {model_name}.forward reads changed after it was captured: {listed(found)}. "
            f"Under PipelineStrategy the forward runs as a graph captured once, which keeps what it read of them "
            f"then: where the forward reads such a field (a scale, a flag choosing a branch), the change is ignored, "
            f"where one device uses it at once. Keep a value that changes in training in a buffer "
            f"(self.register_buffer) or pass it to forward as a tensor")


def read_advice(model_name: str, found: list[str]) -> str:
    """The error for plain attributes a captured forward read that were changed after its capture (``found``)."""
    return (f"{model_name}.forward reads plain attributes (Python numbers, flags, None, lists of them, tensors that "
            f"are not buffers) that changed after it was captured: {listed(found)}. Under PipelineStrategy the forward "
            f"runs as a graph captured once, which keeps the value it read then, so the change would be ignored (one "
            f"device uses it at once). Keep such a value in a buffer (self.register_buffer('tau', torch.tensor(1.0)), "
            f"then self.tau.fill_(value) or self.tau = new_tensor) or pass it to forward as a tensor argument; both "
            f"reach the graph at every step. For blocks switched on as training goes (progressive growing: a list of "
            f"the blocks that run), run every block and scale each one's contribution by a buffer (0 until it is on, "
            f"then 1, or faded in)" + (_LOOP_COUNT_ADVICE if any(_COUNT.search(item) for item in found) else ""))


_COUNT = re.compile(r"\(-?\d+ at its capture, now -?\d+\)$")
_LOOP_COUNT_ADVICE = (". Where such a whole number counts a loop's runs (for _ in range(self.n_iter)), it cannot "
                      "come from a tensor (the loop would branch on a value): loop to the largest count and let a "
                      "buffer gate each run i (self.active, 0 or 1 per run: h = h + self.active[i] * (f(h) - h)), "
                      "whose gradients are one device's")


def _caller() -> FrameType | None:
    """The frame that made the assignment: the first outside this file and torch's ``Module.__setattr__``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in (__file__, torch.nn.modules.module.__file__):
        frame = frame.f_back
    return frame


def _name(names: dict[int, str], module: nn.Module, attribute: str) -> str:
    prefix = names.get(id(module), "")
    return f"{prefix}.{attribute}" if prefix else attribute


def assignment_advice(model_name: str, found: list[str]) -> str:
    """The error for a forward whose assignments a captured graph would not make (``found``)."""
    return (f"{model_name}.forward assigns to its modules what a captured graph cannot assign at each step: "
            f"{listed(found)}. Export runs the forward once: the graph keeps what was computed from such a value "
            f"then (run again from the values set, it computes otherwise), where one device sees it change from "
            f"step to step. Keep per-step state in a buffer "
            f"(self.register_buffer) updated in place or given a tensor of its shape and dtype "
            f"(self.count += 1 on a tensor buffer; it then changes once per micro-batch, which a warning says), "
            f"compute it in training_step or a hook and pass it to the model, or carry a state kept for the next "
            f"call through the step (returned by the model, given back as an input)" + (
                ". Hugging Face's RWKV (layers_are_rescaled) divides its layers' weights in place as evaluation "
                "starts, every config.rescale_every layers (a guard against float16 overflow at inference): build it "
                "with rescale_every=0 to pipeline it" if any("layers_are_rescaled" in item for item in found) else
                ""))


def appended_refusal(model_name: str, found: list[str]) -> str:
    """The error for a forward that appends tensors to lists it keeps (``found``)."""
    return (f"{model_name}.forward appends tensors to lists it keeps as attributes: {listed(found)} (a memory bank "
            f"filled at each training step, as anomalib's Padim and PatchCore collect their features). Under "
            f"PipelineStrategy the forward runs as a graph captured once, which does not append at each step, so the "
            f"list would stay as it was. A model that fits by collecting features, with no parameters to train, has "
            f"nothing to pipeline: fit it on one device (drop the strategy). To collect values from a trained model, "
            f"return them from forward and collect them in the step")


def carried_advice(model_name: str, found: list[str]) -> str:
    """The warning for a forward that reads tensors it keeps as attributes and gives them new values (``found``)."""
    return (f"{model_name}.forward reads tensors it keeps as attributes and gives them new values: {listed(found)}. A "
            f"captured forward runs as a graph that neither stores them nor reads a later value: every step runs as "
            f"the capture found them. A cache computed on first use from the weights or sizes (a rope table) is "
            f"recomputed at each step, as it should be; a state carried from one batch to the next (a stateful RNN's "
            f"hidden state, self.h = h.detach()) is not carried, where one device carries it: carry it through the "
            f"step instead (out, self.h = self.model(x, self.h), which the pipeline supports)")


def stored_advice(model_name: str, found: list[str]) -> str:
    """The warning for a forward that keeps tensors it computed as attributes (``found``)."""
    return (f"{model_name}.forward keeps tensors it computes as attributes: {listed(found)}. A captured forward runs "
            f"as a graph that does not store them at each step: after the capture they hold what they held before "
            f"(and a stage holds only its own modules). To use such a value in the step (an auxiliary loss, deep "
            f"supervision, attention maps to log), return it from forward")
