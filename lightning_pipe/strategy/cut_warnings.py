"""Warnings given when the model is cut, about what the cut changes for the user's code: a frozen or averaged copy of
the model kept whole beside it, buffers of a module placed on several ranks, forward hooks on the layers of a
pipelined ``nn.Sequential``, gradient hooks on the parameters (run once per micro-batch)."""

from __future__ import annotations

import builtins
import dis
import functools
import re
import sys
import traceback
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.strategy.model_choice import (
    averaged as averaged_parameters, callback_copies, frozen_copies, parameter_lists,
)
from lightning_pipe.strategy.tied import split_buffers
from lightning_pipe.strategy.unfollowed import (
    BACKWARD_HOOKS, FOREIGN, FORWARD_HOOKS, MODULE_HOOKS, users_hook, users_hooks,
)

__all__ = ["FrozenCopies", "warn_of_gradient_hooks", "warn_of_layer_hooks", "warn_of_split_buffers",
           "refuse_sequence_hooks"]


class FrozenCopies:
    """Copies of the model kept whole beside it (:func:`~.model_choice.frozen_copies`), while under the pipeline each
    rank holds only its share of the model, so that code pairing their parameters pairs the wrong ones.

    torch's ``AveragedModel`` copies are said at once (they exist to be updated from the model); a frozen copy is said
    once its weights are seen to differ from those it had when training began (an EMA target, a momentum encoder, a
    mean teacher, a target network copied every N steps), and never while they stay as they were (a distillation
    teacher, a born-again network's previous generation), which pairs nothing. Seen before and after every one of
    the first training steps, then after steps 16, 32, 64, ... (a check reads the copy's weights once); said on
    global rank 0 and on the last stage's rank, where the step's code runs.
    """

    every_step = 8  # training steps checked before and after each; later ones at powers of two

    def __init__(self, module: LightningModule, path: str, model: torch.nn.Module, pipeline: Pipeline,
                 running: set[int] | None = None) -> None:
        self.module, self.path = module, path
        self.originals = frozen_copies(module, path, model, running)  # each copy's path -> the path of what it copies
        copies = list(self.originals)
        first_rank = not dist.is_initialized() or dist.get_rank() == 0
        averages = averaged_parameters(module)
        averaged = [name for name in copies if any(id(p) in averages for p in module.get_submodule(name).parameters())]
        self.unsaid = [name for name in copies if name not in averaged]  # (every rank: explain())
        self.averaged = averaged  # (said at the build; explained too: found by review, timm's ModelEmaV2 updated in
        # on_train_batch_end failed with a bare shape error)
        self.watched = list(self.unsaid) if first_rank or pipeline.is_last_rank else []
        # the last stage runs the step's code, which calls the copies: a copy changed elsewhere is not the one it runs
        self.runs_the_step = bool(pipeline.is_last_rank)
        self.first: dict[str, torch.Tensor] = {}  # each watched copy's weights' sums when training began
        self.steps = 0
        if averaged and first_rank:
            self._say(averaged, "is an averaged copy of it")
        trainer = getattr(module, "_trainer", None)
        callbacks = list(getattr(trainer, "callbacks", None) or [])
        self.held = callback_copies(callbacks, model)  # (found by review: timm's ModelEmaV3 made in a callback's
        # setup failed with a bare shape error in its update)
        if self.held and first_rank:
            warnings.warn(self._held_pairing(), stacklevel=3)
        # (found by review: diffusers' EMAModel made in __init__: a bare shape error, or silently wrong averages where
        # the shapes pair up); a pipeline of one rank holds the whole model
        self.lists = parameter_lists(module, model, callbacks) if len(getattr(pipeline, "stage_ranks", ())) != 1 \
            else []
        if self.lists and first_rank:
            warnings.warn(self._list_pairing(), stacklevel=3)

    def before_step(self) -> None:
        """Note the watched copies' weights before the first training step (after the hooks that run before
        training, which may load a teacher's weights), or, early on, see whether they changed since."""
        if self.watched and (not self.first or self.steps < self.every_step):
            self._check()

    def after_step(self) -> None:
        """See whether the training steps so far changed a watched copy's weights."""
        self.steps += 1
        if self.watched and (self.steps <= self.every_step or self.steps & (self.steps - 1) == 0):
            self._check()

    def _check(self) -> None:
        changed = []
        for name in self.watched:
            params = list(self.module.get_submodule(name).parameters())
            if any(p.is_meta for p in params):
                continue
            sums = torch.stack([p.detach().double().sum() for p in params]).cpu()
            if name not in self.first:
                self.first[name] = sums
            elif not torch.equal(sums, self.first[name]):
                changed.append(name)
        if changed:
            self.watched = [name for name in self.watched if name not in changed]
            self.unsaid = [name for name in self.unsaid if name not in changed]
            what = f"is a frozen copy of it whose weights have changed since training began (seen after training " \
                   f"step {self.steps})"
            # (found by review: a hand-written EMA in a hook trained on, wrong, past its warning) where this rank
            # holds part of what a copy copies, its update pairs the wrong ones; where it holds all of it but does not
            # run the step, the last stage's copy, which the step runs, holds none of it and stays as it was
            partial = {name: self._held_here(name) < self._held_here(name, copy=True) for name in changed}
            wrong = [name for name in changed if partial[name] or not self.runs_the_step]
            if wrong:
                why = "only part of" if partial[wrong[0]] else \
                    "all of, while the last stage, whose step runs the copy, holds none or part of"
                raise ValueError(f"{self.pairing(wrong, what)}. This rank holds {why} the model's parameters that "
                                 f"{wrong[0]} copies, so the copy the step runs cannot be one device's: stopped "
                                 f"rather than train on with a wrong copy")
            self._say(changed, what)

    def _held_here(self, name: str, copy: bool = False) -> int:
        """How many parameters this rank holds of the part of the model that the copy ``name`` copies (or of the
        copy, which stays whole)."""
        path = name if copy else self.originals.get(name, self.path)
        return sum(1 for p in self.module.get_submodule(path).parameters() if not p.is_meta and p.numel() > 0)

    def explain(self, exception: BaseException) -> None:
        """A shape error raised while a frozen copy has not been said (an EMA update pairing the copy's parameters
        with this rank's share of the model, whose shapes differ, fails before the copy is seen to change; a target
        network's ``load_state_dict(model.state_dict())`` finds keys missing): its message says why it may have
        come."""
        message = exception.args[0] if isinstance(exception, RuntimeError) and exception.args else None
        # an average said at the build, where the failing code names it (its update: timm's ema.update(model)), not
        # any shape error of a module that holds one (found by review)
        averaged = [name for name in self.averaged if _named_in(exception, name.rsplit(".", 1)[-1])]
        copies = self.unsaid or averaged or self.held or self.lists
        if copies and isinstance(message, str) and "where this comes from pairing" not in message \
                and ("size" in message or "state_dict" in message or "same number of tensors" in message):
            why = self.pairing(self.unsaid, "is a frozen copy of it") if self.unsaid else \
                self.pairing(averaged, "is an averaged copy of it") if averaged else \
                self._held_pairing() if self.held else self._list_pairing()
            exception.args = (f"{message} (where this comes from pairing the parameters of {copies[0]} with the "
                              f"model's: {why})", *exception.args[1:])

    def parameters(self) -> list[torch.nn.Parameter]:
        """The copies' parameters."""
        return [p for name in self.originals for p in self.module.get_submodule(name).parameters()]

    def written(self, parameters: list[torch.nn.Parameter]) -> str | None:
        """The copy (its path) holding one of ``parameters``, which the step's code wrote in place, if any."""
        ids = {id(p) for p in parameters}
        return next((name for name in self.originals
                     if any(id(p) in ids for p in self.module.get_submodule(name).parameters())), None)

    def pairing(self, copies: list[str], what: str) -> str:
        """What pairing the parameters of ``copies`` with the model's does under the pipeline, and what to do."""
        original = self.originals.get(copies[0], self.path)
        return _pairing(copies, what, original, original != self.path)

    def _held_pairing(self) -> str:
        """What a copy of the whole model that a callback holds (:attr:`held`) does under the pipeline."""
        return (f"{', '.join(self.held)} is a copy of the whole model at {self.path!r} that a callback made before the "
                f"model was cut (in setup or __init__): it stays whole on every rank, while under PipelineStrategy "
                f"each rank holds only its share of the model, so an update pairing their parameters (an EMA's "
                f"update(model)) pairs the wrong ones. Make it in the callback's on_fit_start, after the cut: there "
                f"each rank's copy is of its own share, which pairs with it, and the callback's state_dict() "
                f"returning the copy's state_dict() is saved in the checkpoint put together from every rank's")

    def _list_pairing(self) -> str:
        """What a list of one tensor per parameter of the whole model (:attr:`lists`) does under the pipeline."""
        return (f"{', '.join(self.lists)} holds one tensor per parameter of the whole model at {self.path!r}, made "
                f"before the model was cut (in __init__ or setup; diffusers' EMAModel(self.{self.path or 'model'}."
                f"parameters()) keeps such a list): it stays whole on every rank, while under PipelineStrategy each "
                f"rank holds only its share of the parameters, so code pairing the list with parameters() by "
                f"position (an EMA's step(...), copy_to(...)) pairs the wrong ones, silently where their shapes "
                f"agree. Make it in on_fit_start, after the cut: there each rank's list is of its own share, which "
                f"pairs with it, and a state_dict() listing one tensor per parameter is saved in the checkpoint put "
                f"together from every rank's; or keep an EMA with Lightning's EMAWeightAveraging callback")

    def _say(self, copies: list[str], what: str) -> None:
        warnings.warn(self.pairing(copies, what), stacklevel=3)


