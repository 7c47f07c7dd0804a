"""A cut LightningModule's ``state_dict()`` called by the user's code: it holds this rank's share, said once.

After ``fit`` each rank keeps its stages, so the common ending ``torch.save(model.state_dict(), path)`` (on global
rank 0) would save part of the model, and a strict load of it fail far from the cause; so would a callback saving
"the best weights" during fit. The strategy's own reads (a checkpoint, which gathers every rank's share), the
libraries' while the Trainer runs and callbacks' states put in a checkpoint (which the strategy merges) are not
warned of.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch.nn as nn

__all__ = ["watch_state_dict", "strategy_reads", "said_pickled", "read_by_the_user", "shares_read"]

_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_pickled: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # said to be pickled
_reading = [0]  # the strategy's own state_dict() calls in progress
_reads = [0]  # the user's reads of a share, warned of (see shares_read)


def watch_state_dict(module: nn.Module, state_keys: Sequence[str]) -> None:
    """Warn once when the ``state_dict()`` of ``module`` or of a submodule whose state this rank holds only part of
    (the pipelined ``self.model``, a backbone cut across ranks) is called by the user's code (``state_keys``: the whole
    model's keys). The hooks are module-level functions, so the module still pickles."""
    with strategy_reads():
        here = list(module.state_dict().keys())
    whole, held = _counts(state_keys), _counts(here)
    for name, part in module.named_modules():
        count = whole.get(name, 0)
        if part in _watched or held.get(name, 0) == count:
            continue  # a submodule this rank holds whole (the module: one stage, replicated): its state is all of it
        _watched.add(part)
        part.register_state_dict_pre_hook(functools.partial(_said_once, count, name))


def _counts(keys: Sequence[str]) -> dict[str, int]:
    """How many of ``keys`` lie under each module path ('' for all of them)."""
    counts: dict[str, int] = {}
    for key in keys:
        path = key.split(".")[:-1]
        for depth in range(len(path) + 1):
            prefix = ".".join(path[:depth])
            counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def _said_once(whole_keys: int, name: str, part: nn.Module, prefix: str, keep_vars: bool) -> None:
    if prefix or _reading[0]:
        return
    if part in _warned:  # (said: counted, for an error this read may cause, :func:`shares_read`)
        _reads[0] += _called_by_the_user()
        return
    # while a Trainer runs a watched module (a copy of it too: StochasticWeightAveraging's averaged model, whose
    # state the strategy merges into the checkpoint, has no Trainer of its own), only the user's own calls: a
    # callback's or a hook's (Lightning's, the strategy's and the libraries' are merged or stay on this rank)
    running = any(_running(module) for module in [part, *_watched])
    if running and not _called_by_the_user() or _in_checkpoint_dump():
        return
    _warned.add(part)
    _reads[0] += 1
    when = (f"during the Trainer's run (in {_users_function()})" if running else "outside the Trainer's run")
    kept = (" A copy kept in memory and loaded back into the same module on this rank is fine. Loaded into another "
            "module (a target network synced with target.load_state_dict(net.state_dict()), as DQN does) it lacks the "
            "other ranks' keys, and torch's load fails with missing keys: a second copy of the pipelined model kept "
            "whole beside it cannot be pipelined (train such a model on one device or with DDP). A file written "
            "from it is not the whole model either." if running else "")
    who = f"the state_dict() of '{name}' ({type(part).__name__})" if name else f"{type(part).__name__}.state_dict()"
    warnings.warn(
        f"{who} called {when} holds only this rank's share of the pipelined model (the whole of it has {whole_keys} "
        f"keys): under PipelineStrategy each rank keeps its own stages, "
        f"so saving it (torch.save(model.state_dict(), ...)) saves part of the model.{kept} Save the whole model with "
        f"trainer.save_checkpoint(path), which every rank calls (its file holds every rank's weights under one "
        f"device's names), and load it with YourModule.load_from_checkpoint(path) or torch.load(path)['state_dict']"
        + (f" (this module's keys are those starting with '{name}.')" if name else ""),
        stacklevel=3)


def shares_read() -> int:
    """How many times the user's code read a share of the pipelined model's state in this process, told so (the
    first time) in a warning: a step's error after a read within it may come from that read."""
    return _reads[0]


