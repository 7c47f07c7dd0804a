"""The staging folder of a sharded checkpoint's durable write, and what a killed job left in it.

A sharded checkpoint is written into ``<parent>/.lightning_pipe-writing/<name>`` and renamed into place when every
rank has written its part (:func:`publish`). Global rank 0 marks each folder it stages with its owner
(``<name>.owner``: host and process id), removed last when the folder is published or dropped after an error. A job
killed while writing (SIGKILL, a node's out-of-memory killer, a pre-empted allocation) leaves the mark behind; the
next sharded save in that parent, by any job, looks at the marks: one whose owner ran on this host and is gone is
cleared. Its half-written folder is deleted; an older checkpoint moved aside by a publish that never finished
(``<name>.previous``) is put back at ``<parent>/<name>`` where nothing took its place, else deleted. A mark of another
host, or of a process still alive (its id reused, say), is left alone: nothing a live job writes is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket

from lightning_pipe.strategy.checkpoint import fsync_path

__all__ = ["STAGING", "stage", "publish", "drop", "clear_abandoned"]

STAGING = ".lightning_pipe-writing"
_OWNER, _ASIDE = ".owner", ".previous"


def stage(parent: str, name: str) -> str:
    """Make the empty staging folder for ``<parent>/<name>`` (whatever an earlier attempt left there removed) after
    clearing what killed jobs left beside it, and mark it as this process's; return its path."""
    root = os.path.join(parent, STAGING)
    clear_abandoned(root)
    staging = os.path.join(root, name)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    with open(staging + _OWNER, "w") as file:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, file)
    return staging


def publish(staging: str, target: str) -> None:
    """Rename the written folder into place; an older checkpoint there is moved aside first and deleted after."""
    fsync_path(staging)
    aside = None
    if os.path.lexists(target):
        aside = staging + _ASIDE
        _remove(aside)
        os.replace(target, aside)
    os.replace(staging, target)
    fsync_path(os.path.dirname(target))
    if aside is not None:
        _remove(aside)
    _remove(staging + _OWNER)
    _remove_if_empty(os.path.dirname(staging))


def drop(staging: str) -> None:
    """Remove a staging folder whose write failed (every rank raised), and its mark."""
    shutil.rmtree(staging, ignore_errors=True)
    _remove(staging + _OWNER)
    _remove_if_empty(os.path.dirname(staging))


def clear_abandoned(root: str) -> list[str]:
    """Clear what the jobs that ran on this host and are gone left in the staging folder ``root`` (see the module's
    text); return the names cleared."""
    try:
        marks = [entry for entry in os.listdir(root) if entry.endswith(_OWNER)]
    except OSError:  # no staging folder yet
        return []
    cleared = []
    for mark in marks:
        staging = os.path.join(root, mark.removesuffix(_OWNER))
        if not _abandoned(staging + _OWNER):
            continue
        shutil.rmtree(staging, ignore_errors=True)
        aside, target = staging + _ASIDE, os.path.join(os.path.dirname(root), os.path.basename(staging))
        if os.path.lexists(aside):  # a publish killed between its renames: the older checkpoint goes back
            os.replace(aside, target) if not os.path.lexists(target) else _remove(aside)
        _remove(staging + _OWNER)
        cleared.append(os.path.basename(staging))
    _remove_if_empty(root)
    return cleared


def _abandoned(mark: str) -> bool:
    """Whether the mark's owner ran on this host and its process is gone."""
    try:
        with open(mark) as file:
            owner = json.load(file)
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):  # being written, or not ours: left alone
        return False
    if host != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


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
