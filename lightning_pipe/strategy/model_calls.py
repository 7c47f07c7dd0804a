"""A step's calls of the pipelined model: their inputs on the first stage, their outputs on the last.

The first stage runs a step only to learn what it gives the model. The first time it runs a step (per step name) it
learns how many calls the step makes: each call's input is recorded and answered by a :class:`Pending` output, and
the step goes on; computing with a pending output gives another, so a siamese network's, SimCLR's or a bi-encoder's
second call is recorded too, pooled first output and all; needing a pending value (``if``, ``.item()``, printing) or
returning ends that run. (The module's torchmetrics are neither updated nor left changed; the runner undoes what the
step changed on the module.) From then on the run stops right at the step's last call, as it stops at the only call
of most steps: code after the model never runs on the first stage. The calls' inputs are the micro-batch's input,
one call's as it is, several as :class:`~lightning_pipe.engine.calls.Calls` (every stage runs its layers on each in
turn). The last stage runs the step whole, each call returning its output. A call on an earlier call's output cannot
be known ahead: the run ends before it, and the last stage, seeing one call more than it was sent, says so.
"""

from __future__ import annotations

import collections
import copy
import itertools
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.engine.calls import Calls
from lightning_pipe.strategy.logs import MetricTracker

__all__ = ["Pending", "ModelCalls", "Stop"]


class Stop(BaseException):
    """The step needs a value of a model output the first stage does not have (a BaseException, so that a user's
    ``except Exception`` lets it pass): the calls before it are the micro-batch's input."""


_KEPT = ("a value computed from the model's output on the first stage, which never computes it (a stand-in from "
         "its run of the step up to the model), was kept by the step in an object the strategy does not follow and "
         "used later. Keep what a step collects in the module's own attributes (lists, dicts, tensors, numbers: "
         "those every rank receives from the last stage), or in a torchmetrics Metric")
_capturing = [0]  # runs of a step up to the model in progress in this process


def _pending(*_: Any, **__: Any) -> Pending:
    if not _capturing[0]:
        raise RuntimeError(_KEPT)
    return Pending()


def _stop(*_: Any, **__: Any) -> Any:
    if not _capturing[0]:
        raise RuntimeError(_KEPT)
    raise Stop()


def _ignore(*_: Any, **__: Any) -> None:
    return None


class Pending:
    """A model output on the first stage, which never computes it. Computing with it gives another (``z.mean()``,
    ``F.normalize(out.last_hidden_state[:, 0])``), so that a step pooling each call's output before the next call
    goes on to that call; needing its value (``if``, ``float``, ``len``, printing) ends the step's run there."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # a protocol probed by name (copy, pickle, NumPy): none is offered
            raise AttributeError(name)
        return _pending()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _pending()

    def __repr__(self) -> str:
        return "Pending(the model's output, computed by the last stage)"


for _name in ("__getitem__", "__call__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
              "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__matmul__",
              "__rmatmul__", "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__invert__", "__and__",
              "__rand__", "__or__", "__ror__", "__xor__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
              "__iadd__", "__isub__", "__imul__", "__itruediv__"):
    setattr(Pending, _name, _pending)
for _name in ("__iter__", "__len__", "__bool__", "__float__", "__int__", "__index__", "__complex__", "__contains__",
              "__array__", "__format__", "__str__"):
    setattr(Pending, _name, _stop)
Pending.__setitem__ = _ignore  # type: ignore[method-assign]
Pending.__setattr__ = _ignore  # type: ignore[method-assign,assignment]
Pending.__hash__ = object.__hash__  # type: ignore[method-assign,assignment]


_LIBRARIES = ("torch", "lightning", "pytorch_lightning", "torchmetrics", "numpy", "transformers", "builtins")


class _Objects:
    """The module's attributes that hold objects the runner's :class:`~.step_effects.StepEffects` does not follow (a
    ``deque``, a ``set``, an average meter of the user's own class), copied now and put back in place by
    :meth:`restore`: code after a call, run on pending outputs, leaves them as they were. The module's submodules,
    tensors and trainer are referred to by the copies, never copied."""

    def __init__(self, module: nn.Module) -> None:
        self.saved: list[tuple[Any, Any]] = []
        shared: dict[int, Any] = {}
        for child in module.modules():
            shared[id(child)] = child
            shared.update((id(t), t) for t in itertools.chain(child.parameters(False), child.buffers(False)))
        for name, value in vars(module).items():
            if name.startswith("_") or not _followed_elsewhere(value):
                continue
            try:
                self.saved.append((value, copy.deepcopy(value, dict(shared))))
            except Exception:  # noqa: BLE001 - an object that cannot be copied is left to the step
                continue

    def restore(self) -> None:
        for value, saved in self.saved:
            if isinstance(value, (collections.deque, set)):
                value.clear()
                value.extend(saved) if isinstance(value, collections.deque) else value.update(saved)
            elif hasattr(value, "__dict__"):
                vars(value).clear()
                vars(value).update(vars(saved))


def _followed_elsewhere(value: Any) -> bool:
    """Whether ``value`` is a plain object of the user's (or a deque or a set) that only :class:`_Objects` follows."""
    if isinstance(value, (collections.deque, set)):
        return True
    kind = type(value)
    data = (torch.utils.data.Dataset, torch.utils.data.DataLoader, torch.utils.data.Sampler)  # large, and not state
    return (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type, *data))
            and not callable(value) and kind.__module__.split(".")[0] not in _LIBRARIES)


