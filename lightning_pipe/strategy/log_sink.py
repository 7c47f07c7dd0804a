"""Where ``self.log`` goes while the strategy takes a module's logged values (a step's per micro-batch, a gradient
hook's to gather over the ranks).

A module may override ``log`` (pytorch-forecasting's models log nothing while predicting, ``if not self.predicting:
super().log(...)``). An instance attribute shadowing the method would skip that override (found by review: every
pytorch-forecasting model's ``predict`` failed on the ``None`` loss it never logs on one device), so the strategy
leaves the method alone: while a sink is set on a module, Lightning's ``LightningModule.log`` itself hands the calls
that reach it to the sink, after the module's own ``log`` has decided what to log. Without a sink it is Lightning's.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import LightningModule

__all__ = ["lightning_log", "logs_to"]

_LIGHTNINGS = LightningModule.log
# each module's sink, kept beside it (not on it: a step's changes to the module are undone, and followed)
_SINKS: weakref.WeakKeyDictionary[LightningModule, Callable[..., None]] = weakref.WeakKeyDictionary()


def lightning_log(module: LightningModule, *args: Any, **kwargs: Any) -> None:
    """Lightning's own ``log`` on ``module``: past the module's override (which ran when the value was taken)."""
    _LIGHTNINGS(module, *args, **kwargs)


@functools.wraps(_LIGHTNINGS)
def _log(self: LightningModule, *args: Any, **kwargs: Any) -> None:
    sink = _SINKS.get(self)
    if sink is None:
        _LIGHTNINGS(self, *args, **kwargs)
    else:
        sink(*args, **kwargs)


@contextmanager
def logs_to(module: LightningModule, sink: Callable[..., None]) -> Iterator[None]:
    """Inside, what reaches ``LightningModule.log`` on ``module`` (through its own ``log``, ``log_dict``) goes to
    ``sink`` (with the arguments after ``self``); as it was after."""
    if LightningModule.log is not _log:
        LightningModule.log = _log  # type: ignore[method-assign]
    before = _SINKS.get(module)
    _SINKS[module] = sink
    try:
        yield
    finally:
        if before is None:
            _SINKS.pop(module, None)
        else:
            _SINKS[module] = before
