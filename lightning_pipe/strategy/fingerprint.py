"""A cheap fingerprint of a batch, for checking that every rank of a pipeline is reading the same batch.

Each rank of a pipeline reads the batch itself: stage 0 takes its inputs from it and the last stage its targets. If
the ranks' dataloaders drift apart (a sampler or a worker drawing from a per-process generator), the two ends train
on different rows, silently. The fingerprint is compared across the pipeline's ranks at every step inside the
collective that already shares the last stage's results (:mod:`.results`), so the check costs no extra message.

It covers every row of every tensor (a few evenly spaced elements of each row, bit for bit), the shapes and dtypes,
and the non-tensor leaves (numbers, strings, None); it is the same for the same batch in any process. Tensors on a CUDA
device are hashed on the device (integer arithmetic without overflow), so computing it does not wait for the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["batch_fingerprint", "FINGERPRINT_BITS"]

FINGERPRINT_BITS = 61
_MODULUS = (1 << FINGERPRINT_BITS) - 1  # a Mersenne prime
_LEAF_MODULUS = (1 << 40) - 87
_ELEMENTS_PER_ROW = 8
_MAX_ROWS = 1 << 14
_weights: dict[tuple[torch.device, int], torch.Tensor] = {}


def batch_fingerprint(batch: Any, device: torch.device | None = None) -> int | torch.Tensor:
    """A number in ``[0, 2**61 - 1)`` that identifies ``batch``: a Python int when its tensors are on the host, else a
    0-dim int64 tensor on ``device`` (computed there, so that nothing waits for the device)."""
    described: list[str] = []
    tensors: list[torch.Tensor] = []
    _walk(batch, described, tensors)
    host = _hash(("|".join(described)).encode())
    total: torch.Tensor | None = None
    for number, tensor in enumerate(tensors, start=1):
        part = _tensor_hash(tensor)
        if isinstance(part, int):
            host = (host + part * number) % _MODULUS
        else:
            part = (part % _LEAF_MODULUS) * number  # < 2**60: the sum of two stays below 2**63
            part = part.to(device) if device is not None else part
            total = part if total is None else (total + part.to(total.device)) % _MODULUS
    return host if total is None else (total + host) % _MODULUS


def _walk(tree: Any, described: list[str], tensors: list[torch.Tensor]) -> None:
    if isinstance(tree, torch.Tensor):
        described.append(f"T{tuple(tree.shape)}{tree.dtype}")
        tensors.append(tree)
    elif isinstance(tree, Mapping):
        described.append(f"{{{len(tree)}")
        for key, value in tree.items():
            described.append(repr(key) if isinstance(key, (str, int, float, bool)) else type(key).__name__)
            _walk(value, described, tensors)
    elif isinstance(tree, (list, tuple)):
        described.append(f"[{len(tree)}")
        for value in tree:
            _walk(value, described, tensors)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        described.append(f"@{type(tree).__qualname__}")
        for item in dataclasses.fields(tree):
            described.append(item.name)
            _walk(getattr(tree, item.name), described, tensors)
    elif tree is None or isinstance(tree, (bool, int, float)):
        described.append(repr(tree))
    elif isinstance(tree, (str, bytes)):
        described.append(repr(tree[:256]))
    else:  # an object we cannot read safely (its repr may hold an address): its type must match
        described.append(type(tree).__qualname__)


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """A few evenly spaced elements of every row (of every row up to _MAX_ROWS, evenly spaced beyond), as bytes; the same
    elements :func:`_tensor_hash` takes through NumPy."""
    rows = tensor.reshape(1, -1) if tensor.dim() == 0 else tensor.reshape(tensor.shape[0], -1)
    if rows.shape[0] > _MAX_ROWS:
        rows = rows[:: -(-rows.shape[0] // _MAX_ROWS)]
    step = max(1, rows.shape[1] // _ELEMENTS_PER_ROW)
    return rows[:, ::step].contiguous().view(torch.uint8).reshape(-1)


def _tensor_hash(tensor: torch.Tensor) -> int | torch.Tensor:
    """A Python int for a host tensor; a 0-dim int64 tensor, computed where the tensor is, for a device tensor."""
    if tensor.numel() == 0:
        return 0
    if tensor.device.type == "cpu":
        try:
            array = tensor.detach().numpy()  # NumPy slices in a microsecond where torch takes several
        except (TypeError, RuntimeError):  # a dtype NumPy lacks (bfloat16): through torch
            return _hash(_sample(tensor.detach()).numpy().tobytes())
        rows = array.reshape(1 if array.ndim == 0 else array.shape[0], -1)
        if rows.shape[0] > _MAX_ROWS:
            rows = rows[:: -(-rows.shape[0] // _MAX_ROWS)]
        return _hash(rows[:, :: max(1, rows.shape[1] // _ELEMENTS_PER_ROW)].tobytes())
    data = _sample(tensor.detach())
    # bytes (< 2**8) times weights (< 2**31) summed over at most 2**20 bytes: < 2**59, no overflow on any device
    weights = _weights_on(data.device, data.numel())
    return (data.to(torch.int64) * weights[: data.numel()]).sum()


def _weights_on(device: torch.device, count: int) -> torch.Tensor:
    key = (device, max(count, 1024))
    cached = next((w for (d, n), w in _weights.items() if d == device and n >= count), None)
    if cached is None:
        generator = torch.Generator().manual_seed(0x5EED)
        cached = torch.randint(1, 1 << 31, (key[1],), generator=generator, dtype=torch.int64).to(device)
        _weights[key] = cached
    return cached


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") % _MODULUS