def _pairing(copies: list[str], what: str, path: str, part: bool = False) -> str:
    target = copies[0]
    model = f"self.{path}, a part of the pipelined model," if part else f"the model at {path!r}"
    return (f"{', '.join(copies)} has the structure of {model} and {what} (an EMA target, torch's "
            f"AveragedModel, a momentum encoder, a mean teacher): it stays whole on every rank, while under "
            f"PipelineStrategy each rank holds only its share of the model, so code that pairs their parameters "
            f"(zip(self.{target}.parameters(), self.{path}.parameters()), {target}.update_parameters(self.{path}), "
            f"an EMA update) pairs the wrong ones and updates {target} from part of the model. Train such a pair on "
            f"one device or with DDP; Lightning's WeightAveraging callbacks (an EMA of the weights for evaluation) "
            f"work under the pipeline, and a frozen teacher the step only calls is fine")


def warn_of_split_buffers(sequence: torch.nn.Module, pipeline: Pipeline) -> None:
    """Say (on the pipeline's rank 0) which modules at places on several ranks hold buffers (:func:`.split_buffers`)."""
    split = split_buffers(sequence, pipeline.stage_sizes, pipeline.stage_ranks)
    if split and pipeline.rank == 0:
        warnings.warn(f"{'; '.join(split)}: a module the model runs at places that fall on several ranks holds buffers "
                      f"(a batch norm's running statistics); its parameters are tied, but each rank's copy of its "
                      f"buffers takes only the updates of its own places, so they differ from one device's and the "
                      f"checkpoint holds the first rank's. Put its places on one rank (partition=[...]) for one "
                      f"device's buffers", stacklevel=3)


