"""Which model of a LightningModule the strategy pipelines, and how: the ``nn.Sequential`` path (:mod:`.split`, the
no-tracing fast path) whenever the module has one outermost ``nn.Sequential`` holding every trainable parameter;
otherwise a capture (:mod:`.captured`) of the child attribute (``self.model``, ``self.net``) holding every trainable
parameter, or of the one ``layers=`` names, or, when several attributes hold them (``self.encoder``,
``self.decoder``), of the LightningModule's own ``forward`` (path ``""``). A child the step never calls itself but
reaches through the LightningModule's ``forward`` (``self(x)`` calling ``self.vae.encode`` and ``decode``) is found
at the first capture (:meth:`~.cutting.PipelineCutting._capture`): that ``forward`` is captured instead."""

from __future__ import annotations

import inspect
import re
import weakref
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.chain import chain_paths
from lightning_pipe.strategy.state_names import uncompiled_name

__all__ = ["averaged", "choose_model", "compiled_paths", "owners", "own_forward", "undo_compile", "frozen_copies",
           "SEQUENCE", "CAPTURED", "CHAIN"]

SEQUENCE, CAPTURED, CHAIN = "sequence", "captured", "chain"


def choose_model(module: nn.Module, layers: str | None, split_points: Any = None,
                 thawing: bool = False) -> tuple[str, str | None]:
    """Which path cuts ``module`` and the attribute path of what it cuts: ``("sequence", path or None)`` (today's
    ``nn.Sequential`` path, which finds its sequence itself), ``("chain", None)`` (several ``nn.Sequential``
    attributes called in turn, :mod:`.chain`) or ``("captured", path)``. ``thawing``: frozen parameters will train
    later (a fine-tuning callback unfreezes them), so they count as trainable."""
    if layers is not None:
        try:
            target = module.get_submodule(layers)
        except AttributeError:
            children = ", ".join(f"{name!r} ({type(child).__name__})" for name, child in module.named_children())
            raise ValueError(f"{type(module).__name__} has no submodule {layers!r}; its children are "
                             f"{children or 'none'}. Pass layers= the attribute path of the model the step calls "
                             f"(a dotted path for a nested one: 'backbone.blocks'), or leave it out and the strategy "
                             f"finds it") from None
        if isinstance(target, nn.Sequential) and split_points is None:
            return SEQUENCE, layers
        return CAPTURED, layers
    trainable = {id(p) for p in module.parameters() if p.requires_grad or thawing} - averaged(module)
    if not own_forward(module):  # the module's own parameters (a learned temperature) are the step's, not the model's
        trainable -= {id(p) for p in module._parameters.values() if p is not None}
    outermost: list[nn.Sequential] = []
    names: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Sequential) and name and not any(name.startswith(f"{n}.") for n in names):
            names.append(name)
            outermost.append(child)
    if split_points is None and len(outermost) == 1 and trainable <= {id(p) for p in outermost[0].parameters()}:
        return SEQUENCE, None
    holders = [name for name, child in module.named_children()
               if trainable and trainable <= {id(p) for p in child.parameters()}]
    if holders:
        return CAPTURED, holders[0]
    if split_points is None and len(outermost) >= 1 and not trainable:
        return SEQUENCE, None  # nothing to train: the sequence path's own errors and checks apply
    chain = chain_paths(module) if split_points is None else None
    if chain is not None and not (own_forward(module) and _forward_calls_all(module, chain)):
        return CHAIN, None  # nn.Sequential attributes the step calls in turn (:mod:`.chain`)
    if own_forward(module):
        return CAPTURED, ""  # the module's forward holds the model: the step calls self(...)
    raise ValueError(f"PipelineStrategy cannot tell which model of {type(module).__name__} to pipeline: its trainable "
                     f"parameters are spread over {owners(module, thawing)} and it has no forward.{_copy_hint(module)} "
                     f"Name the attribute "
                     f"holding the model to pipeline, whose output the step then gives to the others (a classifier "
                     f"or margin head, an ArcFace: PipelineStrategy(layers={largest_owner(module, thawing)!r}); "
                     f"parameters the step uses before calling it, a condition's embedding or a classifier-free "
                     f"guidance's null embedding, belong inside that model, since only its output reaches the "
                     f"others); or "
                     f"put the model in one attribute that the step calls (self.model = MyModel(...)); or call the "
                     f"layers from the module's forward and call self(...) in the step; or, for one nn.Sequential, put "
                     f"every trainable layer inside it")


