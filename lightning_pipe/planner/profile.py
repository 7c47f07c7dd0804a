"""Profile each layer on a sample micro-batch: forward and backward time, activation and weight bytes; cache the result.

Each layer runs on its own: its input is the previous layer's output, detached into a leaf that requires
grad (as a received activation is), so its forward and its backward can be timed separately and summed over
any contiguous stage. Times are medians over ``repeats`` runs after ``warmup`` runs. Saved-for-backward bytes
are counted with ``torch.autograd.graph.saved_tensors_hooks``, one count per storage, parameters excluded.

The model is left as it was: parameter gradients, buffers (batch-norm statistics) and RNG state are restored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.engine.kept import kept_buffers, kept_modes
from lightning_pipe.engine.tree import tree_flatten, tree_map_tensors

__all__ = ["LayerProfile", "profile_layers", "profile_key", "load_profiles", "save_profiles", "scale_profiles"]

_FORMAT = 1  # bump when LayerProfile's fields or their meaning change, so old cache files are ignored


@dataclass(frozen=True)
class LayerProfile:
    """What one layer costs for one micro-batch of the sample's size."""

    name: str
    """The layer's name in its sequence ("3" for the fourth layer of a plain ``nn.Sequential``)."""
    forward: float
    """Seconds of forward."""
    backward: float
    """Seconds of backward (input gradient and weight gradient)."""
    input_bytes: int
    """Bytes of the layer's input tensors."""
    output_bytes: int
    """Bytes of its output tensors: the message to the next stage when a cut follows this layer."""
    saved_bytes: int
    """Bytes saved for backward other than its input, its output and parameters (one count per storage)."""
    saves_input: bool
    """Whether backward keeps (part of) the input's storage."""
    saves_output: bool
    """Whether backward keeps (part of) the output's storage."""
    parameters: int
    """Number of parameter elements (what ``partition="parameters"`` balances)."""
    parameter_bytes: int
    """Bytes of all parameters."""
    gradient_bytes: int
    """Bytes of the gradients of trainable parameters."""
    optimizer_bytes: int
    """Bytes of optimizer state: ``optimizer_state_factor`` times the trainable parameter bytes."""

    @property
    def compute(self) -> float:
        """Forward plus backward seconds."""
        return self.forward + self.backward

    @property
    def weight_bytes(self) -> int:
        """Parameters, gradients and optimizer state: what a stage holds however many micro-batches are in flight."""
        return self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes


