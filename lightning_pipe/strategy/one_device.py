"""Optimizer states as one device numbers them, both ways.

Torch numbers an optimizer's parameters group by group, in the order its ``configure_optimizers`` listed them; a
pipeline rank lists only its own stages' parameters. One device's order of a group is read from the ranks' orders
(:func:`group_orders`): where every rank lists it in the model's order (as ``self.parameters()`` and the usual
decay/no-decay filters over it do), the ranks' lists put together in the model's order, a tied parameter once at its
first name; where every rank lists it sorted by name (minGPT's ``sorted(decay)``), all of them sorted by name. That
gives both directions:

- :func:`one_device_optimizer_states`: a pipeline's states, numbered for a one-device ``fit(ckpt_path=...)``;
- :func:`one_device_names`: the parameters' names of a one-device (or DDP) checkpoint's states, so that a pipeline
  ``fit(ckpt_path=...)`` finds each parameter's state by its name, on any layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import inspect
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["one_device_optimizer_states", "optimizer_own", "local_group_names", "one_device_names", "group_orders",
           "sorts_by_name"]

_FIX = ("list the parameters in the model's order (as self.parameters() does), give the optimizer "
        "named_parameters(), or start a new fit from the weights (YourModule.load_from_checkpoint(path), then "
        "trainer.fit(model) without ckpt_path)")


def sorts_by_name(module: Any) -> bool:
    """Whether ``module``'s ``configure_optimizers`` may list parameters sorted by name (minGPT's ``sorted(decay)``):
    the source of a class of the module's (not Lightning's), or of a submodule with a ``configure_optimizers`` of its
    own (minGPT's model, which the module's calls), sorts something, or cannot be read. Code that does not sort lists
    them in the model's order (or in neither order, which every rank's list then shows)."""
    classes = [cls for cls in type(module).__mro__ if not cls.__module__.startswith(("lightning", "torch", "builtins"))]
    classes += [type(part) for part in module.modules() if part is not module
                and callable(getattr(type(part), "configure_optimizers", None))]
    for cls in dict.fromkeys(classes):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            return True
        if "sorted(" in source or ".sort(" in source:
            return True
    return False


def group_orders(ranks: Sequence[Sequence[str]], order: Mapping[str, int], first: Mapping[str, str],
                 by_name: bool = True) -> list[list[str]]:
    """The orders one device may have listed a group in, given each rank's list of it (by its names there): the
    model's order where every rank's list follows it, sorted by name where every rank's is sorted (both where both
    hold and they differ; none where neither holds), but not where every rank's list follows the model's order and
    the code does not sort (``by_name=False``, :func:`sorts_by_name`: an encoder-decoder's ranks each list their
    stack's layers, in both orders). Each order names a tied parameter once, by its first name."""
    def follows(names: Sequence[str], key: Any) -> bool:
        keys = [key(name) for name in names]
        return keys == sorted(keys)

    union = {first.get(name, name) for names in ranks for name in names}
    by_model = sorted(union, key=lambda name: (order.get(name, len(order)), name))
    sorted_names = sorted(union)
    def in_model_order(names: Sequence[str]) -> bool:  # a tied copy at its own place, or at its first name's
        known = [name for name in names if name in order]
        return follows(known, order.__getitem__) or follows([first.get(name, name) for name in known],
                                                             lambda name: order.get(name, len(order)))

    model = all(in_model_order(names) for names in ranks)
    named = all(follows(names, str) for names in ranks)
    if model and not by_name:
        return [by_model]
    return ([by_model] if model else []) + ([sorted_names] if named and not (model and sorted_names == by_model)
                                            else [])


def _recorded(orders: list[list[list[str]]] | None, index: int, group: int) -> list[str] | None:
    """Group ``group`` of optimizer ``index`` in ``orders`` (:func:`~.optimizers.whole_orders`), if recorded."""
    return orders[index][group] if orders is not None and index < len(orders) and group < len(orders[index]) \
        else None


def _whole_order(orders: Sequence[Any], index: int, group: int, lists: Sequence[Sequence[str]],
                 first: Mapping[str, str]) -> list[str] | None:
    """Group ``group`` of optimizer ``index`` as one device lists it, where every rank recorded it alike (each saw
    the whole model while configure_optimizers ran: :func:`~.optimizers.whole_orders`) and it holds just the
    parameters the ranks' groups hold (``lists``, by their names there); else None."""
    found = [_recorded(o, index, group) for o in orders]
    if not found or found[0] is None or any(other != found[0] for other in found[1:]):
        return None
    whole = list(dict.fromkeys(first.get(name, name) for name in found[0]))
    held = {first.get(name, name) for names in lists for name in names}
    return whole if set(whole) == held else None


def one_device_optimizer_states(shares: Sequence[Mapping[str, Any]], state_keys: Sequence[str],
                                tied: Mapping[str, str] | None = None,
                                by_name: bool = True) -> list[dict[str, Any]] | None:
    """Every rank's optimizer states (``shares``, as :func:`gather_checkpoint` collects them) put together as one
    device's optimizers number them, so that a one-device ``fit(ckpt_path=...)`` resumes them too: each group's
    parameters in one device's order (:func:`group_orders`, ``state_keys`` the model's), a tied parameter once, at its
    first name's place (``tied``: each name of a tied parameter -> its first name on one device, :func:`tied_names`).
    ``None`` where that order cannot be known (a rank's group in neither order, both possible and different) or the
    ranks' groups differ. ``by_name``: whether the code may sort by name (:func:`sorts_by_name`)."""
    order = {key: index for index, key in enumerate(state_keys)}
    first = dict(tied or {})
    counts = {len(part.get("optimizer_states", [])) for part in shares}
    if len(counts) != 1 or any(len(part["param_names"]) != len(part.get("optimizer_states", [])) for part in shares):
        return None
    merged = []
    for index in range(counts.pop()):
        states = [(part["optimizer_states"][index], part["param_names"][index]) for part in shares]
        if len({len(state["param_groups"]) for state, _ in states}) != 1:
            return None
        groups, values, number = [], {}, 0
        for group_index in range(len(states[0][0]["param_groups"])):
            lists: list[list[str]] = []  # each rank's group, by the parameters' names there
            found: dict[str, Any] = {}  # one device's name of each parameter -> its state
            hyper: dict[str, Any] | None = None
            for state, names in states:
                group = state["param_groups"][group_index]
                local = []
                for number_here in group["params"]:
                    known = [name for name in names[number_here] if name in order]
                    if not known:  # a stage with nothing to train holds a placeholder
                        continue
                    local.append(known[0])
                    found.setdefault(first.get(known[0], known[0]), state["state"].get(number_here))
                lists.append(local)
                if local and hyper is None:
                    hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            whole = _whole_order([part.get("whole_orders") for part in shares], index, group_index, lists, first)
            candidates = [whole] if whole is not None else group_orders(lists, order, first, by_name)
            if hyper is None or len(candidates) != 1:
                return None
            (names_in_order,) = candidates
            group = {**hyper, "params": list(range(number, number + len(names_in_order)))}
            if any("param_names" in state["param_groups"][group_index] for state, _ in states):
                group["param_names"] = names_in_order
            values.update((number + offset, found[name]) for offset, name in enumerate(names_in_order)
                          if found[name] is not None)
            number += len(names_in_order)
            groups.append(group)
        own_state, own_top = {}, {}  # what the optimizer keeps for itself (a step counter): alike on every rank
        for state, _ in states:
            here, top = optimizer_own(state)
            own_state = {**here, **own_state}
            own_top = {**top, **own_top}
        merged.append({**own_top, "state": {**values, **own_state}, "param_groups": groups})
    return merged


def optimizer_own(state: Mapping[str, Any]) -> tuple[dict[Any, Any], dict[str, Any]]:
    """What an optimizer's ``state_dict()`` keeps for the optimizer itself, not per parameter: its ``state``'s entries
    under keys that number no parameter (SPAM's ``"total_step"``), and its keys beside ``state`` and
    ``param_groups``; the same on every rank (counters of steps)."""
    numbers = {number for group in state.get("param_groups", []) for number in group.get("params", [])}
    own = {key: value for key, value in state.get("state", {}).items() if key not in numbers and isinstance(key, str)}
    return own, {key: value for key, value in state.items() if key not in ("state", "param_groups")}


def local_group_names(names: Mapping[int, Sequence[str]], optimizers: Sequence[Optimizer]) -> list[list[list[str]]]:
    """For each of this rank's optimizers, each group's parameters by their names here; ``names``: every name of each
    parameter by ``id`` (:func:`~.state_names.parameter_names`). A placeholder without a name is left out."""
    return [[[names[id(p)][0] for p in group["params"] if names.get(id(p))] for group in optimizer.param_groups]
            for optimizer in optimizers]


def one_device_names(states: Sequence[Mapping[str, Any]], ranks: Sequence[Sequence[Sequence[Sequence[str]]]],
                     state_keys: Sequence[str], tied: Mapping[str, str],
                     shapes: Mapping[str, Sequence[int]] | None = None,
                     by_name: bool = True, whole_orders: list[list[list[str]]] | None = None
                     ) -> list[dict[Any, list[str]]]:
    """For each of a one-device checkpoint's ``optimizer_states``, every name of each of its numbered parameters (each
    name of a tied one), as :func:`~.state_names.optimizer_entries` takes them.

    ``ranks``: every rank's :func:`local_group_names`; ``state_keys``: the whole model's ``state_dict`` keys in
    order; ``tied``: each name of a tied parameter -> its first name on one device (:func:`~.state_names.tied_names`);
    ``shapes``: the checkpoint's weights' shapes by name; ``by_name``: as for :func:`group_orders`. A group that names
    its parameters by the model's names (an optimizer given ``self.named_parameters()``) is read by those names; else
    in the order one device listed it (:func:`group_orders`). Where both the model's order and the names' are
    possible, the one under which every state kept in its parameter's shape (``exp_avg``) fits its parameter is taken
    (where both fit, the model's, unless the code sorts); a group listed across stages in another order shows where
    such a state does not fit. Raises ``ValueError`` (alike on every rank: all it reads is every
    rank's) where the checkpoint's groups do not fit this model's or the order cannot be told. ``whole_orders``:
    each group as one device lists it, where ``configure_optimizers`` saw the whole model
    (:func:`~.optimizers.whole_orders`): taken where it holds as many parameters as the saved group."""
    order = {key: index for index, key in enumerate(state_keys)}
    aliases: dict[str, list[str]] = {}
    for name, first in tied.items():
        aliases.setdefault(first, []).append(name)
    counts = {len(rank) for rank in ranks}
    if counts != {len(states)}:
        raise ValueError(f"the checkpoint holds {len(states)} optimizers' states, configure_optimizers returns "
                         f"{sorted(counts)} on the pipeline's ranks; resume with the configure_optimizers that wrote it")
    result = []
    for index, state in enumerate(states):
        saved = state["param_groups"]
        if {len(rank[index]) for rank in ranks} != {len(saved)}:
            raise ValueError(f"optimizer {index} has {len(saved)} parameter groups in the checkpoint and "
                             f"{sorted({len(rank[index]) for rank in ranks})} here: every rank's configure_optimizers "
                             f"must make the groups one device made (an empty group is fine)")
        numbered: dict[Any, list[str]] = {}  # torch's number (or a name, where a file keys its states by name)
        for number, group in enumerate(saved):
            where = f"group {number} of optimizer {index}"
            given = list(group.get("param_names") or ())
            whole = _recorded(whole_orders, index, number)
            if given and all(name in order for name in given):
                names = given
            elif whole is not None and len(whole) == len(group["params"]):
                names = whole
            else:  # no names, or not this module's (a child's named_parameters(), a compiled model's): the order
                candidates = group_orders([rank[index][number] for rank in ranks], order, tied)
                if not candidates:
                    raise ValueError(f"a rank's configure_optimizers lists {where} in neither the model's order nor "
                                     f"by name, so which of a one-device checkpoint's optimizer states is whose "
                                     f"cannot be known; {_FIX}")
                names = _fitting(candidates, state, group["params"], shapes or {}, where, by_name)
            for name, place in zip(names, group["params"]):
                numbered[place] = aliases.get(name, [name])
        result.append(numbered)
    return result


# the states torch's optimizers keep in the shape of their parameter (Adafactor's factored ones are not)
_PARAMETER_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                               "sum", "exp_inf", "prev", "step_size", "ax", "grad_avg"})