def refuse_sequence_hooks(sequence: torch.nn.Module, path: str) -> None:
    """Refuse hooks of the user's on the pipelined ``nn.Sequential`` itself: the pipeline runs its layers, stage by
    stage, and never its own forward, so such a hook (a pre-hook standardizing the input, a forward hook dividing the
    output by a temperature) would silently not run on any rank (found by review: 0.56 off one device)."""
    kinds = sorted({kind for kind, _ in users_hooks(sequence)}, key=MODULE_HOOKS.index)
    if kinds:
        named = ", ".join(kind.strip("_").replace("hooks", "hook") for kind in kinds)
        raise ValueError(f"the pipelined nn.Sequential at {path or 'the model'!r} carries hooks of yours on itself "
                         f"({named}): the pipeline runs its layers stage by stage and never its own forward, so they "
                         f"would not run on any rank. Register them on its first layer (a pre-hook, changing the "
                         f"input) or its last (a forward hook, changing the output), or do their work in the step; "
                         f"or pipeline the module's forward with PipelineStrategy(layers=''), where such hooks run")


def warn_of_layer_hooks(sequence: torch.nn.Module, path: str, pipeline: Pipeline) -> None:
    """Say (on the pipeline's rank 0) which layers of a pipelined ``nn.Sequential`` carry forward or backward hooks of
    the user's: each runs on the rank holding its layer, so what a forward hook stores for the step (features for an
    auxiliary loss or a log) never reaches the step's code, which runs after the model on the last stage (a hook that
    only transforms, :func:`only_transforms`, is not said: it runs as on one device); a backward hook runs once per
    micro-batch on its share of the gradient, and what it writes on the module is undone (a step's changes to the
    module are one device's run of the step without gradients, which runs no backward hook)."""
    def hooked(kinds: tuple[str, ...], said: Callable[[Any], bool] = lambda hook: True) -> list[str]:
        return sorted({f"{path}.{name}" for name, module in sequence.named_modules()  # (the root's: refused)
                       if name and any(said(getattr(module, kind)[key]) for kind, key in users_hooks(module, kinds))})

    if pipeline.rank != 0:
        return
    forward = hooked(FORWARD_HOOKS, lambda hook: not only_transforms(hook))
    if forward:
        warnings.warn(f"{', '.join(forward[:6])} of the pipelined nn.Sequential carry forward hooks of yours: each "
                      f"runs on the rank holding its layer, inside that stage's forward, so a value it stores for the "
                      f"step (features for an auxiliary loss or a log: setattr(self, 'feat', output)) does not reach "
                      f"the step's code, which runs after the model on the last stage's rank. Return such features "
                      f"from the model (a layer that passes them on with its output), or pipeline the module's forward "
                      f"with PipelineStrategy(layers='') and call the layers there", stacklevel=3)
    backward = hooked(BACKWARD_HOOKS)
    if backward:
        warnings.warn(f"{', '.join(backward[:6])} of the pipelined nn.Sequential carry backward hooks of yours: each "
                      f"runs on the rank holding its layer, once per micro-batch, on that micro-batch's share of the "
                      f"gradients, and what it writes on the module (a gradient norm kept for on_after_backward's log) "
                      f"is undone after the step, whose changes to the module come from one device's run of it without "
                      f"gradients, where no backward hook runs. Read the gradients where they are whole: the "
                      f"parameters' .grad in on_after_backward or on_before_optimizer_step (logs from there are "
                      f"gathered over the pipeline)", stacklevel=3)


