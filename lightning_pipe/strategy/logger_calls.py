"""Calls a step makes on the trainer's loggers (``self.logger.experiment.add_image(...)``,
``self.logger.log_image(...)``) and its ``self.print(...)``, made on global rank 0 as on one device.

Lightning makes such calls on global rank 0 only: elsewhere a logger's ``experiment`` is a stand-in that drops every
call, and its ``rank_zero_only`` methods do nothing. Under a pipeline the step's code after the model runs on the last
stage, never rank 0, so images, histograms and text a step logs that way were lost without a word. Here the last
stage records them instead (the stand-in's calls, and the loggers' ``log_*`` methods), with the path from the logger
to the method and the arguments; they travel with the step's result (tensors, numbers, strings, NumPy arrays, and
lists, tuples and dicts of them), and rank 0 makes them on its real loggers. ``self.print`` (which prints on global
rank 0 only) is recorded the same way, as the text it prints. Like the step's changes to the module
(:mod:`.step_effects`), they are recorded from the step run once on the whole batch, so the calls are one device's.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

__all__ = ["note_dropped_experiment_calls", "LoggerCalls", "Call"]

Call = tuple[int, list[str], list[Any], dict[str, Any]]  # (logger's index, attributes from it, args, kwargs)
_PRINT = -1  # the logger index of a self.print call


class _Recorder:
    """Stands for a logger's ``experiment`` (and any attribute of it) while the last stage runs the step: records the
    calls."""

    def __init__(self, calls: list[Call], index: int, path: list[str]) -> None:
        self._calls, self._index, self._path = calls, index, path

    def __getattr__(self, name: str) -> _Recorder:
        return _Recorder(self._calls, self._index, [*self._path, name])

    def __getitem__(self, index: int) -> _Recorder:  # as Lightning's stand-in: experiment[0]
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self._calls.append((self._index, self._path, list(args), dict(kwargs)))


_LIBRARIES = frozenset({"lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "lightning_pipe",
                        "torchmetrics", "torch", "transformers"})


class _NotingRank(int):
    """The rank ``rank_zero_only`` reads while the last stage runs the step: this rank's number, which notes the
    user's functions it keeps from running (their wrapper asks whether it is 0, holding the function as ``fn``)."""

    skipped: set[str]

    def __new__(cls, rank: int, skipped: set[str]) -> _NotingRank:
        noting = super().__new__(cls, rank)
        noting.skipped = skipped
        return noting

    def __eq__(self, other: object) -> bool:
        if other == 0 and int(self) != 0:
            function = sys._getframe(1).f_locals.get("fn")
            module = getattr(function, "__module__", None) or ""
            if callable(function) and module.split(".")[0] not in _LIBRARIES:
                self.skipped.add(getattr(function, "__qualname__", repr(function)))
        return int(self) == other

    __hash__ = int.__hash__


