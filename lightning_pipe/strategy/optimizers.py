"""The module's ``configure_optimizers`` on every rank: a stage with nothing to train still gets an optimizer, and an
error on one rank is raised on all of them before any waits.

After the cut, ``self.parameters()`` in ``configure_optimizers`` lists only this rank's share of the model. A stage can
own no trainable parameter (activations and pooling, a frozen embedding, a partition that gives a rank only such
layers); ``torch.optim.SGD(self.parameters())`` then raises "optimizer got an empty parameter list" on that rank
alone, and the others, waiting for it in their first step, saw only a lost connection. Such a stage still runs its
forward and backward (its input gradients are needed upstream), so it is supported instead: while
``configure_optimizers`` runs, the module holds one placeholder parameter (an empty tensor that never gets a
gradient, so the optimizer never changes anything). It is removed from the module afterwards, so that the model's
``state_dict`` and checkpoints are unchanged; only the optimizer keeps it, and its state is empty.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

__all__ = ["PLACEHOLDER", "placeholder_if_untrainable"]

PLACEHOLDER = "_pipeline_stage_trains_nothing"


@contextmanager
def placeholder_if_untrainable(module: nn.Module, device: torch.device) -> Iterator[bool]:
    """Inside, ``module`` holds a placeholder parameter if none of its parameters requires grad; yields whether."""
    if any(p.requires_grad for p in module.parameters()):
        yield False
        return
    module.register_parameter(PLACEHOLDER, nn.Parameter(torch.empty(0, device=device)))
    try:
        yield True
    finally:
        del module._parameters[PLACEHOLDER]
