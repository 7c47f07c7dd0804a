"""The module's ``configure_optimizers`` on every rank: a stage with nothing to train still gets an optimizer, and an
error on one rank is raised on all of them before any waits.

After the cut, ``self.parameters()`` in ``configure_optimizers`` lists only this rank's share of the model. A stage can
own no trainable parameter (activations and pooling, a frozen embedding, a partition that gives a rank only such
layers); ``torch.optim.SGD(self.parameters())`` then raises "optimizer got an empty parameter list" on that rank
alone, and the others, waiting for it in their first step, saw only a lost connection. Such a stage still runs its
forward and backward (its input gradients are needed upstream), so it is supported instead: while
``configure_optimizers`` runs, the module holds one placeholder parameter (an empty tensor that never gets a
gradient, so the optimizer never changes anything). It is removed from the module afterwards, so that the model's
``state_dict`` and checkpoints are unchanged, and from the optimizer's groups too (:func:`drop_placeholder`: they are
left empty), so that every parameter the optimizer holds is one of the module's: Lightning's fine-tuning callbacks
map each to its name, and add the backbone's parameters as a group of their own when they unfreeze it.

Likewise a parameter that ``configure_optimizers`` names directly (``[self.logit_scale]`` in a group of its own) where
another rank holds it: while it runs, this rank's stand-in for its module holds a placeholder under that name, taken
out of the groups afterwards as well; and an optimizer given only parameters that other ranks hold (a head trained
alone, SparseAdam for an embedding), which torch would refuse as empty, holds a placeholder instead.
"""

from __future__ import annotations

import json
import re
import types
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.collective_guard import collectives_refused

__all__ = ["PLACEHOLDER", "placeholders", "empty_optimizers_allowed", "drop_placeholders", "stand_in", "whole_orders",
           "group_values", "differing_values_warning", "whole_set_warning"]

PLACEHOLDER = "_pipeline_stage_trains_nothing"


def stand_in(like: torch.Tensor, device: torch.device) -> nn.Parameter:
    """A placeholder for another rank's parameter ``like``: its shape, dtype and ``requires_grad`` on ``device``, with
    storage for one element (every stride 0), so that ``configure_optimizers`` may sort it as one device would
    (``p.ndim <= 1`` for no weight decay, ``p.requires_grad`` for frozen layers, ``p.numel()``)."""
    data = torch.empty_strided(tuple(like.shape), (0,) * like.dim(), dtype=like.dtype, device=device)
    return nn.Parameter(data, requires_grad=like.requires_grad)


@contextmanager
def placeholders(module: nn.Module, device: torch.device,
                 elsewhere: Sequence[tuple[nn.Module, str, torch.Tensor, nn.Parameter | None]] = ()
                 ) -> Iterator[list[nn.Parameter]]:
    """Inside, each ``(owner, name, like, tied)`` of ``elsewhere`` (parameters this rank does not hold there) is a
    parameter of ``owner``: ``tied``, this rank's copy of a tied parameter, or else a placeholder like ``like``
    (:func:`stand_in`); and ``module`` holds one more placeholder if none of its parameters requires grad; yields the
    placeholders."""
    made: list[tuple[nn.Module, str, nn.Parameter]] = []
    held: list[tuple[nn.Module, str]] = []
    shared: dict[int, nn.Parameter] = {}  # one placeholder for each parameter: a tie's places share it, and are
    # listed once (a rank holding neither end of a tie listed it twice: other groups than the others', found by review)
    try:
        for owner, name, like, tied in elsewhere:
            if tied is not None:
                held.append((owner, name))
                owner.register_parameter(name, tied)
                continue
            if id(like) in shared:
                held.append((owner, name))
                owner.register_parameter(name, shared[id(like)])
                continue
            made.append((owner, name, stand_in(like, device)))
            shared[id(like)] = made[-1][2]
            owner.register_parameter(name, made[-1][2])
        if not any(p.requires_grad for p in module.parameters()):
            made.append((module, PLACEHOLDER, nn.Parameter(torch.empty(0, device=device))))
            module.register_parameter(PLACEHOLDER, made[-1][2])
        yield [placeholder for _, _, placeholder in made]
    finally:
        for owner, name in [*held, *((owner, name) for owner, name, _ in made)]:
            del owner._parameters[name]


