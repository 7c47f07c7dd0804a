"""The first error of a run, posted where every rank can read it: ranks that only see a broken connection (a
replica of the failed rank, waiting in a gradient all-reduce) end with that error instead of gloo's message."""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.engine.notices import (
    PipelineError,
    error_text,
    failed_as,
    failed_elsewhere,
    from_notice,
    notice_text,
)
from lightning_pipe.engine.deadline import PeerLost, lost_connection
from lightning_pipe.engine.store import short_store
from lightning_pipe.engine.watchdog import linger, mark_failed, posted_failure

__all__ = ["reported_failures", "raise_together"]

_PREFIX = "lightning_pipe"


def _store() -> Any:
    """The job's store through a client that gives up after a few seconds (a stopped store host must not hold a
    failing rank); ``None`` where there is none."""
    return short_store()


def _announce(scope: str, error: PipelineError) -> None:
    store = _store()
    if store is not None:
        try:
            store.compare_set(f"{_PREFIX}/{scope}/first_error", "", notice_text(error))  # the first wins
            mark_failed(store, dist.get_rank(), str(error))
        except Exception:  # noqa: BLE001 - the store may be gone with the rank that hosted it
            pass


def _first_error(scope: str, wait: float) -> PipelineError | None:
    store = _store()
    key = f"{_PREFIX}/{scope}/first_error"
    deadline = time.monotonic() + wait
    while store is not None:
        try:
            if store.check([key]):
                return from_notice(store.get(key).decode("utf-8", "replace"))
        except Exception:  # noqa: BLE001
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return None


def _leave(scope: str) -> None:
    """Count this rank as ended; the rank that hosts the store (global rank 0 under Lightning's launchers) waits up to
    5 s for the others (not for killed or stopped ones), so that they can still read the first error after it has
    ended."""
    store = _store()
    if store is None:
        return
    try:
        linger(store, f"{_PREFIX}/{scope}/ended", range(dist.get_world_size()), 5.0)
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
        if isinstance(error, PeerLost):  # a wait for other ranks failed: a rank's own error, if posted, says more
            # (one in a step of this run; else, where a connection closed, one a rank posted as it ended: an error
            # in a hook or callback, outside the steps)
            cause = _first_error(scope, wait=1.0) or (None if error.timed_out else failed_elsewhere(
                posted_failure(wait=2.0), dist.get_rank(), ""))
            if cause is not None:
                _leave(scope)
                raise cause from error
        _announce(scope, error)
        _leave(scope)
        raise
    except Exception as error:
        if lost_connection(error):
            cause = _first_error(scope, wait=2.0)
            if cause is not None:
                _leave(scope)
                raise cause from error
        rank = dist.get_rank() if dist.is_initialized() else 0
        _announce(scope, failed_as(error, f"rank {rank} failed: {error_text(error)}\n"
                                          f"{traceback.format_exc()}", rank))
        _leave(scope)
        raise


def raise_together(error: BaseException | None, what: str, group: dist.ProcessGroup | None = None,
                   device: torch.device | None = None) -> None:
    """Collective over ``group``: if any rank has an ``error``, raise on every rank (a rank's own error where it has
    one, else a ``RuntimeError`` quoting the failed ranks), so that no rank goes on to wait for one that failed.

    For errors every rank may or may not meet on its own (a stage's ``configure_optimizers``); ``what`` says what
    failed. One ``all_reduce`` when no rank failed; the messages travel as bytes in tensors, never pickled."""
    device = device or torch.device("cpu")
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if not int(failed.item()):
        return
    text = b"" if error is None else f"{type(error).__name__}: {error}".encode()
    size = dist.get_world_size(group)
    lengths = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([len(text)], dtype=torch.int64, device=device), group=group)
    longest = max(int(n.item()) for n in lengths)
    mine = torch.zeros(longest, dtype=torch.uint8)
    if text:
        mine[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(size)]
    dist.all_gather(parts, mine.to(device), group=group)
    if error is not None:
        raise error
    messages = [(rank, bytes(part.cpu().numpy().tobytes()[: int(n.item())]).decode(errors="replace"))
                for rank, (part, n) in enumerate(zip(parts, lengths)) if int(n.item())]
    global_rank = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    raise RuntimeError(f"{what} failed on rank(s) {[global_rank(r) for r, _ in messages]}: "
                       + "; ".join(f"rank {global_rank(r)}: {text}" for r, text in messages))
