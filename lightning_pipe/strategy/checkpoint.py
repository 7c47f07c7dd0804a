"""One standard Lightning checkpoint for a pipeline: every stage's weights and optimizer state, written atomically.

Lightning saves from global rank 0 only, which under a pipeline holds one stage. Here every rank sends its share to
rank 0, which writes a single file whose ``state_dict`` has the keys of the unpipelined module (so that
``YourModule.load_from_checkpoint(path)`` works in a plain program) and whose ``"pipeline"`` entry keeps each rank's
optimizer and LR scheduler states for resuming on any layout. ``optimizer_states`` at the top level are every rank's
put together as one device numbers them (so that a one-device ``fit(ckpt_path=...)`` resumes them too), and
``lr_schedulers`` rank 0's, as Lightning's own format expects one entry per optimizer.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_pipe.engine.wire import flat_bytes
from lightning_pipe.strategy.one_device import one_device_optimizer_states
from lightning_pipe.strategy.parameter_lists import whole_lists
from lightning_pipe.strategy.plain import all_gather_text
from lightning_pipe.strategy.values import decode, encode, tensor_specs
from lightning_pipe.strategy.state_names import optimizer_entries, param_groups_of
from lightning_pipe.strategy.untravelled import marked, resolved

__all__ = ["PIPELINE_KEY", "META_FILE", "is_sharded", "RANDOM_STATES_KEY", "named_optimizer_state", "SHARED_ENTRIES",
           "gather_checkpoint", "training_state_of_rank", "atomic_save", "own_entries", "with_own_entries",
           "written_here", "CallbackMerge", "fsync_path"]

PIPELINE_KEY = "pipeline"
META_FILE = "meta.pt"  # in a sharded checkpoint folder (:mod:`.sharded`): what every rank has alike
RANDOM_STATES_KEY = "pipeline_random_states"  # each rank's global generators' states (its own entry)


def gather_checkpoint(checkpoint: dict[str, Any], state_keys: list[str], layout: dict[str, Any],
                      group: dist.ProcessGroup | None = None,
                      param_names: list[list[list[str]]] | None = None,
                      device: torch.device | None = None,
                      tied: Mapping[str, str] | None = None, by_name: bool = True,
                      parameters: tuple[list[str], list[str]] | None = None,
                      whole_orders: list[list[list[str]]] | None = None) -> dict[str, Any] | None:
    """Collect every rank's share of ``checkpoint`` on the group's rank 0 (collective; None on the other ranks).

    ``state_keys`` are the full model's ``state_dict`` keys in their order; ``layout`` describes the pipeline
    (ranks and stages) so that a resume can check it matches; ``param_names``: for each optimizer of this rank, the
    names of each of its parameters in order (so that another layout can find each parameter's state). The shares
    travel as JSON and raw tensor bytes (:func:`gather_shares`), never pickled; ``device`` carries them (NCCL: the
    rank's GPU); ``tied``: the whole model's tied parameter names (:func:`~.state_names.tied_names`), and
    ``by_name``, whether ``configure_optimizers`` may sort by name (:func:`~.one_device.sorts_by_name`), for the
    one-device optimizer states; ``parameters``: one device's parameter names in order and this rank's, for callback
    states listing a tensor per parameter (:mod:`.parameter_lists`); ``whole_orders``: each optimizer's groups as one
    device lists them, where ``configure_optimizers`` saw the whole model (:func:`~.optimizers.whole_orders`).
    """
    share = {key: move_data_to_device(checkpoint[key], torch.device("cpu"))
             for key in ("state_dict", "optimizer_states", "lr_schedulers") if key in checkpoint}
    share["param_names"] = param_names or []
    share["whole_orders"] = whole_orders
    share["parameters"] = list(parameters[1]) if parameters is not None else []
    share["own"] = move_data_to_device(own_entries(checkpoint), torch.device("cpu"))
    # (found by review: pytorch-forecasting's extras hold its dataset's normalizers, which cannot travel)
    share["own"] = marked(share["own"], share["own"] if dist.get_rank(group) == 0 else None, _CHECKPOINT_ADVICE,
                          group, device or torch.device("cpu"))
    shares = gather_shares(share, group, device or torch.device("cpu"))
    if shares is None:
        return None
    for rank, part in enumerate(shares[1:], 1):  # what could not travel: rank 0's, which did not need to
        part["own"] = resolved(part["own"], shares[0]["own"], rank)
    state: dict[str, Any] = {}
    for part in shares:
        for key, value in part["state_dict"].items():
            state.setdefault(key, value)
    # the model's keys in its order; then those added since the cut (in on_save_checkpoint; pruning's weight_orig
    # and weight_mask). One an on_save_checkpoint dropped (frozen weights), or pruning renamed, is left out.
    ordered = {key: state.pop(key) for key in state_keys if key in state}
    ordered.update(state)
    full = dict(checkpoint)
    full["state_dict"] = ordered
    if "optimizer_states" in checkpoint:
        merged = one_device_optimizer_states(shares, state_keys, tied, by_name)
        if merged is not None:
            full["optimizer_states"] = merged
        else:  # rank 0's: a pipeline resumes from the section below; one device's fails in torch's load_state_dict
            warnings.warn("the checkpoint's optimizer states cannot be numbered as one device's optimizer numbers "
                          "them (a rank's parameter group is listed in neither the model's order nor by name, or in "
                          "either, and configure_optimizers sorts): a pipeline resumes from it, a one-device "
                          "fit(ckpt_path=...) would not; list the parameters in the model's order (self.parameters()) "
                          "for one that does", stacklevel=2)
        full[PIPELINE_KEY] = {
            "layout": dict(layout),
            "optimizer_states": [part.get("optimizer_states", []) for part in shares],
            "lr_schedulers": [part.get("lr_schedulers", []) for part in shares],
            "param_names": [part["param_names"] for part in shares],
            "tied_names": dict(tied or {}),
        }
    section = full.setdefault(PIPELINE_KEY, {"layout": dict(layout)})
    section["own"] = [part["own"] for part in shares]
    if parameters is not None:  # each rank's parameters, for its callbacks' per-parameter lists (`shard` keeps them)
        section["parameters"] = [part["parameters"] for part in shares]
        section["parameter_keys"] = list(parameters[0])
    # Callback states and extras keyed by the model's names whole, from every rank's share (SWA's average model,
    # EMAWeightAveraging's current_model_state), so that one device resumes from the file too; the rest rank 0's.
    merge = CallbackMerge(ordered, ordered, tied)
    for part in shares:
        merge.add(dict(part["own"]))
    full = merge.into(full)
    extras = {key: full[key] for key in merge.extras if key not in merge.by_model}
    if parameters is not None:  # a list with a tensor per parameter (a hand-written EMA's shadows): one device's
        lists = functools.partial(whole_lists, names=[part["parameters"] for part in shares], whole=parameters[0],
                                  shapes={key: value.shape for key, value in ordered.items()}, first=tied or {})
        full["callbacks"] = lists(full["callbacks"], [part["own"].get("callbacks") or {} for part in shares])
        whole = lists(extras, [part["own"] for part in shares])
        full.update(whole)
        extras = {key: value for key, value in extras.items() if _equal(whole[key], value)}
    differing = [key for key in extras if key != RANDOM_STATES_KEY
                 and not all(_equal(part["own"].get(key), extras[key]) for part in shares)]
    if differing:
        warnings.warn(f"on_save_checkpoint's {', '.join(map(repr, differing))} differ between the pipeline's ranks "
                      f"(each computed them from its own stages: a count or norms of self.parameters()): the file "
                      f"holds pipeline rank 0's, and a pipeline resumed on this layout gives each rank its own back. "
                      f"For one device's values, key them by parameter name ({{name: value}}, merged from every "
                      f"rank) or list one tensor per parameter in self.parameters() order", stacklevel=2)
    return full


def _equal(a: Any, b: Any) -> bool:
    """Whether two checkpoint entries (tensors, numbers, strings, and lists and dicts of them) are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_equal(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b) or (a != a and b != b)  # (NaN equals NaN here)
    except Exception:  # noqa: BLE001 - an object whose == is not a truth value: not compared
        return True


def _keyed_by_model(value: Any, model_keys: set[str]) -> bool:
    """Whether ``value`` is a mapping of the model's state names (to tensors, or norms): a rank holds its share."""
    return (isinstance(value, Mapping) and bool(value) and all(isinstance(key, str) and key in model_keys
                                                               for key in value))


_CHECKPOINT_ADVICE = ("keep callback states, on_save_checkpoint's extras and optimizers' groups to those types (a "
                      "dataclass as a dict), or use PipelineStrategy(checkpoint_format='sharded'), where each rank "
                      "writes its own")


def gather_shares(share: Any, group: dist.ProcessGroup | None, device: torch.device) -> list[Any] | None:
    """Every rank's ``share`` on the group's rank 0, in group order (``None`` elsewhere); collective.

    A share is sent as the JSON text of its structure (:func:`~.values.encode`: numbers, strings, tensors, and
    lists, tuples and dicts of them) and each tensor's bytes: nothing received is unpickled. A share holding anything
    else (a callback state that is an arbitrary object) is an error on every rank, naming it (rank 0's, which does
    not travel, is not looked at; :func:`gather_checkpoint` marks the entries of the others' that cannot travel)."""
    tensors: list[torch.Tensor] = []
    text, error = "", ""
    try:  # (rank 0's own share does not travel)
        if dist.get_rank(group) != 0:
            text = json.dumps(encode(share, tensors, "this rank's share of the checkpoint (weights, optimizer and "
                                     "callback states, on_save_checkpoint's extras)", _CHECKPOINT_ADVICE))
    except TypeError as caught:
        text, error, tensors = "", str(caught), []
    errors = [(rank, e) for rank, e in enumerate(all_gather_text(error, group, device)) if e]
    if errors:
        raise TypeError(f"pipeline rank {errors[0][0]}: {errors[0][1]}")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank != 0:
        payload = text.encode()
        dst = dist.get_global_rank(group or dist.group.WORLD, 0)
        dist.send(torch.tensor([len(payload)], dtype=torch.int64, device=device), dst, group=group)
        dist.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device), dst, group=group)
        for tensor in tensors:
            if tensor.numel():
                dist.send(flat_bytes(tensor).to(device), dst, group=group)
        return None
    shares = [share]
    for peer in range(1, size):
        src = dist.get_global_rank(group or dist.group.WORLD, peer)
        length = torch.empty(1, dtype=torch.int64, device=device)
        dist.recv(length, src, group=group)
        data = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        dist.recv(data, src, group=group)
        structure = json.loads(data.cpu().numpy().tobytes().decode())
        received = []
        for dtype_name, shape in tensor_specs(structure):
            dtype = getattr(torch, dtype_name)
            raw = torch.empty(math.prod(shape) * torch.empty(0, dtype=dtype).element_size(), dtype=torch.uint8,
                              device=device)
            if raw.numel():
                dist.recv(raw, src, group=group)
            received.append(raw.cpu().view(dtype).reshape(shape))
        shares.append(decode(structure, received))
    return shares