def undo_compile(module: nn.Module) -> list[str]:
    """Put back the module that each ``torch.compile``d submodule of ``module`` wraps (an ``OptimizedModule``, whose
    compiled code would call the layers as they were, not the stages they are cut into); return their paths."""
    if not any(type(m).__name__ == "OptimizedModule" for m in module.modules()):
        return []  # no import of torch._dynamo for the common case
    from torch._dynamo.eval_frame import OptimizedModule

    undone = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, OptimizedModule):
                setattr(parent, child_name, child._orig_mod)
                undone.append(f"{name}.{child_name}" if name else child_name)
    # a compiled module inside a compiled module: its path once the outer one is undone
    _COMPILED[module] = [uncompiled_name(path + ".").removesuffix(".") for path in undone]
    return undone


def compiled_paths(module: nn.Module) -> list[str]:
    """The paths :func:`undo_compile` undid in ``module`` (none if it found no compiled module)."""
    return _COMPILED.get(module, [])


_COMPILED: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


def own_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines its own ``forward`` (a LightningModule's default one runs nothing)."""
    from lightning.pytorch import LightningModule

    return type(module).forward not in (LightningModule.forward, nn.Module.forward)


def _forward_calls_all(module: nn.Module, names: list[str]) -> bool:
    """Whether the module's ``forward`` names every one of ``names`` (``self.encoder``...): then it is the model and
    is captured; a ``forward`` that gives the embedding only (Lightning's autoencoder) leaves the step's chain."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return all(re.search(rf"\bself\.{re.escape(name)}\b", source) for name in names)


def owners(module: nn.Module, thawing: bool = False) -> list[str]:
    """The attributes holding ``module``'s trainable parameters (all of its parameters when ``thawing``; never an
    average's copy: :func:`averaged`)."""
    copies = averaged(module)
    return sorted({name.split(".")[0] for name, p in module.named_parameters()
                   if (p.requires_grad or thawing) and id(p) not in copies})


def averaged(module: nn.Module) -> set[int]:
    """The ids of the parameters of ``module``'s averaged copies (torch's ``AveragedModel``, timm's ``ModelEma``,
    ``ModelEmaV2``, ``ModelEmaV3``: an EMA, SWA): they require grad as the model they copy does, but no optimizer
    trains them."""
    return {id(p) for part in module.modules() if _averaging(part) for p in part.parameters()}


def _averaging(part: nn.Module) -> bool:
    """Whether ``part`` is an averaged copy of a model it holds as ``.module`` (torch's ``AveragedModel``, timm's
    ``ModelEma*``)."""
    from torch.optim.swa_utils import AveragedModel

    return isinstance(part, AveragedModel) or (type(part).__name__.startswith("ModelEma")
                                               and isinstance(getattr(part, "module", None), nn.Module))


def callback_copies(callbacks: list[Any], model: nn.Module) -> list[str]:
    """The copies of the whole ``model`` that ``callbacks`` hold as attributes (timm's ``ModelEmaV3`` made in a
    callback's ``setup``, before the cut; an ``AveragedModel``; a frozen ``deepcopy``), by ``Class.attribute``."""
    wanted = _layout(model)
    found = []
    for callback in callbacks:
        if type(callback).__module__.startswith("lightning."):  # (Lightning's own: its WeightAveraging and SWA
            continue  # are given the copy of each rank's share)
        for name, value in vars(callback).items():
            if not isinstance(value, nn.Module) or not any(True for _ in value.parameters()):
                continue
            if _averaging(value) and _layout(value.module) == wanted or (
                    not any(p.requires_grad for p in value.parameters()) and _layout(value) == wanted):
                found.append(f"{type(callback).__name__}.{name}")
    return found


def parameter_lists(module: nn.Module, model: nn.Module, callbacks: list[Any]) -> list[str]:
    """Lists of one tensor per parameter of the whole ``model`` (or of ``module``), in order, that plain objects beside
    it hold, made before the cut (diffusers' ``EMAModel(self.unet.parameters())`` in ``__init__``: its
    ``shadow_params``; a hand-written ``self.shadow = [p.clone() for p in self.parameters()]``), by path: code pairing
    them by position with ``parameters()`` pairs the wrong ones where each rank holds its share (found by review)."""
    # (of every parameter, or of the trainable ones: an EMA of what the optimizer steps)
    wanted = [[tuple(p.shape) for p in part.parameters() if p.requires_grad or every]
              for part in (model, module) for every in (True, False)]
    own = {id(p) for p in module.parameters()}

    def pairs(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) >= 2 \
            and all(isinstance(item, torch.Tensor) and id(item) not in own for item in value) \
            and [tuple(item.shape) for item in value] in wanted

    def inner(value: Any) -> dict[str, Any]:  # an object's attributes or a dict's entries, looked into
        if isinstance(value, dict):
            return {f"[{key!r}]": item for key, item in value.items()}
        if not isinstance(value, (nn.Module, torch.Tensor, type)) and hasattr(value, "__dict__"):
            return {f".{key}": item for key, item in vars(value).items()}
        return {}

    holders = [("self", module)] + [(type(callback).__name__, callback) for callback in callbacks
                                    if not type(callback).__module__.startswith("lightning.")]
    found = []
    for owner, holder in holders:
        for name, value in vars(holder).items():
            if pairs(value):
                found.append(f"{owner}.{name}")
            elif not name.startswith("_"):  # (a module's own: its trainer, its hyper-parameters)
                found += [f"{owner}.{name}{key}" for key, item in inner(value).items() if pairs(item)]
    return found


def _blocks(part: nn.Module) -> int:
    """How many of ``part``'s modules hold parameters of their own."""
    return sum(1 for module in part.modules() if any(True for _ in module.parameters(recurse=False)))


def _layout(part: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(tensor.shape)) for name, tensor in (*part.named_parameters(), *part.named_buffers())]


