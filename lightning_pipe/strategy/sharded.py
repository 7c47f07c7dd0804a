"""Sharded checkpoints: every rank writes its own stages into one folder with torch.distributed.checkpoint (DCP).

A sharded checkpoint is a folder at the path Lightning gives (``epoch=3-step=400.ckpt/``):

- DCP's files (``.metadata``, ``__<rank>_<n>.distcp``): every rank's weights under ``model/<name>`` and its optimizers'
  state under ``optim/<i>/<name>/<key>`` (``exp_avg``, ``step``, ...), where ``<name>`` is the parameter's name in the
  unpipelined model. No key depends on the layout, so any layout loads them: each rank asks DCP for the keys of its
  own parameters only, and no rank ever holds another rank's state. Replicas and tied copies write equal values under
  the same key; DCP keeps one.
- ``meta.pt`` (global rank 0): the rest of Lightning's checkpoint, which every rank has alike (loops, LR schedulers,
  hyperparameters, the run's position and seed), the optimizers' parameter groups, and the layout that wrote it.
- ``rank-<r>.pt`` (every rank): what may differ between ranks: the callbacks' states (an EMA of a stage's weights)
  and the module's ``on_save_checkpoint`` extras. On the same layout each rank gets its own back; on another, the
  callbacks' states are merged over the ranks, and entries keyed by a name of the model go only to the rank holding it.
- ``README.txt``: for whoever finds the folder where a file was expected (one-device code reading it gets a bare
  ``IsADirectoryError``): what it is and the one command that makes it a file.

Durable: all of it is written into ``<parent>/.lightning_pipe-writing/<name>``, every file fsync'd (DCP's
``sync_files``, and :func:`write_file`), and only when every rank has written its part does global rank 0 rename the
folder into place (an older checkpoint at the path is moved aside first, then deleted). A failure on any rank is raised
on every rank, with its cause; the previous checkpoint at the path stays as it was. What a job killed while writing
left there is cleared by the next save (:mod:`.staging`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.optim import Optimizer

from lightning_pipe.strategy.checkpoint import META_FILE, SHARED_ENTRIES, CallbackMerge, is_sharded, own_entries
from lightning_pipe.strategy.state_names import (
    MODEL,
    OPTIM,
    OWN_STATE,
    OWN_TOP,
    boxed,
    group_names,
    optimizer_entries,
    optimizers_parameter_names,
    param_groups_of,
    parameter_names,
    unboxed,
)
from lightning_pipe.strategy.failures import raise_together
from lightning_pipe.strategy.parameter_lists import own_lists, whole_lists
from lightning_pipe.strategy.plain import all_gather_text
from lightning_pipe.strategy.references import hparams_with_skeleton
from lightning_pipe.strategy.split import SplitModule
from lightning_pipe.strategy.staging import drop, publish, stage, staging_path

__all__ = ["META_FILE", "SHARDED_KEY", "is_sharded", "save_sharded", "read_sharded",
           "load_sharded_weights", "load_sharded_optimizers", "load_named_optimizers", "write_file", "write_guide",
           "whole_parameter_lists"]

GUIDE_FILE = "README.txt"
GUIDE = """This folder is one checkpoint: a sharded checkpoint written by lightning_pipe's PipelineStrategy
(checkpoint_format='sharded'), every rank's stages in torch.distributed.checkpoint's files, the rest in meta.pt
and rank-<r>.pt.

- To resume the pipeline, on this layout or another:  trainer.fit(model, ckpt_path="<this folder>")
- Code that reads one file (YourModule.load_from_checkpoint, a Trainer without the pipeline, torch.load) fails on
  a folder with "IsADirectoryError". Make one standard Lightning file of it first:

      python -m lightning_pipe.checkpoint consolidate <this folder> model.ckpt
"""
SHARDED_KEY = "pipeline_sharded"  # in meta.pt: how the checkpoint was written
HPARAMS_KEY = "hyper_parameters"  # LightningModule.CHECKPOINT_HYPER_PARAMS_KEY
T = TypeVar("T")


def write_file(value: Any, path: str) -> None:
    """``torch.save`` to ``path``, flushed and fsync'd before returning."""
    _write_durably(path, "wb", lambda file: torch.save(value, file))


def write_guide(folder: str) -> None:
    """The folder's README.txt (:data:`GUIDE`), flushed and fsync'd."""
    _write_durably(os.path.join(folder, GUIDE_FILE), "w", lambda file: file.write(GUIDE))


