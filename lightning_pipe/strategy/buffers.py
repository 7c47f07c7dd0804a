"""Buffers of the pipelined model that a pipeline treats otherwise than one device, said once on the rank holding
them: batch norms normalize each micro-batch by its own statistics, and any other buffer its forward changes (a
``spectral_norm``'s power iteration, a layer's own running statistics) changes once per micro-batch. So too the
parameters a forward writes itself (a data-dependent initialization on the first call, as Glow's ActNorm makes):
from the first micro-batch's rows, not the whole batch's."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.strategy.step_effects import own_attributes
from lightning_pipe.strategy.unfollowed import FOREIGN, mark

__all__ = ["warn_of_batch_norms", "BufferWatch"]

def warn_of_batch_norms(stages: Sequence[nn.Module], num_microbatches: int) -> None:
    """Say, on a rank whose ``stages`` hold batch norms in training mode that the first training step ran, that they
    normalize each micro-batch by its own statistics (one in eval, a frozen backbone's, uses its running statistics,
    as on one device: also one a hook puts in eval mode as each epoch starts)."""
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                and m.__dict__.get("_used", True)  # a deferred one the step's forward never ran: not said
                for stage in stages for m in stage.modules())
    if count and num_microbatches > 1:
        warnings.warn(f"this rank's {count} batch norm(s) normalize each of the {num_microbatches} micro-batches of a "
                      f"step by that micro-batch's statistics in training (as GPipe's do), so outputs and gradients "
                      f"differ from one device's, which uses the whole batch's; their running statistics are the whole "
                      f"batch's, updated once per step (one device updates them at each call: a norm called more "
                      f"than once a step, as a ghost batch norm over chunks of the batch is, gets others). "
                      f"num_microbatches=1 gives one device's results; GroupNorm and "
                      f"LayerNorm do not depend on the batch", stacklevel=3)


_MODES_EVERY = 8  # steps between two looks at the layers' modes, once the watched steps are over
_COMPARED = 4096  # a buffer up to this size is compared by value as well


def _users(module: nn.Module) -> bool:
    """Whether ``module`` is of a class of the user's (not torch's, a library's, or this package's stand-ins)."""
    return type(module).__module__.split(".")[0] not in FOREIGN


def _changed(before: tuple, after: tuple) -> bool:
    if before[:2] != after[:2]:
        return True
    first, second = before[2], after[2]
    return first is not None and second is not None and not torch.equal(first, second)


def _masked(before: tuple[float, ...], after: tuple[float, ...]) -> bool:
    """Whether a parameter's write only set entries to zero (fewer of them nonzero, its magnitudes' sum smaller): a
    mask applied in forward (a masked convolution's ``weight.data *= mask``), the same whatever the input, which one
    device applies alike (found by review: warned of as a data-dependent initialization)."""
    return len(before) == len(after) == 3 and after[2] < before[2] and after[1] < before[1]


def _alike(first: tuple[float, ...], second: tuple[float, ...]) -> bool:
    """Equal sums, a NaN or an infinity equal to itself (a step that diverged is no write)."""
    return all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(first, second))


class BufferWatch:
    """Over the first ``steps`` training steps of several micro-batches: which buffers of ``stages()`` (this rank's
    share of the model) other than batch norms' (deferred to once per step) the step changed; warns once."""

    def __init__(self, stages: Callable[[], Sequence[nn.Module]], num_microbatches: int, steps: int = 2,
                 parameters: bool = True, runs_step: bool = True, rematerialized: bool = False) -> None:
        self._stages = stages
        self._rematerialized = rematerialized  # each forward runs again in backward (checkpoint_activations)
        self._num_microbatches = num_microbatches
        # a rank that does not run the step's code after the model (not the last stage's) looks at the layers' plain
        # attributes with one micro-batch too: the step reads the last stage's copies, which these layers never set
        self._runs_step = runs_step
        self._left = steps if num_microbatches > 1 or not runs_step else 0
        self._steps = steps
        # the layers' modes as last watched: a part put in train mode later (held in eval for a first epoch, then
        # trained) may start changing its buffers then, so a change of modes watches some steps more
        self._modes_seen: tuple[bool, ...] | None = None
        self._rearm = self._left > 0
        self._calls = 0
        self._parameters = parameters and num_microbatches > 1  # also the parameters (not where the optimizer steps
        # inside the run)
        self._attributes_warned = False

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
                       buffer.detach().clone() if buffer.numel() <= _COMPARED and not buffer.is_meta
                       and buffer.layout == torch.strided else None)  # (a sparse one, a graph's adjacency: torch
                # cannot compare it; found by review)
                for stage in stages for name, buffer in stage.named_buffers() if id(buffer) not in deferred}

    def _sums(self) -> dict[str, tuple[float, float, float]]:
        """Each parameter's sum, sum of magnitudes and count of entries not zero, accumulated in float64 (a write
        changes them; no copy of the weights is made, and one read from the device for all).
        ``Embedding(max_norm=...)`` renormalizes the rows it looks up in its forward as one device does: left out."""
        if not self._parameters:
            return {}
        named = [(f"{path}.{name}" if path else name, p) for stage in self._stages()
                 for path, module in stage.named_modules()
                 if not (isinstance(module, nn.Embedding) and module.max_norm is not None)
                 for name, p in module.named_parameters(recurse=False) if not p.is_meta and p.numel()]
        if not named:
            return {}
        with torch.no_grad():
            # (in float64: a frozen integer parameter, an int8 base under LoRA, an index table, has no norm itself)
            # (a complex parameter's real and imaginary parts: both are written)
            real = [torch.view_as_real(p) if p.is_complex() else p for _, p in named]
            sums = torch.stack([torch.stack([p.sum(dtype=torch.float64), torch.linalg.vector_norm(p.double(), 1),
                                             p.count_nonzero().double()]) for p in real]).cpu().tolist()
        return {name: (total, size, nonzero) for (name, _), (total, size, nonzero) in zip(named, sums)}

    def _attributes(self) -> dict[str, Any]:
        """The plain attributes of this rank's layers of the user's own classes (a call counter, a recurrent state
        kept for the next call), each marked (:func:`~.unfollowed.mark`)."""
        return {f"{path}.{name}" if path else name: mark(value) for stage in self._stages()
                for path, module in stage.named_modules() if _users(module)
                for name, value in own_attributes(module).items()}

    def before(self) -> tuple[dict[str, tuple], dict[str, tuple[float, ...]], dict[str, Any]] | None:
        """Each buffer as (object, version, a small one's values), each parameter's sums and each plain attribute
        of the layers before a step; None once the steps to watch are over."""
        self._calls += 1
        if self._rearm and (self._left > 0 or self._calls % _MODES_EVERY == 0):  # (a walk of every module)
            modes = tuple(module.training for stage in self._stages() for module in stage.modules())
            if self._left <= 0 and modes != self._modes_seen:
                self._left = self._steps
            self._modes_seen = modes
        return (self._versions(), self._sums(), self._attributes()) if self._left > 0 else None

    def after(self, before: tuple[dict[str, tuple], dict[str, tuple[float, ...]], dict[str, Any]] | None) -> None:
        """Warn, once, of the buffers changed (in place or replaced), of the parameters written and of the layers'
        plain attributes changed since ``before``."""
        if before is None:
            return
        before, sums, attributes = before
        # (one made or first set on the first call, a lazily filled cache, is not a change: a later one says it)
        moved = sorted(name for name, seen in self._attributes().items()
                       if attributes.get(name) is not None and attributes[name] != seen)
        if moved and not self._attributes_warned:
            self._attributes_warned = True
            more = " ..." if len(moved) > 6 else ""
            elsewhere = "" if self._runs_step else (
                " Above all, the step's code runs on the last stage's rank and reads that rank's copies of these "
                "layers, which their forward never sets there: a value the step collects from them (an auxiliary "
                "loss summed over self.modules(), a statistic to log) is stale, and its gradient never reaches this "
                "rank. Return such values from forward (carried along the sequence with the activations, or as "
                "the model's output), as a captured model must too; one computed over the batch's rows is then each "
                "micro-batch's: where that differs (a load-balancing loss, a product of two batch means), a check "
                "of the first step says so.")
            per_microbatch = "" if self._num_microbatches <= 1 else (
                f" Under a pipeline a stage's forward runs once per micro-batch ({self._num_microbatches} per step), "
                f"so a counter counts micro-batches and a state kept for the next call is the micro-batch's before, "
                f"of other rows: what depends on them differs from one device's. Count in a hook "
                f"(on_train_batch_start) and pass the count to the model, or carry a recurrent state through the step "
                f"(returned by the model, given back as an input).")
            warnings.warn(f"the forward changes the plain attributes {', '.join(moved[:6])}{more} of its layers (a "
                          f"call counter, a state kept for the next call: self.h = h.detach(), a value for the "
                          f"step: self.aux_loss).{elsewhere}{per_microbatch}", stacklevel=4)
        written = sorted(name for name, seen in self._sums().items() if name in sums and not _alike(seen, sums[name])
                         and not _masked(sums[name], seen))
        if written:
            self._parameters = False
            more = " ..." if len(written) > 6 else ""
            warnings.warn(f"the forward writes the parameters {', '.join(written[:6])}{more} itself. Under a "
                          f"pipeline each stage's forward first sees a micro-batch (1/{self._num_microbatches} of "
                          f"the batch's rows), not the whole batch: a data-dependent "
                          f"initialization on the first call (Glow's ActNorm: loc and scale from the input's "
                          f"statistics) takes that micro-batch's, so training starts elsewhere than on one device. "
                          f"Initialize such layers before trainer.fit, on a whole batch (the model is whole then: "
                          f"model.layers(batch) once), or pass num_microbatches=1", stacklevel=4)
        after = self._versions()
        self._left -= 1
        changed = sorted(name for name, seen in before.items() if name in after and _changed(seen, after[name]))
        if changed and self._num_microbatches > 1:
            self._left, self._rearm = 0, False
            more = " ..." if len(changed) > 6 else ""
            again = (f"twice per micro-batch ({2 * self._num_microbatches} per step: the forward re-materialized "
                     f"in backward, checkpoint_activations, changes them once more, so the backward differentiates "
                     f"another forward than the one whose loss it follows)" if self._rematerialized else
                     f"once per micro-batch ({self._num_microbatches} per step)")
            warnings.warn(f"the forward changes the buffers {', '.join(changed[:6])}{more} (a spectral_norm's power "
                          f"iteration, a layer's own running statistics, quantization-aware training's observers, "
                          f"whose ranges are then each micro-batch's): under a pipeline this happens {again}, "
                          f"where one device does it once per batch, so they and what depends on them differ from one "
                          f"device's. num_microbatches=1"
                          f"{' and checkpoint_activations=False match' if self._rematerialized else ' matches'} one "
                          f"device; torch's batch norms are updated once per step already. Where the step's own code "
                          f"changes them before calling the model (a KAN's grid updated from the batch's inputs), "
                          f"make that change in on_train_batch_start, which every rank runs once on the whole batch "
                          f"as one device does", stacklevel=4)
