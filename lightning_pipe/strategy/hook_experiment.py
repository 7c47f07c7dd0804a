"""What hooks and callbacks log through a logger's experiment on a rank other than 0, made on rank 0.

Lightning's loggers write on global rank 0 only: elsewhere ``logger.experiment`` is a stand-in that drops every call,
as under DDP, where every rank holds the whole model. Under a pipeline another rank holds other layers, and what a
hook or a callback logs of them (``self.logger.experiment.add_histogram(name, param, self.global_step)`` over
``self.named_parameters()`` in ``on_train_epoch_end``) was missing from the logs. Here such a rank records the calls
the user's code makes on its loggers' experiments outside the steps (a step's own calls are the last stage's, made on
rank 0 by :mod:`.logger_calls`), with their arguments copied as plain values when made (:mod:`.plain`: tensors on the
CPU, NumPy arrays, numbers, strings, lists, tuples and dicts of them). Where every rank meets next (a training
epoch's first batch, the end of an evaluation or of the training) rank 0 gathers them and makes them on its loggers,
rank by rank in the order they were made: a histogram carries the step its call names, as on one device.

Only the first rank of each stage other than rank 0's records (replicas and other pipelines hold copies of those
layers, as DDP's ranks do). A call whose arguments cannot travel (a matplotlib figure) is warned of once, naming it.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_pipe.strategy.logger_calls import _LIBRARIES, in_step_code, made_on_loggers, without_figures
from lightning_pipe.strategy.plain import decode, encode

__all__ = ["HookExperimentCalls"]

_NUMPY = "__numpy__"  # a NumPy array travels as a tensor in a dict of this one key


class HookExperimentCalls:
    """On a recording rank (:meth:`install`), the user's calls on its loggers' experiments outside the steps; at
    :meth:`flush` (every rank, together), rank 0 makes every recording rank's calls on its own loggers."""

    def __init__(self, loggers: Callable[[], Sequence[Any]], rank: int, records: bool) -> None:
        self._loggers = loggers  # () -> the trainer's loggers
        self.rank = rank
        self.records = records
        self.pending: list[str] = []  # each call as JSON text, made when the hook made it
        self._original: Any = None
        self._warned: set[str] = set()

    def install(self, stepping: Callable[[], bool]) -> None:
        """From now on (until :meth:`uninstall`), a recording rank's loggers' experiments record the user's calls
        made outside the steps (``stepping``: whether the Trainer is in a step, whose calls are not a hook's)."""
        from lightning.fabric.loggers import logger as fabric_logger

        if not self.records or self._original is not None:
            return
        original = self._original = fabric_logger._DummyExperiment

        def stand_in() -> Any:  # called by rank_zero_experiment's wrapper, whose frame holds the logger as self
            owner = sys._getframe(1).f_locals.get("self")
            caller = (sys._getframe(2).f_globals.get("__name__", "") or "").split(".")[0]
            index = next((i for i, logger in enumerate(self._loggers()) if logger is owner), None)
            if index is None or caller in _LIBRARIES or in_step_code() or stepping():
                return original()
            return _Recorder(self, index, ["experiment"])

        fabric_logger._DummyExperiment = stand_in  # type: ignore[misc,assignment]

    def uninstall(self) -> None:
        from lightning.fabric.loggers import logger as fabric_logger

        if self._original is not None:
            fabric_logger._DummyExperiment = self._original  # type: ignore[misc]
            self._original = None

    def record(self, index: int, path: list[str], args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            self.pending.append(encode([index, path, _travelling(list(args)), _travelling(kwargs)]))
        except (TypeError, ValueError) as error:
            name = ".".join(path)
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(f"self.logger.{name}(...) is called on rank {self.rank} outside the steps (in a hook or "
                              f"callback), where Lightning's loggers do not write; the pipeline makes such calls on "
                              f"rank 0, but not this one: its arguments cannot travel ({error}). Pass tensors, "
                              f"NumPy arrays, numbers or strings (a figure's pixels as an image tensor)", stacklevel=3)

    def flush(self, gather_text: Callable[[str], list[str]]) -> None:
        """Every rank together: rank 0 makes the calls every rank recorded since the last flush."""
        mine = "[" + ",".join(self.pending) + "]"
        self.pending = []
        texts = gather_text(mine)
        if self.rank != 0:
            return
        loggers = list(self._loggers())
        for text in texts:
            for index, path, args, kwargs in decode(text):
                made_on_loggers(loggers, (index, path, _arrived(args), _arrived(kwargs)), "a hook's")


class _Recorder:
    """A logger's ``experiment`` (or an attribute of it) on a recording rank: a call is recorded."""

    def __init__(self, calls: HookExperimentCalls, index: int, path: list[str]) -> None:
        self._calls, self._index, self._path = calls, index, path

    def __getattr__(self, name: str) -> _Recorder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Recorder(self._calls, self._index, [*self._path, name])

    def __getitem__(self, index: int) -> _Recorder:  # as Lightning's stand-in: experiment[0]
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        path, listed, named = without_figures(self._path, list(args), dict(kwargs))  # (a figure: drawn, closed)
        self._calls.record(self._index, path, tuple(listed), named)


def _travelling(value: Any) -> Any:
    """``value`` with tensors detached on the CPU (copied when encoded) and NumPy arrays tagged as tensors."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        return {_NUMPY: torch.from_numpy(numpy.ascontiguousarray(value))}
    if numpy is not None and isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return type(value)(_travelling(item) for item in value)
    if isinstance(value, dict):
        return {key: _travelling(item) for key, item in value.items()}
    return value


def _arrived(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _NUMPY in value:
            return value[_NUMPY].numpy()
        return {key: _arrived(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_arrived(item) for item in value)
    return value
