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
import torch.nn as nn
import torch.utils._pytree as pytree

from lightning_pipe.capture import CaptureError, Segment, Splitter
from lightning_pipe.capture.patterns import all_match
from lightning_pipe.capture.scalars import MEAN
from lightning_pipe.engine.tree import tree_flatten
from lightning_pipe.engine.kept import kept_buffers
from lightning_pipe.strategy.capture_keeping import CaptureKeeping, no_logging
from lightning_pipe.strategy.carried import CarriedRows
from lightning_pipe.strategy.deferred import DeferredCalls
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

__all__ = ["CapturedModule", "ModelNotCalled"]


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


class CapturedModule(CaptureKeeping):
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
                                              "layers=..., or freeze them with requires_grad_(False)", calls,
                                              self.module))
        return inputs

    def input_leaves(self, step: str, batch: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
        """The tensors of :meth:`capture_input` for ``batch``, without capturing (a whole batch, whose shape may be
        new: a capture made on one rank alone would part the ranks' captures)."""
        return [leaf for leaves in self.call_leaves(step, batch, args, kwargs) for leaf in leaves]

    def call_leaves(self, step: str, batch: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[list[Any]]:
        """:meth:`input_leaves` call by call (one list per call of the model the step makes)."""
        return [[leaf for leaf in self.splitter.leaves(call_args, call_kwargs) if isinstance(leaf, torch.Tensor)]
                for call_args, call_kwargs in self.model_calls(step, batch, args, kwargs)]

    def call_sizes(self) -> dict[int, set[tuple]]:
        """The sizes besides the rows of the model calls' inputs the last stage answered since the last time."""
        return self.calls.taken_sizes()

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
