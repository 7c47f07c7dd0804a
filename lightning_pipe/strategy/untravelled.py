"""``on_save_checkpoint`` extras that cannot travel between ranks in a checkpoint's gathering (an arbitrary object:
pytorch-forecasting's models keep their dataset's normalizers there, so that a checkpoint can predict). Made by the
same module on every rank, they are saved as rank 0's, which never travels: a rank's value that the codec refuses goes
as a mark, and rank 0 puts its own value at that place in its stead. Where rank 0 holds nothing there, the gathering
is refused on every rank, as before; so is a callback's state that cannot travel (it may differ by rank)."""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.strategy.plain import all_gather_text
from lightning_pipe.strategy.values import encode

__all__ = ["marked", "resolved"]

_MARK = "lightning_pipe: as rank 0's"  # the key of the mark standing for a value that did not travel
_DIGEST = "lightning_pipe: digest"  # beside it: the value's pickled bytes' digest, where it pickles


def _digest(value: Any) -> str | None:
    """A digest of ``value``'s pickled bytes (None where it does not pickle): equal values made alike on every rank
    (a model's dataset normalizers) give equal digests, so rank 0's value is theirs, and nothing needs saying."""
    try:
        return hashlib.sha256(pickle.dumps(value, protocol=4)).hexdigest()
    except Exception:  # noqa: BLE001 - anything may fail to pickle
        return None


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
                      f"checkpoint holds rank 0's in its place, which differs from it (or does not pickle, to be "
                      f"compared)", stacklevel=3)
        return rank_zero
    if type(value) is dict:
        return {key: resolved(item, rank_zero.get(key) if isinstance(rank_zero, dict) else None, rank,
                              f"{path}[{key!r}]") for key, item in value.items()}
    return value
