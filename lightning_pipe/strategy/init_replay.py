"""Computing again, on the CPU, what the recording (:mod:`~.init_tape`) says meta tensors hold: only the operations
they depend on, each random draw seeded by the tensor it draws into (see :mod:`~.recorded_init`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map

from lightning_pipe.strategy.init_tape import EMPTY, HOST, TAPE, WRITERS, Entry, Layout, layout_of, needed, storage_key
from lightning_pipe.strategy.randomness import derive_seed, name_digest

__all__ = ["flows", "replay", "storage_names"]

_DRAW_STREAM = 14  # derived seeds of the replayed random draws (see strategy/randomness.Stream)


class _Replayed:
    """The new tensors of a replay, by the recorded meta tensor they stand for."""

    def __init__(self) -> None:
        self.real: dict[int, tuple[Layout, torch.Tensor]] = {}  # id(meta tensor) -> its layout then, new tensor
        self.made: dict[int, list[tuple[Layout, torch.Tensor]]] = {}  # meta storage -> (layout, new tensor)

    def add(self, recorded_tensor: torch.Tensor, layout: Layout | None, result: torch.Tensor) -> None:
        if layout is not None:
            self.real[id(recorded_tensor)] = layout, result
            self.made.setdefault(layout[0], []).append((layout, result))

    def of(self, tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The new tensor for ``tensor`` (of ``layout`` then): itself recorded with that layout (``.data = ...``
        gives a tensor another storage under the same object), else a tensor on the same storage (a parameter made
        of a recorded tensor, which no operation returned) seen through its geometry. KeyError if unknown."""
        found = self.real.get(id(tensor))
        if found is not None and found[0] == layout:
            return found[1]
        on_storage = self.made.get(layout[0], [])
        for seen, result in reversed(on_storage):
            if seen[1:] == layout[1:]:
                return result
        if on_storage and on_storage[-1][0][4] == layout[4]:
            return torch.as_strided(on_storage[-1][1], layout[1], layout[2], layout[3])
        raise KeyError(id(tensor))

    def host(self, value: Any, inputs: dict[int, Layout], generator: torch.Generator | None) -> Any:
        if isinstance(value, torch.Tensor) and value.is_meta:
            return self.of(value, inputs[id(value)])
        if isinstance(value, torch.device) and value.type == "meta":
            return HOST
        if isinstance(value, torch.Generator) and generator is not None:
            return generator  # a draw seeded as the others are, the user's generator left alone
        return value


class _Unknown(Exception):
    """A value the replay cannot know."""


def _unknown_if_unwritten(inputs: list[Any], out: Any) -> None:
    """A value derived from what nothing wrote (NaN since an ``empty``) without carrying the NaN (a comparison, a count)
    would pass for known."""
    if any(isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex())
           for t in tree_leaves(out)) and any(isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
                                               and bool(torch.isnan(t).any()) for t in inputs):
        raise _Unknown


