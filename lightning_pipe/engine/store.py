"""Clients of the job's store for the failure paths: each with a short timeout of its own, made while the store
answers, and a quick look whether the store's server is gone before writing to it.

The store lives in one process (global rank 0's under Lightning's launcher, torchrun's agent under torchrun). Once
that process has ended, every operation on the process group's own client waits out the store's whole timeout (the
process group's: 30 minutes under Lightning) before it fails, and so does connecting a new client. The heartbeat, the
diagnosis of a wait and the notice of a failure therefore go through the clients made here."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["STORE_TIMEOUT_S", "short_store", "cached_store", "store_gone"]

STORE_TIMEOUT_S = 5.0
"""Seconds a read of the store may take in a diagnosis before the store itself counts as not answering."""

_CLIENTS: dict[str, tuple[Any, Any]] = {}  # purpose -> (default process group, store client)


def short_store(purpose: str = "main", timeout: float = STORE_TIMEOUT_S) -> Any:
    """A client of the job's store of its own, whose operations give up after ``timeout`` seconds (``None`` where
    there is no store, or it no longer answers). One per ``purpose`` and process group: a client serves one thread.

    Made while the store answers (the heartbeat makes the main one as it starts), since connecting to a store that
    is gone waits out the store's whole timeout before it fails: a rank that failed after the store's holder had
    ended blocked there, never ending. A connection made here gives up after ``timeout`` too, and then there is no
    client (asked again later, it tries again)."""
    world = dist.group.WORLD if dist.is_initialized() else None
    cached = _CLIENTS.get(purpose)
    if cached is not None and cached[0] is world:
        return cached[1]
    client = None
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no process group: nothing to read or write
        store = None
    if store is not None:
        try:
            client = _clone(store, timeout)
        except dist.DistError:  # the store's holder is gone (or did not answer in time): none now
            return None
        except Exception:  # noqa: BLE001 - a store that cannot be cloned (a FileStore): share it (its own timeout)
            client = store
    _CLIENTS[purpose] = (world, client)
    return client


def cached_store(purpose: str = "main") -> Any:
    """The client :func:`short_store` made for ``purpose`` under the current process group, never a new one (the exit
    path: connecting to a store that is gone blocks); ``None`` if there is none."""
    cached = _CLIENTS.get(purpose)
    if cached is None or not dist.is_initialized() or cached[0] is not dist.group.WORLD:
        return None
    return cached[1]


def store_gone(store: Any) -> bool:
    """Whether ``store``'s server refuses connections now (its holder ended): an operation on it would fail, and
    torch logs each such failure with its C++ stack, so the failure and exit paths look first. Only a TCPStore can
    tell (one quick connection); any other store is taken as answering."""
    inner = store
    while hasattr(inner, "underlying_store"):  # the process group's prefixes
        inner = inner.underlying_store
    host, port = getattr(inner, "host", None), getattr(inner, "port", None)
    if not host or not port:
        return False
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # slow or unreachable: not known to be gone
        return False
    return False


def _clone(store: Any, timeout: float) -> Any:
    """A new client of ``store`` whose connecting and operations give up after ``timeout`` seconds. A clone takes
    the store's timeout for its connection, so the store's is lowered meanwhile: for a moment, for every user of the
    process group's store in this process (its prefixes share the one under them)."""
    was = store.timeout
    store.set_timeout(timedelta(seconds=timeout))
    try:
        client = store.clone()
    finally:
        store.set_timeout(was)
    client.set_timeout(timedelta(seconds=timeout))
    return client
