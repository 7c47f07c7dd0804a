"""Tensors a captured forward left outside the model: a forward hook that keeps a layer's output in a dict of the
LightningModule (``self.features[name] = output``, for an auxiliary loss or to log), a hook setting
``self.last_feature``. Export runs the forward once, on fake tensors, so what such code stores is the capture's fake,
never a step's value; the step after the model then met it deep in the strategy's machinery ("``.numpy()`` is not
supported for tensor subclasses"). :func:`mark_not_kept` finds them after each capture and puts a :class:`NotKept` in
their place, whose every use raises an error saying why and what to do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

__all__ = ["NotKept", "mark_not_kept"]

_LIGHTNING_OWN = frozenset({"_trainer", "_fabric", "_parameters", "_buffers", "_modules", "_hparams",
                            "_hparams_initial", "_metric_attributes", "_device_mesh"})


class NotKept(torch.Tensor):
    """Stands in for a tensor that a captured forward stored outside the model: any use raises, saying why."""

    @staticmethod
    def __new__(cls, where: str, model: str) -> NotKept:
        tensor = torch.Tensor._make_subclass(cls, torch.empty(0))
        tensor.__dict__.update(where=where, model=model)
        return tensor

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        found = next((a for a in (*args, *(kwargs or {}).values()) if isinstance(a, NotKept)), None)
        where, model = (found.__dict__["where"], found.__dict__["model"]) if found is not None else ("it", "the model")
        raise RuntimeError(f"{where} was stored while {model} was captured (by a forward hook, or an assignment in "
                           f"its forward); under PipelineStrategy the forward runs as a captured graph, which does not "
                           f"store such values at each step, and the layer that computed it may run on another rank. "
                           f"Return what the step needs from the model's forward (e.g. the logits and the features "
                           f"for an auxiliary loss) instead of storing it")

    def __deepcopy__(self, memo: Any) -> NotKept:  # a deep copy of the module (an EMA callback's) copies the stand-in
        return NotKept(self.__dict__["where"], self.__dict__["model"])

    def __reduce_ex__(self, protocol: Any) -> Any:
        return NotKept, (self.__dict__["where"], self.__dict__["model"])

    def __repr__(self) -> str:
        return f"NotKept({self.__dict__['where']})"


def mark_not_kept(module: nn.Module, model: str) -> list[str]:
    """Put a :class:`NotKept` in place of each fake tensor in ``module``'s own attributes, directly or in dicts and
    lists there (two levels deep); returns their places."""
    found: list[str] = []

    def visit(container: Any, path: str, depth: int) -> None:
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in list(items):
            where = f"{path}[{key!r}]"
            if isinstance(value, torch.Tensor) and not isinstance(value, NotKept) and is_fake(value):
                container[key] = NotKept(where, model)
                found.append(where)
            elif isinstance(value, (dict, list)) and depth < 2:
                visit(value, where, depth + 1)

    name = type(module).__name__
    for attribute, value in list(module.__dict__.items()):
        if attribute in _LIGHTNING_OWN:
            continue
        if isinstance(value, torch.Tensor) and not isinstance(value, NotKept) and is_fake(value):
            module.__dict__[attribute] = NotKept(f"{name}.{attribute}", model)
            found.append(f"{name}.{attribute}")
        elif isinstance(value, (dict, list)):
            visit(value, f"{name}.{attribute}", 1)
    return found
