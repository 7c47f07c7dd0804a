"""Keeping a captured model's graphs true to each step: the captures made at set-up and those a step needs (a new mode,
a new shape), each agreed on by every rank, after refusing what changed since that the graphs cannot follow (plain
values the forward read, hooks of the user's on its modules)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torchmetrics import Metric

from lightning_pipe.capture import Splitter
from lightning_pipe.capture.assignments import changed_fields, changed_reads, fields_warning, read_advice
from lightning_pipe.capture.graph_rows import known_rows
from lightning_pipe.capture.patterns import autocast_state
from lightning_pipe.engine.kept import kept_buffers, kept_modes
from lightning_pipe.engine.microbatch import batch_rows, owned
from lightning_pipe.engine.tree import tree_flatten
from lightning_pipe.strategy.carried import CarriedRows
from lightning_pipe.strategy.failures import raise_together
from lightning_pipe.strategy.model_calls import ModelCalls
from lightning_pipe.strategy.pipelined_model import PipelinedModel
from lightning_pipe.strategy.step_effects import StepEffects
from lightning_pipe.strategy.unfollowed import users_hooks

__all__ = ["CaptureKeeping", "no_logging"]

_SHAPES_KEPT = 4096  # micro-batch shapes remembered as checked against the captures


class CaptureKeeping:
    """The captures of :class:`~.captured.CapturedModule` (a mixin of it): :meth:`capture_first` at set-up,
    :meth:`prepare` before each step."""

    module: nn.Module
    model: nn.Module
    root: bool
    splitter: Splitter
    calls: ModelCalls
    carried: CarriedRows
    proxy: PipelinedModel | None
    group: Any
    collective_device: torch.device
    modes: frozenset[str]
    _seen: set[tuple[str, bool, tuple, tuple, frozenset[str]]]
    _call_modes: dict[tuple, frozenset[str]]
    _shapes_seen: set[tuple]
    _fields_warned: set[str]
    _hooks_seen: dict[str, frozenset[tuple[str, int]]] | None
    where: str
    training: bool
    segments: list
    model_calls: Callable[..., list[tuple[tuple, dict[str, Any]]]]
    modes_now: Callable[[], frozenset[str]]
    _mark_stored: Callable[[], None]

    def _capture_calls(self, step: str, microbatch: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
                       training: bool) -> None:
        """Capture the model from each of ``step``'s calls of it on ``microbatch``; where the step unpacked an output
        whose structure no capture knew yet (``z1, p1 = self.model(x1)`` before a second call), run it again with
        the structures now known, until no new call shows."""
        captured, pristine = 0, owned(microbatch)  # (each run gets the micro-batch as the step was given it: its
        # code may change it, batch.pop("labels"))
        while True:
            calls = self.model_calls(step, microbatch if not captured else owned(pristine), args, kwargs)
            for call_args, call_kwargs in calls[captured:]:
                with known_rows(batch_rows(pristine, microbatch=True)):
                    self.splitter.capture(call_args, call_kwargs, training=training)
                self._mark_stored()
            if not self.calls.unpacked or len(calls) <= captured:
                return
            captured = len(calls)

    def capture_first(self, step: str, microbatch: Any, training: bool) -> None:
        """Capture from ``step``'s call of the model on ``microbatch`` (every rank, at setup); errors and ranks that
        cut differently are raised on every rank."""
        before = self.modes_now()

        def make() -> None:
            with torch.random.fork_rng(devices=[]), no_logging(self.module), \
                    kept_buffers([self.module], skip=self.model), kept_modes([self.module, self.model]):
                try:
                    self._capture_calls(step, microbatch, (0,), {}, training)
                except AttributeError as error:  # (found by review: a scheduler made in on_fit_start)
                    _made_later(error, self.module, step)
                    raise

        self._agree(make, f"capturing {self.where}")
        self._hooks_seen = _user_hooks(self.model, self.proxy)  # what the graphs run: changes are refused from here
        for capture in self.splitter.captures:  # made before any hook ran: a later one for the same inputs replaces it
            capture.provisional = True
        key = (step, training, autocast_state(), self.carried.pattern(), before)
        self._call_modes[key] = self.splitter.cache.modes
        self._seen.add(key)
        self._shapes_seen.add((key, _shapes(microbatch)))

    def prepare(self, step: str, microbatches: Sequence[Any], args: Sequence[Any], kwargs: Mapping[str, Any],
                context: Callable[[int], Any]) -> None:
        """Make the captures this step needs (:meth:`_prepare`), after refusing what changed since the last step that
        the graphs cannot follow: plain values the forward read, and the hooks of yours on the model's modules."""
        self._check_reads()
        self._check_hooks()
        self._prepare(step, microbatches, args, kwargs, context)

    def _check_hooks(self) -> None:
        """Refuse forward or backward hooks of the user's added to or removed from the model's modules since its capture
        at set-up (a hook registered in on_train_start, a warm-up hook's handle.remove()): the graphs were captured with
        the hooks there were then, and keep running them as they were (found by review: 0.87 and 0.45 off one
        device, silently)."""
        seen, now = self._hooks_seen, _user_hooks(self.model, self.proxy)
        if seen is None:  # no capture at set-up: from the first step's
            self._hooks_seen = now
            return
        # by the hooks themselves: a module's name may change with the cut (a block repeated under two names)
        hooks_now, hooks_seen = frozenset().union(*now.values()), frozenset().union(*seen.values())
        if hooks_now == hooks_seen:
            return
        added = sorted({name or "the model" for name, hooks in now.items() if hooks & (hooks_now - hooks_seen)})
        removed = sorted({name or "the model" for name, hooks in seen.items() if hooks & (hooks_seen - hooks_now)})
        raise ValueError(f"hooks of yours were {'added to ' + ', '.join(added) if added else ''}"
                         f"{' and ' if added and removed else ''}"
                         f"{'removed from ' + ', '.join(removed) if removed else ''} of {type(self.model).__name__} "
                         f"after it was captured (when the Trainer set the strategy up, before on_fit_start): under "
                         f"PipelineStrategy its forward runs as a graph captured once, with the hooks it had then, so "
                         f"the change would be ignored (one device runs them as they are at each call). Register hooks "
                         f"in __init__, setup() or configure_model and keep them; a hook "
                         f"that should act for a while only can read a buffer (self.register_buffer('on', "
                         f"torch.tensor(1.0)), set with self.on.fill_(0.0)) and scale what it changes by it")

    def _prepare(self, step: str, microbatches: Sequence[Any], args: Sequence[Any], kwargs: Mapping[str, Any],
                 context: Callable[[int], Any]) -> None:
        """Make the captures this step needs on every rank: the first micro-batch's when the step or the mode
        (train/eval, autocast) is new (``predict_step`` may call the model without the labels ``validation_step``
        passes); every micro-batch's pattern when the captures are static (one per shape); and when a symbolic
        capture fixed some size, that of each micro-batch whose tensors' shapes are new (a new sequence length is
        captured anew)."""
        assert self.proxy is not None
        # each evaluation dataloader's step may call the model its own way (labels for one, none for another)
        loader = args[1] if step != "training_step" and len(args) > 1 and type(args[1]) is int and args[1] else None
        key = (step if loader is None else f"{step}:{loader}", self.training, autocast_state(), self.carried.pattern(),
               self.modes_now())
        self.modes = self.splitter.cache.modes = self._call_modes.get(key, key[4])
        for segment in self.segments:  # a segment picks its graph by its own mode
            if segment.training != key[1]:
                segment.train(key[1])
        captures = self.splitter.captures
        new_shapes: dict[tuple, int] = {}  # (key, a micro-batch's shapes) not checked yet -> its first micro-batch
        if not all(capture.dynamic for capture in captures):
            picked = list(range(len(microbatches)))  # one capture per shape
        elif all(capture.serves_every_size for capture in captures):
            if key in self._seen:
                return self._served(key[1])
            picked = [0]
        else:  # symbolic, but some sizes fixed: each micro-batch whose tensors' shapes are new (cheap to tell)
            for index, microbatch in enumerate(microbatches):
                shapes = (key, _shapes(microbatch))
                if shapes not in self._shapes_seen:
                    new_shapes.setdefault(shapes, index)
            if not new_shapes:
                return self._served(key[1])
            picked = list(new_shapes.values())
        before = [id(capture) for capture in captures]

        def make() -> None:
            effects = StepEffects(self.module, lambda: [self.model])  # what the step's code changes: undone (a
            for index in picked:  # running mean it updates would be updated twice)
                with effects.undone(), context(index), kept_buffers([self.module], skip=self.model):
                    self._capture_calls(step, microbatches[index], args, kwargs, key[1])

        error: BaseException | None = None
        try:
            make()
        except Exception as caught:  # noqa: BLE001 - raised on every rank below
            error = caught
        after = [id(capture) for capture in self.splitter.captures]
        if error is not None or after != before:
            self._agree(None, f"capturing {self.where}", error)
        # the step's own code may set modes before its call (self.backbone.eval()): its calls run in those
        self.modes = self._call_modes[key] = self.splitter.cache.modes
        if not set(before) <= set(after):  # a provisional capture was replaced: its inputs are captured anew
            self._seen.clear()
            self._shapes_seen.clear()
        self._served(key[1])
        self._seen.add(key)
        if len(self._shapes_seen) > _SHAPES_KEPT:  # ragged batches make new shapes every step: a cache, not a log
            self._shapes_seen.clear()
            self._seen.clear()
        self._shapes_seen.update(new_shapes)

    def _served(self, training: bool) -> None:
        """This mode's captures made at setup have served a step, as the step's inputs are: none is replaced now."""
        for capture in self.splitter.captures:
            if capture.training == training:
                capture.provisional = False

    def _check_reads(self) -> None:
        """Refuse a plain attribute the captured forward read (a temperature, a dropout's ``p``; not a flag of a module
        of the model) that was changed since (an annealing hook): the graphs keep the value it had then
        (:func:`~.assignments.changed_reads`). The
        model's own forward reads the LightningModule's attributes through a twin (:func:`_twin`), which a change
        made on the module does not reach: those are read on the module."""
        twin = self.model if self.root else None
        # a flag of the model's modules (a callback's bn.track_running_stats = False) has graphs of each value
        # (:meth:`~lightning_pipe.capture.Splitter.follow_modes`)
        # (a torchmetrics metric's states, which the step's update replaces, are the metric tracker's: not read by a
        # forward that only holds the metric)
        reads = [read for read in self.splitter.reads.values()
                 if (type(read.value) is not bool or read.module is twin) and not issubclass(type(read.module), Metric)]
        found = changed_reads(reads, lambda m: self.module if m is twin else m)
        if found:
            raise ValueError(read_advice(type(self.model).__name__, found))
        fields = [field for field in changed_fields(reads) if field not in self._fields_warned]
        if fields:
            self._fields_warned.update(fields)
            warnings.warn(fields_warning(type(self.model).__name__, fields), stacklevel=2)

    def _agree(self, make: Callable[[], None] | None, what: str, error: BaseException | None = None) -> None:
        """Run ``make`` here; raise its error (or another rank's) on every rank; then check that every rank's newest
        capture has the same digest (its cut, live values, state and ops)."""
        if make is not None:
            try:
                make()
            except Exception as caught:  # noqa: BLE001 - raised on every rank below
                error = caught
        raise_together(error, what, self.group, self.collective_device)
        digest = self.splitter.captures[-1].digest.encode()
        mine = torch.frombuffer(bytearray(digest.ljust(16)[:16]), dtype=torch.uint8).to(self.collective_device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, mine, group=self.group)
        digests = [bytes(part.cpu().tolist()).decode() for part in parts]
        if len(set(digests)) > 1:
            raise RuntimeError(f"the ranks captured {type(self.model).__name__} differently (digests by pipeline rank: "
                               f"{digests}), so their stages would not fit together: every rank must build the same "
                               f"model (same config, same code version) and call it with the same batch")