def _holds_pending(value: Any) -> bool:
    if isinstance(value, Pending):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_pending(item) for item in value)
    if isinstance(value, Mapping):
        return any(_holds_pending(item) for item in value.values())
    return False


class ModelCalls:
    """The calls a stand-in of the pipelined model answers within one step: ``capture`` records their inputs
    (first stage), ``output`` hands out their outputs in call order (last stage)."""

    def __init__(self, where: str, module: nn.Module | None = None, expected: dict[str, int] | None = None) -> None:
        self.where = where  # the model, for messages
        self.module = module  # the LightningModule whose step calls it (its metrics are kept as they were)
        self.expected = {} if expected is None else expected  # step name -> its calls, once learned
        self._metrics: MetricTracker | None = None
        self._limit: int | None = None  # capture: the calls after which the run stops
        self.mode: str | None = None  # "capture", "output", or None outside a step
        self.recorded: list[Any] = []  # capture: each call's input
        self.output: Any = None  # output: the pipeline's output, Calls for several calls
        self.calls = 0  # output: the calls answered so far

    def capture(self, run: Callable[[], Any], step: str) -> list[Any] | None:
        """Run ``step`` (``run``) up to its calls of the model, recorded; their inputs, or None if it never called
        it. An error after a call ends the run too (the first stage needs only the inputs; the last stage runs the
        step whole and meets the error if it is real)."""
        self.mode, self.recorded, self._limit = "capture", [], self.expected.get(step)
        learning = self._limit is None
        pending = learning or self._limit > 1  # code runs after a call: between the calls, or while learning
        if pending and self._metrics is None and self.module is not None:
            self._metrics = MetricTracker(self.module)
        metrics = self._metrics.metrics if pending and self._metrics is not None else {}
        kept = self._metrics.untouched() if metrics else nullcontext()  # type: ignore[union-attr]
        objects = _Objects(self.module) if pending and self.module is not None else None
        _capturing[0] += 1
        try:
            with kept:
                for metric in metrics.values():  # an update would read the pending output's values
                    metric.forward = metric.update = _pending  # type: ignore[method-assign]
                try:
                    run()
                finally:
                    for metric in metrics.values():
                        del metric.forward, metric.update
        except Stop:
            pass
        except Exception:
            if not self.recorded:
                raise
        finally:
            _capturing[0] -= 1
            self.mode = None
            if objects is not None:
                objects.restore()
        recorded, self.recorded = self.recorded, []
        if learning and recorded:
            self.expected[step] = len(recorded)
        return recorded or None

    def record(self, value: Any) -> Pending:
        """Note a call's input and answer it; a call on an earlier call's output ends the run before it, and the
        step's last call (once known) right after it."""
        if _holds_pending(value):
            raise Stop()
        self.recorded.append(value)
        if self._limit is not None and len(self.recorded) >= self._limit:
            raise Stop()
        return Pending()

    @staticmethod
    def as_input(recorded: list[Any]) -> Any:
        """The pipeline's input for the recorded calls: one call's as it is, several as :class:`Calls`."""
        return recorded[0] if len(recorded) == 1 else Calls(tuple(recorded))

    def serve(self, output: Any) -> None:
        """The last stage: answer the step's calls with ``output`` (the pipeline's output)."""
        self.mode, self.output, self.calls = "output", output, 0

    @property
    def answered(self) -> bool:
        """Whether the step has made every call the pipeline ran (code before the last call, whose inputs only the
        first stage needs, is deferred until then: :class:`~.deferred.DeferredCalls`)."""
        return self.calls >= (len(self.output.each) if isinstance(self.output, Calls) else 1)

    def answer(self) -> Any:
        """The output of the step's next call."""
        self.calls += 1
        outputs = self.output.each if isinstance(self.output, Calls) else (self.output,)
        if self.calls > len(outputs):
            sent = f"{len(outputs)} call{'s' if len(outputs) > 1 else ''}"
            raise RuntimeError(f"the step calls {self.where} once more than the first stage saw ({sent}): before "
                               f"call {self.calls} it needs a value of an earlier call's output, which the first "
                               f"stage does not have (the call's input is computed from it, an `if` or `.item()` reads "
                               f"it, or the step fails there without it). A pipeline learns every call's input before "
                               f"it runs the model: compute the inputs first, then call the model on each "
                               f"(z1, z2 = self.model(x1), self.model(x2)), and read the outputs after the last call")
        return outputs[self.calls - 1]

    def finish(self, never_called: str) -> None:
        """After the last stage's step: it made as many calls as the pipeline ran (``never_called``: the message for
        none)."""
        made, outputs = self.calls, self.output
        self.mode, self.output = None, None
        expected = len(outputs.each) if isinstance(outputs, Calls) else 1
        if made == 0:
            raise RuntimeError(never_called)
        if made < expected:
            raise RuntimeError(f"the step calls {self.where} {made} time(s) on the last stage but {expected} times "
                               f"on the first: a step must call the model the same way on every run of the same "
                               f"batch (no branching on the model's outputs or on which rank runs it)")

    def reset(self) -> None:
        self.mode, self.output = None, None