@contextmanager
def empty_optimizers_allowed(made: list[nn.Parameter], device: torch.device) -> Iterator[None]:
    """Inside, an optimizer built on no parameters (every one it names is on other ranks) holds a placeholder instead,
    appended to ``made``: torch's ``Optimizer.__init__`` is wrapped while ``configure_optimizers`` runs."""
    original = torch.optim.Optimizer.__init__

    def init(self: torch.optim.Optimizer, params: Any, *args: Any, **kwargs: Any) -> None:
        _refuse_sharding_optimizers(self)
        if not isinstance(params, torch.Tensor):
            params = list(params)
            if not params:
                made.append(nn.Parameter(torch.empty(0, device=device)))
                params = [made[-1]]
        original(self, params, *args, **kwargs)

    torch.optim.Optimizer.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.optim.Optimizer.__init__ = original  # type: ignore[method-assign]


def _refuse_sharding_optimizers(optimizer: torch.optim.Optimizer) -> None:
    """Refuse torch's ``ZeroRedundancyOptimizer`` as it is made, before its collectives over the whole job (which,
    given other ranks' placeholders, ended a rank with a segmentation fault: found by review)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        raise ValueError("ZeroRedundancyOptimizer shards an optimizer's state over the ranks of its process group "
                         "(every rank of the job by default), as DDP's ranks each hold the whole model; the ranks of "
                         "a pipeline hold different stages, and each one's optimizer already holds the parameters "
                         "and state of its own stages only. Return the optimizer it wraps instead "
                         "(optimizer_class(self.parameters(), lr=...)), e.g. `if isinstance(self.trainer.strategy, "
                         "PipelineStrategy)` in configure_optimizers")


def whole_orders(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> list[list[list[str]]]:
    """While ``configure_optimizers``'s placeholders stand in ``module`` for other ranks' parameters: each group of
    each optimizer as one device lists it, by the parameters' names (a tie at its first name); what one device's
    optimizer states are numbered by, whatever order the code listed them in."""
    from lightning_pipe.strategy.state_names import parameter_names

    names = {key: found[0] for key, found in parameter_names(module).items() if found[0] != PLACEHOLDER}
    return [[[names[id(p)] for p in group["params"] if id(p) in names] for group in optimizer.param_groups]
            for optimizer in optimizers]


def drop_placeholders(optimizers: Iterable[torch.optim.Optimizer], made: Sequence[nn.Parameter]) -> None:
    """Take the placeholders ``made`` out of every group of ``optimizers`` (a group may be left empty: a step skips
    it); not out of an ``LBFGS``, whose step concatenates its one group's gradients (none would fail)."""
    ids = {id(placeholder) for placeholder in made}
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.LBFGS):
            continue
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for placeholder in made:
            optimizer.state.pop(placeholder, None)


