"""Pipeline any model the step calls: capture it (:mod:`lightning_pipe.capture`), cut it into segments, and stand in
for it with a proxy that holds this rank's share of its state under the model's own names.

Which model is captured (or whether the ``nn.Sequential`` path runs instead) is :mod:`.model_choice`'s decision.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree
from torchmetrics import Metric

from lightning_pipe.capture import CaptureError, Segment, Splitter
from lightning_pipe.capture.assignments import changed_fields, changed_reads, fields_warning, read_advice
from lightning_pipe.capture.graph_rows import known_rows
from lightning_pipe.capture.patterns import all_match, autocast_state
from lightning_pipe.capture.scalars import MEAN
from lightning_pipe.engine.microbatch import batch_rows, owned
from lightning_pipe.engine.tree import tree_flatten
from lightning_pipe.engine.kept import kept_buffers, kept_modes
from lightning_pipe.strategy.carried import CarriedRows
from lightning_pipe.strategy.deferred import DeferredCalls
from lightning_pipe.strategy.failures import raise_together
from lightning_pipe.strategy.logger_calls import LoggerCalls
from lightning_pipe.strategy.model_calls import SKIPPED_BATCHES, ModelCalls, Stop, call_key, other_modes
from lightning_pipe.strategy.model_choice import largest_owner, owners
from lightning_pipe.strategy.model_parts import ModelPart
from lightning_pipe.strategy.pipelined_model import PipelinedModel
from lightning_pipe.strategy.references import meta_skeleton
from lightning_pipe.strategy.split import load_share, with_grad
from lightning_pipe.strategy.standing_in import redirect_into, release_others, stand_in_for_children
from lightning_pipe.strategy.state_names import parameter_keys, tied_names
from lightning_pipe.strategy.step_effects import StepEffects
from lightning_pipe.strategy.step_values import ROW_MEAN, input_needs_grad
from lightning_pipe.strategy.stored import mark_not_kept
from lightning_pipe.strategy.unfollowed import users_hooks

__all__ = ["CapturedModule", "no_logging"]

_SHAPES_KEPT = 4096  # micro-batch shapes remembered as checked against the captures


def _output_kinds(captures: Sequence[Any], counted: bool = False) -> list[tuple[Any, list[str | int | None]]]:
    """Each output structure the captures give (as :func:`~lightning_pipe.engine.tree.tree_flatten` specs it, with
    its tensors' numbers of dims: :func:`~lightning_pipe.strategy.step_values.output_structure`), with how each of
    its tensors adds up over micro-batches; where captures of one structure disagree on a tensor, not known (None).
    ``counted``: the means that no mean over a count of the inputs' elements reaches (a mean over rows returned beside
    a loss over the labels other than -100) are :data:`~.step_values.ROW_MEAN`, weighted by rows, not by the counts."""
    found: list[tuple[Any, list[str | int | None]]] = []
    for capture in captures:
        if capture.output_kinds is None or capture.output_dims is None or capture.output_markers is None:
            continue
        try:
            leaves, spec = tree_flatten(pytree.tree_unflatten(list(capture.output_markers), capture.out_spec))
            numbers = [int(leaf.reshape(-1)[0]) for leaf in leaves]
            kinds = [capture.output_kinds[number] for number in numbers]
            if counted:
                reached = {index for mean in capture.counted_means if mean.linear for index in mean.outputs}
                kinds = [ROW_MEAN if kind == MEAN and number not in reached else kind
                         for kind, number in zip(kinds, numbers)]
            spec = (spec, tuple(capture.output_dims[number] for number in numbers))
        except Exception:  # noqa: BLE001 - an output this cannot rebuild from stand-ins: not known
            continue
        for index, (other, known) in enumerate(found):
            if other == spec:
                found[index] = (spec, [kind if kind == mine else None for kind, mine in zip(known, kinds)])
                break
        else:
            found.append((spec, kinds))
    return found


def _shapes(microbatch: Any) -> tuple:
    """The dtypes and shapes of a micro-batch's tensors: micro-batches alike in them call the model alike."""
    return tuple((t.dtype, tuple(t.shape)) for t in tree_flatten(microbatch)[0])


