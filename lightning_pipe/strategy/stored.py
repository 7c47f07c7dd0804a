"""Tensors a captured forward left outside the model: a forward hook that keeps a layer's output in a dict of the
LightningModule (``self.features[name] = output``, for an auxiliary loss or to log), a hook setting
``self.last_feature``. Export runs the forward once, on fake tensors, so what such code stores is the capture's fake,
never a step's value; the step after the model then met it deep in the strategy's machinery ("``.numpy()`` is not
supported for tensor subclasses"). :func:`mark_not_kept` finds them after each capture and puts a :class:`NotKept` in
their place, whose every use raises an error saying why and what to do (what code walking a module's attributes
asks of a tensor, its shape or version, it answers as an empty tensor).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

__all__ = ["NotKept", "mark_not_kept"]

_LIGHTNING_OWN = frozenset({"_trainer", "_fabric", "_parameters", "_buffers", "_modules", "_hparams",
                            "_hparams_initial", "_metric_attributes", "_device_mesh"})


_LOOKS = frozenset({torch.Tensor.is_inference, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.size,
                    *(getattr(torch.Tensor, name).__get__ for name in ("_version", "requires_grad", "device", "dtype",
                                                                        "shape", "layout", "is_leaf", "grad"))})


class NotKept(torch.Tensor):
    """Stands in for a tensor that a captured forward stored outside the model: any use raises, saying why."""

    @staticmethod
    def __new__(cls, where: str, model: str) -> NotKept:
        tensor = torch.Tensor._make_subclass(cls, torch.empty(0))
        tensor.__dict__.update(where=where, model=model)
        return tensor

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _LOOKS:  # what code that walks a module's attributes asks of a tensor: the empty stand-in's
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        found = next((a for a in (*args, *(kwargs or {}).values()) if isinstance(a, NotKept)), None)
        where, model = (found.__dict__.get("where", "it"), found.__dict__.get("model", "the model")) \
            if found is not None else ("it", "the model")
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
    """Put a :class:`NotKept` in place of each fake tensor in ``module``'s own attributes, directly or in dicts, lists
    and tuples there (three levels deep; a tuple is rebuilt, a named one as its type); returns their places."""
    found: list[str] = []

    def replaced(value: Any, where: str, depth: int) -> Any:
        if isinstance(value, torch.Tensor):
            if isinstance(value, NotKept) or not is_fake(value):
                return value
            found.append(where)
            return NotKept(where, model)
        if depth >= 3:
            return value
        if isinstance(value, (dict, list)):
            for key, item in list(value.items() if isinstance(value, dict) else enumerate(value)):
                new = replaced(item, f"{where}[{key!r}]", depth + 1)
                if new is not item:
                    value[key] = new
            return value
        if isinstance(value, tuple):
            items = [replaced(item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value)]
            if any(new is not item for new, item in zip(items, value)):
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    name = type(module).__name__
    for attribute, value in list(module.__dict__.items()):
        if attribute not in _LIGHTNING_OWN:
            new = replaced(value, f"{name}.{attribute}", 0)
            if new is not value:
                module.__dict__[attribute] = new
    return found
