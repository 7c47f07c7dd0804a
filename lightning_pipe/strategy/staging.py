"""The staging folder of a sharded checkpoint's durable write, and what a killed job left in it.

A sharded checkpoint is written into ``<parent>/.lightning_pipe-writing/<name>`` and renamed into place when every
rank has written its part (:func:`publish`). Global rank 0 marks each folder it stages with a file
(``<name>.owner``: its host and process id, for whoever reads it) on which it holds an exclusive lock (``flock``)
until the folder is published or dropped after an error, when the mark is removed. A job killed while writing
(SIGKILL, a node's out-of-memory killer, a pre-empted allocation) leaves the mark, and the system releases its lock
with the process. The next sharded save in that parent, by any job, takes the lock of each mark it finds: a mark whose
lock it gets is a dead writer's, and is cleared. Its half-written folder is deleted; an older checkpoint moved aside
by a publish that never finished (``<name>.previous``) is put back at ``<parent>/<name>`` where nothing took its
place, else deleted. A mark whose lock is held (a live job, in this container or another, on this host or another
sharing the file system) or cannot be taken (a file system without locks) is left alone: nothing a live job writes is
touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from typing import IO

from lightning_pipe.strategy.checkpoint import fsync_path

try:
    import fcntl
except ImportError:  # (Windows: no marks are ever taken, so none is cleared)
    fcntl = None  # type: ignore[assignment]

__all__ = ["STAGING", "staging_path", "stage", "publish", "drop", "clear_abandoned"]

STAGING = ".lightning_pipe-writing"
_OWNER, _ASIDE = ".owner", ".previous"
_HELD: dict[str, IO[str]] = {}  # staging folder -> its mark, open and locked while this process writes it


def staging_path(parent: str, name: str) -> str:
    """Where ``<parent>/<name>`` is written before it is published."""
    return os.path.join(parent, STAGING, name)


def stage(parent: str, name: str) -> str:
    """Make the empty staging folder for ``<parent>/<name>`` (whatever an earlier attempt left there removed) after
    clearing what killed jobs left beside it, marked and locked as this process's; return its path."""
    staging = staging_path(parent, name)
    root = os.path.dirname(staging)
    clear_abandoned(root)
    _release(staging)
    for attempt in range(5):  # (another job's clearing removes the root folder once it is empty)
        os.makedirs(root, exist_ok=True)
        try:
            mark = open(staging + _OWNER, "a+")
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
    if fcntl is not None:
        with contextlib.suppress(OSError):  # (held by another writer of this name, or no locks here: unguarded)
            fcntl.flock(mark, fcntl.LOCK_EX | fcntl.LOCK_NB)
    mark.truncate(0)
    json.dump({"host": socket.gethostname(), "pid": os.getpid()}, mark)
    mark.flush()
    _HELD[staging] = mark
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish(staging: str, target: str) -> None:
    """Rename the written folder into place; an older checkpoint there is moved aside first and deleted after (put
    back where the second rename fails)."""
    fsync_path(staging)
    aside = None
    if os.path.lexists(target):
        aside = staging + _ASIDE
        _remove(aside)
        os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)
        raise
    fsync_path(os.path.dirname(target))
    if aside is not None:
        _remove(aside)
    _release(staging)
    _remove_if_empty(os.path.dirname(staging))


def drop(staging: str) -> None:
    """Remove a staging folder whose write failed (every rank raised), and its mark; an older checkpoint moved aside
    goes back where nothing took its place."""
    shutil.rmtree(staging, ignore_errors=True)
    _put_back(staging)
    _release(staging)
    _remove_if_empty(os.path.dirname(staging))


def clear_abandoned(root: str) -> list[str]:
    """Clear what dead writers left in the staging folder ``root`` (see the module's text); return the names
    cleared."""
    try:
        marks = [entry for entry in os.listdir(root) if entry.endswith(_OWNER)]
    except OSError:  # no staging folder yet
        return []
    cleared = []
    for entry in marks:
        mark, staging = os.path.join(root, entry), os.path.join(root, entry.removesuffix(_OWNER))
        if staging in _HELD or fcntl is None:
            continue
        try:
            handle = open(mark, "r+")  # (writable: an exclusive lock over NFS needs it)
        except OSError:  # (cleared by another job just now)
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a live writer (or no locks here): left alone
                continue
            try:
                if os.fstat(handle.fileno()).st_ino != os.stat(mark).st_ino:
                    continue  # (another job cleared it and a new writer marked the name since)
            except OSError:
                continue
            shutil.rmtree(staging, ignore_errors=True)
            _put_back(staging)
            with contextlib.suppress(FileNotFoundError):
                os.remove(mark)  # (while locked: no one takes a mark that is going)
        cleared.append(os.path.basename(staging))
    _remove_if_empty(root)
    return cleared


def _put_back(staging: str) -> None:
    """An older checkpoint a publish moved aside (``<staging>.previous``) goes back to its path where nothing took
    its place; it is deleted where something did."""
    aside = staging + _ASIDE
    target = os.path.join(os.path.dirname(os.path.dirname(staging)), os.path.basename(staging))
    with contextlib.suppress(FileNotFoundError):  # (another job put it back just now)
        if not os.path.lexists(aside):
            return
        if os.path.lexists(target):
            _remove(aside)
        else:
            os.replace(aside, target)


def _release(staging: str) -> None:
    """Remove this process's mark of ``staging``, if it made one (before unlocking it: no one takes a mark that is
    going)."""
    mark = _HELD.pop(staging, None)
    if mark is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(staging + _OWNER)
    mark.close()


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _remove_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:  # not empty (another checkpoint being written), or gone
        pass