def _write_durably(path: str, mode: str, write: Callable[[Any], Any]) -> None:
    with open(path, mode) as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def _together(what: str, device: torch.device, work: Callable[[], T]) -> T | None:
    """Run ``work`` on every rank; if it fails on any, raise on every rank (with the cause) before anyone goes on."""
    error, result = None, None
    try:
        result = work()
    except Exception as caught:
        error = caught
    raise_together(error, what, None, device)
    return result


def save_sharded(checkpoint: Mapping[str, Any], path: str | os.PathLike, module: torch.nn.Module,
                 optimizers: Sequence[Optimizer], layout: Mapping[str, Any], split: SplitModule,
                 device: torch.device) -> None:
    """Write this rank's share of ``checkpoint`` into the sharded checkpoint folder ``path`` (collective: every rank
    calls it). ``layout`` describes the pipeline; ``split`` is the cut module (its full model's keys, and the
    sequence's skeleton for hyper-parameters that hold the network)."""
    target = os.fspath(path)
    if "://" in target and not target.startswith("file://"):  # every rank sees the same path: all raise alike
        raise ValueError(f"checkpoint_format='sharded' writes a folder on a local or mounted file system, not "
                         f"{target!r}; mount the bucket (e.g. s3fs), or use checkpoint_format='full'")
    target = os.path.abspath(target.removeprefix("file://"))
    parent, name = os.path.split(target)
    staging = staging_path(parent, name)  # (made by rank 0: stage)
    rank = dist.get_rank()
    what = f"writing the sharded checkpoint {target}"
    names = optimizers_parameter_names(module, optimizers)
    optimizer_states = checkpoint.get("optimizer_states", [])

    def prepare() -> dict[str, Any]:
        if rank == 0:
            stage(parent, name)
        state = boxed({f"{MODEL}{key}": value for key, value in checkpoint.get("state_dict", {}).items()})
        for index, opt_state in enumerate(optimizer_states):
            state.update(boxed(optimizer_entries(index, opt_state, names[index])))
        return state

    try:
        state = _together(what, device, prepare) or {}
        # every rank's parameter groups by name, so that consolidate can number the states as one device does, and
        # its parameters in order, for callbacks' lists with a tensor per parameter (:mod:`.parameter_lists`)
        mine = [[group_names(opt_state, names[index]) for index, opt_state in enumerate(optimizer_states)],
                [name for name, _ in module.named_parameters()]]
        every = [json.loads(text) for text in all_gather_text(json.dumps(mine), None, device)]
        every_group, every_parameters = [part[0] for part in every], [part[1] for part in every]
        _together(what, device, lambda: _write_shards(state, staging))
        _together(what, device, lambda: _write_own(checkpoint, staging, rank, layout, split, every_group,
                                                   every_parameters))
        _together(what, device, lambda: publish(staging, target) if rank == 0 else None)
    except Exception:  # raised on every rank together (_together): none writes into the staging folder any more
        if rank == 0:
            drop(staging)
        dist.barrier()  # no rank goes on (to list the folder, say) before it is gone
        raise


def _write_shards(state: dict[str, Any], staging: str) -> None:
    """DCP's write of every rank's tensors. DCP gathers every rank's failure and raises it on all of them as a
    ``CheckpointException``, which is a ``BaseException``: raised as an ``Exception`` here, so that the staging folder
    is dropped (a full disk kept most of a checkpoint there, found by review) and a caller's ``except Exception``
    takes it."""
    try:
        dcp.save(state, storage_writer=FileSystemWriter(staging, sync_files=True))
    except CheckpointException as error:  # (its text holds every failed rank's traceback: the first and last line)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        said = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        raise OSError(f"writing the checkpoint's tensors failed: {said}") from error


def _write_own(checkpoint: Mapping[str, Any], staging: str, rank: int, layout: Mapping[str, Any],
               split: SplitModule, every_group: list[Any] | None = None,
               every_parameters: list[list[str]] | None = None) -> None:
    """This rank's callbacks and extras; on global rank 0 also what every rank has alike (meta.pt). Hyper-parameters
    holding the network (``save_hyperparameters()`` of a ``net``) are kept with a meta copy of the whole sequence in
    its place, which ``consolidate`` fills with the weights (no rank holds them all)."""
    write_file(own_entries(checkpoint), os.path.join(staging, f"rank-{rank}.pt"))
    if rank == 0:
        meta = {key: value for key, value in checkpoint.items()
                if key in SHARED_ENTRIES and key not in ("state_dict", "optimizer_states")}
        if "optimizer_states" in checkpoint:
            meta["optimizer_param_groups"] = [param_groups_of(state) for state in checkpoint["optimizer_states"]]
        meta[SHARDED_KEY] = {"layout": dict(layout), "world_size": dist.get_world_size(),
                             "state_keys": list(split.state_keys), "optimizer_group_names": every_group,
                             "tied_names": dict(split.tied_names), "parameters": every_parameters,
                             "parameter_keys": list(split.parameter_keys)}
        if meta.get(HPARAMS_KEY) is not None and split.proxy is not None:
            hparams, whole = hparams_with_skeleton(meta[HPARAMS_KEY], split.proxy, split.skeleton, split.path)
            if whole is not None:
                meta[HPARAMS_KEY] = hparams
                meta[SHARDED_KEY]["hparams_sequence"] = (split.path, whole)  # one pickle: hparams refer to it
        write_file(meta, os.path.join(staging, META_FILE))
        write_guide(staging)


