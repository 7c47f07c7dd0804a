"""A cut LightningModule's ``state_dict()`` called outside the Trainer's run: it holds this rank's share, said once.

After ``fit`` each rank keeps its stages, so the common ending ``torch.save(model.state_dict(), path)`` (on global
rank 0) would save part of the model, and a strict load of it fail far from the cause. The strategy's own reads (a
checkpoint, which gathers every rank's share) and those made while the Trainer runs (callbacks, whose states the
strategy merges) are not warned of.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

__all__ = ["watch_state_dict", "strategy_reads"]

_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_reading = [0]  # the strategy's own state_dict() calls in progress


def watch_state_dict(module: nn.Module, whole_keys: int) -> None:
    """Warn once when ``module``'s ``state_dict()`` is called outside the Trainer's run (``whole_keys``: the whole
    model's number of keys, for the message). The hook is a module-level function, so the module still pickles."""
    if module in _watched:
        return
    _watched.add(module)
    module.register_state_dict_pre_hook(functools.partial(_said_once, whole_keys))


def _said_once(whole_keys: int, part: nn.Module, prefix: str, keep_vars: bool) -> None:
    if prefix or _reading[0] or part in _warned:
        return
    # while a Trainer runs a watched module: a copy of it too (StochasticWeightAveraging's averaged model, whose
    # state the strategy merges into the checkpoint), which has no Trainer of its own
    if any(_running(module) for module in [part, *_watched]):
        return
    _warned.add(part)
    warnings.warn(
        f"{type(part).__name__}.state_dict() called outside the Trainer's run holds only this rank's share of the "
        f"pipelined model (the whole model has {whole_keys} keys): under PipelineStrategy each rank keeps its own "
        f"stages after fit, so saving it (torch.save(model.state_dict(), ...)) saves part of the model. Save the whole "
        f"model with trainer.save_checkpoint(path), which every rank calls (its file holds every rank's weights under "
        f"one device's names), and load it with YourModule.load_from_checkpoint(path) or torch.load(path)"
        f"['state_dict']", stacklevel=3)


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
