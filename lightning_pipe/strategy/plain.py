"""Values that ranks share as JSON text in tensors, never pickled: the strategy's ``broadcast`` (which Lightning calls
with paths, flags and numbers), the cut plan global rank 0 makes, the ranks' views of a tied parameter.

``torch.distributed``'s ``*_object`` collectives pickle, and ``pickle.loads`` of bytes another process sent runs
whatever code they name. Here a value crosses as JSON: ``None``, booleans, numbers, strings, lists, and dicts with
string keys as they are; tuples, ``pathlib`` paths, tensors (their bytes, dtype and shape; on the CPU, or on this
rank's CUDA device for a CUDA tensor) and dicts with other keys (ints, tuples...) tagged (``{"__tuple__": [...]}``)
so they come back as they left. Anything else is refused on the sending rank, with its
place in the value, and every rank raises that error (none is left waiting for the value).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.engine.wire import flat_bytes

__all__ = ["encode", "decode", "broadcast_value", "all_gather_text", "gather_stacked"]

_TAGS = ("__tuple__", "__path__", "__items__", "__float__", "__tensor__")


def encode(value: Any) -> str:
    """``value`` as JSON text (see the module's doc); ``TypeError`` naming the first part that is not plain data."""
    return json.dumps(_plain(value, "value"), allow_nan=False, separators=(",", ":"))


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, PurePath):
        return {"__path__": str(value)}
    if type(value) in (torch.Tensor, torch.nn.Parameter) and not value.is_meta and not value.is_quantized \
            and value.layout == torch.strided:
        data = flat_bytes(value.cpu()).numpy().tobytes()
        return {"__tensor__": [str(value.dtype).removeprefix("torch."), list(value.shape), value.device.type,
                               base64.b64encode(data).decode()]}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"__tuple__": [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and key not in _TAGS for key in value):
            return {key: _plain(item, f"{where}[{key!r}]") for key, item in value.items()}
        return {"__items__": [[_plain(key, f"{where} key {key!r}"), _plain(item, f"{where}[{key!r}]")]
                              for key, item in value.items()]}
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__} ({_short(value)}), which ranks "
                    f"do not share: values cross between processes as JSON, never pickled, so pass None, a bool, "
                    f"number, string, path, or a list, tuple or dict of those")


def decode(text: str) -> Any:
    """The value :func:`encode` wrote."""
    return _restore(json.loads(text))


def _restore(value: Any) -> Any:
    if isinstance(value, list):
        return [_restore(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag == "__tuple__":
                return tuple(_restore(item) for item in inner)
            if tag == "__path__":
                return Path(inner)
            if tag == "__float__":
                return float(inner)
            if tag == "__tensor__":
                return _tensor(*inner)
            if tag == "__items__":
                return {_restore(key): _restore(item) for key, item in inner}
        return {key: _restore(item) for key, item in value.items()}
    return value


def _tensor(dtype: str, shape: list[int], device: str, data: str) -> torch.Tensor:
    """The tensor :func:`_plain` wrote: a CUDA tensor comes on this rank's CUDA device."""
    kind = getattr(torch, dtype)
    if not isinstance(kind, torch.dtype):
        raise ValueError(f"a broadcast tensor of dtype {dtype!r}, which torch does not have")
    raw = base64.b64decode(data)
    tensor = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(kind) if raw
              else torch.empty(0, dtype=kind)).reshape(shape)
    return tensor.to(torch.device("cuda", torch.cuda.current_device())) if device == "cuda" else tensor


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def broadcast_value(value: Any, src: int = 0, group: dist.ProcessGroup | None = None,
                    device: torch.device | None = None) -> Any:
    """``value`` of global rank ``src`` on every rank of ``group``, as JSON text (two broadcasts: the length, then the
    bytes). A value that is not plain data raises its ``TypeError`` on every rank."""
    device = device or torch.device("cpu")
    payload, failed = b"", 0
    if dist.get_rank() == src:
        try:
            payload = encode(value).encode()
        except Exception as error:  # noqa: BLE001 - every rank raises it: none is left waiting for the value
            payload, failed = f"{error}" if isinstance(error, TypeError) else f"{type(error).__name__}: {error}", 1
            payload = payload.encode()
    header = torch.tensor([len(payload), failed], dtype=torch.int64, device=device)
    dist.broadcast(header, src=src, group=group)
    length, failed = (int(n) for n in header.cpu())
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if dist.get_rank() == src and length \
        else torch.empty(length, dtype=torch.uint8, device=device)
    if length:
        dist.broadcast(data, src=src, group=group)
    text = data.cpu().numpy().tobytes().decode()
    if failed:
        raise TypeError(f"broadcast from rank {src}: {text}")
    return decode(text)


def all_gather_text(text: str, group: dist.ProcessGroup | None = None, device: torch.device | None = None,
                    run: Callable[..., Any] | None = None) -> list[str]:
    """Every rank's ``text`` in group order (two all_gathers: the lengths, then the padded bytes); ``run(call, *args,
    group=group)`` makes each (default: the call itself; a watched one, :func:`~lightning_pipe.engine.deadline.
    collective`, ends when another rank fails)."""
    device = device or torch.device("cpu")
    run = run or (lambda call, *args, **kwargs: call(*args, **kwargs))
    mine = text.encode()
    size = dist.get_world_size(group)
    lengths = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(size)]
    run(dist.all_gather, lengths, torch.tensor([len(mine)], dtype=torch.int64, device=device), group=group)
    counts = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(counts + [1]), dtype=torch.uint8)
    if mine:
        padded[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    parts = [torch.empty_like(padded, device=device) for _ in range(size)]
    run(dist.all_gather, parts, padded.to(device), group=group)
    return [part.cpu().numpy().tobytes()[:count].decode() for part, count in zip(parts, counts)]


def gather_stacked(tensor: torch.Tensor, group: dist.ProcessGroup | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """Every rank's ``tensor`` (of one shape on every rank) stacked in group order, on the CPU."""
    device = device or torch.device("cpu")
    parts = [torch.empty_like(tensor, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.to(device), group=group)
    return torch.stack([part.cpu() for part in parts])
