"""Optimizer states as one device numbers them, both ways.

Torch numbers an optimizer's parameters group by group, in the order its ``configure_optimizers`` listed them; a
pipeline rank lists only its own stages' parameters. Where every rank lists each group in the model's order (as
``self.parameters()`` and the usual decay/no-decay filters over it do), one device's numbering is the ranks' groups
put together in the model's order, a tied parameter once at its first name. That gives both directions:

- :func:`one_device_optimizer_states`: a pipeline's states, numbered for a one-device ``fit(ckpt_path=...)``;
- :func:`one_device_names`: the parameters' names of a one-device (or DDP, or FSDP full) checkpoint's states, so that
  a pipeline ``fit(ckpt_path=...)`` finds each parameter's state by its name, on any layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["one_device_optimizer_states", "local_group_names", "one_device_names"]


def one_device_optimizer_states(shares: Sequence[Mapping[str, Any]], state_keys: Sequence[str],
                                tied: Mapping[str, str] | None = None) -> list[dict[str, Any]] | None:
    """Every rank's optimizer states (``shares``, as :func:`gather_checkpoint` collects them) put together as one
    device's optimizers number them, so that a one-device ``fit(ckpt_path=...)`` resumes them too: each group's
    parameters in the model's order (``state_keys``), a tied parameter once, at its first name's place (``tied``:
    each name of a tied parameter -> its first name on one device, :func:`tied_names`). ``None`` where that order
    cannot be known: a rank's group lists its parameters in another order than the model's, or the ranks' groups
    differ."""
    order = {key: index for index, key in enumerate(state_keys)}
    first = dict(tied or {})
    position = {name: order[first.get(name, name)] for name in order if first.get(name, name) in order}
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
            found: dict[int, Any] = {}  # one device's place of each parameter (its first name's) -> its state
            hyper: dict[str, Any] | None = None
            for state, names in states:
                group = state["param_groups"][group_index]
                positions = []
                for local in group["params"]:
                    known = [name for name in names[local] if name in order]
                    if not known:  # a stage with nothing to train holds a placeholder
                        continue
                    positions.append(order[known[0]])  # this rank's order: by its first name here
                    found.setdefault(position[known[0]], state["state"].get(local))  # one device's place
                if positions != sorted(positions):
                    return None
                if positions and hyper is None:
                    hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            if hyper is None:
                return None
            places = sorted(found)
            group = {**hyper, "params": list(range(number, number + len(places)))}
            if any("param_names" in state["param_groups"][group_index] for state, _ in states):
                group["param_names"] = [state_keys[place] for place in places]
            values.update((number + offset, found[place]) for offset, place in enumerate(places)
                          if found[place] is not None)
            number += len(places)
            groups.append(group)
        merged.append({"state": values, "param_groups": groups})
    return merged


def local_group_names(names: Mapping[int, Sequence[str]], optimizers: Sequence[Optimizer]) -> list[list[list[str]]]:
    """For each of this rank's optimizers, each group's parameters by their names here; ``names``: every name of each
    parameter by ``id`` (:func:`~.checkpoint.parameter_names`). A placeholder without a name is left out."""
    return [[[names[id(p)][0] for p in group["params"] if names.get(id(p))] for group in optimizer.param_groups]
            for optimizer in optimizers]


def one_device_names(states: Sequence[Mapping[str, Any]], ranks: Sequence[Sequence[Sequence[Sequence[str]]]],
                     state_keys: Sequence[str], tied: Mapping[str, str],
                     shapes: Mapping[str, Sequence[int]] | None = None) -> list[dict[Any, list[str]]]:
    """For each of a one-device checkpoint's ``optimizer_states``, every name of each of its numbered parameters (each
    name of a tied one), as :func:`~.checkpoint.optimizer_entries` takes them.

    ``ranks``: every pipeline rank's :func:`local_group_names`; ``state_keys``: the whole model's ``state_dict`` keys
    in order; ``tied``: each name of a tied parameter -> its first name on one device (:func:`~.checkpoint.tied_names`);
    ``shapes``: the checkpoint's weights' shapes by name. A group that names its parameters (an optimizer given
    ``named_parameters()``) is read by those names; else by the model's order, which every rank's group must follow
    (a group listed across stages in another order shows where a state of the parameter's shape, ``exp_avg`` say, has
    another shape than the parameter given it). Raises ``ValueError`` (alike on every rank: all
    it reads is every rank's) where the checkpoint's groups do not fit this model's."""
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
            names = list(group.get("param_names") or _in_model_order([rank[index][number] for rank in ranks], order,
                                                                      tied, index, number))
            if len(names) != len(group["params"]):
                raise ValueError(f"group {number} of optimizer {index} holds {len(group['params'])} parameters in "
                                 f"the checkpoint and {len(names)} in this model: resume with the model and "
                                 f"configure_optimizers that wrote it")
            for name, place in zip(names, group["params"]):
                _check_shapes(state["state"].get(place, {}), name, (shapes or {}).get(name), index, number)
                numbered[place] = aliases.get(name, [name])
        result.append(numbered)
    return result
# the states torch's optimizers keep in the shape of their parameter (Adafactor's factored ones are not)
_PARAMETER_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                               "sum", "exp_inf", "prev", "step_size", "ax", "grad_avg"})


def _check_shapes(values: Mapping[str, Any], name: str, shape: Sequence[int] | None, index: int, number: int) -> None:
    for key, value in values.items():
        if shape is not None and key in _PARAMETER_SHAPED and isinstance(value, torch.Tensor) \
                and tuple(value.shape) != tuple(shape):
            raise ValueError(f"a one-device optimizer state of group {number} of optimizer {index} ({key!r}, shape "
                             f"{tuple(value.shape)}) falls to {name} (shape {tuple(shape)}) in the model's order: "
                             f"configure_optimizers lists the group's parameters in another order than the model's, "
                             f"so which state is whose cannot be known here; list the parameters in the model's order "
                             f"(as self.parameters() does), give the optimizer named_parameters(), or start a new fit "
                             f"from the weights (YourModule.load_from_checkpoint(path), then trainer.fit(model) without "
                             f"ckpt_path)")


def _in_model_order(ranks: Sequence[Sequence[str]], order: Mapping[str, int], tied: Mapping[str, str], index: int,
                    number: int) -> list[str]:
    """One group's parameters on one device: every rank's, in the model's order, a tied one once by its first name."""
    for rank, names in enumerate(ranks):
        places = [order[name] for name in names if name in order]  # by its name here: a tied head's is its own
        if places != sorted(places):
            raise ValueError(f"pipeline rank {rank}'s configure_optimizers lists group {number} of optimizer {index} "
                             f"in another order than the model's, so which of a one-device checkpoint's optimizer "
                             f"states is whose cannot be known; list the parameters in the model's order (as "
                             f"self.parameters() does), or start a new fit from the weights "
                             f"(YourModule.load_from_checkpoint(path), then trainer.fit(model) without ckpt_path)")
    return sorted({tied.get(name, name) for names in ranks for name in names},
                  key=lambda name: order.get(name, len(order)))