def _twin(module: nn.Module) -> nn.Module:
    """A second object of ``module``'s class sharing its submodules, parameters and buffers but none of its hooks: what
    the splitter captures when the model is the module's own ``forward``, while the module itself is cut."""
    twin = object.__new__(type(module))
    twin.__dict__.update(module.__dict__)
    for key in ("_modules", "_parameters", "_buffers"):
        twin.__dict__[key] = dict(module.__dict__[key])
    twin.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    for key, value in module.__dict__.items():
        if "hooks" in key and isinstance(value, dict):
            twin.__dict__[key] = type(value)()
    return twin


class CapturedModule:
    """A LightningModule whose model (any module the step calls) is captured and pipelined as segments.

    The interface is :class:`~.split.SplitModule`'s: :meth:`capture_input` runs a step up to the model and returns
    the first segment's input (the flattened call); :meth:`run_step` runs it with the model returning the last
    segment's output; :meth:`prepare` makes, on every rank, the captures a step needs (a mode seen for the first
    time, or an input shape new to a static capture) and checks that every rank cut alike.
    """

    def __init__(self, module: nn.Module, path: str, split_points: Any = None, group: Any = None,
                 device: torch.device | None = None, allow_autograd_functions: bool = False,
                 dynamic_shapes: bool = True, rematerialized: bool = False) -> None:
        self.module = module
        self.path = path
        self.root = path == ""  # the module's own forward is the model
        self.model = _twin(module) if self.root else module.get_submodule(path)
        self._own_parameters = [name for name, p in self.model._parameters.items() if p is not None]
        self.called = module if self.root else self.model  # what the step calls
        self._kinds: tuple[tuple, list[tuple[Any, list[str | int | None]]]] = ((), [])  # captures, their kinds
        self.state_keys = list(module.state_dict().keys())
        self.parameter_keys = parameter_keys(module)  # one device's, in its order
        self.tied_names = tied_names(module)  # one device's numbering of optimizer states counts a tie once
        self.calls = ModelCalls(self.where, module)  # the step's calls of the model (the proxy's, once cut)
        self.carried = CarriedRows(module)  # states given to the model with the batch's rows
        inside = {id(p) for p in self.model.parameters()}
        self.outside_trainable = [name for name, p in module.named_parameters()
                                  if p.requires_grad and id(p) not in inside]
        try:
            self.splitter = Splitter(self.model, split_points, dynamic=dynamic_shapes,
                                     allow_autograd_functions=allow_autograd_functions, rematerialized=rematerialized)
        except (CaptureError, ValueError) as error:
            raise ValueError(f"split_points for {self.where}: {error}") from None
        self.calls.structure = self._output_structure  # (unpacked by the step on the first stage)
        self.group = group
        self.collective_device = device or torch.device("cpu")
        self.proxy: PipelinedModel | None = None
        self.deferred: DeferredCalls | None = None  # the last stage's calls before the model (install())
        # the model's structure, for checkpoints' hyper-parameters (the module's own forward is in none)
        self.skeleton = None if self.root else meta_skeleton(self.model)
        self.aliases: list[str] = []  # other paths to the model or into it, redirected by install()
        # (step, training, autocast, the module's attributes by kind, its modules in the other mode) captured so far
        self._seen: set[tuple[str, bool, tuple, tuple, frozenset[str]]] = set()
        # such a key -> the modules in the other mode at the step's call of the model (the step may set some: a
        # frozen backbone put in eval before the call); the modes every rank's segments run the step's calls in
        self._call_modes: dict[tuple, frozenset[str]] = {}
        self.modes: frozenset[str] = frozenset()  # those of this step's calls
        self._shapes_seen: set[tuple] = set()  # those with the shapes of a micro-batch's tensors, checked so far
        self._stored: set[str] = set()  # places outside the model where a capture's forward stored tensors
        self._fields_warned: set[str] = set()  # changed fields of config objects the forward read, said once
        self._hooks_seen: dict[str, frozenset[tuple[str, int]]] | None = None  # the user's hooks the graphs run

    @property
    def is_cut(self) -> bool:
        return self.proxy is not None

    @property
    def stored(self) -> bool:
        """Whether a capture's forward stored tensors outside the model (:meth:`_mark_stored`)."""
        return bool(self._stored)

    @property
    def where(self) -> str:
        """The model, for messages."""
        if self.root:
            return f"{type(self.module).__name__}.forward"
        return f"the model at {self.path!r} ({type(self.model).__name__})"

    @property
    def training(self) -> bool:
        """The mode the step runs the model in (Lightning sets the LightningModule's; a user may set the model's)."""
        return self.module.training if self.root or self.proxy is None else self.proxy.training

    def modes_now(self) -> frozenset[str]:
        """The model's switches now: its modules in the other mode than the step's (a frozen backbone's batch norms in
        eval while the model trains), and the flags its forward reads that a callback switched since their capture
        (:meth:`~lightning_pipe.capture.Splitter.follow_modes`); the module's own forward's twin follows the
        module's mode first."""
        if self.root:
            self.model.training = self.module.training
        return self.splitter.switches(self.training)

    def mode(self) -> tuple[bool, frozenset[str]]:
        """The step's mode and the model's modules in the other one, now: what a call of the model runs in."""
        return self.training, self.modes_now()

    @property
    def segments(self) -> list[Segment]:
        return self.splitter.segments()

    def own_unread_parameters(self) -> set[str]:
        """The names of the module's own parameters that its captured forward does not read (a scale the step
        applies): every rank keeps them (:meth:`install`)."""
        return set(self.module._parameters) & self.splitter.unread_state if self.root else set()

    def install(self, local: Sequence[Segment]) -> PipelinedModel:
        """Replace the model by a proxy holding only the state of ``local`` segments (for the module's own forward:
        the module keeps this rank's share of its state, and its ``forward`` becomes the proxy's)."""
        self.proxy = PipelinedModel(local, self.segments, self.model, self.path, self.calls)
        proxy = self.proxy
        self.deferred = DeferredCalls(self.module, lambda child: any(m is proxy for m in child.modules()),
                                      torch.device("cpu"))  # the runner sets the rank's device
        if self.root:
            self.outside_trainable += stand_in_for_children(self.module, self.proxy, self.model, self.segments,
                                                            self.splitter.unread_state, local)
            return self.proxy
        parent_path, _, attribute = self.path.rpartition(".")
        parent = self.module.get_submodule(parent_path) if parent_path else self.module
        setattr(parent, attribute, self.proxy)
        self.aliases = redirect_into(self.module, self.model, self.proxy, self.path)
        release_others(local, [self.model, *self.segments])
        return self.proxy

    def parameters_held_elsewhere(self) -> list[tuple[nn.Module, str, torch.Tensor, nn.Parameter | None]]:
        """``(stand-in, name, parameter, tied)`` of each parameter of the model that this rank stands in for but does
        not hold there: while ``configure_optimizers`` runs, each gets a placeholder of its shape there, or ``tied``,
        this rank's copy where it holds the parameter under another name (a tie: listed at its first name then), so
        that groups made from ``named_parameters()`` are one device's on every rank (:mod:`.optimizers`)."""
        if self.proxy is None:
            return []
        parts = [(part, part.__dict__["_original"]) for part in self.proxy.modules()
                 if isinstance(part, ModelPart) and part.__dict__.get("_original") is not None]
        held = {id(original._parameters.get(name)): p for part, original in parts
                for name, p in part._parameters.items() if original._parameters.get(name) is not None}
        found = [(part, name, p, held.get(id(p))) for part, original in parts
                 for name, p in original._parameters.items() if p is not None and name not in part._parameters]
        holder = self.module if self.root else self.proxy
        own = self.model._parameters
        return found + [(holder, name, own.get(name) if own.get(name) is not None else torch.empty(0), None)
                        for name in self._own_parameters if name not in holder._parameters]

    # -- capturing ----------------------------------------------------------------------------------
    def model_calls(self, step: str, microbatch: Any, args: Sequence[Any],
                    kwargs: Mapping[str, Any]) -> list[tuple[tuple, dict[str, Any]]]:
        """Run ``step`` on ``microbatch`` up to its first use of the model's output and return the ``(args, kwargs)``
        of each call of the model before it (:mod:`.model_calls`)."""
        def run() -> Any:
            return getattr(self.module, step)(microbatch, *args, **kwargs)

        calls, key = self.calls, call_key(step, args, kwargs)  # the proxy's, once cut
        parts: list[str] = []  # the model's children the step ran without its forward (vae.encode's encoder)
        if self.proxy is not None:
            recorded = calls.capture(run, key)
        else:  # before the cut (at setup): the model's forward is never run, its calls are recorded instead; what
            # the step's code after them changes on the module, or logs through its loggers, is undone or dropped
            called = self.called
            own = called.__dict__.get("forward")
            called.forward = lambda *call_args, **call_kwargs: calls.record((call_args, call_kwargs))
            effects = StepEffects(self.module, lambda: [self.model])
            start = effects.snapshot()
            hooks = [] if self.root else [child.register_forward_pre_hook(lambda *_, name=name: parts.append(name))
                                          for name, child in self.model.named_children()
                                          if not isinstance(child, torch.jit.ScriptModule)]  # (which take no hooks)
            try:
                with LoggerCalls(self.module, lambda: ()).discarding():
                    recorded = calls.capture(run, key)
            except Exception as error:
                if parts:  # the model's parts ran, its forward never: that is the thing to fix, not what failed after
                    raise ModelNotCalled(self._never_called(step, list(dict.fromkeys(parts)))) from error
                raise
            finally:
                for hook in hooks:
                    hook.remove()
                if own is None:
                    del called.forward
                else:
                    called.forward = own
                effects.restore(start)
        if recorded is None:
            raise ModelNotCalled(self._never_called(step, list(dict.fromkeys(parts))))
        return self.carried.take(recorded)

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

    def _output_structure(self, call: tuple[tuple, dict[str, Any]]) -> Any:
        """The structure (a pytree spec) of the model's output for a call's ``(args, kwargs)``, where the captures
        that take such inputs agree on one; else None."""
        try:
            flat = self.splitter.leaves(*call)
        except Exception:  # noqa: BLE001 - inputs the capture would refuse: not known
            return None
        specs = {str(capture.out_spec): capture.out_spec for capture in self.splitter.captures
                 if all_match(capture.in_patterns, flat)}
        return next(iter(specs.values())) if len(specs) == 1 else None

    def step_calls_model(self, step: str, microbatch: Any) -> bool:
        """Whether ``step`` calls the model on ``microbatch`` (before the cut, on this rank): it runs up to the model's
        call, or up to its first call of a module inside the model (its encoder, through ``vae.encode``), where it
        stops, so that no layer runs. A step that fails before either counts as calling it: the capture that
        follows raises its error on every rank."""
        stops = [part.register_forward_pre_hook(_stop) for part in self.model.modules() if part is not self.model]
        try:
            with torch.random.fork_rng(devices=[]), no_logging(self.module), \
                    kept_buffers([self.module], skip=self.model):
                self.model_calls(step, microbatch, (0,), {})
        except ModelNotCalled:
            return False
        except Exception:  # noqa: BLE001 - raised on every rank by the capture
            return True
        finally:
            for stop in stops:
                stop.remove()
        return True

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

    def capture_input(self, step: str, microbatch: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """The first segment's input for ``step`` on ``microbatch``: the model call's arguments, flattened (of each
        call, as :class:`~lightning_pipe.engine.calls.Calls`, for several)."""
        calls = self.model_calls(step, microbatch, args, kwargs)
        ran, now = (self.training, self.modes), self.mode()
        if now != ran:
            raise RuntimeError(other_modes(self.where, ran, now))
        inputs = ModelCalls.as_input([self.splitter.flat_inputs(call_args, call_kwargs, training=self.training,
                                                                modes=self.modes) for call_args, call_kwargs in calls])
        if self.calls.needs_grad:
            raise ValueError(input_needs_grad(step, self.where, self.outside_trainable,
                                              "move them into the model, name a module holding both with "
                                              "layers=..., or freeze them with requires_grad_(False)"))
        return inputs

    def input_leaves(self, step: str, batch: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
        """The tensors of :meth:`capture_input` for ``batch``, without capturing (a whole batch, whose shape may be
        new: a capture made on one rank alone would part the ranks' captures)."""
        return [leaf for leaves in self.call_leaves(step, batch, args, kwargs) for leaf in leaves]

    def call_leaves(self, step: str, batch: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[list[Any]]:
        """:meth:`input_leaves` call by call (one list per call of the model the step makes)."""
        return [[leaf for leaf in self.splitter.leaves(call_args, call_kwargs) if isinstance(leaf, torch.Tensor)]
                for call_args, call_kwargs in self.model_calls(step, batch, args, kwargs)]

    def output_kinds(self, training: bool | None = None,
                     counted: bool = False) -> Callable[[Any], list[str | int | None] | None]:
        """For a model output's structure (:func:`~lightning_pipe.strategy.step_values.output_structure`), how each of
        its tensors adds up over micro-batches: a single number's kind ("mean", "sum", "other"), a tensor's dim of the
        batch's rows (:func:`lightning_pipe.capture.scalars.output_kinds`), None for one not known; None for a
        structure no capture gives. A model called two ways (a summed loss, and a decoding) gives two structures.
        ``training``: the captures of that mode only (training's loss over ``num_items_in_batch`` is a sum where
        evaluation's, without it, is a mean: together, neither would be known). ``counted``: for micro-batches
        weighted by the counts the model's loss is a mean over (:func:`_output_kinds`)."""
        captures = [capture for capture in self.splitter.captures if training is None or capture.training == training]
        made = (training, counted, *(id(capture) for capture in captures))
        if self._kinds[0] != made:
            self._kinds = (made, _output_kinds(captures, counted))
        known = self._kinds[1]
        return lambda spec: next((kinds for other, kinds in known if other == spec), None)

    def run_step(self, step: str, output: Any, microbatch: Any, args: Sequence[Any],
                 kwargs: Mapping[str, Any]) -> Any:
        """Run ``step`` on ``microbatch`` with the model returning ``output``; returns what the step returns."""
        assert self.proxy is not None
        calls = self.calls
        calls.serve(output, self.mode, ran=(self.training, self.modes), step=step)
        deferring = self.deferred.around(lambda: calls.answered) if self.deferred is not None \
            else contextlib.nullcontext()
        try:
            with deferring:  # code before the model ran on the first stage: here it runs only where it is used
                result = getattr(self.module, step)(microbatch, *args, **kwargs)
            calls.finish(self._never_called(step))
        finally:
            calls.reset()
        return result

    def outside_parameters_with_grad(self) -> list[str]:
        return with_grad(self.module, self.outside_trainable)

    def outside_error(self, names: Sequence[str]) -> str:
        return (f"training_step uses parameters outside {self.where} that require grad "
                f"({', '.join(names)}); a pipeline trains only the model it cuts: move them into the model, name a "
                f"module holding both with layers=..., or freeze them with requires_grad_(False)")

    # -- state ------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Load a full model's ``state_dict``: all of it before the cut, this rank's share after it."""
        load_share(self.module, self.state_keys, state_dict, strict, self.is_cut)

    def _mark_stored(self) -> None:
        """After a capture: tensors its forward stored in the LightningModule's attributes (a forward hook's dict)
        are the capture's fakes; each gets a stand-in that says so when used, and a warning names them once."""
        found = [place for place in mark_not_kept(self.module, self.where) if place not in self._stored]
        if found:
            self._stored.update(found)
            warnings.warn(f"the forward of {self.where} stored tensors in {', '.join(found)} (a forward hook, or "
                          f"code that keeps an output): under PipelineStrategy the forward runs as a captured graph "
                          f"that does not store them at each step, so using them raises; return what the step needs "
                          f"from the model's forward instead", stacklevel=2)

    def _never_called(self, step: str, parts: Sequence[str] = ()) -> str:
        name = type(self.module).__name__
        if self.root:
            spread, largest = owners(self.module), largest_owner(self.module)
            return (f"{name}.{step} never called self(...): its trainable parameters are spread over {spread}, so "
                    f"the pipeline runs the module's forward, which {step} must call (self(x)); or name the attribute "
                    f"holding the model to pipeline, whose output the step then gives to the others (a classifier or "
                    f"margin head, an ArcFace: PipelineStrategy(layers={largest!r})); or put the model in one "
                    f"attribute that the step calls (self.model = MyModel(...))")
        if parts:  # the step used the model through its other methods
            return (f"{name}.{step} never called {self.where}, but ran its parts {', '.join(parts)} (each "
                    f"called itself, as an ensemble's members, or through methods other than forward, as a VAE's "
                    f"encode and decode); the pipeline runs one forward: give {name} a "
                    f"forward (or make its forward one) that makes those calls and returns what {step} needs from "
                    f"them, and call self(...) in {step}; the strategy then pipelines {name}.forward")
        return (f"{name}.{step} never called {self.where}; the pipeline runs that model, so "
                f"{step} must call it (directly or through forward), or name the module it calls with "
                f"PipelineStrategy(layers='attribute.path'){SKIPPED_BATCHES}")


class ModelNotCalled(RuntimeError):
    """A step that never called the model the strategy pipelines."""


def _stop(*_: Any) -> None:
    raise Stop()


@contextlib.contextmanager
def no_logging(module: nn.Module) -> Any:
    """``self.log`` does nothing while a step runs only up to its model (no loop collects logs at setup)."""
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log


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
