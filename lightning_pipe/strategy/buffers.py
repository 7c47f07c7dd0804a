"""Buffers of the pipelined model that a pipeline treats otherwise than one device, said once on the rank holding
them: batch norms normalize each micro-batch by its own statistics, and any other buffer its forward changes (a
``spectral_norm``'s power iteration, a layer's own running statistics) changes once per micro-batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["warn_of_batch_norms", "BufferWatch"]

def warn_of_batch_norms(stages: Sequence[nn.Module], num_microbatches: int) -> None:
    """Say, on a rank whose ``stages`` hold batch norms, that they normalize each micro-batch by its own statistics."""
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for stage in stages for m in stage.modules())
    if count and num_microbatches > 1:
        warnings.warn(f"this rank's {count} batch norm(s) normalize each of the {num_microbatches} micro-batches of a "
                      f"step by that micro-batch's statistics in training (as GPipe's do), so outputs and gradients "
                      f"differ from one device's, which uses the whole batch's; their running statistics are the whole "
                      f"batch's, updated once per step. num_microbatches=1 gives one device's results; GroupNorm and "
                      f"LayerNorm do not depend on the batch", stacklevel=3)


_COMPARED = 4096  # a buffer up to this size is compared by value as well


def _changed(before: tuple, after: tuple) -> bool:
    if before[:2] != after[:2]:
        return True
    first, second = before[2], after[2]
    return first is not None and second is not None and not torch.equal(first, second)


class BufferWatch:
    """Over the first ``steps`` training steps of several micro-batches: which buffers of ``stages()`` (this rank's
    share of the model) other than batch norms' (deferred to once per step) the step changed; warns once."""

    def __init__(self, stages: Callable[[], Sequence[nn.Module]], num_microbatches: int, steps: int = 2) -> None:
        self._stages = stages
        self._num_microbatches = num_microbatches
        self._left = steps if num_microbatches > 1 else 0

    def _versions(self) -> dict[str, tuple[int, int]]:
        stages = self._stages()
        # torch's batch norms, also as a captured model's parts (which stand for them): deferred. Not by their
        # buffers' names: an InstanceNorm's running statistics, or a module's own, are updated per micro-batch.
        deferred = {id(buffer) for stage in stages for module in stage.modules()
                    if isinstance(module.__dict__.get("_original", module), nn.modules.batchnorm._BatchNorm)
                    for buffer in module.buffers()}
        # a small buffer's values too: a fused kernel (torch's default fake-quantize observers) writes them in place
        # without moving the version counter
        return {name: (id(buffer), buffer._version,
                       buffer.detach().clone() if buffer.numel() <= _COMPARED and not buffer.is_meta else None)
                for stage in stages for name, buffer in stage.named_buffers() if id(buffer) not in deferred}

    def before(self) -> dict[str, tuple] | None:
        """Each buffer as (object, version, a small one's values) before a step; None once the steps to watch are
        over."""
        return self._versions() if self._left > 0 else None

    def after(self, before: dict[str, tuple] | None) -> None:
        """Warn, once, of the buffers changed (in place or replaced) since ``before``."""
        if before is None:
            return
        after = self._versions()
        self._left -= 1
        changed = sorted(name for name, seen in before.items() if name in after and _changed(seen, after[name]))
        if changed:
            self._left = 0
            more = " ..." if len(changed) > 6 else ""
            warnings.warn(f"the forward changes the buffers {', '.join(changed[:6])}{more} (a spectral_norm's power "
                          f"iteration, a layer's own running statistics): under a pipeline this happens once per "
                          f"micro-batch ({self._num_microbatches} per step), where one device does it once per batch, "
                          f"so they and what depends on them differ from one device's. num_microbatches=1 matches one "
                          f"device; torch's batch norms are updated once per step already", stacklevel=4)