def read_sharded(path: str | os.PathLike, layout: Mapping[str, Any], local_keys: Iterable[str],
                 local_parameters: Sequence[str] = ()) -> dict[str, Any]:
    """Lightning's checkpoint dict of a sharded folder, without weights and optimizer states (which
    :func:`load_sharded_weights` and :func:`load_sharded_optimizers` read), for this rank: its own ``rank-<r>.pt`` on
    the layout that wrote it, else the ranks' callback states merged (entries named after the model's tensors only for
    those in ``local_keys``; a list with a tensor per parameter cut to ``local_parameters``, this rank's in order)."""
    path = os.fspath(path)
    checkpoint = torch.load(os.path.join(path, META_FILE), map_location="cpu", weights_only=False)
    written = checkpoint[SHARDED_KEY]
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if written["layout"] == dict(layout) and written["world_size"] == world_size:
        checkpoint.update(torch.load(os.path.join(path, f"rank-{rank}.pt"), map_location="cpu", weights_only=False))
    else:
        merge = CallbackMerge(written["state_keys"], local_keys)
        callbacks = []
        for other in range(written["world_size"]):  # one rank's file at a time
            entries = torch.load(os.path.join(path, f"rank-{other}.pt"), map_location="cpu", weights_only=False)
            callbacks.append(entries.get("callbacks") or {})
            merge.add(entries)
        merge.into(checkpoint)
        shapes = {key[len(MODEL):]: meta.size for key, meta in
                  FileSystemReader(path).read_metadata().state_dict_metadata.items()
                  if key.startswith(MODEL) and isinstance(meta, TensorStorageMetadata)}
        whole = whole_parameter_lists(checkpoint.get("callbacks") or {}, callbacks, written, shapes)
        if whole is not None:
            checkpoint["callbacks"] = own_lists(checkpoint.get("callbacks") or {}, written["parameter_keys"],
                                                local_parameters, shapes, written.get("tied_names") or {}, whole)
    if "optimizer_param_groups" in checkpoint:
        checkpoint["optimizer_states"] = []  # Lightning asks for the key; load_sharded_optimizers fills them
    return checkpoint


def whole_parameter_lists(callbacks: dict[str, Any], ranks: Sequence[Mapping[str, Any]], written: Mapping[str, Any],
                          shapes: Mapping[str, Any]) -> dict[str, Any] | None:
    """The callback states ``callbacks`` (rank 0's) with each list of one tensor per parameter put together from every
    rank's (``ranks``: each one's callback states) in one device's order, as a folder's ``written`` entry names each
    rank's parameters; None for a folder written without those names."""
    if not written.get("parameters") or len(ranks) != len(written["parameters"]):
        return None
    return whole_lists(callbacks, ranks, written["parameters"], written["parameter_keys"], shapes,
                       written.get("tied_names") or {})


def load_sharded_weights(path: str | os.PathLike, module: torch.nn.Module, strict: bool = True,
                         state_keys: Sequence[str] | None = None) -> None:
    """Load this rank's weights of ``module`` (cut: its share, with the full model's names) from the folder, in place
    (collective: every rank calls it). ``state_keys``: the whole model's, so that a strict load missing any fails on
    every rank alike (before DCP's collective load)."""
    reader = FileSystemReader(os.fspath(path))
    saved = reader.read_metadata().state_dict_metadata
    state = {f"{MODEL}{key}": value for key, value in module.state_dict(keep_vars=True).items()}
    missing = [key for key in (state_keys if state_keys is not None else [k[len(MODEL):] for k in state])
               if f"{MODEL}{key}" not in saved]
    if missing and strict:
        raise RuntimeError(f"the sharded checkpoint {os.fspath(path)} does not match {type(module).__name__}: it has no "
                           f"{missing[:10]}{f' and {len(missing) - 10} more' if len(missing) > 10 else ''}; load "
                           f"it into the module that wrote it, or set the module's strict_loading = False (those "
                           f"keep the weights they start with). The sharded format reads the weights straight into "
                           f"the model, so on_load_checkpoint gets no checkpoint['state_dict'] to rename keys in: to "
                           f"migrate one, consolidate it (python -m lightning_pipe.checkpoint consolidate FOLDER "
                           f"FILE), rename the keys in the file, and resume from the file")
    kept = {key for key, value in saved.items() if not isinstance(value, TensorStorageMetadata)}  # (boxed: sparse)
    tensors = {key: value.data for key, value in state.items() if key in saved and key not in kept}
    request: dict[str, Any] = {**tensors, **{key: None for key in state if key in kept}}
    dcp.load(request, storage_reader=reader)  # (fills in the objects' places)
    for key in kept & set(state):  # a sparse buffer (a graph's adjacency): put in the module's place
        value = request[key]
        owner, _, name = key[len(MODEL):].rpartition(".")
        module.get_submodule(owner).register_buffer(name, unboxed(key, value).to(state[key].device))


