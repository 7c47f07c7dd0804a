"""Captured batch norms a pipeline stage can defer: each training ``batch_norm`` op asks its module what to do.

In a captured graph a ``nn.BatchNorm`` is not a module call but two ops: ``aten.add_(num_batches_tracked, 1)`` and
``aten.batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps, ...)``, which updates the running
statistics in place. A pipeline stage runs that once per micro-batch, and again when it re-materializes a forward
in backward (``checkpoint_activations``): ``m`` or ``2m`` updates per step, each of a fraction of the batch. The
engine's deferred batch norm (:mod:`lightning_pipe.engine.batchnorm`) fixes exactly this for ``nn.BatchNorm``
modules a stage holds: it records each micro-batch's statistics in the stage's first forward and commits the whole
batch's once per step. Here both ops of a captured batch norm are rewritten to call functions bound to the model's
``BatchNorm`` module, which the segment holding its state also holds (:class:`~.segment.Segment`), so a stage
converts it like any other and these functions follow its rule. The module is marked ``_defers_in_graph``: a
subclass of torch's (timm's ``BatchNormAct2d``), whose own forward the stage cannot change, is then deferred too,
since here no forward runs.

- while the stage's forward or backward runs (the module's ``_deferred.active``): normalize with the micro-batch's
  statistics without touching the running ones, record them in a recording forward only, and leave
  ``num_batches_tracked`` alone (the commit counts the step);
- anywhere else (a plain module, a segment run on its own, an eval graph): the original ops, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .programs import Program

__all__ = ["defer_batch_norms"]

_BATCH_NORM = torch.ops.aten.batch_norm.default
_ADD_ = torch.ops.aten.add_.Tensor


def defer_batch_norms(program: Program, model: nn.Module) -> int:
    """Rewrite ``program``'s training batch norms (and their counters) to defer to their module; returns how many."""
    placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"]
    norms: dict[fx.Node, nn.Module] = {}  # a state placeholder -> the batch norm owning that buffer
    for node, (kind, name) in zip(placeholders, program.state):
        owner, _, leaf = name.rpartition(".")
        if kind == "BUFFER" and leaf in ("running_mean", "num_batches_tracked"):
            module = model.get_submodule(owner)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                norms[node] = module
                module._defers_in_graph = True  # a stage defers it, whatever its class (engine.batchnorm)
    changed = 0
    for node in program.graph_module.graph.nodes:
        if node.op != "call_function" or not node.args:
            continue
        if node.target is _BATCH_NORM and len(node.args) > 5 and node.args[5] is True and node.args[3] in norms:
            node.target = _deferred_norm(norms[node.args[3]])
            changed += 1
        elif node.target is _ADD_ and node.args[0] in norms:
            node.target = _deferred_count(norms[node.args[0]])
            norms[node] = norms[node.args[0]]  # a norm run again (a block repeated) counts on from this result
            changed += 1
    if changed:
        program.graph_module.recompile()
        program.forget_derived()
    return changed


def _active(module: nn.Module) -> Any:
    """The stage's deferred statistics of ``module`` while that stage is running it, else None."""
    deferred = getattr(module, "_deferred", None)
    return deferred if deferred is not None and deferred.active else None


def _deferred_norm(module: nn.Module) -> Callable[..., Any]:
    def deferred_batch_norm(input: torch.Tensor, weight: Any, bias: Any, running_mean: Any, running_var: Any,
                            training: bool, momentum: float, eps: float, cudnn_enabled: bool) -> torch.Tensor:
        deferred = _active(module)
        if deferred is None:
            return _BATCH_NORM(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)
        if deferred.recording:
            deferred.record(module, input)  # the stage's DeferredStatistics (engine.batchnorm)
        # the micro-batch's own statistics; no running statistics given, so none are updated
        return _BATCH_NORM(input, weight, bias, None, None, True, 0.0, eps, cudnn_enabled)

    return deferred_batch_norm


def _deferred_count(module: nn.Module) -> Callable[..., Any]:
    def deferred_count(counter: torch.Tensor, other: Any) -> torch.Tensor:
        if _active(module) is not None:
            return counter  # the step's commit counts it, once
        return counter.add_(other)

    return deferred_count
