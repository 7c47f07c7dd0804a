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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

__all__ = ["PLACEHOLDER", "placeholder_if_untrainable", "drop_placeholder"]

PLACEHOLDER = "_pipeline_stage_trains_nothing"


@contextmanager
def placeholder_if_untrainable(module: nn.Module, device: torch.device) -> Iterator[nn.Parameter | None]:
    """Inside, ``module`` holds a placeholder parameter if none of its parameters requires grad; yields it, or
    ``None``."""
    if any(p.requires_grad for p in module.parameters()):
        yield None
        return
    placeholder = nn.Parameter(torch.empty(0, device=device))
    module.register_parameter(PLACEHOLDER, placeholder)
    try:
        yield placeholder
    finally:
        del module._parameters[PLACEHOLDER]


def drop_placeholder(optimizers: Iterable[torch.optim.Optimizer], placeholder: nn.Parameter) -> None:
    """Take ``placeholder`` out of every group of ``optimizers`` (a group may be left empty: a step skips it); not out
    of an ``LBFGS``, whose step concatenates its one group's gradients (none would fail)."""
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.LBFGS):
            continue
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if p is not placeholder]
        optimizer.state.pop(placeholder, None)
