"""A step's calls of the pipelined model: their inputs on the first stage, their outputs on the last.

The first stage runs a step only to learn what it gives the model. Each call's input is recorded and answered by a
:class:`Pending` stand-in, and the step goes on; the first use of a stand-in (``loss = F.mse_loss(z1, z2)``) ends
the run. A call whose output's structure a capture of the model knows (a tuple, a dict, a Hugging Face output) is
answered by that structure of stand-ins, so that the step may unpack it (``z1, p1 = self.model(x1)``, SimSiam's) and
go on to its next call; one whose structure is not known (an ``nn.Sequential``'s; a captured model's at set-up,
before its capture) is an :class:`Unknown`, which may be indexed (``["sentence_embedding"]``) or read by field, and
whose unpacking ends the run as unpacked: the calls are captured and the step run again. So a siamese network's,
SimCLR's or a triplet loss's calls, made before their outputs are used, are all recorded. The first run of each step
(per step name and dataloader) learns how many calls it makes; later runs stop right at the last one, as at the only
call of most steps: code after the model never runs on the first stage but in that first run, and there only up to
the first use of an output. The calls' inputs are the micro-batch's input, one call's as it is, several as
:class:`~lightning_pipe.engine.calls.Calls` (every stage runs its layers on each in turn). The last stage runs the
step whole, each call returning its output. A call whose input needs an earlier call's output (pooled first, or
read) cannot be known ahead: the run ends before it, and the last stage, seeing one call more than it was sent, says
how to reorder the step.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
from lightning.pytorch import LightningModule

from lightning_pipe.capture.patterns import autocast_state
from lightning_pipe.engine.calls import Calls
from lightning_pipe.engine.tree import tree_flatten, tree_map_tensors
from lightning_pipe.strategy.deferred import LazyValue
from lightning_pipe.strategy.logger_calls import figures_closed
from lightning_pipe.strategy.metric_states import MetricTracker

__all__ = ["SKIPPED_BATCHES", "other_modes", "Pending", "Unknown", "ModelCalls", "Stop", "call_key", "capturing",
           "refuse_other_weights"]

SKIPPED_BATCHES = (". The step must call it at every batch: every stage runs the model for each batch, so a step that "
                   "returns before it on some (validating every other batch) cannot be pipelined; skip batches with "
                   "limit_val_batches or a sampler (torch.utils.data.Subset) instead, or call the model and leave its "
                   "output unused")


class Stop(BaseException):
    """The step needs a value of a model output the first stage does not have (a BaseException, so that a user's
    ``except Exception`` lets it pass): the calls before it are the micro-batch's input."""


_KEPT = ("a value computed from the model's output on the first stage, which never computes it (a stand-in from "
         "its run of the step up to the model), was kept by the step in an object the strategy does not follow and "
         "used later. Keep what a step collects in the module's own attributes (lists, dicts, tensors, numbers: "
         "those every rank receives from the last stage), or in a torchmetrics Metric")
_capturing = [0]  # runs of a step up to the model in progress in this process
_unpacked = [False]  # the run in progress ended at the unpacking of an output whose structure is not known


_LIBRARY_ADVICE = {  # what to do where a library's function makes the calls (found by review)
    "sliding_window_inference": "it calls the model on sw_batch_size windows at a time and adds each call's output "
                                "into the images' before the next call: give it an sw_batch_size of at least the "
                                "windows of a batch (its images times the windows of an image: every window in one "
                                "call, as one device computes them), or run it after training on one device",
}