def refuse_searching_optimizers(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Refuse an optimizer that calls the closure several times per step and reads all parameters' gradients
    together (``torch.optim.LBFGS``'s line search and direction): each rank of a pipeline holds a share of the
    parameters, so each would search on its own share, and its calls of the closure (each a run of the whole pipeline)
    could differ in number between ranks."""
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("torch.optim.LBFGS computes its search direction and step size from the gradients of all "
                             "the parameters together and calls the closure several times per step; under a "
                             "pipeline each rank holds a share of the parameters, so each rank would search on its "
                             "share alone (not one device's steps) and run the pipeline a number of times of its own. "
                             "Use an optimizer that steps each parameter from its own gradient (SGD, Adam, AdamW), or "
                             "train with LBFGS on one device or under DDP")


# Optimizers whose step computes a number from all their parameters together without keeping it in a group (which
# :func:`differing_values_warning` would compare): AdamS's and Adai's means of exp_avg_sq over every parameter
_WHOLE_SET_OPTIMIZERS = frozenset({"AdamS", "Adai", "AdaiV2"})


def whole_set_warning(optimizers: Iterable[torch.optim.Optimizer]) -> str | None:
    """What to tell a user whose optimizer's step reads all its parameters together: a mean over them
    (:data:`_WHOLE_SET_OPTIMIZERS`), or their gradients' norm, by which it clips them (a group's ``max_grad_norm``:
    timm's and apex's LAMB); None for others."""
    optimizers = list(optimizers)
    kinds = sorted({type(optimizer).__name__ for optimizer in optimizers} & _WHOLE_SET_OPTIMIZERS)
    if kinds:
        return (f"{', '.join(kinds)} computes its step from a mean over all the parameters it holds (of exp_avg_sq), "
                f"and under a pipeline each rank's optimizer holds its own stages' parameters only, so each stage "
                f"steps by a mean of its own, not one device's. Use an optimizer that steps each parameter from its "
                f"own gradient and state (SGD, Adam, AdamW), or train with it on one device or under DDP")
    clipping = sorted({f"{type(optimizer).__name__}(max_grad_norm={group['max_grad_norm']!r})"
                       for optimizer in optimizers for group in optimizer.param_groups
                       if isinstance(group.get("max_grad_norm"), (int, float)) and group["max_grad_norm"] > 0})
    if clipping:
        return (f"{', '.join(clipping)} clips the gradients by their norm over all the parameters it holds (as "
                f"timm's and apex's LAMB do), and under a pipeline each rank's optimizer holds its own stages' "
                f"parameters only, so each stage would clip by the norm of its own share, not one device's. Give it "
                f"max_grad_norm=None and clip with Trainer(gradient_clip_val=...), which a synchronous pipeline "
                f"computes over every rank's gradients (the asynchronous schedules clip by value only)")
    coupled = sorted({type(optimizer).__name__ for optimizer in optimizers if _couples(optimizer)})
    if coupled:
        return (f"{', '.join(coupled)} updates a parameter by the gradients of the others too (tried on two "
                f"parameters: doubling one's gradient moved the other's update), as an optimizer that normalizes by "
                f"the gradients' global norm does; under a pipeline each rank's optimizer holds its own stages' "
                f"parameters only, so each stage steps by a number of its own share, not one device's. Use an "
                f"optimizer that steps each parameter from its own gradient and state (clip by the global norm with "
                f"Trainer(gradient_clip_val=...), which a synchronous pipeline computes over every rank), or train "
                f"with it on one device or under DDP")
    return None


def _couples(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step of ``optimizer``'s class (not one of torch's, which step each parameter alone) moves one
    parameter by another's gradient: tried twice on a new instance over two small parameters with its defaults, the
    second's gradient doubled the second time; False where that cannot be told (it needs a closure, or draws)."""
    kind = type(optimizer)
    if kind.__module__.startswith("torch.") or not isinstance(getattr(optimizer, "defaults", None), dict):
        return False

    def first_after_two_steps(scale: float) -> torch.Tensor | None:
        first = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
        second = nn.Parameter(torch.linspace(0.5, -0.5, 6))
        try:
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                warnings.simplefilter("ignore")
                trial = _made_like(kind, [first, second], optimizer.defaults)
                for step in range(2):
                    first.grad = torch.linspace(0.3, -0.2, 6) * (step + 1)
                    second.grad = torch.linspace(-0.1, 0.4, 6) * (scale if step else 1.0) * (step + 1)  # (both
                    # steps scaled alike would hide a clip from Adam, which divides by the scale: found by review)
                    try:  # a step that runs its closure (a clip inside the optimizer's step): one that does nothing
                        trial.step(lambda: torch.zeros(()))
                    except TypeError:  # a step that takes none
                        trial.step()
        except Exception:  # noqa: BLE001 - a constructor of other arguments, a step that draws: no telling
            return None
        return first.detach().clone()

    plain, again, doubled = first_after_two_steps(1.0), first_after_two_steps(1.0), first_after_two_steps(2.0)
    if plain is None or again is None or doubled is None or not torch.equal(plain, again):
        return False
    return not torch.equal(plain, doubled)


def _made_like(kind: type, params: list[nn.Parameter], defaults: dict[str, Any]) -> torch.optim.Optimizer:
    """A new ``kind`` over ``params`` with ``defaults``, less those its constructor refuses: torch's AdamW keeps
    ``decoupled_weight_decay`` among its defaults and takes no such argument (so no subclass of AdamW was tried:
    found by review)."""
    defaults = dict(defaults)
    for _ in range(len(defaults) + 1):
        try:
            return kind(params, **defaults)
        except TypeError as error:
            refused = re.search(r"unexpected keyword argument '(\w+)'", str(error))
            if refused is None or refused.group(1) not in defaults:
                raise
            del defaults[refused.group(1)]
    raise TypeError(f"{kind.__name__} could not be made from its defaults")


@contextmanager
def world_collectives_refused(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside, while ``optimizer.step`` runs, a collective of ``torch.distributed`` over every process (the default
    group) that the step's own code calls outside the closure it was given is refused: an optimizer made for data
    parallelism (distributed Muon's ``all_gather`` of the matrices each process orthogonalized) takes every process
    for a copy of the model, and under a pipeline each holds other stages: another rank's layer was copied over this
    rank's, 0.36 off one device, silently (found by review). The closure (the step's code, the backward, Lightning's
    hooks after it, the pipeline's own work) may run collectives. Guarded: ``torch.distributed``'s functions, their
    definitions in ``distributed_c10d``, and names the optimizer's module (or its classes' modules) imported from
    either (``from torch.distributed import all_gather``)."""
    stepping, depth = [0], [0]

    def inside(closure: Any) -> Any:
        if not callable(closure):
            return closure

        def run(*args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            try:
                return closure(*args, **kwargs)
            finally:
                depth[0] -= 1
        return run

    original_step = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if "closure" in kwargs:
            kwargs["closure"] = inside(kwargs["closure"])
        elif args:
            args = (inside(args[0]), *args[1:])
        stepping[0] += 1
        try:
            return original_step(*args, **kwargs)
        finally:
            stepping[0] -= 1

    def refusal(name: str, caller: str) -> str | None:
        if not stepping[0] or depth[0]:
            return None
        return (f"{type(optimizer).__name__}'s step calls torch.distributed.{name} over every process (the default "
                f"group), as an optimizer made for data parallelism (DDP) does: it takes every process for a copy "
                f"of the model. Under a pipeline the processes hold different stages, so it would exchange one "
                f"stage's parameters for another's. Use its single-process variant (Muon's SingleDeviceMuon or "
                f"SingleDeviceMuonWithAuxAdam), or train with it under DDP")

    own = optimizer.__dict__.get("step")  # (an instance's own step, if one was set)
    optimizer.step = step  # type: ignore[method-assign]
    try:
        with collectives_refused(refusal, _globals_of(type(optimizer))):
            yield
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own  # type: ignore[method-assign]


def _globals_of(kind: type) -> list[dict[str, Any]]:
    """The global namespaces the methods of ``kind`` and its bases look names up in (through decorators'
    ``__wrapped__``: a ``@torch.no_grad()`` step's own module), torch's own left out."""
    spaces = []
    for owner in kind.__mro__:
        for function in vars(owner).values():
            for _ in range(8):
                if isinstance(function, types.FunctionType):
                    spaces.append(function.__globals__)
                function = getattr(function, "__wrapped__", None)
                if function is None:
                    break
    return [space for space in spaces if str(space.get("__name__", "")).partition(".")[0] != "torch"]  # (torchao's
    # and torchtitan's are looked at)


def group_settings(optimizers: Iterable[torch.optim.Optimizer]) -> str:
    """Each optimizer's parameter groups as text, by their settings (what a rank compares with the others')."""
    described = []
    for optimizer in optimizers:
        groups = []
        for group in optimizer.param_groups:
            groups.append(", ".join(f"{key}={value!r}" for key, value in sorted(group.items())
                                    if key in ("name", "lr", "weight_decay", "initial_lr")
                                    and isinstance(value, (int, float, str))))
        described.append(f"{type(optimizer).__name__}: " + "; ".join(f"[{group}]" for group in groups))
    return " | ".join(described)


def differing_groups_warning(settings: Sequence[str]) -> str | None:
    """What to tell a user whose ranks' ``configure_optimizers`` made other parameter groups (``settings``: each
    rank's :func:`group_settings`); None where they agree."""
    if len(set(settings)) <= 1:
        return None
    shown = "; ".join(f"rank {rank}: {text[:160]}{'...' if len(text) > 160 else ''}"
                      for rank, text in enumerate(settings))
    return (f"configure_optimizers made other parameter groups on each rank of the pipeline ({shown}): each rank sees "
            f"only its own stages' parameters, so groups built from named_parameters() (a group per layer: "
            f"layer-wise learning-rate decay) differ from rank to rank. Each group's own settings train as on one "
            f"device, but a scheduler given one value per group (LambdaLR with a list, OneCycleLR's max_lr list) "
            f"applies them to other groups, LearningRateMonitor logs rank 0's groups alone, and the checkpoint's "
            f"optimizer state cannot be resumed on one device. Make the same groups on every rank, each with the "
            f"parameters this rank holds (an empty list is fine): a group per layer of the whole model, by name")


def group_values(optimizers: Iterable[torch.optim.Optimizer]) -> str:
    """Each optimizer's class and the numbers in its parameter groups (its settings, and what its step keeps there:
    Prodigy's step size ``d``), as JSON; a group that holds no parameter on this rank as null."""
    described = []
    for optimizer in optimizers:
        groups: list[dict[str, str] | None] = []
        for group in optimizer.param_groups:
            numbers = {}
            for key, value in group.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = value.item()
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    numbers[key] = repr(float(value))
            groups.append(numbers if group["params"] else None)
        described.append([type(optimizer).__name__, groups])
    return json.dumps(described)


def differing_values_warning(texts: Sequence[str]) -> str | None:
    """What to tell a user whose optimizer's step left another number in a parameter group on each rank (``texts``:
    each rank's :func:`group_values` after a step); None where the ranks holding the group's parameters agree."""
    every = [json.loads(text) for text in texts]  # (the same optimizers on every rank)
    for index, (kind, _) in enumerate(every[0]):
        for number, groups in enumerate(zip(*(described[index][1] for described in every))):
            held = {rank: values for rank, values in enumerate(groups) if values is not None}
            # (a key some ranks' step has not set yet is not compared)
            for key in sorted(set.intersection(*(set(values) for values in held.values())) if held else ()):
                seen = {rank: values[key] for rank, values in held.items()}
                if len(set(seen.values())) > 1:
                    shown = ", ".join(f"rank {rank}: {value}" for rank, value in seen.items())
                    return (f"{kind}'s step left another {key!r} in parameter group {number} on each rank of the "
                            f"pipeline ({shown}): it computes {key!r} from all the parameters it holds together (as "
                            f"Prodigy's and D-Adaptation's step size d is computed), and under a pipeline each "
                            f"rank's optimizer holds its own stages' parameters only, so each stage trains with a "
                            f"{key!r} of its own, none of them one device's. Use an optimizer that steps each "
                            f"parameter from its own gradient and state (SGD, Adam, AdamW), or train with {kind} on "
                            f"one device or under DDP")
    return None
