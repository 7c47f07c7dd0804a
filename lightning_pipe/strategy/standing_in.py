"""Where the pieces of a captured model are reached after the cut: this rank's share, a stand-in that says where the
rest is, or, for the step's own modules, the module itself.

A captured model is replaced by a proxy holding this rank's share of its state (:class:`~.pipelined_model.
PipelinedModel`). Other paths to it (aliases, hyper-parameters) lead to the proxy's holders or to a
:class:`~.references.LayerElsewhere` (:func:`redirect_into`); where the model is the module's own ``forward``, each
child of the module is stood in for by the proxy's part, except the step's own modules (a frozen loss or teacher
the forward never reads), which stay whole (:func:`stand_in_for_children`); and the parameters no local segment
holds go to the meta device (:func:`release_others`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn

from lightning_pipe.capture import Segment
from lightning_pipe.strategy.model_parts import ModelPart, has_state
from lightning_pipe.strategy.pipelined_model import PipelinedModel
from lightning_pipe.strategy.references import LayerElsewhere, redirect, shared_advice

__all__ = ["redirect_into", "release_others", "stand_in_for_children"]


def stand_in_for_children(module: nn.Module, proxy: PipelinedModel, model: nn.Module, segments: Sequence[Segment],
                          unread_state: set[str], local: Sequence[Segment]) -> list[str]:
    """Where ``model`` is ``module``'s own forward (a twin of it): make ``module`` this rank's share of itself, its
    children the proxy's parts and its ``forward`` the proxy's; returns the names of the module's own trainable
    parameters that no graph reads (the step's, outside the model)."""
    # A child whose state no graph reads, with nothing to train, is the step's, not the forward's (a
    # weighted loss, a frozen teacher): it stays whole on every rank. Any other child is this rank's share.
    read = _read_tensors(model, segments, unread_state)
    kept: list[nn.Module] = []
    replaced: dict[int, nn.Module] = {}
    used = [name for name, child in module._modules.items() if child is not None and any(
        id(t) in read for t in itertools.chain(child.parameters(), child.buffers()))]
    for name, child in list(module._modules.items()):
        if child is None or name not in proxy._modules:
            continue
        unread = not any(id(t) in read for t in itertools.chain(child.parameters(), child.buffers()))
        trainable = any(p.requires_grad for p in child.parameters())
        if unread and not trainable:
            kept.append(child)
            continue
        module._modules[name] = replaced[id(child)] = proxy._modules[name]
        if unread and has_state(child):
            layers = (f"; or, where the step applies it to what forward returns (a head on the features of "
                      f"{used[0]!r}), pass PipelineStrategy(layers={used[0]!r}): the pipeline then cuts "
                      f"{used[0]!r}, and every rank holds {name!r} for the step" if len(used) == 1 else "")
            reason = (f"{name!r} holds trainable parameters that {type(module).__name__}.forward does not "
                      f"use, so no pipeline stage holds it; a pipeline trains only the model it cuts (the "
                      f"module's forward here): call it inside forward, or freeze it with "
                      f"requires_grad_(False){layers}")
            for part in proxy._modules[name].modules():  # (heads["a"] of a ModuleDict of heads too)
                if isinstance(part, ModelPart):
                    part.reason = reason
    _replace_in_containers(module, replaced)
    # The module's own parameters that no graph reads (a scale the step applies) stay whole on every rank, as
    # such children do; a trainable one is the step's, outside the model: it gets a gradient on one rank only,
    # which the step's check refuses, saying so.
    unread = {name: p for name, p in module._parameters.items() if p is not None and id(p) not in read}
    module._parameters = {**unread, **proxy._parameters}
    module._buffers = dict(proxy._buffers)
    module._non_persistent_buffers_set = set(proxy._non_persistent_buffers_set)
    module.forward = proxy.forward  # type: ignore[method-assign]
    object.__setattr__(module, "_pipelined_model", proxy)
    release_others(local, [model, *segments], keep=kept)
    return [name for name, p in unread.items() if p.requires_grad]


def redirect_into(module: nn.Module, model: nn.Module, proxy: PipelinedModel, path: str) -> list[str]:
    """After ``model`` (at ``path``) was replaced by ``proxy``: :func:`~.references.redirect`, with a path into the
    model led to the proxy's holder of that module (segments hold the model's modules by name, not the modules
    themselves), which holds this rank's share of its state, as the path through the model does: a second name of a
    module that spans ranks (``self.backbone = self.model.bert``, as Lightning's ``BackboneFinetuning`` wants it) is
    frozen, thawed and saved as one device's, each rank its share (found by review: it was a stand-in holding nothing,
    the backbone was never thawed and its second name's keys were missing from the checkpoint); else a
    :class:`~.references.LayerElsewhere`."""
    held = dict(proxy.named_modules(remove_duplicate=False))

    def inside_to(alias: str, name: str, child: nn.Module) -> nn.Module:
        holder = held.get(name)
        if holder is None:
            return LayerElsewhere(alias, name, path, kind="captured model")
        if isinstance(holder, ModelPart) and holder.reason is None:  # run through the other path: say what to do
            holder.reason = (f"{alias!r} is the module {name!r} of the model at {path!r}, which is cut into pipeline "
                             f"stages; under PipelineStrategy only the step's call of the model runs its parts. "
                             + shared_advice(alias))
        return holder

    return redirect(module, model, proxy, path, inside_to)


def release_others(local: Sequence[Segment], holders: Sequence[nn.Module], keep: Sequence[nn.Module] = ()) -> None:
    """Put the parameters no ``local`` segment holds (other ranks') on the meta device, everywhere the model and its
    segments refer to them (one meta tensor per tensor): this rank keeps only its share of the weights in memory.
    Later captures run on meta twins anyway (:meth:`~lightning_pipe.capture.Splitter.capture` with
    ``capture_on_meta``). Buffers stay: a later capture may have a segment recompute from a buffer (a rope table)
    what the first one sent it, and the segment then takes it from the model."""
    mine = {id(p) for segment in local for p in segment.parameters()}
    mine.update(id(p) for module in keep for p in module.parameters())
    released: dict[int, nn.Parameter] = {}
    for holder in holders:
        for module in holder.modules():
            table = module._parameters
            for key, param in table.items():
                if param is None or id(param) in mine or param.is_meta:
                    continue
                if id(param) not in released:
                    released[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
                table[key] = released[id(param)]


def _read_tensors(model: nn.Module, segments: Sequence[Segment], unread: set[str]) -> set[int]:
    """The ids of ``model``'s parameters and buffers that some segment's graph reads (by any of their names)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {id(tensors[name]) for segment in segments for name in segment.state_names()
            if name not in unread and name in tensors}


def _replace_in_containers(module: nn.Module, replaced: dict[int, nn.Module]) -> None:
    """Where ``module`` keeps children in a plain dict, list or tuple of its own (``self.heads = {"a": self.head}``,
    modules kept by name outside a ModuleDict), the entries of ``replaced`` children (by id) become their
    replacements: the originals are released (left on the meta device), and would run there, naming nothing."""
    for attribute, value in list(vars(module).items()):
        if isinstance(value, dict) and any(id(item) in replaced for item in value.values()):
            for key, item in list(value.items()):
                value[key] = replaced.get(id(item), item)
        elif isinstance(value, list) and any(id(item) in replaced for item in value):
            value[:] = [replaced.get(id(item), item) for item in value]
        elif isinstance(value, tuple) and not hasattr(value, "_fields") \
                and any(id(item) in replaced for item in value):
            object.__setattr__(module, attribute, tuple(replaced.get(id(item), item) for item in value))


