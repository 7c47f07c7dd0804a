"""One pipeline stage: its slice of layers, the forward and backward of micro-batches, and what backward keeps."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lightning_pipe.engine.tree import tree_flatten

__all__ = ["PipelineStage"]


class PipelineStage:
    """Runs ``module`` (stage ``stage_index`` of ``num_stages``) on micro-batches and back-propagates them.

    Forward keeps the micro-batch's input and output until its backward; with ``checkpoint_activations`` it
    keeps only the input and recomputes the forward during backward (GPipe's re-materialization; RNG state is
    restored so dropout draws the same mask). Gradients accumulate in the module's parameters.
    """

    def __init__(
        self,
        module: nn.Module,
        stage_index: int,
        num_stages: int,
        device: torch.device | str = "cpu",
        checkpoint_activations: bool = False,
    ) -> None:
        self.module = module
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.device = torch.device(device)
        self.checkpoint_activations = checkpoint_activations
        self._inputs: dict[int, list[torch.Tensor]] = {}  # micro-batch -> input leaves
        self._outputs: dict[int, Any] = {}  # micro-batch -> output tree (or the scaled loss, on the last stage)
        self._weight_grads_owed: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def forward(self, microbatch: int, inputs: Any) -> Any:
        """Run the layers on ``inputs`` and keep what the backward of ``microbatch`` needs."""
        if torch.is_grad_enabled():
            self._inputs[microbatch] = tree_flatten(inputs)[0]
        if self.checkpoint_activations and torch.is_grad_enabled():
            output = checkpoint(self.module, inputs, use_reentrant=False, preserve_rng_state=True)
        else:
            output = self.module(inputs)
        if torch.is_grad_enabled():
            self._outputs[microbatch] = output
        return output

    def hold(self, microbatch: int, loss: torch.Tensor) -> None:
        """On the last stage: back-propagate ``microbatch`` from ``loss`` instead of from the layers' output."""
        self._outputs[microbatch] = loss

    def backward(self, microbatch: int, grad_outputs: list[torch.Tensor | None] | None) -> list[torch.Tensor | None]:
        """Back-propagate ``microbatch`` given its output gradients (``None`` from a held loss).

        Returns the gradient of each input leaf (``None`` where the input needs none) and frees the micro-batch.
        """
        tensors, grads = self._roots(microbatch, grad_outputs)
        if tensors:
            torch.autograd.backward(tensors, grads)
        inputs = self._inputs.pop(microbatch)
        return [x.grad if x.requires_grad else None for x in inputs]

    def backward_input(
        self, microbatch: int, grad_outputs: list[torch.Tensor | None] | None
    ) -> list[torch.Tensor | None]:
        """The input-gradient half of :meth:`backward`; :meth:`backward_weight` must follow for ``microbatch``."""
        tensors, grads = self._roots(microbatch, grad_outputs)
        inputs = self._inputs.pop(microbatch)
        wanted = [x for x in inputs if x.requires_grad]
        results = iter(torch.autograd.grad(tensors, wanted, grads, retain_graph=True, allow_unused=True)
                       if tensors and wanted else [])
        self._weight_grads_owed[microbatch] = (tensors, grads)
        return [next(results) if x.requires_grad else None for x in inputs]

    def backward_weight(self, microbatch: int) -> None:
        """The weight-gradient half of :meth:`backward` for a micro-batch that went through :meth:`backward_input`."""
        tensors, grads = self._weight_grads_owed.pop(microbatch)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if tensors and params:
            torch.autograd.backward(tensors, grads, inputs=params)

    def _roots(
        self, microbatch: int, grad_outputs: list[torch.Tensor | None] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        output = self._outputs.pop(microbatch)
        if grad_outputs is None:  # a scalar loss
            return ([output], [None]) if output.requires_grad else ([], [])
        leaves = tree_flatten(output)[0]
        if len(leaves) != len(grad_outputs):
            raise RuntimeError(
                f"stage {self.stage_index} got {len(grad_outputs)} output gradients for {len(leaves)} outputs "
                f"of micro-batch {microbatch}"
            )
        pairs = [(t, g) for t, g in zip(leaves, grad_outputs) if g is not None and t.requires_grad]
        return [t for t, _ in pairs], [g for _, g in pairs]

    def clear(self) -> None:
        """Drop everything kept for backward (after a failed or forward-only step)."""
        self._inputs.clear()
        self._outputs.clear()
        self._weight_grads_owed.clear()

    @property
    def num_held(self) -> int:
        """Micro-batches whose activations are held for a backward still to come."""
        return len(self._outputs) + len(self._weight_grads_owed)