# Lightning's entries that are the same on every rank; the others (callbacks, on_save_checkpoint's extras) may differ
SHARED_ENTRIES = frozenset({"epoch", "global_step", "pytorch-lightning_version", "loops", "lr_schedulers",
                            "hparams_name", "hyper_parameters", "datamodule_hparams_name",
                            "datamodule_hyper_parameters", "pipeline_position", "state_dict", "optimizer_states",
                            PIPELINE_KEY})


def own_entries(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a rank's checkpoint that may differ between ranks: callbacks' states, the module's extras."""
    return {key: value for key, value in checkpoint.items() if key not in SHARED_ENTRIES}


def written_here(checkpoint: Mapping[str, Any], rank: int, layout: Mapping[str, Any]) -> bool:
    """Whether a full checkpoint was written by this layout, which has a rank ``rank`` (it keeps that rank's own
    callbacks and extras)."""
    section = checkpoint.get(PIPELINE_KEY) or {}
    return "own" in section and dict(section.get("layout") or {}) == dict(layout) and rank < len(section["own"])


def with_own_entries(checkpoint: dict[str, Any], rank: int, layout: Mapping[str, Any],
                     local_keys: Iterable[str]) -> dict[str, Any]:
    """A full checkpoint with pipeline rank ``rank``'s own callbacks and extras in place of rank 0's where the layout
    is the one that wrote it; on another, the ranks' callback states merged (:class:`CallbackMerge`)."""
    section = checkpoint.get(PIPELINE_KEY)
    if not section or "own" not in section:
        return checkpoint
    if written_here(checkpoint, rank, layout):
        checkpoint.update(section["own"][rank])
        return checkpoint
    merge = CallbackMerge(checkpoint["state_dict"].keys(), local_keys)
    for own in section["own"]:
        merge.add(dict(own))
    return merge.into(checkpoint)


class CallbackMerge:
    """The callbacks' states of several ranks as one rank of another layout needs them: mappings merged key by key,
    where an entry keyed by a name of the model's state (an EMA's shadow of a parameter) is kept only for this rank's
    ``local_keys``; a fine-tuning callback's saved parameter groups (``BaseFinetuning``'s, which name their
    parameters) merged group by group, each naming this rank's parameters, from every rank, in the model's order
    (``tied``: a tied parameter by its one-device name, once);
    anything else as the first rank had it. The other entries (the module's extras): those keyed by the model's names
    merged alike (EMAWeightAveraging's ``current_model_state``), the rest the first rank's.
    """

    def __init__(self, model_keys: Iterable[str], local_keys: Iterable[str],
                 tied: Mapping[str, str] | None = None) -> None:
        self.order = {key: index for index, key in enumerate(model_keys)}
        self.model_keys, self.local = set(self.order), set(local_keys)
        self.first = dict(tied or {})  # the one-device name of each name of a tied parameter (a full file's groups)
        self.callbacks: dict[str, Any] = {}
        self.extras: dict[str, Any] = {}
        self.by_model: set[str] = set()  # the extras keyed by the model's names, merged

    def add(self, own: dict[str, Any]) -> None:
        self.callbacks = self._merged(self.callbacks, own.pop("callbacks", None) or {})
        for key, value in own.items():
            if _keyed_by_model(value, self.model_keys):  # this rank's share of it, from whichever rank held each
                self.extras.setdefault(key, {}).update((k, v) for k, v in value.items() if k in self.local)
                self.by_model.add(key)
            else:
                self.extras.setdefault(key, value)

    def into(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        checkpoint.update(self.extras)
        checkpoint["callbacks"] = self.callbacks
        return checkpoint

    def _groups(self, value: Any) -> bool:
        """Whether ``value`` is a list of parameter groups naming their parameters by the model's names (the groups
        ``BaseFinetuning`` saves in ``internal_optimizer_metadata``)."""
        return (isinstance(value, list) and bool(value)
                and all(isinstance(group, Mapping) and isinstance(group.get("params"), list) for group in value)
                and all(isinstance(name, str) and name in self.model_keys for group in value
                        for name in group["params"]))

    def _merged(self, into: Any, value: Any) -> Any:
        if self._groups(value) and (into is None or (self._groups(into) and len(into) == len(value))):
            merged = []
            for index, group in enumerate(value):
                first = into[index] if into is not None else {**group, "params": []}
                names = {*first["params"], *(self.first.get(name, name) for name in group["params"]
                                             if name in self.local)}
                merged.append({**first, "params": sorted(names, key=self.order.__getitem__)})
            return merged
        if isinstance(value, Mapping) and (into is None or isinstance(into, Mapping)):
            result = dict(into or {})
            for key, item in value.items():
                if not (isinstance(key, str) and key in self.model_keys and key not in self.local):
                    result[key] = self._merged(result.get(key), item)
            return result
        return value if into is None else into


def named_optimizer_state(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], list[list[dict[str, Any]]]] | None:
    """A pipeline checkpoint's optimizer states as named entries and each optimizer's groups, if it has names: a
    consolidated file (``optimizer_entries``), or a full checkpoint written with ``param_names``; else ``None``."""
    section = checkpoint.get(PIPELINE_KEY) or {}
    if "optimizer_entries" in section:
        return dict(section["optimizer_entries"]), section["optimizer_param_groups"]
    if "param_names" not in section or "optimizer_states" not in section:
        return None
    entries: dict[str, Any] = {}
    for rank_states, rank_names in zip(section["optimizer_states"], section["param_names"]):
        for index, (state, names) in enumerate(zip(rank_states, rank_names)):
            for key, value in optimizer_entries(index, state, names).items():
                entries.setdefault(key, value)
    # the groups of the rank that trains the most parameters (a stage that trains nothing has a placeholder)
    richest = max(range(len(section["param_names"])), key=lambda r: sum(map(len, section["param_names"][r])))
    return entries, [param_groups_of(state) for state in section["optimizer_states"][richest]]


def training_state_of_rank(checkpoint: Mapping[str, Any], rank: int,
                           layout: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    """This rank's optimizer and LR scheduler states from a pipeline checkpoint written with the same ``layout``."""
    section = checkpoint.get(PIPELINE_KEY)
    if section is None:
        raise ValueError("this checkpoint was not written by PipelineStrategy, so it has no optimizer state for each "
                         "stage; start a new fit from its weights instead: YourModule.load_from_checkpoint(path), "
                         "then trainer.fit(model) without ckpt_path")
    saved = dict(section["layout"])
    if saved != dict(layout):
        raise ValueError(f"this checkpoint's optimizer states belong to a pipeline laid out as {saved}, but this one "
                         f"is {dict(layout)}; resume with the same devices, schedule, partition and replicas, or start "
                         f"a new fit from its weights (YourModule.load_from_checkpoint(path)) without ckpt_path")
    return section["optimizer_states"][rank], section["lr_schedulers"][rank]


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (:mod:`.sharded`)."""
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, META_FILE))


def atomic_save(checkpoint_io: CheckpointIO, checkpoint: dict[str, Any], path: str | os.PathLike,
                storage_options: Any | None = None) -> None:
    """Write ``checkpoint`` to ``path`` so that a crash while writing leaves any previous file there intact.

    Local paths are written to a temporary file beside ``path``, fsync'd, and renamed over it (``os.replace`` is atomic);
    remote URLs (``s3://...``) go straight to the checkpoint IO, whose stores replace objects whole, and so does a
    checkpoint IO of the project's own, which may write elsewhere, or files beside the one it is given.
    """
    target = os.fspath(path)
    if "://" in target and not target.startswith("file://") or _writes_later(checkpoint_io) \
            or not _torch_save(checkpoint_io):
        checkpoint_io.save_checkpoint(checkpoint, target, storage_options=storage_options)
        return
    target = target.removeprefix("file://")
    directory, name = os.path.split(os.path.abspath(target))
    temporary = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    # a sharded checkpoint of an earlier run in the same place (save_last's last.ckpt); a link to one (save_last="link")
    # is replaced as a file is, the folder it points to left alone
    folder = os.path.isdir(target) and not os.path.islink(target)
    if folder and not is_sharded(target):
        raise IsADirectoryError(f"cannot write the checkpoint {target}: a folder of that name is there, which is not "
                                f"a checkpoint; move it, or give the checkpoints another path")
    aside = os.path.join(directory, f".{name}.previous-{os.getpid()}")
    try:
        checkpoint_io.save_checkpoint(checkpoint, temporary, storage_options=storage_options)
        fsync_path(temporary)  # on disk before it replaces the previous file: a crash leaves one of the two whole
        if folder:  # a file does not replace a folder in one rename: the folder goes aside first, then away
            os.replace(target, aside)
        try:
            os.replace(temporary, target)
        except BaseException:
            if folder:  # the previous checkpoint back in its place
                os.replace(aside, target)
            raise
        fsync_path(directory)
        if folder:
            shutil.rmtree(aside)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _torch_save(checkpoint_io: CheckpointIO) -> bool:
    """Whether ``checkpoint_io`` writes the one file it is given as Lightning's own does (``torch.save``)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    return isinstance(checkpoint_io, TorchCheckpointIO) and \
        type(checkpoint_io).save_checkpoint is TorchCheckpointIO.save_checkpoint


def _writes_later(checkpoint_io: CheckpointIO) -> bool:
    """Whether ``checkpoint_io`` writes in the background (Lightning's ``AsyncCheckpointIO``): the file is not there
    when its call returns, so it gets the final path itself (its write is as atomic as it makes it)."""
    from lightning.pytorch.plugins.io.async_plugin import AsyncCheckpointIO

    return isinstance(checkpoint_io, AsyncCheckpointIO)


def fsync_path(path: str) -> None:
    """Flush a file or a folder (its entries: a rename into it) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
