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

__all__ = ["LoggerCalls", "Call", "figures_closed", "in_step_code", "made_on_loggers", "without_figures"]

Call = tuple[int, list[str], list[Any], dict[str, Any]]  # (logger's index, attributes from it, args, kwargs)
_PRINT = -1  # the logger index of a self.print call
_STEP_CODE = [0]  # how deep this process is in a step's code (recorded or discarded runs)


def in_step_code() -> bool:
    """Whether a run of a step's code is under way in this process (its logger calls are the step's, recorded on the
    last stage or dropped elsewhere), rather than a hook's or a callback's."""
    return _STEP_CODE[0] > 0


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
        path, args, kwargs = without_figures(self._path, list(args), dict(kwargs))
        self._calls.append((self._index, path, args, kwargs))


class _Dropped:
    """Stands for a logger's ``experiment`` in a run of the step whose calls are dropped: a matplotlib figure given
    to it is closed, as TensorBoard's ``add_figure`` closes it (else one per such run stayed open)."""

    def __getattr__(self, name: str) -> _Dropped:
        return self

    def __getitem__(self, index: int) -> _Dropped:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> _Dropped:
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, list) else [value]:
                if _is_figure(item):
                    import matplotlib.pyplot as plt

                    plt.close(item)
        return self


@contextmanager
def figures_closed() -> Iterator[None]:
    """Inside, a run of the step cut short after its model's calls (the first stage learning them): the matplotlib
    figures it opened are closed (its code after the model, which would log and close them, does not run here)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    before = set(pyplot.get_fignums()) if pyplot is not None else set()
    try:
        yield
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        for number in set(pyplot.get_fignums()) - before if pyplot is not None else ():
            pyplot.close(number)


def _is_figure(value: Any) -> bool:
    return type(value).__module__.startswith("matplotlib.figure")


def without_figures(path: list[str], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[str], list[Any],
                                                                                        dict[str, Any]]:
    """A logger call's ``path`` and arguments with each matplotlib figure drawn into an image (a ``(height, width,
    3)`` uint8 array) and closed: a figure cannot travel to rank 0, and left open on the last stage, one per run of
    the step, they piled up (found by review: pytorch-forecasting's prediction plots). TensorBoard's ``add_figure``
    becomes the ``add_image`` (``add_images`` for a list) it would make of them."""
    if not any(_is_figure(value) or isinstance(value, list) and value and all(_is_figure(item) for item in value)
               for value in (*args, *kwargs.values())):
        return path, args, kwargs
    import numpy as np

    def drawn(value: Any) -> Any:
        if isinstance(value, list) and value and all(_is_figure(item) for item in value):
            return np.stack([drawn(item) for item in value])
        return _drawn(value) if _is_figure(value) else value

    args, kwargs = [drawn(value) for value in args], {key: drawn(value) for key, value in kwargs.items()}
    if path and path[-1] == "add_figure":  # (tag, figure, global_step=None, close=True, walltime=None)
        named = dict(zip(("tag", "figure", "global_step", "close", "walltime"), args))
        named.update(kwargs)
        images = named.pop("figure")
        named.pop("close", None)
        many = isinstance(images, np.ndarray) and images.ndim == 4
        return ([*path[:-1], "add_images" if many else "add_image"], [],
                {**named, "img_tensor": images, "dataformats": "NHWC" if many else "HWC"})
    return path, args, kwargs


def _drawn(figure: Any) -> Any:
    """``figure`` drawn into an RGB array, then closed."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


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
        from lightning.fabric.loggers import logger as fabric_logger
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        dummy = fabric_logger._DummyExperiment
        fabric_logger._DummyExperiment = lambda: _Dropped()  # type: ignore[assignment,misc]
        rank = getattr(rank_zero_only, "rank", None)
        if rank == 0:
            rank_zero_only.rank = 1
        # (the step's code asking is_global_zero is answered as the first stage, rank 0's, on every rank)
        self._module.print = lambda *args, **kwargs: None
        try:
            with self._as_first_stage():
                yield
        finally:
            fabric_logger._DummyExperiment = dummy  # type: ignore[misc]
            del self._module.print
            if rank == 0:
                rank_zero_only.rank = rank

    @contextmanager
    def _as_first_stage(self) -> Iterator[None]:
        """The strategy's ``answering_as_first_stage`` (the step's code asking its rank gets the pipeline's first
        stage's), where the module is attached to a pipeline's Trainer; :func:`in_step_code` says True inside."""
        trainer = getattr(self._module, "_trainer", None)
        answering = getattr(getattr(trainer, "strategy", None), "answering_as_first_stage", None)
        _STEP_CODE[0] += 1
        try:
            with answering() if answering is not None else nullcontext():
                yield
        finally:
            _STEP_CODE[0] -= 1

    def take(self) -> list[Call]:
        calls, self.calls = self.calls, []
        return calls

    def make(self, calls: Sequence[Call]) -> None:
        """Make ``calls`` (recorded on the last stage) on this rank's loggers: on rank 0, where they log."""
        loggers = list(self._loggers())
        for index, path, args, kwargs in calls:
            if index == _PRINT:
                self._module.print(*args, **kwargs)
            else:
                made_on_loggers(loggers, (index, path, args, kwargs), "the step's")


def made_on_loggers(loggers: Sequence[Any], call: Call, whose: str) -> None:
    """Make ``call`` (recorded elsewhere) on ``loggers``, on rank 0; a failure is warned of (``whose`` call), never
    raised: rank 0 alone makes the calls, and an error there alone would leave the other ranks waiting."""
    index, path, args, kwargs = call
    try:
        target: Any = loggers[index]
        for name in path:
            target = getattr(target, name)
        target(*args, **kwargs)
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"{whose} call self.logger.{'.'.join(path)}(...) failed on rank 0, where the pipeline makes "
                      f"it: {type(error).__name__}: {error}", stacklevel=3)


def _log_methods(logger: Any) -> list[str]:
    """The public ``log_*`` methods of ``logger`` (``log_image``, ``log_text``, ...) a step may call itself."""
    return [name for name in dir(type(logger)) if name.startswith("log_") and callable(getattr(type(logger), name))
            and not isinstance(getattr(type(logger), name), property)]
