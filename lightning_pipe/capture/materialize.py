"""Give some segments' state storage on a device, everywhere the model refers to it, keeping tied tensors one object."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from .segment import Segment

__all__ = ["materialize", "put_in_place"]


def materialize(local: Sequence[Segment], holders: Iterable[nn.Module],
                device: torch.device) -> dict[int, torch.Tensor]:
    """Put the parameters and buffers of the ``local`` segments on ``device``: a meta tensor becomes an
    uninitialized one there, a real one is moved there. Every module of ``holders`` (the model, every segment) that
    refers to one of them gets the new tensor, so that the model, its segments and a tied parameter's every use
    keep sharing one object (``Module.to`` / ``to_empty`` would give each module a copy of its own). Returns the
    new tensors by the ``id`` of the old ones; the rest of the model stays where it is (on meta: no memory).

    Values are the caller's to fill: load a checkpoint by the model's names (``segment.load_state_dict``), or run
    the modules' own initialization (``reset_parameters``). Non-persistent buffers (rope tables) are not in a
    checkpoint: recompute them.
    """
    device = torch.device(device)
    new: dict[int, torch.Tensor] = {}
    for segment in local:
        for name in segment.state_names():
            owner, leaf = segment._where[name]
            old = getattr(owner, leaf)
            if id(old) not in new:
                new[id(old)] = _placed(old, device)
    put_in_place(holders, new)
    return new


def put_in_place(holders: Iterable[nn.Module], new: dict[int, torch.Tensor]) -> None:
    """In every module of ``holders``, replace each parameter or buffer whose ``id`` is a key of ``new`` by its value
    (one object for every module that referred to the old one)."""
    if not new:
        return
    for holder in holders:
        for module in holder.modules():
            for table in (module._parameters, module._buffers):
                for key, tensor in table.items():
                    if tensor is not None and id(tensor) in new:
                        table[key] = new[id(tensor)]


def _placed(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor
    with torch.no_grad():
        value = torch.empty_like(tensor, device=device) if tensor.is_meta else tensor.to(device)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(value, requires_grad=tensor.requires_grad)
    return value