def _fitting(candidates: list[list[str]], state: Mapping[str, Any], places: Sequence[Any],
             shapes: Mapping[str, Sequence[int]], where: str, by_name: bool = True) -> list[str]:
    """The one order of ``candidates`` (the model's first) under which the group's states fit their parameters; where
    both fit, the model's, if the code does not sort (``by_name=False``)."""
    misfits = [_misfit(names, state, places, shapes) for names in candidates]
    fitting = [names for names, misfit in zip(candidates, misfits) if misfit is None]
    if len(fitting) == 1 or (fitting and not by_name and misfits[0] is None):
        return fitting[0]
    if fitting:
        raise ValueError(f"{where} of this one-device checkpoint may list its parameters in the model's order or "
                         f"sorted by name (every rank's list is both), and its states fit either way, so which state "
                         f"is whose cannot be told; {_FIX}")
    if len(candidates[0]) != len(places):
        raise ValueError(f"{where} holds {len(places)} parameters in the checkpoint and {len(candidates[0])} in this "
                         f"model: resume with the model and configure_optimizers that wrote it")
    raise ValueError(f"{misfits[0]}: configure_optimizers lists {where} in another order than the model's, so which "
                     f"state is whose cannot be known here; {_FIX}")


def _misfit(names: Sequence[str], state: Mapping[str, Any], places: Sequence[Any],
            shapes: Mapping[str, Sequence[int]]) -> str | None:
    """Where a state kept in its parameter's shape does not fit the parameter ``names`` give it (None: all fit)."""
    if len(names) != len(places):
        return "another number of parameters"
    for name, place in zip(names, places):
        shape = shapes.get(name)
        for key, value in state["state"].get(place, {}).items():
            if shape is not None and key in _PARAMETER_SHAPED and isinstance(value, torch.Tensor) \
                    and tuple(value.shape) != tuple(shape):
                return (f"a one-device optimizer state ({key!r}, shape {tuple(value.shape)}) falls to {name} (shape "
                        f"{tuple(shape)})")
    return None