class LoggerCalls:
    """Records the calls a step makes on ``loggers()`` where they would be dropped, and makes them on rank 0."""

    def __init__(self, module: Any, loggers: Any) -> None:
        self._module = module  # the LightningModule, whose print() prints on rank 0 only
        self._loggers = loggers  # () -> the trainer's loggers (none outside a Trainer)
        self.calls: list[Call] = []
        self.skipped: set[str] = set()  # the user's rank_zero_only functions the step's code after the model called
        self._warned: set[str] = set()

    def _print(self, *args: Any, sep: str = " ", end: str = "\n", **_: Any) -> None:
        self.calls.append((_PRINT, [], [sep.join(str(arg) for arg in args)], {"end": end}))

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Inside (the last stage's runs of the step, on whichever rank): the loggers' experiments, ``log_*`` methods
        and ``self.print`` record into :attr:`calls` instead of logging."""
        from lightning.fabric.loggers import logger as fabric_logger
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if self._module._trainer is None:
            yield
            return
        loggers = list(self._loggers())
        calls, index_of = self.calls, {id(logger): index for index, logger in enumerate(loggers)}

        def stand_in() -> Any:  # called by rank_zero_experiment's wrapper, whose frame holds the logger as self
            owner = sys._getframe(1).f_locals.get("self")
            index = index_of.get(id(owner))
            return dummy() if index is None else _Recorder(calls, index, ["experiment"])

        dummy = fabric_logger._DummyExperiment
        patched: list[tuple[Any, str]] = []
        for index, logger in enumerate(loggers):
            for name in _log_methods(logger):
                setattr(logger, name, _Recorder(calls, index, [name]))
                patched.append((logger, name))
        fabric_logger._DummyExperiment = stand_in  # type: ignore[assignment,misc]
        self._module.print = self._print
        rank = rank_zero_only.rank
        # rank 0 holds the last stage in a V schedule: its calls are recorded too
        rank_zero_only.rank = _NotingRank(max(rank, 1), self.skipped)
        try:
            with self._as_first_stage():
                yield
        finally:
            rank_zero_only.rank = rank
            del self._module.print
            fabric_logger._DummyExperiment = dummy  # type: ignore[misc]
            for logger, name in patched:
                del logger.__dict__[name]
            self._warn_skipped()

    def _warn_skipped(self) -> None:
        """Once per function: the step called a ``rank_zero_only`` function of the user's, which therefore ran on no
        rank (the last stage runs the step's code; rank 0 runs only its part up to the model, with logging off)."""
        new = sorted(self.skipped - self._warned)
        if not new:
            return
        self._warned.update(new)
        warnings.warn(f"the step calls {', '.join(new)}, decorated with rank_zero_only: under a pipeline the step's "
                      f"code runs on the last stage's rank (global rank 0 runs only its part up to the model, with "
                      f"logging off), so it did not run. Log through self.log or self.logger (made on rank 0), or "
                      f"call it from a hook every rank runs, where rank 0 has the step's outputs "
                      f"(on_train_batch_end(outputs, ...), on_validation_epoch_end)", stacklevel=2)

    @contextmanager
    def discarding(self) -> Iterator[None]:
        """Inside, on rank 0: the loggers drop the step's calls, as on other ranks (the first stage's run of the step
        up to the model; the last stage's calls, which include those, reach rank 0 once the step ends)."""
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        rank = getattr(rank_zero_only, "rank", None)
        if rank != 0:
            with self._as_first_stage():
                yield
            return
        rank_zero_only.rank = 1
        self._module.print = lambda *args, **kwargs: None
        try:
            with self._as_first_stage():
                yield
        finally:
            del self._module.print
            rank_zero_only.rank = rank

    def _as_first_stage(self) -> Any:
        """The strategy's ``answering_as_first_stage`` (the step's code asking its rank gets the pipeline's first
        stage's), where the module is attached to a pipeline's Trainer."""
        trainer = getattr(self._module, "_trainer", None)
        answering = getattr(getattr(trainer, "strategy", None), "answering_as_first_stage", None)
        return answering() if answering is not None else nullcontext()

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls

    def make(self, calls: Sequence[Call]) -> None:
        """Make ``calls`` (recorded on the last stage) on this rank's loggers: on rank 0, where they log."""
        loggers = list(self._loggers())
        for index, path, args, kwargs in calls:
            try:
                if index == _PRINT:
                    self._module.print(*args, **kwargs)
                    continue
                target: Any = loggers[index]
                for name in path:
                    target = getattr(target, name)
                target(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - rank 0 alone makes them: never end the run there alone
                warnings.warn(f"the step's call self.logger.{'.'.join(path)}(...) failed on rank 0, where the "
                              f"pipeline makes it: {type(error).__name__}: {error}", stacklevel=2)


def note_dropped_experiment_calls(rank: int) -> None:
    """On a rank other than 0, for the rest of the process: a call the user's code makes on a logger's experiment
    outside the steps (a hook logging weight histograms over ``self.named_parameters()``), which Lightning drops
    there as under DDP, is warned of once: under a pipeline this rank holds other layers than rank 0, so what it
    would have logged is missing from the logs, not logged by rank 0 instead. The steps' calls are recorded and made
    on rank 0 (:meth:`LoggerCalls.recording`)."""
    from lightning.fabric.loggers import logger as fabric_logger

    dummy = fabric_logger._DummyExperiment
    if rank == 0 or getattr(dummy, "_noting", False):
        return
    warned: set[str] = set()

    class NotingExperiment(dummy):  # type: ignore[misc,valid-type]
        _noting = True

        def __getattr__(self, name: str) -> Any:
            frame = sys._getframe(1)
            module = frame.f_globals.get("__name__", "") or ""
            if module.split(".")[0] not in _LIBRARIES and name not in warned and not name.startswith("_"):
                warned.add(name)
                warnings.warn(f"self.logger.experiment.{name}(...) is called on rank {rank} outside the steps (in a "
                              f"hook or callback), where Lightning's loggers do not write (global rank 0 only, as "
                              f"under DDP). Under a pipeline this rank holds other layers than rank 0 (its stages'), "
                              f"so what it logs of its own parameters (weight or gradient histograms over "
                              f"named_parameters()) is missing from the logs. Log numbers with self.log in "
                              f"on_before_optimizer_step or on_after_backward (gathered over the pipeline), or give "
                              f"this rank a logger of its own", stacklevel=2)
            return super().__getattr__(name)

    fabric_logger._DummyExperiment = NotingExperiment  # type: ignore[misc]


def _log_methods(logger: Any) -> list[str]:
    """The public ``log_*`` methods of ``logger`` (``log_image``, ``log_text``, ...) a step may call itself."""
    return [name for name in dir(type(logger)) if name.startswith("log_") and callable(getattr(type(logger), name))
            and not isinstance(getattr(type(logger), name), property)]
