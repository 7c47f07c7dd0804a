"""A step's calls of the pipelined model: their inputs on the first stage, their outputs on the last.

The first stage runs a step only to learn what it gives the model. At each call the stand-in records the call and
returns a :class:`Pending` output, and the step goes on: computing with a pending output gives another, so a siamese
network's, SimCLR's or a bi-encoder's second call is recorded too, pooled first output and all. Needing a pending
value (``if``, ``.item()`` then ``float``, printing) or returning ends the run: every call made before is the
micro-batch's input, one call as it is, several as :class:`~lightning_pipe.engine.calls.Calls` (every stage runs its
layers on each in turn). The module's torchmetrics are left as they were (the last stage updates them). The last stage
runs the step whole, each call returning its output. A call on an earlier call's output cannot be known ahead on the
first stage: it ends the run there, and the last stage, seeing one call more than it was sent, says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch.nn as nn

from lightning_pipe.engine.calls import Calls
from lightning_pipe.strategy.logs import MetricTracker

__all__ = ["Pending", "ModelCalls", "Stop"]


class Stop(BaseException):
    """The step needs a value of a model output the first stage does not have (a BaseException, so that a user's
    ``except Exception`` lets it pass): the calls before it are the micro-batch's input."""


def _pending(*_: Any, **__: Any) -> Pending:
    return Pending()


def _stop(*_: Any, **__: Any) -> Any:
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
        return Pending()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return Pending()

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

    def __init__(self, where: str, module: nn.Module | None = None) -> None:
        self.where = where  # the model, for messages
        self.module = module  # the LightningModule whose step calls it (its metrics are kept as they were)
        self._metrics: MetricTracker | None = None
        self.mode: str | None = None  # "capture", "output", or None outside a step
        self.recorded: list[Any] = []  # capture: each call's input
        self.output: Any = None  # output: the pipeline's output, Calls for several calls
        self.calls = 0  # output: the calls answered so far

    def capture(self, run: Callable[[], Any]) -> list[Any] | None:
        """Run a step (``run``) with every call recorded and answered by a :class:`Pending`; the calls' inputs, or
        None if the step never called the model. An error after a call ends the run too (the first stage needs only
        the inputs; the last stage runs the step whole and meets the error if it is real)."""
        self.mode, self.recorded = "capture", []
        if self._metrics is None and self.module is not None:
            self._metrics = MetricTracker(self.module)
        kept = self._metrics.untouched() if self._metrics is not None and self._metrics.metrics else nullcontext()
        try:
            with kept:  # a metric updated with a pending output would hold it
                run()
        except Stop:
            pass
        except Exception:
            if not self.recorded:
                raise
        finally:
            self.mode = None
        recorded, self.recorded = self.recorded, []
        return recorded or None

    def record(self, value: Any) -> Pending:
        """Note a call's input and answer it; a call on an earlier call's output ends the run before it."""
        if _holds_pending(value):
            raise Stop()
        self.recorded.append(value)
        return Pending()

    @staticmethod
    def as_input(recorded: list[Any]) -> Any:
        """The pipeline's input for the recorded calls: one call's as it is, several as :class:`Calls`."""
        return recorded[0] if len(recorded) == 1 else Calls(tuple(recorded))

    def serve(self, output: Any) -> None:
        """The last stage: answer the step's calls with ``output`` (the pipeline's output)."""
        self.mode, self.output, self.calls = "output", output, 0

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
