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

_KEY = "lightning_pipe/first_error"


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no process group, or a store we cannot reach: nothing to share through
        return None


def _announce(message: str) -> None:
    store = _store()
    if store is not None:
        try:
            store.compare_set(_KEY, "", f"{dist.get_rank()}\n{message}")  # the first error wins
        except Exception:  # noqa: BLE001 - the store may be gone with the rank that hosted it
            pass


def _first_error(wait: float) -> PipelineError | None:
    store = _store()
    deadline = time.monotonic() + wait
    while store is not None:
        try:
            if store.check([_KEY]):
                origin, _, message = store.get(_KEY).decode().partition("\n")
                return PipelineError(message, int(origin))
        except Exception:  # noqa: BLE001
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return None


@contextmanager
def reported_failures() -> Iterator[None]:
    """Post the first error raised in the block; turn a lost connection into the error that caused it."""
    try:
        yield
    except PipelineError as error:
        _announce(str(error))
        raise
    except RuntimeError as error:
        if "Connection closed by peer" in str(error) or "Connection reset" in str(error):
            cause = _first_error(wait=2.0)
            if cause is not None:
                raise cause from error
        _announce(f"rank {dist.get_rank() if dist.is_initialized() else 0} failed: {type(error).__name__}: "
                  f"{error}\n{traceback.format_exc()}")
        raise
    except Exception as error:
        _announce(f"rank {dist.get_rank() if dist.is_initialized() else 0} failed: {type(error).__name__}: "
                  f"{error}\n{traceback.format_exc()}")
        raise