_STORES = {"STORE_ATTR", "STORE_SUBSCR", "STORE_GLOBAL", "STORE_DEREF", "DELETE_ATTR", "DELETE_SUBSCR",
           "DELETE_GLOBAL", "DELETE_DEREF", "STORE_SLICE"}
_WRITING = {"append", "extend", "insert", "update", "setdefault", "add", "pop", "put", "put_nowait", "send", "write",
            "log", "log_dict", "setattr", "__setitem__", "register_buffer", "register_parameter", "add_module"}


def only_transforms(hook: Any, depth: int = 0) -> bool:
    """Whether a forward (pre-)hook of the user's only returns a changed output or input (``3 * tanh(o / 3)``, a
    rescaled input), storing nothing: its code (and that of the user's functions it calls, a few calls deep) returns a
    value other than None, writes no attribute, item, global or outer variable, and calls no method that stores
    (``append``, ``update``, ``log``, an in-place ``add_``). A hook that cannot be read so (a callable object, a
    builtin) is taken to store."""
    if isinstance(hook, functools.partial):
        return only_transforms(hook.func, depth)
    function = getattr(hook, "__func__", hook)  # a bound method's
    code = getattr(function, "__code__", None)
    if not isinstance(code, types.CodeType) or depth > 3:
        return False
    instructions = list(dis.get_instructions(code))
    returns_value = any(
        op.opname == "RETURN_VALUE" and not (before.opname == "LOAD_CONST" and before.argval is None)
        or op.opname == "RETURN_CONST" and op.argval is not None
        for before, op in zip([instructions[0], *instructions], instructions))
    return (returns_value or depth > 0) and _stores_nothing(function, code, depth)