def _shapes(microbatch: Any) -> tuple:
    """The dtypes and shapes of a micro-batch's tensors: micro-batches alike in them call the model alike."""
    return tuple((t.dtype, tuple(t.shape)) for t in tree_flatten(microbatch)[0])


def _user_hooks(*roots: nn.Module | None) -> dict[str, frozenset[tuple[str, int]]]:
    """Each module of the ``roots`` (by name; the model and its stand-in, whose parts a hook may be registered on)
    -> the hooks of the user's it carries, as (table, handle id)."""
    found: dict[str, frozenset[tuple[str, int]]] = {}
    for root in roots:
        for name, module in root.named_modules() if root is not None else ():
            found[name] = found.get(name, frozenset()) | users_hooks(module)
    return found


def _made_later(error: AttributeError, module: nn.Module, step: str) -> None:
    """An attribute of the LightningModule missing when its step runs at set-up, for the capture: say that this run
    comes before the hooks that start the run (``on_fit_start``, ``on_train_start``), where the module may make it."""
    message = str(error)
    if message.startswith(f"'{type(module).__name__}' object has no attribute") \
            and "PipelineStrategy ran" not in message:
        stage = {"training_step": "fit_start and on_train", "validation_step": "validation",
                 "test_step": "test", "predict_step": "predict"}.get(step, "fit")
        error.args = (f"{message} (raised while PipelineStrategy ran {step} on the first micro-batch as the Trainer "
                      f"set it up, to capture the model: before on_{stage}_start, so what that hook makes for the step "
                      f"does not exist yet. Make it in __init__ or setup(), which run before)",
                      *error.args[1:])


@contextlib.contextmanager
def no_logging(module: nn.Module) -> Any:
    """``self.log`` does nothing while a step runs only up to its model (no loop collects logs at setup)."""
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log