def said_pickled(part: nn.Module) -> None:
    """Warn once per object when a pipelined model's stand-in is pickled by the user's code (``torch.save(model.
    model)`` after fit, to load the network elsewhere): the file holds this rank's share, and a call of what it loads
    is refused. A copy (``copy.deepcopy``: a weight-averaging callback's), the strategy's own reads and a checkpoint's
    hyper-parameters (which hold the model whole) are not said."""
    if _reading[0] or part in _pickled or _copying_or_saving():
        return
    _pickled.add(part)
    warnings.warn(f"pickling {type(part).__name__} (torch.save(model) or torch.save(model.model)) under "
                  f"PipelineStrategy writes only this rank's share of the pipelined model, whose call is refused "
                  f"where it is loaded. Save the whole model with trainer.save_checkpoint(path), which every rank "
                  f"calls, and build the network from YourModule.load_from_checkpoint(path) on one process (then "
                  f"torch.save(loaded.model) if you need a pickle)", stacklevel=3)


def _copying_or_saving() -> bool:
    """Whether the pickling is a ``copy.deepcopy``, a process started with the object (a DataLoader worker given a
    LightningModule's method as its ``collate_fn``), a checkpoint being written (its hyper-parameters) or Lightning's
    probe of the hyper-parameters at each run (``parsing.is_picklable``: the hydra template's ``net``), on this
    thread."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "") or ""
        if name in ("copy", "multiprocessing.reduction") or name.startswith("multiprocessing.popen") or (
                frame.f_code.co_name in ("save_checkpoint", "dump_checkpoint", "is_picklable") and name.startswith(
                    ("lightning.", "pytorch_lightning.", "lightning_fabric.", "lightning_pipe."))):
            return True
        frame = frame.f_back
    return False


_LIBRARIES = frozenset({"torch", "lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities",
                        "lightning_pipe", "torchmetrics", "transformers", "peft", "copy", "contextlib", "functools",
                        "timm"})  # (timm's ModelEmaV2 reads the model's state_dict each step, to average in memory)


def _called_by_the_user() -> bool:
    """Whether the ``state_dict()`` under way was called by code outside torch, Lightning and this package."""
    frame = sys._getframe(2)
    while frame is not None:
        package = (frame.f_globals.get("__name__", "") or "").split(".")[0]
        if package != "torch":
            return package not in _LIBRARIES
        frame = frame.f_back
    return False


def _users_function() -> str:
    """The function of the user's code that called the ``state_dict()`` under way (a step, a hook, a callback's)."""
    frame = sys._getframe(2)
    while frame is not None:
        package = (frame.f_globals.get("__name__", "") or "").split(".")[0]
        name = frame.f_code.co_name
        if package not in _LIBRARIES and package not in sys.stdlib_module_names and not name.startswith("<"):
            return name  # (not a lambda's, a comprehension's: the function around it)
        frame = frame.f_back
    return "a hook or a callback"


def read_by_the_user() -> bool:
    """Whether the read of a strategy's property under way (this function's caller is the property) was made by code
    outside torch, Lightning, this package and the libraries (past Lightning's ``Trainer.world_size``, which forwards
    to the strategy's)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name == "world_size" and \
            (frame.f_globals.get("__name__", "") or "").startswith(("lightning.", "pytorch_lightning.")):
        frame = frame.f_back
    return frame is not None and (frame.f_globals.get("__name__", "") or "").split(".")[0] not in _LIBRARIES


def _in_checkpoint_dump() -> bool:
    """Whether Lightning is putting a checkpoint together (``trainer.save_checkpoint``, after fit too): a callback's
    state (StochasticWeightAveraging's averaged copy) is merged whole by the strategy."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "dump_checkpoint" and (frame.f_globals.get("__name__", "") or "").startswith(
                ("lightning.pytorch.", "pytorch_lightning.")):
            return True
        frame = frame.f_back
    return False


def _running(module: nn.Module) -> bool:
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and trainer.state.status.value == "running"


@contextmanager
def strategy_reads() -> Iterator[None]:
    """The strategy's own ``state_dict()`` calls within: not warned of."""
    _reading[0] += 1
    try:
        yield
    finally:
        _reading[0] -= 1