def _stores_nothing(function: Any, code: types.CodeType, depth: int) -> bool:
    """Whether ``code`` (``function``'s, or one nested in it) writes nothing outside it (:func:`only_transforms`): no
    store but to its own variables; an attribute of a module only from torch, math, NumPy or einops (``torch.tanh``,
    not ``operator.setitem``); a method of anything else only a tensor's that computes (``o.clamp(...)``, not
    ``self._keep(o)`` nor ``queue.appendleft(o)``); no dunder (``object.__setattr__``)."""
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or ()))
    base: Any = None  # the value the last instruction loaded by name (or a module's attribute: torch.nn.functional)
    for op in dis.get_instructions(code):
        name = op.argval if isinstance(op.argval, str) else ""
        if op.opname in _STORES:
            return False
        loaded = None
        if op.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            method = op.opname == "LOAD_METHOD" or sys.version_info >= (3, 12) and bool((op.arg or 0) & 1)
            if name.startswith("__"):
                return False
            if isinstance(base, types.ModuleType):
                if base.__name__.split(".")[0] not in _PURE_MODULES:
                    return False
                loaded = getattr(base, name, None)
            elif name in _WRITING or name.endswith("_") and not name.startswith("_") \
                    or method and not hasattr(torch.Tensor, name):
                return False
        base = loaded
        if op.opname in ("LOAD_GLOBAL", "LOAD_DEREF", "LOAD_NAME"):  # a function of the user's it may call
            if name in _WRITING:  # setattr(model, "feat", output)
                return False
            base = function.__globals__.get(name, getattr(builtins, name, None)) if op.opname != "LOAD_DEREF" \
                else _cell(cells.get(name))
            if isinstance(base, (types.FunctionType, types.MethodType)) and (
                    getattr(base, "__module__", None) or "").split(".")[0] not in FOREIGN:
                if not only_transforms(base, depth + 1):
                    return False
    return all(_stores_nothing(function, inner, depth) for inner in code.co_consts if isinstance(inner, types.CodeType))


_PURE_MODULES = {"torch", "math", "numpy", "einops"}  # modules whose functions a transforming hook calls


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents if cell is not None else None
    except ValueError:  # empty
        return None


def warn_of_frequency_scaling(sequence: torch.nn.Module, path: str, pipeline: Pipeline) -> None:
    """Say (on the pipeline's rank 0) which embeddings of a pipelined ``nn.Sequential`` scale each token's gradient
    by its count in the batch (``scale_grad_by_freq=True``): each micro-batch's backward counts its own tokens. (A
    captured model's graph shows it: :mod:`lightning_pipe.capture.coupling`.)"""
    scaled = [f"{path}.{name}" if path else name for name, module in sequence.named_modules()
              if isinstance(module, torch.nn.Embedding | torch.nn.EmbeddingBag) and module.scale_grad_by_freq]
    if scaled and pipeline.rank == 0 and pipeline.num_microbatches > 1:
        warnings.warn(f"{', '.join(scaled[:6])} scale each token's gradient by how often the token occurs in the batch "
                      f"(scale_grad_by_freq=True): a pipeline runs each of its {pipeline.num_microbatches} "
                      f"micro-batches' backward alone, so each token's gradient is scaled by its count in its "
                      f"micro-batch, not one device's. For one device's, pass num_microbatches=1 or drop "
                      f"scale_grad_by_freq", stacklevel=3)


def warn_of_gradient_hooks(module: torch.nn.Module, pipeline: Pipeline) -> None:
    """Say (on each rank holding some) which of this rank's parameters carry gradient hooks of the user's
    (``p.register_hook``, ``register_post_accumulate_grad_hook``): each backward of a micro-batch runs them on that
    micro-batch's share of the gradient, which only a hook linear in the gradient (scaling, masking rows) takes as one
    device's whole gradient (a clamp of each share is not a clamp of the sum)."""
    if pipeline.num_microbatches <= 1:
        return
    names = {id(p): name for name, p in module.named_parameters()}
    hooked = sorted({names.get(id(p), "?") for stage in pipeline.modules() for p in stage.parameters()
                     for hooks in (getattr(p, "_backward_hooks", None), getattr(p, "_post_accumulate_grad_hooks", None))
                     for hook in (hooks or {}).values() if users_hook(hook)})
    if hooked:
        warnings.warn(f"{', '.join(hooked[:6])}{' and more' if len(hooked) > 6 else ''} carry gradient hooks of yours "
                      f"(register_hook, register_post_accumulate_grad_hook): the pipeline runs one backward per "
                      f"micro-batch, so each hook runs {pipeline.num_microbatches} times a step, on a micro-batch's "
                      f"share of the gradient. A hook linear in the gradient (a scale, a mask) gives one device's "
                      f"result; one that is not (g.clamp(-c, c), a norm) does not. Change the gradient once per step "
                      f"instead, in on_before_optimizer_step over self.parameters() (every rank runs it over its own "
                      f"share, after the last micro-batch)", stacklevel=3)


def _named_in(exception: BaseException, name: str) -> bool:
    """Whether a line of ``exception``'s traceback names ``name`` (an attribute: ``self.ema.update(...)``)."""
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    return any(frame.line and pattern.search(frame.line) for frame in traceback.extract_tb(exception.__traceback__))
