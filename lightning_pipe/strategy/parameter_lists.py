"""Callback states that hold one tensor per parameter, listed in ``parameters()`` order: whole in a full checkpoint.

A hand-written EMA callback keeps ``shadow = [p.clone() for p in pl_module.parameters()]`` and saves it in its
``state_dict``. Under a pipeline each rank's list holds its own parameters' shadows, so a checkpoint holding rank 0's
list would resume on one device with half the shadows, and a one-device file would give every rank the whole list to
pair with its share. Here a full checkpoint's list is put together from every rank's in one device's order (a tied
parameter once), and a one-device file's list is cut to this rank's parameters when it is loaded. A list is taken for
such a state where it has as many tensors as the parameters, each of its parameter's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["whole_lists", "own_lists"]


def _fits(value: Any, names: Sequence[str], shapes: Mapping[str, Any]) -> bool:
    """Whether ``value`` is a list of one tensor per parameter of ``names``, each of its shape."""
    return (isinstance(value, (list, tuple)) and len(value) == len(names) > 0
            and all(isinstance(item, torch.Tensor) and name in shapes and tuple(item.shape) == tuple(shapes[name])
                    for item, name in zip(value, names)))


def _walk(value: Any, others: Sequence[Any], change: Callable[[Any, Sequence[Any]], Any]) -> Any:
    """``value`` (a callback state) with ``change(item, the others' items at its place)`` made at each of its values,
    dicts followed; ``others``: other ranks' states of the same structure (missing places: None)."""
    changed = change(value, others)
    if changed is not value:
        return changed
    if isinstance(value, dict):
        return {key: _walk(item, [other.get(key) if isinstance(other, Mapping) else None for other in others], change)
                for key, item in value.items()}
    return value


def whole_lists(merged: dict[str, Any], ranks: Sequence[Mapping[str, Any]], names: Sequence[Sequence[str]],
                whole: Sequence[str], shapes: Mapping[str, Any], first: Mapping[str, str]) -> dict[str, Any]:
    """The callback states ``merged`` (rank 0's lists) with each per-parameter list made one device's: ``ranks``:
    each rank's callback states, ``names``: each rank's parameters in its ``parameters()`` order, ``whole``: one
    device's, ``shapes``: each parameter's shape, ``first``: a tied parameter's one-device name by each of its names.
    A list is put together where every rank's fits its parameters and together they hold each of ``whole``'s."""
    def change(value: Any, at_ranks: Sequence[Any]) -> Any:
        if not _fits(value, names[0], shapes) or not all(_fits(item, rank_names, shapes)
                                                         for item, rank_names in zip(at_ranks, names)):
            return value
        by_name: dict[str, torch.Tensor] = {}
        for item, rank_names in zip(at_ranks, names):
            for tensor, name in zip(item, rank_names):
                by_name.setdefault(first.get(name, name), tensor)
        if any(name not in by_name for name in whole):
            return value
        return type(value)(by_name[name] for name in whole)

    return {key: _walk(state, [rank.get(key) for rank in ranks], change) for key, state in merged.items()}


def own_lists(callbacks: dict[str, Any], whole: Sequence[str], local: Sequence[str], shapes: Mapping[str, Any],
              first: Mapping[str, str], source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One device's callback states with each per-parameter list (of ``whole``, one device's parameters in order)
    cut to this rank's parameters ``local``, in its ``parameters()`` order (a tied copy by its one-device name).
    ``source``: one device's states to cut the lists from, where ``callbacks`` hold another rank's share of them (a
    pipeline's file resumed on another layout)."""
    index = {name: position for position, name in enumerate(whole)}

    def change(value: Any, whole_values: Sequence[Any]) -> Any:
        candidate = whole_values[0] if source is not None else value
        if not _fits(candidate, whole, shapes) or any(first.get(name, name) not in index for name in local):
            return value
        return type(candidate)(candidate[index[first.get(name, name)]] for name in local)

    return {key: _walk(state, [source.get(key)] if source is not None else [], change)
            for key, state in callbacks.items()}