def _copy_hint(module: nn.Module) -> str:
    """Where one attribute holding trainable parameters has another's structure (``self.ema =
    copy.deepcopy(self.model)``, not frozen), what that means under the pipeline."""
    children = dict(module.named_children())
    held = [name for name in owners(module) if name in children]  # (not a parameter of the module's own)
    for name in held:
        for other in held:
            if other != name and _layout(children[name]) == _layout(children[other]):
                return (f" {other} has the structure of {name}: if it is a copy no optimizer trains (an EMA, a "
                        f"momentum encoder, a target network), freeze it (self.{other}.requires_grad_(False)), and "
                        f"know that under PipelineStrategy code pairing its parameters with {name}'s (an EMA update) "
                        f"pairs the wrong ones: Lightning's EMAWeightAveraging callback keeps an EMA that works.")
    return ""


def largest_owner(module: nn.Module, thawing: bool = False) -> str:
    """The attribute among :func:`owners` holding the most parameters (a backbone, beside its head)."""
    def size(attribute: str) -> int:
        part = getattr(module, attribute, None)
        return sum(p.numel() for p in part.parameters()) if isinstance(part, nn.Module) else 0

    return max(owners(module, thawing), key=size, default="backbone")


def frozen_copies(module: nn.Module, path: str, model: nn.Module, running: set[int] | None = None) -> dict[str, str]:
    """``module``'s frozen submodules outside ``model`` (at ``path``) with the model's state names and shapes, and its
    averaged copies of the model (``AveragedModel``, timm's ``ModelEma*``): an EMA target, a teacher, a momentum
    encoder (BYOL, MoCo, DINO, a mean teacher), which the step's code pairs parameter by parameter with the model's;
    and frozen submodules with the names and shapes of one of the model's trainable children (lightly's BYOL keeps a
    momentum copy of its backbone and of its projection head beside them), never one whose parameters the pipelined
    model runs (``running``, their ids: the model's own by default; frozen first blocks of a stack are cut with it).
    Each by path, with what it copies."""
    wanted = _layout(model)
    running = {id(p) for p in model.parameters()} if running is None else running
    parts = {f"{path}.{name}" if path else name: _layout(child) for name, child in model.named_children()
             if any(p.requires_grad for p in child.parameters()) and _blocks(child) > 1}  # (not one layer's copy)
    found: dict[str, str] = {}
    for name, part in module.named_modules():
        inside = name == path or name.startswith(f"{path}.") or path.startswith(f"{name}.") or not name
        if not name or any(name.startswith(f"{other}.") for other in found) or part is model:
            continue
        if not inside and _averaging(part) and _layout(part.module) == wanted:
            found[name] = path
            continue
        if not any(True for _ in part.parameters()) or any(p.requires_grad or id(p) in running
                                                            for p in part.parameters()):
            continue
        layout = _layout(part)
        if not inside and layout == wanted:
            found[name] = path
        else:
            matches = [original for original, shape in parts.items() if shape == layout and original != name
                       and not original.startswith(f"{name}.") and not name.startswith(f"{original}.")]
            named = [original for original in matches if original.rpartition(".")[2] in name.rpartition(".")[2]]
            if matches:  # (a copy of one of two parts alike: the one its name says, backbone_momentum's backbone)
                found[name] = (named or matches)[0]
    return found
