"""The first error of a run, posted where every rank can read it: ranks that only see a broken connection (a
replica of the failed rank, waiting in a gradient all-reduce) end with that error instead of gloo's message."""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from lightning_pipe.engine.comm import PipelineError

__all__ = ["reported_failures"]

_PREFIX = "lightning_pipe"


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no process group, or a store we cannot reach: nothing to share through
        return None


def _announce(scope: str, message: str) -> None:
    store = _store()
    if store is not None:
        try:
            store.compare_set(f"{_PREFIX}/{scope}/first_error", "", f"{dist.get_rank()}\n{message}")  # first wins
        except Exception:  # noqa: BLE001 - the store may be gone with the rank that hosted it
            pass


def _first_error(scope: str, wait: float) -> PipelineError | None:
    store = _store()
    key = f"{_PREFIX}/{scope}/first_error"
    deadline = time.monotonic() + wait
    while store is not None:
        try:
            if store.check([key]):
                origin, _, message = store.get(key).decode().partition("\n")
                return PipelineError(message, int(origin))
        except Exception:  # noqa: BLE001
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return None


# What gloo and the store say when a peer has gone away (the symptom of a failure elsewhere, not its cause).
_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "got 0 bytes",
         "connection was likely closed")


def _lost_connection(error: BaseException) -> bool:
    """Whether ``error`` says a peer went away rather than what went wrong."""
    return isinstance(error, dist.DistNetworkError) or any(text in str(error).lower() for text in _LOST)


def _leave(scope: str) -> None:
    """Count this rank as ended; the rank that hosts the store (global rank 0 under Lightning's launchers) waits up to
    5 s for the others, so that they can still read the first error after it has ended."""
    store = _store()
    if store is None:
        return
    try:
        ended = store.add(f"{_PREFIX}/{scope}/ended", 1)
        if dist.get_rank() == 0:
            deadline = time.monotonic() + 5.0
            while ended < dist.get_world_size() and time.monotonic() < deadline:
                time.sleep(0.05)
                ended = store.add(f"{_PREFIX}/{scope}/ended", 0)
    except Exception:  # noqa: BLE001 - the store went with the rank that hosted it
        pass


@contextmanager
def reported_failures(scope: str = "run") -> Iterator[None]:
    """Post the first error raised in the block; turn a lost connection into the error that caused it.

    ``scope`` names the run the errors belong to (every rank passes the same one): a later run in the same process
    group, after a failure was caught, starts with no first error."""
    try:
        yield
    except PipelineError as error:
        _announce(scope, str(error))
        _leave(scope)
        raise
    except Exception as error:
        if _lost_connection(error):
            cause = _first_error(scope, wait=2.0)
            if cause is not None:
                _leave(scope)
                raise cause from error
        _announce(scope, f"rank {dist.get_rank() if dist.is_initialized() else 0} failed: {type(error).__name__}: "
                         f"{error}\n{traceback.format_exc()}")
        _leave(scope)
        raise