def storage_names(module: nn.Module) -> dict[int, str]:
    """The names of ``module``'s meta tensors by storage (the first of a tied tensor's names), for :func:`replay`."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    names: dict[int, str] = {}
    for name, tensor in named:
        if tensor.is_meta:
            names.setdefault(storage_key(tensor), name)
    return names


def flows(names: dict[int, str]) -> dict[int, tuple[str, int]]:
    """For each draw into a temporary (``torch.randn(...) * scale``, one matrix copied into several layers, a row
    drawn per loop into a parameter), the first named tensor (``names``) its values reach and how many draws into
    temporaries reached that tensor before it: one pass over the recording, by which storages each op reads and
    writes."""
    pending: dict[int, list[int]] = {}  # storage -> draws into temporaries whose values it holds, not yet named
    reached: dict[int, tuple[str, int]] = {}
    counts: dict[str, int] = {}
    for index, entry in enumerate(TAPE):
        carried = sorted({draw for key in entry.reads for draw in pending.get(key, ())})
        if entry.draws and not any(key in names for key in entry.writes):
            carried.append(index)
        if not carried:
            continue
        named = sorted(names[key] for key in entry.writes if key in names)
        if named:
            for draw in carried:
                if draw not in reached:
                    reached[draw] = named[0], counts.get(named[0], 0)
                    counts[named[0]] = counts.get(named[0], 0) + 1
        for key in entry.writes:
            if key not in names:
                pending[key] = sorted(set(pending.get(key, [])) | set(carried))
    return reached


def _draw_seed(seed: int, entry: Entry, index: int, names: dict[int, str], reached: dict[int, tuple[str, int]],
               label: str, others: list[int]) -> int:
    """A draw into a named tensor (``names``) is seeded by that name and how many draws into it came before; a draw
    into a temporary by the named tensor it first reaches and its count among those (:func:`flows`), else by
    ``label`` (the tensor replayed) and a count (``others``) of such draws in the replay. So every replay that needs
    a draw makes it alike, on every rank and whatever else was recorded (a target network loaded from its online
    network has the online network's draws)."""
    named = sorted((names[key], key) for key in entry.writes if key in names)
    if named:
        name, key = named[0]
        earlier = sum(1 for other in WRITERS[key] if other < index and TAPE[other].draws)
        return derive_seed(seed, _DRAW_STREAM, name_digest(name), earlier)
    if index in reached:
        name, count = reached[index]
        return derive_seed(seed, _DRAW_STREAM, name_digest(name), 1 << 32, count)
    others[0] += 1
    return derive_seed(seed, _DRAW_STREAM, name_digest(label), 1 << 33, others[0])


def replay(targets: Sequence[torch.Tensor], seed: int = 0, names: dict[int, str] | None = None,
           reached: dict[int, tuple[str, int]] | None = None) -> list[torch.Tensor | None]:
    """The values the recorded operations computed for the meta tensors ``targets``, computed again on the CPU; each
    random draw seeded by ``seed`` and the tensor it draws into (:func:`_draw_seed`, with ``names`` from
    :func:`storage_names`; ``reached`` from :func:`flows` with those names), so the values do not depend on which
    tensors a rank holds, nor on what else was recorded; ``None`` for all if some value they depend on cannot be
    known (:mod:`~.recorded_init` says when)."""
    unknown: list[torch.Tensor | None] = [None] * len(targets)
    keys = {storage_key(t) for t in targets}
    if not TAPE or not all(key in WRITERS for key in keys):
        return unknown
    names = names or {}
    label = names.get(storage_key(targets[0]), "") if targets else ""
    others = [0]
    replayed = _Replayed()
    previous = torch.get_default_dtype()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for index in needed(keys):
                entry = TAPE[index]
                if any(tensor._version != version for tensor, version in entry.hosts):
                    raise _Unknown  # a host tensor changed since (its value then is gone)
                generator = None
                if entry.draws:
                    drawn = _draw_seed(seed, entry, index, names, reached or {}, label, others)
                    torch.default_generator.manual_seed(drawn)  # the CPU's only: the device's are the run's
                    generator = torch.Generator().manual_seed(drawn)
                args, kwargs = tree_map(lambda value: replayed.host(value, entry.inputs, generator),
                                        (entry.args, entry.kwargs))
                torch.set_default_dtype(entry.dtype)
                out = entry.call(*args, **kwargs)
                if entry.call in EMPTY and (out.is_floating_point() or out.is_complex()):
                    out.fill_(float("nan"))  # what nothing writes afterwards stays unknown
                _unknown_if_unwritten(tree_leaves((args, kwargs)), out)
                results = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                for recorded_tensor, layout, result in zip(entry.outputs, entry.results, results):
                    replayed.add(recorded_tensor, layout, result)
        values = [replayed.of(target, layout_of(target)).detach() for target in targets]
    except (KeyError, _Unknown):  # made outside the tape, or derived from what nothing wrote
        return unknown
    finally:
        torch.set_default_dtype(previous)
    if any((v.is_floating_point() or v.is_complex()) and bool(torch.isnan(v).any()) for v in values):
        return unknown  # unwritten since an empty: an initialization the tape did not see
    return values