def _library_calls() -> str:
    """Where an installed package's function (not torch's, Lightning's, this package's nor Python's) makes the
    model's call in progress, which the step cannot reorder (MONAI's ``sliding_window_inference``): a sentence naming
    it, with what to do where that is known; empty where the step's own code makes the call."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        top, code = module.split(".")[0], frame.f_code
        owner = frame.f_locals.get("self")
        if top in _OURS or top in sys.stdlib_module_names or code.co_filename.startswith("<") \
                or code.co_name == "<lambda>":  # (torch's call of a module; a predictor=lambda x: self.net(x))
            frame = frame.f_back
            continue
        if isinstance(owner, LightningModule) and code.co_name != "forward":  # the step's own code
            return ""
        if isinstance(owner, nn.Module):  # a module around the pipelined one (MONAI's UNet holding its
            # nn.Sequential; the LightningModule's forward handed to the inferer as its predictor): the caller of
            # the model is further out (found by review)
            frame = frame.f_back
            continue
        path = os.path.abspath(code.co_filename)
        if os.sep + "site-packages" + os.sep not in path and os.sep + "dist-packages" + os.sep not in path:
            return ""
        advice = _LIBRARY_ADVICE.get(code.co_name, "call it so that it calls the model once per step, or run it "
                                                   "after training on one device")
        return f". Here {module}.{code.co_name}, a library's code, makes the calls: {advice}"
    return ""


def _outside_transforms(where: str) -> None:
    """Refuse a call of the pipelined model inside a torch.func transform (``torch.func.vmap(self.net)(x)``: found by
    review, a crash deep in functorch as the first stage ran its layers on a tensor that escaped the transform)."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(f"the step calls {where} inside a torch.func transform (vmap, grad, jacrev, jvp): a "
                           f"pipeline runs the model on its stages apart from the step's code, where the transform "
                           f"does not reach. Call it on the batch itself (its rows already run side by side, as vmap "
                           f"runs them); per-row gradients or Jacobians of the model cannot be pipelined: train such "
                           f"a model on one device or with DDP")


_OURS = ("torch", "lightning", "pytorch_lightning", "lightning_pipe", "lightning_fabric")


def _training() -> bool:  # a module-level function, not a lambda: the stand-ins holding calls pickle
    return True


def capturing() -> bool:
    """Whether a run of a step up to the model is in progress (the first stage's: code before the model's call)."""
    return _capturing[0] > 0


def _stop(*_: Any, **__: Any) -> Any:
    if not _capturing[0]:
        raise RuntimeError(_KEPT)
    raise Stop()


