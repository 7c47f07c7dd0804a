"""Streamed conversion between a sharded checkpoint folder and one full checkpoint file.

:func:`consolidate` reads the folder's tensors a batch at a time (DCP without processes) into the file's dict, which
``torch.save`` then writes storage by storage: the model is in memory once. The file is a standard Lightning
checkpoint (``state_dict`` with the unpipelined model's names, hyperparameters, loops, LR schedulers) that
``YourModule.load_from_checkpoint`` opens on one device; the optimizer states go under ``"pipeline"`` by parameter
name (``optimizer_entries``), where ``PipelineStrategy`` finds them on any layout, and at the top level numbered as one
device numbers them (from every rank's parameter groups by name, which the folder keeps), so that a one-device
``fit(ckpt_path=...)`` resumes them too. :func:`shard` memory-maps the file and
writes its tensors with DCP, so the model is not held in memory at all; it takes a consolidated file or one written
with ``checkpoint_format="full"``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_pipe.strategy.checkpoint import PIPELINE_KEY, SHARED_ENTRIES, named_optimizer_state, own_entries
from lightning_pipe.strategy.state_names import (
    MODEL,
    OPTIM,
    OWN_STATE,
    OWN_TOP,
    boxed,
    group_names,
    unboxed,
    uncompiled_names,
)
from lightning_pipe.strategy.one_device import one_device_optimizer_states
from lightning_pipe.strategy.references import fill_skeleton
from lightning_pipe.strategy.sharded import (
    META_FILE,
    SHARDED_KEY,
    is_sharded,
    whole_parameter_lists,
    write_file,
    write_guide,
)

__all__ = ["consolidate", "shard", "BATCH_BYTES"]

BATCH_BYTES = 256 * 2**20  # tensors read from the folder per DCP call


def consolidate(folder: str | os.PathLike, output: str | os.PathLike) -> tuple[int, int | None]:
    """Write the sharded checkpoint ``folder`` as one full checkpoint file ``output``; the number of tensors in its
    ``state_dict`` and its global step."""
    folder = os.fspath(folder)
    if not is_sharded(folder):
        raise ValueError(f"{folder} is not a sharded checkpoint folder (no .metadata and {META_FILE}); give the folder "
                         f"PipelineStrategy(checkpoint_format='sharded') wrote")
    checkpoint = torch.load(os.path.join(folder, META_FILE), map_location="cpu", weights_only=False)
    written = checkpoint.pop(SHARDED_KEY)
    groups = checkpoint.pop("optimizer_param_groups", None)
    reader = FileSystemReader(folder)
    saved = reader.read_metadata().state_dict_metadata
    keys = [f"{MODEL}{key}" for key in written["state_keys"] if f"{MODEL}{key}" in saved]
    keys += [key for key in saved if key.startswith(MODEL) and key not in set(keys)]
    checkpoint["state_dict"] = {key[len(MODEL):]: unboxed(key, value) for key, value in _read(reader, saved, keys)}
    if "hparams_sequence" in written:  # hyper-parameters holding the network: the whole sequence, with its weights
        sequence_path, whole = written["hparams_sequence"]
        fill_skeleton(whole, sequence_path, checkpoint["state_dict"])
    ranks = [torch.load(os.path.join(folder, f"rank-{rank}.pt"), map_location="cpu", weights_only=False)
             for rank in range(written["world_size"]) if os.path.exists(os.path.join(folder, f"rank-{rank}.pt"))]
    if ranks:
        checkpoint.update(ranks[0])  # the callbacks and extras of global rank 0, as Lightning's own files have
        shapes = {key: value.shape for key, value in checkpoint["state_dict"].items()}
        whole = whole_parameter_lists(checkpoint.get("callbacks") or {},
                                      [rank.get("callbacks") or {} for rank in ranks], written, shapes)
        if whole is not None:  # a list with a tensor per parameter: one device's
            checkpoint["callbacks"] = whole
    section: dict[str, Any] = {"layout": written["layout"], "own": ranks}
    if written.get("parameters"):
        section["parameters"], section["parameter_keys"] = written["parameters"], written["parameter_keys"]
    if groups is not None:
        section["optimizer_entries"] = {key: unboxed(key, value) for key, value in
                                        _read(reader, saved, [key for key in saved if key.startswith(OPTIM)])}
        section["optimizer_param_groups"] = groups
        if written.get("optimizer_group_names"):  # every rank's groups by name: numbered as one device does
            section["optimizer_group_names"] = written["optimizer_group_names"]  # kept for `shard`
            section["tied_names"] = written.get("tied_names") or {}
            shares = _shares(section["optimizer_entries"], written["optimizer_group_names"], groups)
            merged = shares and one_device_optimizer_states(shares, written["state_keys"], written.get("tied_names"))
            if merged is not None:
                checkpoint["optimizer_states"] = merged
    checkpoint[PIPELINE_KEY] = section
    _save_file(checkpoint, os.fspath(output))
    return len(checkpoint["state_dict"]), checkpoint.get("global_step")


def _shares(entries: dict[str, Any], group_names: list[Any], groups: list[list[dict[str, Any]]]) -> list[dict] | None:
    """Each rank's optimizer states as :func:`~lightning_pipe.strategy.checkpoint.gather_checkpoint` collects them,
    rebuilt from the folder's named entries (``optim/<i>/<name>/<key>``) and the names of each rank's groups; None
    where a rank's optimizers or groups do not match the folder's."""
    by_name: dict[tuple[int, str], dict[str, Any]] = {}
    for entry, value in entries.items():
        index, rest = entry[len(OPTIM):].split("/", 1)
        name, key = rest.rsplit("/", 1)
        by_name.setdefault((int(index), name), {})[key] = value
    shares = []
    for rank_groups in group_names:
        states, names = [], []
        if len(rank_groups) != len(groups):
            return None
        for index, optimizer_groups in enumerate(rank_groups):
            if len(optimizer_groups) != len(groups[index]):
                return None
            numbered = [name for group in optimizer_groups for name in group]
            params, start = [], 0
            for group in optimizer_groups:
                params.append(list(range(start, start + len(group))))
                start += len(group)
            states.append({**by_name.get((index, OWN_TOP), {}),
                           "state": {**{number: by_name[(index, name)] for number, name in enumerate(numbered)
                                        if (index, name) in by_name}, **by_name.get((index, OWN_STATE), {})},
                           "param_groups": [{**hyper, "params": numbers}
                                            for hyper, numbers in zip(groups[index], params)]})
            names.append([[name] if name is not None else [] for name in numbered])
        shares.append({"optimizer_states": states, "param_names": names})
    return shares


def shard(file: str | os.PathLike, folder: str | os.PathLike) -> tuple[int, int | None]:
    """Write the full checkpoint ``file`` as a sharded checkpoint folder ``folder`` (replacing one there); the number
    of tensors in its ``state_dict`` and its global step."""
    checkpoint = torch.load(os.fspath(file), map_location="cpu", weights_only=False, mmap=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{file} has no state_dict; give a Lightning checkpoint file")
    # a compiled module's names (layers._orig_mod.0.weight) as a sharded folder holds them, without torch.compile's part
    checkpoint["state_dict"] = uncompiled_names(checkpoint["state_dict"])
    state = boxed({f"{MODEL}{key}": value for key, value in checkpoint["state_dict"].items()})
    section = checkpoint.get(PIPELINE_KEY) or {}
    named = named_optimizer_state(checkpoint)
    if named is None and any(checkpoint.get("optimizer_states") or ()):
        raise ValueError(f"{file} holds optimizer states numbered as one device numbers its parameters (one device's "
                         f"or DDP's file), which a sharded folder keeps by parameter name, and the names come from the "
                         f"module, which this command has not: the folder would resume without them. Resume the "
                         f"pipeline from the file itself, Trainer(strategy=PipelineStrategy(...)).fit(model, "
                         f"ckpt_path={os.fspath(file)!r}) (it names the states by the module's parameters), and save "
                         f"a sharded checkpoint from that fit")
    if named is not None:
        state.update(boxed(named[0]))
    target = os.path.abspath(os.fspath(folder))
    staging = f"{target}.writing-{os.getpid()}"
    os.makedirs(staging)
    try:
        dcp.save(state, storage_writer=FileSystemWriter(staging, sync_files=True), no_dist=True)
        meta = {key: value for key, value in checkpoint.items()
                if key in SHARED_ENTRIES and key not in ("state_dict", "optimizer_states", PIPELINE_KEY)}
        if named is not None:
            meta["optimizer_param_groups"] = named[1]
        own = list(section.get("own") or [own_entries(checkpoint)])
        meta[SHARDED_KEY] = {"layout": dict(section.get("layout") or {}), "world_size": len(own),
                             "state_keys": list(checkpoint["state_dict"]),
                             "optimizer_group_names": section.get("optimizer_group_names") or _group_names(section),
                             "tied_names": section.get("tied_names") or {},
                             "parameters": section.get("parameters"), "parameter_keys": section.get("parameter_keys")}
        for rank, entries in enumerate(own):
            write_file(entries, os.path.join(staging, f"rank-{rank}.pt"))
        write_file(meta, os.path.join(staging, META_FILE))
        write_guide(staging)
        if os.path.lexists(target):
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(checkpoint["state_dict"]), checkpoint.get("global_step")


def _group_names(section: dict[str, Any]) -> list[Any] | None:
    """Every rank's parameter groups by name, from a full checkpoint's ``"pipeline"`` entry (each rank's optimizer
    states and the names of their parameters); None for a file without them."""
    if "param_names" not in section or "optimizer_states" not in section:
        return None
    return [[group_names(state, names) for state, names in zip(rank_states, rank_names)]
            for rank_states, rank_names in zip(section["optimizer_states"], section["param_names"])]


def _read(reader: FileSystemReader, saved: dict[str, Any], keys: list[str]) -> Iterator[tuple[str, Any]]:
    """The values of ``keys``, read from the folder about :data:`BATCH_BYTES` at a time."""
    batch: dict[str, Any] = {}
    size = 0
    for key in keys:
        meta = saved[key]
        if isinstance(meta, TensorStorageMetadata):
            batch[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
            size += batch[key].numel() * batch[key].element_size()
        else:
            batch[key] = None
        if size >= BATCH_BYTES:
            dcp.load(batch, storage_reader=reader, no_dist=True)
            yield from batch.items()
            batch, size = {}, 0
    if batch:
        dcp.load(batch, storage_reader=reader, no_dist=True)
        yield from batch.items()


def _save_file(checkpoint: dict[str, Any], output: str) -> None:
    """``torch.save`` beside ``output``, fsync'd, then renamed over it."""
    directory, name = os.path.split(os.path.abspath(output))
    temporary = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        write_file(checkpoint, temporary)
        os.replace(temporary, output)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
