"""Non-finite values (NaN, infinity) caught where they first appear: in a stage's forward output, the loss, the
gradient a stage sends back, or a stage's parameter gradients, naming the step, micro-batch and stage.

The pipelined counterpart of Lightning's ``detect_anomaly`` (``PipelineConfig(detect_anomaly=True)``). The executor
checks each of those after the action that made it; the first check that fails raises :class:`NonFiniteError` on
that rank, and the executor's failure path ends every rank with it. Each check is one ``isfinite().all()`` per tensor
(one reduction and one host sync): a debugging option, off by default. Parameter gradients accumulate over the
micro-batches, so the first micro-batch whose backward makes one non-finite is the one named.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .tree import tree_flatten

__all__ = ["NonFiniteError", "check_finite", "check_gradients"]


class NonFiniteError(FloatingPointError):
    """A NaN or infinity appeared in a pipeline step (see :mod:`.anomaly`)."""


def _bad(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def check_finite(value: Any, what: str, where: str) -> None:
    """Raise :class:`NonFiniteError` if a floating tensor of the tree ``value`` holds a NaN or an infinity; ``what``
    names the value ("the loss"), ``where`` the place ("stage 3, micro-batch 1 of training step 5")."""
    for index, tensor in enumerate(tree_flatten(value)[0]):
        if tensor is not None and _bad(tensor.detach()):
            kinds = _kinds(tensor)
            raise NonFiniteError(f"{kinds} first appeared in {what} (tensor {index}, shape {tuple(tensor.shape)}) "
                                 f"at {where}; detect_anomaly=True stopped training there (check the inputs, the "
                                 f"learning rate, or the layers of that stage)")


def check_gradients(named: Iterable[tuple[str, torch.nn.Parameter]], where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first parameter whose gradient holds a NaN or an infinity."""
    for name, param in named:
        if param.grad is not None and _bad(param.grad):
            raise NonFiniteError(f"{_kinds(param.grad)} first appeared in the gradient of parameter {name!r} "
                                 f"(shape {tuple(param.shape)}) at {where}; detect_anomaly=True stopped training "
                                 f"there (check the loss scale, the learning rate, or the layers of that stage)")


def _kinds(tensor: torch.Tensor) -> str:
    tensor = tensor.detach()
    nan = bool(torch.isnan(tensor).any())
    inf = bool(torch.isinf(tensor).any())
    return "NaN and infinity" if nan and inf else "NaN" if nan else "infinity"
