"""A gradient scaler (``precision="16-mixed"``) under a pipeline: one loss scale and one decision to skip a step.

Lightning's ``MixedPrecision`` scales the loss before backward, unscales each optimizer's gradients after the closure
(noting any inf or NaN among them), skips ``optimizer.step`` when it noted one, and updates the scale: halved after a
skip, doubled after a run of good steps. Under a pipeline each rank holds one stage's gradients, so each rank's
scaler would see only its own infs: one stage would skip a step that the others take, and the scales would drift
apart. Here the engine seeds every micro-batch's backward with the scaler's scale (the same on every rank: all start
at the same value and update on the same decisions), and after each unscale the ranks' counts of non-finite
gradients are summed over the pipeline, so that every stage skips together (data-parallel replicas hold averaged
gradients, so their counts agree already).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.engine.deadline import collective

__all__ = ["agree_on_overflow", "refuse_self_unscaling", "scaled"]


def scaled(loss_scale: float, scaler: Any | None) -> float:
    """``loss_scale`` times the scaler's current scale (its initial one before its first step), if there is one."""
    return loss_scale * scaler.get_scale() if scaler is not None else loss_scale


def refuse_self_unscaling(optimizers: list[torch.optim.Optimizer]) -> None:
    """A fused optimizer (``fused=True``) unscales and looks for infs inside its own ``step``, where no rank learns of
    another's: refused, with the fix."""
    fused = [type(optimizer).__name__ for optimizer in optimizers
             if getattr(optimizer, "_step_supports_amp_scaling", False)]
    if fused:
        raise ValueError(f"{', '.join(fused)} with fused=True unscales its gradients inside its own step, where the "
                         f"pipeline's stages cannot agree on skipping a step under precision='16-mixed' (each would "
                         f"skip on its own); pass fused=False (foreach=True is as fast on most models), or use "
                         f"precision='bf16-mixed'")


def agree_on_overflow(scaler: Any, group: dist.ProcessGroup | None, device: torch.device, timeout: float) -> None:
    """Make ``scaler.unscale_`` sum its non-finite counts over ``group`` (whose collectives run on ``device``), on this
    scaler object: ``scaler.step`` unscales through it too, and ``step`` and ``update`` read the summed counts."""
    if getattr(scaler.unscale_, "agrees_over_the_pipeline", False):
        return
    unscale = scaler.unscale_

    def unscale_(optimizer: torch.optim.Optimizer) -> None:
        unscale(optimizer)
        state = scaler._per_optimizer_states[id(optimizer)]
        found: dict[torch.device, torch.Tensor] = state["found_inf_per_device"]
        total = torch.zeros((), dtype=torch.float32, device=device)
        for count in found.values():
            total += count.to(device, torch.float32)
        collective(dist.all_reduce, total, what="the gradient scaler's inf/NaN count all_reduce", group=group,
                   timeout=timeout)
        # a rank whose optimizer has no gradient still needs a count: scaler.step asserts that one was recorded
        state["found_inf_per_device"] = {where: total.to(where) for where in (found or [device])}

    unscale_.agrees_over_the_pipeline = True  # type: ignore[attr-defined]
    scaler.unscale_ = unscale_
