"""The names a checkpoint keys state by: each parameter's names (tied, wrapped, compiled) and an optimizer's
``state_dict()`` as entries keyed by those names, which any layout (a pipeline's stages, one device) can read back.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_pipe.strategy.one_device import optimizer_own

__all__ = ["MODEL", "OPTIM", "OWN_STATE", "OWN_TOP", "parameter_keys", "parameter_names", "optimizers_parameter_names",
           "optimizer_entries", "boxed", "unboxed", "param_groups_of", "tied_names", "group_names", "compiled_names",
           "uncompiled_name", "uncompiled_names"]

MODEL, OPTIM = "model/", "optim/"  # the prefixes of named entries: weights, optimizer states
OWN_STATE, OWN_TOP = ":state", ":top"  # the names of an optimizer's own entries (not a parameter's: optimizer_entries)


def tied_names(module: torch.nn.Module) -> dict[str, str]:
    """Each name of a parameter that has several in the whole ``module`` (a tied one) -> its first name."""
    names = parameter_names(module)
    return {name: group[0] for group in names.values() if len(group) > 1 for name in group}


def parameter_names(module: torch.nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter of ``module`` (a tied parameter has several), by ``id``: the names its
    ``state_dict`` gives it, which a wrapper's hooks may change (torch's ``checkpoint_wrapper`` drops its
    ``_checkpoint_wrapped_module.``), as checkpoints and one device's optimizer states know them."""
    from lightning_pipe.strategy.share_warning import strategy_reads

    with strategy_reads():
        state = module.state_dict(keep_vars=True)
    stated: dict[int, list[str]] = {}
    for key, value in state.items():
        if isinstance(value, torch.nn.Parameter):
            stated.setdefault(id(value), []).append(key)
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in stated:
            names[id(param)] = stated[id(param)]
        else:
            names.setdefault(id(param), []).append(name)
    return names


def parameter_keys(module: torch.nn.Module) -> list[str]:
    """``module``'s parameters in ``named_parameters()`` order (a tied one once), by their first name as its
    ``state_dict`` gives it (:func:`parameter_names`)."""
    names = parameter_names(module)
    return [names[id(param)][0] for param in module.parameters()]


def optimizers_parameter_names(module: torch.nn.Module, optimizers: Sequence[Optimizer],
                               before: Mapping[int, list[str]] | None = None) -> list[list[list[str]]]:
    """For each optimizer, the names of each of its parameters, in the numbering of its ``state_dict()``; after
    them, those ``before`` gave it (:func:`parameter_names` when the model was cut) where it has other names now
    (pruning registers ``weight`` anew as ``weight_orig``)."""
    names = parameter_names(module)
    earlier = before or {}

    def all_names(param: torch.nn.Parameter) -> list[str]:
        now = names.get(id(param), [])
        return now + [name for name in earlier.get(id(param), []) if now and name not in now]

    return [[all_names(p) for group in optimizer.param_groups for p in group["params"]] for optimizer in optimizers]


def group_names(state: Mapping[str, Any], names: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Optimizer ``state_dict()``'s parameter groups as each parameter's first name (None for one without: a
    placeholder); ``names``: as :func:`optimizers_parameter_names`."""
    return [[names[number][0] if names[number] else None for number in group["params"]]
            for group in state["param_groups"]]


def optimizer_entries(index: int, state: Mapping[str, Any],
                      names: Sequence[Sequence[str]] | Mapping[Any, Sequence[str]]) -> dict[str, Any]:
    """Optimizer ``index``'s ``state_dict()`` (parameters numbered) as entries keyed by the parameters' names (each
    of a tied parameter's names): ``optim/<index>/<name>/<key>``; ``names``: as :func:`optimizers_parameter_names`.
    What the optimizer keeps for itself, not per parameter (a step counter under a string key of its ``state``, a
    key of its ``state_dict()`` beside ``state`` and ``param_groups``), is ``optim/<index>/:state/<key>`` and
    ``optim/<index>/:top/<key>`` (:func:`~.one_device.optimizer_own`)."""
    own, top = optimizer_own(state)
    entries = {f"{OPTIM}{index}/{OWN_STATE}/{key}": value for key, value in own.items()}
    entries.update((f"{OPTIM}{index}/{OWN_TOP}/{key}", value) for key, value in top.items())
    for number, values in state["state"].items():
        if number in own:
            continue
        for name in names[number]:
            for key, value in values.items():
                entries[f"{OPTIM}{index}/{name}/{key}"] = value
    return entries


_SPARSE = "sparse tensor"  # the first item of a boxed sparse tensor (:func:`boxed`)


def boxed(entries: Mapping[str, Any]) -> dict[str, Any]:
    """Named entries as a sharded folder stores them: an optimizer's own value in a tuple of one, which torch's
    distributed checkpoint keeps whole (it splits a dict into its items), and a sparse tensor (SGD's momentum for a
    sparse gradient), which it cannot write as a tensor, in a pair after :data:`_SPARSE`, kept whole as well."""
    return {key: (value,) if _own_entry(key) else
            (_SPARSE, value) if isinstance(value, torch.Tensor) and value.layout != torch.strided else value
            for key, value in entries.items()}


def unboxed(key: str, value: Any) -> Any:
    """An entry of a sharded folder as :func:`optimizer_entries` named it (see :func:`boxed`)."""
    if _own_entry(key) and isinstance(value, tuple) and len(value) == 1:
        return value[0]
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and value[0] == _SPARSE:
        return value[1]
    return value


def _own_entry(key: str) -> bool:
    parts = key[len(OPTIM):].split("/") if key.startswith(OPTIM) else []
    return len(parts) >= 3 and parts[1] in (OWN_STATE, OWN_TOP)


def param_groups_of(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An optimizer ``state_dict()``'s parameter groups without their parameters (the hyperparameters)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in state["param_groups"]]


_COMPILED_PART = re.compile(r"(^|\.)_orig_mod\.")  # what torch.compile's wrapper adds to its module's names


def uncompiled_name(key: str) -> str:
    """``key`` without what ``torch.compile``'s wrappers add (``layers._orig_mod.0.weight`` -> ``layers.0.weight``)."""
    return _COMPILED_PART.sub(r"\1", key)


def compiled_names(state: dict[str, Any], compiled: Sequence[str]) -> dict[str, Any]:
    """``state`` under the names one device gives the state of the ``compiled`` module paths (``layers.0.weight`` ->
    ``layers._orig_mod.0.weight``; a compiled module inside another gets both), in order: what a checkpoint file
    holds, so that it loads into the module as its user built it."""
    if not compiled:
        return state
    prefixes = sorted((f"{path}." for path in compiled), key=len, reverse=True)  # inner ones first

    def named(key: str) -> str:
        for prefix in prefixes:
            if key.startswith(prefix):
                key = f"{prefix}_orig_mod.{key[len(prefix):]}"
        return key

    return {named(key): value for key, value in state.items()}


def uncompiled_names(state: dict[str, Any], known: Collection[str] | None = None) -> dict[str, Any]:
    """``state`` with the ``_orig_mod`` parts left out of its names where the name without them is one of ``known``
    and the name itself is not (every name, without ``known``), in order: a checkpoint of a compiled module, loaded
    where the compile is undone, or into a module that was never compiled."""
    if not any("_orig_mod." in key for key in state):
        return state

    def named(key: str) -> str:
        plain = uncompiled_name(key)
        return plain if known is None or (plain in known and key not in known) else key

    return {named(key): value for key, value in state.items()}
