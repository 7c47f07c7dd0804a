"""``on_save_checkpoint`` extras that cannot travel between ranks in a checkpoint's gathering (an arbitrary object:
pytorch-forecasting's models keep their dataset's normalizers there, so that a checkpoint can predict). Made by the
same module on every rank, they are saved as rank 0's, which never travels: a rank's value that the codec refuses goes
as a mark, and rank 0 puts its own value at that place in its stead. Where rank 0 holds nothing there, the gathering
is refused on every rank, as before; so is a callback's state that cannot travel (it may differ by rank)."""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.strategy.plain import all_gather_text
from lightning_pipe.strategy.values import encode

__all__ = ["marked", "resolved"]

_MARK = "lightning_pipe: as rank 0's"  # the key of the mark standing for a value that did not travel
_DIGEST = "lightning_pipe: digest"  # beside it: a digest of the value's content, where it can be read


def _digest(value: Any) -> str | None:
    """A digest of ``value``'s content (None where it holds what cannot be read so: a function, a file): equal values
    made alike on every rank (a model's dataset normalizers) give equal digests, so rank 0's value is theirs, and
    nothing needs saying. A module counts by its class and state dict."""
    try:
        return hashlib.sha256(repr(_content(value, 0)).encode()).hexdigest()
    except _Unreadable:
        return None


class _Unreadable(Exception):
    pass


def _content(value: Any, depth: int) -> Any:
    if depth > 8:
        raise _Unreadable
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return value
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return ("tensor", str(data.dtype), tuple(data.shape), hashlib.sha256(data.view(-1).view(torch.uint8).numpy()
                                                                             .tobytes()).hexdigest())
    if type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "tobytes"):
        kind = str(getattr(value, "dtype", ""))
        if kind == "object":  # (its bytes are its items' addresses, another in each process: found by review, a
            # fitted scaler's feature_names_in_): read item by item
            return ("numpy", kind, value.shape, _content(value.tolist(), depth + 1))
        return ("numpy", kind, getattr(value, "shape", ()), value.tobytes())
    if type(value).__module__.split(".")[0] == "pandas":  # a fitted normalizer's frame (pytorch-forecasting's)
        read = getattr(value, "to_dict", None) or getattr(value, "tolist", None)
        if callable(read):
            return ("pandas", type(value).__qualname__, _content(read(), depth + 1))
    if isinstance(value, dict):
        return ("dict", sorted((repr(key), _content(item, depth + 1)) for key, item in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(map(repr, value)) if isinstance(value, (set, frozenset)) else value
        return (type(value).__name__, [_content(item, depth + 1) for item in items])
    if isinstance(value, torch.nn.Module):
        return ("module", type(value).__qualname__, _content(dict(value.state_dict()), depth + 1))
    if isinstance(getattr(value, "__dict__", None), dict) and not inspect.isroutine(value) \
            and not isinstance(value, type):
        return ("object", type(value).__module__, type(value).__qualname__, _content(vars(value), depth + 1))
    raise _Unreadable


def _marked(value: Any, advice: str, path: list[str], found: list[tuple[list[str], str]]) -> Any:
    try:
        encode(value, [], "this rank's share of the checkpoint (callback states, on_save_checkpoint's extras)", advice,
               "".join(f"[{key!r}]" for key in path))
        return value
    except TypeError as error:
        if type(value) is dict and all(isinstance(key, str) for key in value):
            return {key: _marked(item, advice, [*path, key], found) for key, item in value.items()}
        found.append((path, str(error)))
        return {_MARK: str(error), _DIGEST: _digest(value)}


def _holds(value: Any, path: list[str]) -> bool:
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return False
        value = value[key]
    return True


def marked(own: dict[str, Any], rank_zero: dict[str, Any] | None, advice: str, group: Any,
           device: torch.device) -> dict[str, Any]:
    """This rank's ``own`` checkpoint entries with each part of the module's extras the codec refuses as a mark (a
    dict's items looked at one by one, so that only what cannot travel is marked); collective: where rank 0 (whose
    own entries are ``rank_zero`` there) holds nothing at a marked place, a ``TypeError`` on every rank."""
    found: list[tuple[list[str], str]] = []
    result = own
    if dist.get_rank(group) != 0:  # (callbacks' states, which may differ by rank, are not: they still must travel)
        result = {key: item if key == "callbacks" else _marked(item, advice, [key], found) for key, item in own.items()}
    every = [json.loads(text) for text in all_gather_text(json.dumps(found), group, device)]
    if not any(every):
        return result
    lacking = ""
    if rank_zero is not None:
        lacking = next((f"pipeline rank {rank}: {message}" for rank, marks in enumerate(every)
                        for path, message in marks if not _holds(rank_zero, path)), "")
    errors = [text for text in all_gather_text(lacking, group, device) if text]
    if errors:
        raise TypeError(errors[0])
    return result


def resolved(value: Any, rank_zero: Any, rank: int, path: str = "") -> Any:
    """``value`` (rank ``rank``'s own entries, received on rank 0) with each mark replaced by what rank 0 holds at its
    place (``rank_zero``), said once."""
    if type(value) is dict and _MARK in value and set(value) <= {_MARK, _DIGEST}:
        digest = value.get(_DIGEST)
        if digest is not None and digest == _digest(rank_zero):  # (found by review: said at every save, though alike)
            return rank_zero
        warnings.warn(f"rank {rank}'s checkpoint entry {path} cannot travel between ranks ({value[_MARK]}), so the "
                      f"checkpoint holds rank 0's in its place, which differs from it (or holds what cannot be read "
                      f"to compare: a function, a file)", stacklevel=3)
        return rank_zero
    if type(value) is dict:
        return {key: resolved(item, rank_zero.get(key) if isinstance(rank_zero, dict) else None, rank,
                              f"{path}[{key!r}]") for key, item in value.items()}
    return value