def load_sharded_optimizers(path: str | os.PathLike, module: torch.nn.Module, optimizers: Sequence[Optimizer],
                            param_groups: Sequence[Sequence[Mapping[str, Any]]]) -> None:
    """Give each optimizer of this rank the state of its parameters from the folder (collective)."""
    reader = FileSystemReader(os.fspath(path))
    saved = reader.read_metadata().state_dict_metadata

    def read(keys: list[str]) -> dict[str, Any]:
        wanted = {key: torch.empty(saved[key].size, dtype=saved[key].properties.dtype)
                  if isinstance(saved[key], TensorStorageMetadata) else None for key in keys}
        dcp.load(wanted, storage_reader=reader)
        return {key: unboxed(key, value) for key, value in wanted.items()}

    load_named_optimizers([key for key in saved if key.startswith(OPTIM)], read, module, optimizers, param_groups)


def load_named_optimizers(keys: Iterable[str], read: Callable[[list[str]], Mapping[str, Any]], module: torch.nn.Module,
                          optimizers: Sequence[Optimizer], param_groups: Sequence[Sequence[Mapping[str, Any]]]) -> None:
    """Give each optimizer the state of its parameters, from entries named as :func:`optimizer_entries` names them:
    ``keys`` are all there are, ``read(keys)`` returns the values of those this rank needs (once, every rank alike)."""
    if len(param_groups) != len(optimizers):
        raise ValueError(f"the checkpoint has {len(param_groups)} optimizers' states, configure_optimizers returns "
                         f"{len(optimizers)}; resume with the module's own configure_optimizers")
    by_param: dict[tuple[int, str], list[str]] = {}  # (optimizer, parameter name) -> its state's entries
    for key in keys:
        index, rest = key[len(OPTIM):].split("/", 1)
        name, entry = rest.rsplit("/", 1)
        by_param.setdefault((int(index), name), []).append(entry)
    names = parameter_names(module)
    wanted: list[str] = []
    layouts = []
    for index, optimizer in enumerate(optimizers):
        if len(param_groups[index]) != len(optimizer.param_groups):
            raise ValueError(f"optimizer {index} has {len(optimizer.param_groups)} parameter groups on this rank, the "
                             f"checkpoint's has {len(param_groups[index])}: every rank's configure_optimizers must "
                             f"make the same groups (an empty group is fine)")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        entries: dict[int, str] = {}
        for number, param in enumerate(params):
            name = next((n for n in names.get(id(param), []) if (index, n) in by_param), None)
            if name is not None:
                entries[number] = name
                wanted.extend(f"{OPTIM}{index}/{name}/{entry}" for entry in by_param[(index, name)])
        layouts.append(entries)
        wanted.extend(f"{OPTIM}{index}/{own}/{entry}" for own in (OWN_STATE, OWN_TOP)
                      for entry in by_param.get((index, own), []))  # (the optimizer's own: alike on every rank)
    values = read(wanted)
    for index, (optimizer, entries) in enumerate(zip(optimizers, layouts)):
        state = {number: {entry: values[f"{OPTIM}{index}/{name}/{entry}"] for entry in by_param[(index, name)]}
                 for number, name in entries.items()}
        state.update({entry: values[f"{OPTIM}{index}/{OWN_STATE}/{entry}"]
                      for entry in by_param.get((index, OWN_STATE), [])})
        groups, first = [], 0
        for saved_group, group in zip(param_groups[index], optimizer.param_groups):
            groups.append({**saved_group, "params": list(range(first, first + len(group["params"])))})
            first += len(group["params"])
        top = {entry: values[f"{OPTIM}{index}/{OWN_TOP}/{entry}"] for entry in by_param.get((index, OWN_TOP), [])}
        optimizer.load_state_dict({**top, "state": state, "param_groups": groups})