def profile_layers(
    layers: nn.Sequential | Sequence[nn.Module],
    sample_input: Any,
    *,
    device: torch.device | str | None = None,
    repeats: int = 5,
    warmup: int = 2,
    optimizer_state_factor: float = 2.0,
    cache: str | os.PathLike[str] | None = None,
) -> list[LayerProfile]:
    """Profile every layer of ``layers`` on ``sample_input`` (one micro-batch, as the first layer takes it).

    ``device``: where to run (default: where the parameters are; layers elsewhere are moved there and back).
    ``optimizer_state_factor``: optimizer state per trainable parameter byte (2 for Adam, 1 for SGD with
    momentum, 0 for plain SGD). ``cache``: a folder; the profile is saved there as ``profile-<key>.json`` and
    reused while :func:`profile_key` (model structure, parameter and input shapes and dtypes, device) is unchanged.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats ({repeats}) must be >= 1 and warmup ({warmup}) >= 0")
    if optimizer_state_factor < 0:
        raise ValueError(f"optimizer_state_factor ({optimizer_state_factor}) must be >= 0 (2 for Adam, 0 for SGD)")
    named = _named_layers(layers)
    if not named:
        raise ValueError("nothing to profile: the sequence has no layers")
    target = torch.device(device) if device is not None else _device_of(named)
    key = profile_key(layers, sample_input, device=target, optimizer_state_factor=optimizer_state_factor)
    path = Path(cache) / f"profile-{key[:20]}.json" if cache is not None else None
    if path is not None and path.exists():
        cached = load_profiles(path, key)
        if cached is not None:
            return cached
    with _borrowed(named, target):
        profiles = _measure(named, tree_map_tensors(lambda t: t.to(target), sample_input), target, repeats, warmup,
                            optimizer_state_factor)
    if path is not None:
        save_profiles(path, profiles, key)
    return profiles


def profile_key(
    layers: nn.Sequential | Sequence[nn.Module],
    sample_input: Any,
    *,
    device: torch.device | str | None = None,
    optimizer_state_factor: float = 2.0,
) -> str:
    """A hash of what a profile depends on: each layer's type and ``repr``, its parameters' and buffers' names,
    shapes, dtypes and ``requires_grad``, the sample's shapes and dtypes, the device and the torch version."""
    named = _named_layers(layers)
    target = torch.device(device) if device is not None else _device_of(named)
    leaves, spec = tree_flatten(sample_input)
    description = {
        "format": _FORMAT,
        "torch": torch.__version__,
        "device": _device_name(target),
        "optimizer_state_factor": optimizer_state_factor,
        "input": [[list(t.shape), str(t.dtype), t.requires_grad] for t in leaves] + [repr(spec)],
        "layers": [
            [name, type(layer).__qualname__, repr(layer),
             [[n, list(p.shape), str(p.dtype), p.requires_grad] for n, p in layer.named_parameters()],
             [[n, list(b.shape), str(b.dtype)] for n, b in layer.named_buffers()]]
            for name, layer in named
        ],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def save_profiles(path: str | os.PathLike[str], profiles: Sequence[LayerProfile], key: str = "") -> None:
    """Write ``profiles`` as JSON (with the :func:`profile_key` they belong to)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": _FORMAT, "key": key, "layers": [dataclasses.asdict(p) for p in profiles]}
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=1))
    temporary.replace(path)  # atomic: ranks reading the cache never see half a file


def load_profiles(path: str | os.PathLike[str], key: str | None = None) -> list[LayerProfile] | None:
    """Profiles saved by :func:`save_profiles`; ``None`` if the file is unreadable or belongs to another key."""
    try:
        payload = json.loads(Path(path).read_text())
        if payload.get("format") != _FORMAT or (key is not None and payload.get("key") != key):
            return None
        return [LayerProfile(**entry) for entry in payload["layers"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None


def scale_profiles(profiles: Sequence[LayerProfile], factor: float) -> list[LayerProfile]:
    """Profiles for micro-batches ``factor`` times the sample's rows: times and activation bytes scale linearly,
    weights do not. (Small micro-batches use a device less well than this assumes; profile them if it matters.)"""
    if not factor > 0:
        raise ValueError(f"factor ({factor}) must be > 0")
    return [dataclasses.replace(p, forward=p.forward * factor, backward=p.backward * factor,
                                input_bytes=round(p.input_bytes * factor), output_bytes=round(p.output_bytes * factor),
                                saved_bytes=round(p.saved_bytes * factor)) for p in profiles]


# -- measuring ---------------------------------------------------------------------------------------
def _measure(named: list[tuple[str, nn.Module]], sample: Any, device: torch.device, repeats: int, warmup: int,
             optimizer_state_factor: float) -> list[LayerProfile]:
    forward_times: list[list[float]] = [[] for _ in named]
    backward_times: list[list[float]] = [[] for _ in named]
    memory: list[tuple[int, int, int, bool, bool]] = []
    for run in range(warmup + repeats):
        timed = run >= warmup
        inputs, outputs, counts = [], [], []
        x = sample
        for index, (_, layer) in enumerate(named):
            x = x if index == 0 else tree_map_tensors(_as_input, x)
            with _SavedBytes(layer) as saved:
                start = _clock(device)
                y = layer(x)
                elapsed = _clock(device) - start
            if timed:
                forward_times[index].append(elapsed)
            inputs.append(x)
            outputs.append(y)
            counts.append(saved.summary(x, y))
            x = y
        grads = [torch.ones_like(t) for t in _differentiable(outputs[-1])]
        for index in reversed(range(len(named))):
            outs = _differentiable(outputs[index])
            start = _clock(device)
            if outs:
                torch.autograd.backward(outs, grads)
            elapsed = _clock(device) - start
            if timed:
                backward_times[index].append(elapsed)
            if index > 0:  # the gradient of the previous layer's output is that of this layer's input
                pairs = zip(tree_flatten(inputs[index])[0], tree_flatten(outputs[index - 1])[0])
                grads = [x.grad if x.grad is not None else torch.zeros_like(y) for x, y in pairs if y.requires_grad]
        memory = counts
    profiles = []
    for index, (name, layer) in enumerate(named):
        params = list(layer.parameters())
        parameter_bytes = sum(_nbytes(p) for p in params)
        trainable = sum(_nbytes(p) for p in params if p.requires_grad)
        input_bytes, output_bytes, saved_bytes, saves_input, saves_output = memory[index]
        profiles.append(LayerProfile(
            name=name, forward=statistics.median(forward_times[index]),
            backward=statistics.median(backward_times[index]), input_bytes=input_bytes, output_bytes=output_bytes,
            saved_bytes=saved_bytes, saves_input=saves_input, saves_output=saves_output,
            parameters=sum(p.numel() for p in params), parameter_bytes=parameter_bytes, gradient_bytes=trainable,
            optimizer_bytes=round(optimizer_state_factor * trainable)))
    return profiles


class _SavedBytes:
    """Counts the storages autograd saves for backward while a layer runs, parameters excluded."""

    def __init__(self, layer: nn.Module) -> None:
        self.exclude = {_storage_key(t) for t in (*layer.parameters(), *layer.buffers())}
        self.storages: dict[tuple[str, int], int] = {}

    def __enter__(self) -> _SavedBytes:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = _storage_key(tensor)
            if key not in self.exclude:
                self.storages[key] = tensor.untyped_storage().nbytes()
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def summary(self, inputs: Any, outputs: Any) -> tuple[int, int, int, bool, bool]:
        """(input bytes, output bytes, other saved bytes, saves input, saves output)."""
        input_keys = {_storage_key(t) for t in tree_flatten(inputs)[0]}
        output_keys = {_storage_key(t) for t in tree_flatten(outputs)[0]}
        other = sum(n for key, n in self.storages.items() if key not in input_keys and key not in output_keys)
        return (_tree_bytes(inputs), _tree_bytes(outputs), other, bool(input_keys & self.storages.keys()),
                bool(output_keys & self.storages.keys()))


def _as_input(tensor: torch.Tensor) -> torch.Tensor:
    """A received activation: a leaf, requiring grad if it can carry one."""
    leaf = tensor.detach()
    return leaf.requires_grad_(True) if leaf.is_floating_point() or leaf.is_complex() else leaf


def _differentiable(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if t.requires_grad]


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _tree_bytes(tree: Any) -> int:
    return sum(_nbytes(t) for t in tree_flatten(tree)[0])


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _named_layers(layers: nn.Sequential | Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    if isinstance(layers, nn.Sequential):
        return [(name, layer) for name, layer in layers._modules.items() if layer is not None]  # repeats too
    return [(str(i), layer) for i, layer in enumerate(layers)]


def _device_of(named: list[tuple[str, nn.Module]]) -> torch.device:
    for _, layer in named:
        for tensor in (*layer.parameters(), *layer.buffers()):
            return tensor.device
    return torch.device("cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


@contextmanager
def _borrowed(named: list[tuple[str, nn.Module]], device: torch.device) -> Iterator[None]:
    """Run on ``device`` and in training mode; afterwards put back devices, modes, gradients, buffers and RNG."""
    layers = [layer for _, layer in named]
    homes = [_device_of([(name, layer)]) for name, layer in named]
    params = [p for layer in layers for p in layer.parameters()]
    grads = [p.grad for p in params]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), kept_modes(layers), \
            kept_buffers(layers):
        try:
            for layer in layers:
                layer.to(device).train()
            for p in params:
                p.grad = None
            yield
        finally:
            for p, grad in zip(params, grads):
                p.grad = grad
            for layer, home in zip(layers, homes):
                layer.to(home)
