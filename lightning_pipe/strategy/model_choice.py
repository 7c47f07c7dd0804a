"""Which model of a LightningModule the strategy pipelines, and how: the ``nn.Sequential`` path (:mod:`.split`, the
no-tracing fast path) whenever the module has one outermost ``nn.Sequential`` holding every trainable parameter;
otherwise a capture (:mod:`.captured`) of the child attribute (``self.model``, ``self.net``) holding every trainable
parameter, or of the one ``layers=`` names, or, when several attributes hold them (``self.encoder``,
``self.decoder``), of the LightningModule's own ``forward`` (path ``""``)."""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import torch.nn as nn

from lightning_pipe.strategy.chain import chain_paths

__all__ = ["choose_model", "owners", "undo_compile", "SEQUENCE", "CAPTURED", "CHAIN"]

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
            raise ValueError(f"{type(module).__name__} has no submodule {layers!r}; pass layers= the attribute path of "
                             f"the model the step calls, e.g. layers='model'") from None
        if isinstance(target, nn.Sequential) and split_points is None:
            return SEQUENCE, layers
        return CAPTURED, layers
    trainable = {id(p) for p in module.parameters() if p.requires_grad or thawing}
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
    if chain is not None and not (_own_forward(module) and _forward_calls_all(module, chain)):
        return CHAIN, None  # nn.Sequential attributes the step calls in turn (:mod:`.chain`)
    if _own_forward(module):
        return CAPTURED, ""  # the module's forward holds the model: the step calls self(...)
    raise ValueError(f"PipelineStrategy cannot tell which model of {type(module).__name__} to pipeline: its trainable "
                     f"parameters are spread over {owners(module, thawing)} and it has no forward. Put the model in one "
                     f"attribute that the step calls (self.model = MyModel(...)) and name it with layers='model' if "
                     f"needed, or call the layers from the module's forward and call self(...) in the step; or, for "
                     f"one nn.Sequential, put every trainable layer inside it")


def undo_compile(module: nn.Module) -> list[str]:
    """Put back the module that each ``torch.compile``d submodule of ``module`` wraps (an ``OptimizedModule``, whose
    compiled code would call the layers as they were, not the stages they are cut into); return their paths.

    The state dict keeps the names one device gives (``net._orig_mod.0.weight``), so that checkpoints load into the
    compiled module as the user built it; loading takes either name."""
    if not any(type(m).__name__ == "OptimizedModule" for m in module.modules()):
        return []  # no import of torch._dynamo for the common case
    from torch._dynamo.eval_frame import OptimizedModule

    undone = []
    for name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, OptimizedModule):
                setattr(parent, child_name, child._orig_mod)
                parent._register_state_dict_hook(functools.partial(_compiled_names, child_name))
                parent._register_load_state_dict_pre_hook(functools.partial(_uncompiled_names, child_name))
                undone.append(f"{name}.{child_name}" if name else child_name)
    return undone


def _compiled_names(child: str, module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """State-dict hook: ``{prefix}{child}.x`` is named ``{prefix}{child}._orig_mod.x``, in place and in order."""
    inside = f"{prefix}{child}."
    if not any(key.startswith(inside) for key in state):
        return
    items = list(state.items())
    state.clear()
    state.update((f"{inside}_orig_mod.{key[len(inside):]}" if key.startswith(inside) else key, value)
                 for key, value in items)


def _uncompiled_names(child: str, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load pre-hook: ``{prefix}{child}._orig_mod.x`` loads into ``{prefix}{child}.x``."""
    compiled = f"{prefix}{child}._orig_mod."
    for key in [key for key in state if key.startswith(compiled)]:
        state[f"{prefix}{child}.{key[len(compiled):]}"] = state.pop(key)


def _own_forward(module: nn.Module) -> bool:
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
    """The attributes holding ``module``'s trainable parameters (all of its parameters when ``thawing``)."""
    return sorted({name.split(".")[0] for name, p in module.named_parameters() if p.requires_grad or thawing})