class Pending:
    """A model output on the first stage, which never computes it: any use of it ends the step's run there."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # a protocol probed by name (copy, pickle, NumPy): none is offered
            raise AttributeError(name)
        return _stop()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _stop()

    def __repr__(self) -> str:
        return "Pending(the model's output, computed by the last stage)"


class Unknown(Pending):
    """A model output whose structure is not known yet (an ``nn.Sequential``'s, or before a capture of the call):
    indexing it or reading an attribute gives another (``self.model(a)["sentence_embedding"]``, sentence-transformers'
    own; ``out.logits``), as that needs no value; unpacking it ends the run as unpacked (:meth:`ModelCalls.capture`),
    to be run again once captured."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _part()


def _part(*_: Any, **__: Any) -> Any:
    if not _capturing[0]:
        raise RuntimeError(_KEPT)
    return Unknown()


def _unpack(*_: Any, **__: Any) -> Any:
    if _capturing[0]:
        _unpacked[0] = True
    return _stop()


for _name in ("__getitem__", "__setitem__", "__call__", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__",
              "__rmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__",
              "__matmul__", "__rmatmul__", "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__invert__",
              "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__lt__", "__le__", "__gt__", "__ge__",
              "__iadd__", "__isub__", "__imul__", "__itruediv__", "__iter__", "__len__", "__bool__", "__float__",
              "__int__", "__index__", "__complex__", "__contains__", "__array__", "__format__", "__str__",
              "__setattr__"):
    setattr(Pending, _name, _stop)
for _name in ("__iter__", "__len__"):
    setattr(Unknown, _name, _unpack)
Unknown.__getitem__ = _part  # type: ignore[method-assign]


def _stand_in(spec: Any) -> Any:
    """Stand-ins in the structure ``spec`` of a model output (a pytree spec), or an :class:`Unknown` for None (or
    a structure whose type will not hold stand-ins)."""
    if spec is None:
        return Unknown()
    try:
        return pytree.tree_unflatten([Pending() for _ in range(spec.num_leaves)], spec)
    except (Stop, Exception):  # noqa: BLE001 - an output type that reads its values when built: not known
        _unpacked[0] = False
        return Unknown()


def call_key(step: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """What the number of a step's calls is learned for: the step and its dataloader (a validation step may call the
    model once for one loader and twice for another). ``args``: the step's arguments after the batch."""
    dataloader = kwargs.get("dataloader_idx", args[1] if len(args) > 1 else 0)
    return f"{step}/{dataloader}"


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
        self.expected = {} if expected is None else expected  # step name and dataloader -> its calls, once learned
        self._metrics: MetricTracker | None = None
        self._limit: int | None = None  # capture: the calls after which the run stops
        self.mode: str | None = None  # "capture", "output", or None outside a step
        self.step = "the step"  # the step being answered (named in errors)
        self.key = ""  # capture: the step's name and dataloader (call_key) of the last run captured
        self.recorded: list[Any] = []  # capture: each call's input
        self.needs_grad = False  # capture: a call's input required grad, with gradients on at the call
        self.output: Any = None  # output: the pipeline's output, Calls for several calls
        self.calls = 0  # output: the calls answered so far
        self.context: tuple[bool, bool, tuple] = (True, True, ())  # output: the step's gradient mode, model mode and
        # autocast state, in which the pipeline ran the calls
        self._training: Callable[[], bool] = _training  # output: the model's mode now
        # capture: the structure of a call's output, from its input (a pytree spec), where a capture knows it
        self.structure: Callable[[Any], Any] | None = None
        self.unpacked = False  # capture: the last run ended at the unpacking of an output of unknown structure
        # output: the sizes besides the rows of the calls' tensors, since taken (:meth:`taken_sizes`): micro-batches
        # whose step gives the model inputs of different lengths (x[:, :lengths.max()]) tell apart here
        self.sizes: dict[int, set[tuple]] = {}  # (by the call's place in the step)

    def capture(self, run: Callable[[], Any], key: str) -> list[Any] | None:
        """Run a step (``run``; ``key``: its name and dataloader) up to its calls of the model, recorded; their
        inputs, or None if it never called it. An error after a call ends the run too (the first stage needs only
        the inputs; the last stage runs the step whole and meets the error if it is real)."""
        self.mode, self.recorded, self._limit, self.needs_grad = "capture", [], self.expected.get(key), False
        self.key = key
        learning = self._limit is None
        if (learning or self._limit > 1) and self._metrics is None and self.module is not None:
            self._metrics = MetricTracker(self.module)
        # code runs after a call here (between the calls, or up to an output's first use while learning): a metric
        # updated there is put back (the last stage updates them)
        kept = self._metrics.untouched() if (learning or self._limit > 1) and self._metrics is not None \
            and self._metrics.metrics else nullcontext()
        _capturing[0] += 1
        _unpacked[0] = False
        try:
            with kept, figures_closed():
                run()
        except Stop:
            pass
        except Exception:
            if not self.recorded:
                raise
        finally:
            _capturing[0] -= 1
            self.mode = None
        recorded, self.recorded = self.recorded, []
        self.unpacked, _unpacked[0] = _unpacked[0], False
        if learning and recorded and not self.unpacked:  # (unpacked: the calls after it are not known yet)
            self.expected[key] = len(recorded)
        return recorded or None

    def record(self, value: Any) -> Pending:
        """Note a call's input and answer it; a call on an earlier call's output ends the run before it, and the
        step's last call (once known) right after it."""
        _outside_transforms(self.where)
        if _holds_pending(value):
            raise Stop()
        # read at the call: an evaluation step's own torch.enable_grad() (a saliency map) has ended by the check
        self.needs_grad |= torch.is_grad_enabled() and any(isinstance(leaf, torch.Tensor) and leaf.requires_grad
                                                           for leaf in tree_flatten(value)[0])
        self.recorded.append(value)
        if self._limit is not None and len(self.recorded) >= self._limit:
            raise Stop()
        return _stand_in(self.structure(value) if self.structure is not None else None)

    @staticmethod
    def as_input(recorded: list[Any]) -> Any:
        """The pipeline's input for the recorded calls: one call's as it is, several as :class:`Calls`."""
        return recorded[0] if len(recorded) == 1 else Calls(tuple(recorded))

    def serve(self, output: Any, training: Callable[[], Any], ran: Any = None, step: str = "the step") -> None:
        """The last stage: answer ``step``'s calls with ``output`` (the pipeline's output, run in the mode ``ran``,
        by default the one ``training()`` says now, with the gradient mode and autocast state of now: the step's).
        A mode is ``training``'s value: the model's (a bool), or that and the modules in the other one."""
        self.mode, self.output, self.calls, self.step = "output", output, 0, step
        self._training = training
        self.context = (torch.is_grad_enabled(), training() if ran is None else ran, autocast_state())

    @property
    def answered(self) -> bool:
        """Whether the step has made every call the pipeline ran (code before the last call, whose inputs only the
        first stage needs, is deferred until then: :class:`~.deferred.DeferredCalls`)."""
        return self.calls >= (len(self.output.each) if isinstance(self.output, Calls) else 1)

    def taken_sizes(self) -> dict[int, set[tuple]]:
        """The sizes besides their rows of the inputs of the calls answered since the last time (emptied), by the
        call's place in its step."""
        sizes, self.sizes = self.sizes, {}
        return sizes

    def answer(self, inputs: Any = None) -> Any:
        """The output of the step's next call (whose ``inputs`` are noted by their sizes besides the rows): detached
        where the step makes it without gradients (``with torch.no_grad():`` targets from the model itself), as one
        device's has none; a call in another mode or autocast state than the pipeline ran it in is an error that
        says so."""
        _outside_transforms(self.where)
        leaves = tree_flatten(inputs)[0] if inputs is not None else []
        if not any(isinstance(leaf, LazyValue) for leaf in leaves):  # (a deferred module's output stays unseen)
            self.sizes.setdefault(self.calls, set()).add(tuple(tuple(leaf.shape[1:]) for leaf in leaves
                                                               if isinstance(leaf, torch.Tensor)))
        grad, ran, autocast = self.context
        now = self._training()
        if now != ran:
            raise RuntimeError(other_modes(self.where, ran, now, self.calls + 1))
        if autocast_state() != autocast:
            raise RuntimeError(f"the step makes call {self.calls + 1} of {self.where} under another autocast than "
                               f"the step's ({_autocast(autocast_state())} where the step runs under "
                               f"{_autocast(autocast)}): a pipeline runs every call of a step under the step's "
                               f"precision. Give it with Trainer(precision='bf16-mixed'), not torch.autocast in the "
                               f"step")
        self.calls += 1
        outputs = self.output.each if isinstance(self.output, Calls) else (self.output,)
        if self.calls > len(outputs):
            sent = f"{len(outputs)} call{'s' if len(outputs) > 1 else ''}"
            raise RuntimeError(f"{self.step} calls {self.where} once more than the first stage saw ({sent}): before "
                               f"call {self.calls} it uses an earlier call's output, which the first stage does not "
                               f"have (pools or reads it, computes the call's input from it, or fails without it), "
                               f"or it makes more calls than in its first run (the number of calls a step makes is "
                               f"learned on its first batch, per dataloader: a loop over windows of a length that "
                               f"varies makes more on a longer batch; make as many on every batch: pad the batches "
                               f"to one length, or give each length a dataloader of its own). A pipeline learns every "
                               f"call's input "
                               f"before it runs the model: make the calls first, then use their outputs "
                               f"(out1, out2 = self.model(**queries), self.model(**documents); then pool each), "
                               f"and where it calls the model again on the same input, call it once and reuse the "
                               f"output (out = self(x)). A "
                               f"loop that decodes a token per call, each on the one before (greedy decoding), "
                               f"cannot run under a pipeline: score teacher-forced outputs in the step (the loss, "
                               f"token accuracy), and decode after training on one device "
                               f"(YourModule.load_from_checkpoint(path)){_library_calls()}")
        output = outputs[self.calls - 1]
        return tree_map_tensors(torch.Tensor.detach, output) if grad and not torch.is_grad_enabled() else output

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
        self.mode, self.output, self._training = None, None, _training


def refuse_other_weights(module: nn.Module, where: str) -> None:
    """Refuse a call of the pipelined model through ``torch.func.functional_call`` (or another reparametrization)
    with tensors in place of its parameters: the stand-in ``module`` holds them only while the call runs, and the
    stages would run their own weights instead, silently."""
    swapped = [name for name, value in module.named_parameters(remove_duplicate=False)
               if not isinstance(value, nn.Parameter)]
    if swapped:
        raise RuntimeError(f"the step calls {where} with tensors in place of its parameters ({', '.join(swapped[:4])}"
                           f"{', ...' if len(swapped) > 4 else ''}): torch.func.functional_call, or another "
                           f"reparametrization (weight perturbation as SAM's, MAML's fast weights). A pipeline runs "
                           f"each stage with the weights it holds, so the given tensors would be ignored. Change the "
                           f"weights in place between optimizer steps instead (a callback's on_before_optimizer_step), "
                           f"or train such a model on one device or with DDP")


def other_modes(where: str, ran: Any, now: Any, call: int = 1) -> str:
    """Why the step's call ``call`` of the model, in mode ``now``, cannot be answered by the pipeline's run in mode
    ``ran`` (each the model's mode, or that and the names of its modules in the other one)."""
    if isinstance(ran, tuple) and ran[0] == now[0]:
        changed = sorted(ran[1] ^ now[1])
        shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        return (f"the step sets the mode of part of {where} ({shown}) before its call {call} of it, otherwise than "
                f"the pipeline ran that call (its stages run the step's calls before the step's code runs): set the "
                f"modes of the model's parts the same way for every batch, before the call (a frozen backbone put in "
                f"eval in __init__, in on_train_epoch_start or at the step's top), not depending on the batch")
    return _other_mode(where, ran[0] if isinstance(ran, tuple) else ran, call)


def _other_mode(where: str, training: bool, call: int) -> str:
    ran, other = ("train", "eval") if training else ("eval", "train")
    example = ("self.model.eval() before the call, as a teacher's pseudo-labels are often made" if training else
               "self.model.train() before it, as Monte Carlo dropout does")
    dropout = "" if training else (
        ". For Monte Carlo dropout, put the dropout layers in train mode in a hook every rank runs before the step, "
        "the model staying in eval (on_predict_epoch_start, on_validation_epoch_start: for m in self.modules(): if "
        "isinstance(m, nn.Dropout): m.train()), and call the model several times in the step: the stages then draw "
        "a mask for each call")
    return (f"the step makes call {call} of {where} in {other} mode ({example}), but a pipeline runs every call of "
            f"a step in the step's mode, {ran}: its stages run the calls before the step's code sets the mode. Call "
            f"the model in the step's mode (under torch.no_grad() for targets: that is honoured), or make such "
            f"outputs with a separate model kept outside the pipeline (an EMA teacher) or in another step{dropout}")


def _autocast(state: tuple) -> str:
    return ", ".join(f"{device} {str(dtype).replace('torch.', '')}" for device, dtype in state) or "none"
