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

Likewise a parameter that ``configure_optimizers`` names directly (``[self.logit_scale]`` in a group of its own) where
another rank holds it: while it runs, this rank's stand-in for its module holds a placeholder under that name, taken
out of the groups afterwards as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

__all__ = ["PLACEHOLDER", "placeholders", "drop_placeholders"]

PLACEHOLDER = "_pipeline_stage_trains_nothing"


@contextmanager
def placeholders(module: nn.Module, device: torch.device,
                 elsewhere: Sequence[tuple[nn.Module, str]] = ()) -> Iterator[list[nn.Parameter]]:
    """Inside, each ``(owner, name)`` of ``elsewhere`` (parameters other ranks hold) is a placeholder parameter of
    ``owner``, and ``module`` holds one more if none of its parameters requires grad; yields the placeholders."""
    made: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for owner, name in elsewhere:
            made.append((owner, name, nn.Parameter(torch.empty(0, device=device))))
            owner.register_parameter(name, made[-1][2])
        if not any(p.requires_grad for p in module.parameters()):
            made.append((module, PLACEHOLDER, nn.Parameter(torch.empty(0, device=device))))
            module.register_parameter(PLACEHOLDER, made[-1][2])
        yield [placeholder for _, _, placeholder in made]
    finally:
        for owner, name, _ in made:
            del owner._parameters[name]


def drop_placeholders(optimizers: Iterable[torch.optim.Optimizer], made: Sequence[nn.Parameter]) -> None:
    """Take the placeholders ``made`` out of every group of ``optimizers`` (a group may be left empty: a step skips
    it); not out of an ``LBFGS``, whose step concatenates its one group's gradients (none would fail)."""
    ids = {id(placeholder) for placeholder in made}
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.LBFGS):
            continue
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        for placeholder in made:
            optimizer.state.pop(placeholder, None)
