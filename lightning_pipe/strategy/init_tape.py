"""The recording of a module's construction on the meta device (:mod:`~.recorded_init`): one entry per operation, in
order, which storages each reads and writes, and which entries a storage's final contents depend on."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.parameter import is_lazy
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["counted_draw", "EMPTY", "Entry", "FULL", "HOST", "Layout", "layout_of", "meta_inputs", "needed", "record",
           "storage_key", "TAPE", "truncate", "WRITERS", "written_arguments"]

EMPTY = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default,
         torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default}
HOST = torch.device("cpu")
_COPIED_BYTES = 1 << 20  # a host tensor an operation reads is copied up to this size, else kept by reference
# in-place ops that write every element without reading it: what an earlier op wrote there is gone
_OVERWRITING = {torch.ops.aten.fill_.Scalar, torch.ops.aten.fill_.Tensor, torch.ops.aten.zero_.default,
                torch.ops.aten.copy_.default, torch.ops.aten.normal_.default, torch.ops.aten.uniform_.default}

Layout = tuple[int, tuple[int, ...], tuple[int, ...], int, torch.dtype]  # storage, shape, stride, offset, dtype


@dataclasses.dataclass(frozen=True)
class Entry:
    """One recorded operation: ``call(*args, **kwargs)`` gave ``outputs`` (its tensor results, meta or not)."""

    call: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]
    dtype: torch.dtype  # the default dtype then (factories read it inside the op)
    inputs: dict[int, Layout]  # by id, each meta input's layout before the op (``set_`` moves a tensor's storage)
    results: list[Layout | None]  # the outputs' layouts after it (None: not meta)
    hosts: list[tuple[torch.Tensor, int]]  # the large host tensors it reads, by reference, and their versions then
    draws: bool  # it draws random numbers
    writes: frozenset[int]  # the meta storages it makes, views or changes
    reads: frozenset[int]  # the meta storages it reads


TAPE: list[Entry] = []
WRITERS: dict[int, list[int]] = {}  # meta storage -> the entries that made, viewed or changed it, in order
FULL: dict[int, list[int]] = {}  # meta storage -> the entries that overwrote all of it


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def layout_of(tensor: torch.Tensor) -> Layout:
    return storage_key(tensor), tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype


def meta_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[int, Layout]:
    """The layouts of the meta tensors among an op's inputs; a lazy layer's uninitialized parameter (read for its
    device and dtype as it is materialized: a dummy forward in ``configure_model``) has none, and holds nothing."""
    return {id(t): layout_of(t) for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.is_meta and not is_lazy(t)}


def record(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], inputs: dict[int, Layout],
            outputs: list[torch.Tensor], written: list[torch.Tensor], draws: bool) -> None:
    index = len(TAPE)
    results = [layout_of(t) if t.is_meta else None for t in outputs]
    hosts: list[tuple[torch.Tensor, int]] = []

    def kept(value: Any) -> Any:  # a host tensor: as it is now (a staging buffer may be refilled for the next layer)
        if not isinstance(value, torch.Tensor) or value.is_meta:
            return value
        if value.untyped_storage().nbytes() <= _COPIED_BYTES:
            return value.clone()
        hosts.append((value, value._version))  # a checkpoint's tensor: not copied, its version checked at the replay
        return value

    args, kwargs = tree_map(kept, (args, kwargs))
    writes = frozenset(storage_key(t) for t in [*outputs, *written] if t.is_meta)
    reads = frozenset(layout[0] for layout in inputs.values())
    TAPE.append(Entry(call, args, kwargs, outputs, torch.get_default_dtype(), inputs, results, hosts, draws, writes,
                        reads))
    for key in writes:
        WRITERS.setdefault(key, []).append(index)
    if call in _OVERWRITING and results and results[0] is not None and _covers(outputs[0]):
        FULL.setdefault(results[0][0], []).append(index)


def _covers(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is every element of its storage."""
    return tensor.storage_offset() == 0 and tensor.is_contiguous() and (
        tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes())


def written_arguments(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an aten op changes in place (``out=``, ``x.add_``, foreach ops that return nothing)."""
    written: list[torch.Tensor] = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        written.extend(t for t in tree_leaves(value) if isinstance(t, torch.Tensor))
    return written


def needed(keys: set[int]) -> list[int]:
    """The entries the final contents of storages ``keys`` depend on, in order."""
    limits: dict[int, int] = {}
    chosen: set[int] = set()
    work = [(key, len(TAPE)) for key in keys]
    while work:
        key, limit = work.pop()
        start = limits.get(key, 0)
        if limit <= start:
            continue
        limits[key] = limit
        writers = WRITERS.get(key, [])
        for index in writers[bisect.bisect_left(writers, start):bisect.bisect_left(writers, limit)]:
            if index in chosen:
                continue
            chosen.add(index)
            work.extend((read, index) for read in TAPE[index].reads)
    return sorted(chosen)


def counted_draw(index: int) -> bool:
    """Whether entry ``index`` is a draw whose values can still be read: not overwritten whole afterwards."""
    entry = TAPE[index]
    return entry.draws and not all(any(later > index for later in FULL.get(key, ())) for key in entry.writes)


def truncate(length: int) -> None:
    del TAPE[length:]
    for table in (WRITERS, FULL):
        for key in list(table):
            table[key] = [index for index in table[key] if index < length]
            if not table[key]:
                del table[key]
