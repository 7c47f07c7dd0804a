"""Failure notices: the first error of a pipeline, as plain text in the job's store, where every rank can read it.

A rank that fails posts ``"<rank> <type>\\n<message>"`` under its pipeline's key (the first notice wins); a rank
waiting on a peer that failed or went away reads it and raises it as its own :class:`PipelineError`, naming the rank
where it began, and also of the user's exception type (``<type>``, its module and name) where the program has that
type. Text only: a notice is read, never unpickled or run, whoever wrote it.

The store lives in one process (global rank 0's, unless the launcher's agent holds it); if that rank ended at once,
the others could no longer read the notice, so it waits a little for them (:meth:`FailureBoard.linger`). Notices are
posted and read through a store client of their own that gives up after a few seconds
(:func:`~.store.short_store`): if the store's host is stopped, a rank reporting a failure must not wait for it for
the process group's timeout.
"""

from __future__ import annotations

import contextlib
import functools
import re
import signal
import sys
import time
import types
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch.distributed as dist

from .store import short_store, store_gone
from .watchdog import linger, mark_failed

__all__ = ["error_text", "failed_as", "failed_elsewhere", "from_notice", "notice_text", "own_error", "type_name",
           "typed_error", "PipelineError", "FailureBoard"]


class PipelineError(RuntimeError):
    """A rank of the pipeline failed; the message names the rank and carries its error and traceback."""

    kind = ""  # the user's exception type this error is also an instance of, as "module:qualname" ("" for none)

    def __init__(self, message: str, origin_rank: int) -> None:
        super().__init__(message)
        self.origin_rank = origin_rank

    def __str__(self) -> str:  # the message as written, also where the user's type quotes its own (KeyError)
        return str(self.args[0]) if self.args else ""


def own_error(error: BaseException) -> bool:
    """Whether ``error``, out of a wait for other ranks, was raised by a signal handler run inside it (torch's
    DataLoader raises from SIGCHLD when a worker dies): this rank's own failure, not a peer's lost connection or a
    timeout."""
    handlers = set()
    for number in signal.valid_signals():
        with contextlib.suppress(ValueError, OSError):
            handlers.update(_codes(signal.getsignal(number)))
    trace = error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code in handlers:
            return True
        trace = trace.tb_next
    return False


def _codes(handler: object) -> list[types.CodeType]:
    """The code objects a signal handler runs: a function's or method's, and through what wraps one (a
    ``functools.partial``, a decorator's ``__wrapped__``, an object's ``__call__``)."""
    codes, seen = [], 0
    while handler is not None and seen < 8:
        seen += 1
        code = getattr(handler, "__code__", None)
        if isinstance(code, types.CodeType):
            codes.append(code)
        if isinstance(handler, functools.partial):
            handler = handler.func
        elif getattr(handler, "__wrapped__", None) is not None:
            handler = handler.__wrapped__
        elif code is None and callable(handler) and not isinstance(handler, type):
            handler = getattr(type(handler), "__call__", None)
            handler = handler if isinstance(handler, types.FunctionType) else None
        else:
            handler = None
    return codes


def error_text(error: BaseException) -> str:
    """``"Type: message"`` of ``error``, with the notes added to it on its way up (``add_note``: which micro-batch's
    run of the step failed), which ``str`` leaves out."""
    notes = "".join(f" {note}" for note in getattr(error, "__notes__", ()) if isinstance(note, str))
    return f"{type(error).__name__}: {error}{notes}"


_KINDS: dict[type, type] = {}  # a user's exception type -> the PipelineError that is also one (:func:`failed_as`)


def failed_as(error: BaseException, message: str, rank: int) -> PipelineError:
    """The :class:`PipelineError` a rank raises for its own ``error``: also an instance of ``error``'s type where
    Python can make such a class, so that ``except ValueError`` or ``except torch.OutOfMemoryError`` around ``fit``
    still catches the user's error; other ranks read the type's name in the notice (:func:`notice_text`) and raise
    the same kind where their program knows the type."""
    if isinstance(error, PipelineError):
        return error
    return _typed(type(error), message, rank)


def _typed(kind: type, message: str, rank: int) -> PipelineError:
    if kind not in _KINDS:
        try:
            _KINDS[kind] = type("PipelineError", (PipelineError, kind), {"__module__": __name__})
            _KINDS[kind].kind = type_name(kind)
        except TypeError:  # an exception type whose layout cannot be combined with RuntimeError's
            _KINDS[kind] = PipelineError
    try:
        return _KINDS[kind](message, rank)
    except Exception:  # noqa: BLE001 - a type that cannot be made from a message alone (ExceptionGroup)
        return PipelineError(message, rank)


def type_name(kind: type) -> str:
    """``"module:qualname"`` of an exception type another rank may look up; ``""`` for one defined in a function."""
    return "" if "<locals>" in kind.__qualname__ else f"{kind.__module__}:{kind.__qualname__}"


def _known_type(name: str) -> type | None:
    """The exception type ``name`` (:func:`type_name`) names in a module this program has imported already; nothing is
    imported or called to find it (a notice is text from another process), and only ``Exception`` subclasses count
    (never a ``KeyboardInterrupt`` or ``SystemExit`` made from another rank's text)."""
    module, _, qualname = name.partition(":")
    found: object = sys.modules.get(module)
    for part in qualname.split(".") if found is not None and qualname else ():
        found = vars(found).get(part) if isinstance(found, (type, ModuleType)) else None
    return found if isinstance(found, type) and issubclass(found, Exception) else None


def notice_text(error: PipelineError) -> str:
    """The failure notice of ``error``: ``"<origin rank> <kind>"`` (the kind where there is one), a newline, then
    the message."""
    return f"{error.origin_rank} {error.kind}".rstrip() + "\n" + str(error)


def from_notice(text: str, unknown_rank: int = -1) -> PipelineError:
    """The error a notice (:func:`notice_text`) stands for, of the user's exception type where this program knows
    it; ``unknown_rank`` where the notice names no rank (cut short on the wire)."""
    head, _, message = text.partition("\n")
    origin, _, kind = head.partition(" ")
    return typed_error(message, kind, int(origin) if origin.lstrip("-").isdigit() else unknown_rank)


def typed_error(message: str, kind: str, rank: int) -> PipelineError:
    """The :class:`PipelineError` for another rank's error of type ``kind`` (:func:`type_name`; "" for none), also an
    instance of that type where this program knows it."""
    known = _known_type(kind) if kind else None
    return _typed(known, message, rank) if known is not None else PipelineError(message, rank)


def failed_elsewhere(failure: tuple[int, str] | None, me: int, waiting: str,
                     origin: int | None = None) -> PipelineError | None:
    """The error to end with for the job's failure ``failure`` (``(global rank, first line)``, as the heartbeats
    record it) posted by another rank while this one (global rank ``me``) waited (``waiting``: "in a reduce",
    ": <what it awaited>"); ``None`` for none or this rank's own. ``origin``: the failed rank as the error names it
    (its rank in a pipeline's group), else its global rank."""
    if failure is None or failure[0] == me:
        return None
    said = failure[1] if re.match(r"rank \d+ failed", failure[1]) else \
        f"rank {failure[0]} failed: {failure[1]}"  # (a PipelineError's message names its rank already)
    return PipelineError(f"{said} (rank {me} was waiting for it{waiting})", failure[0] if origin is None else origin)


def default_store() -> Any:
    """The job's store, or ``None`` where there is none to reach."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no process group, or a store we cannot reach
        return None


class FailureBoard:
    """The failure notices of one pipeline (``prefix`` names it alike on every rank), in the job's store."""

    def __init__(self, prefix: str, group_size: int, ranks: Sequence[int] | None = None) -> None:
        self.key = f"{prefix}/first_error"
        self.ended_key = f"{prefix}/ended"
        self.group_size = group_size
        self.ranks = list(ranks) if ranks is not None else list(range(group_size))  # the group's global ranks
        self.store = default_store()  # the process group's own client (the side plane's messages go through it)
        self.notices = short_store() if self.store is not None else None

    def post(self, error: PipelineError) -> None:
        """Make ``error`` the pipeline's first error unless there is one already; never raises."""
        if self.notices is None or store_gone(self.notices):
            return
        try:
            self.notices.compare_set(self.key, "", notice_text(error))
            mark_failed(self.notices, error.origin_rank, str(error))
        except Exception:  # noqa: BLE001 - the store may be gone with the rank that held it
            pass

    def read(self, wait: float = 0.0) -> PipelineError | None:
        """The pipeline's first error, if one was posted (waiting up to ``wait`` seconds for it)."""
        deadline = time.monotonic() + wait
        while self.notices is not None:
            try:
                if self.notices.check([self.key]):
                    return from_notice(self.notices.get(self.key).decode("utf-8", "replace"))
            except Exception:  # noqa: BLE001 - the store is gone: nothing more to learn from it
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        return None

    def posted(self) -> bool:
        """Whether a notice is there (one quick look; ``False`` if the store does not answer)."""
        try:
            return self.notices is not None and bool(self.notices.check([self.key]))
        except Exception:  # noqa: BLE001 - the store is gone or stopped
            return False

    def linger(self, timeout: float) -> None:
        """Count this rank as ended; the process that holds the store waits up to ``timeout`` seconds for the others
        (not for killed or stopped ones), so that they can still read the notice after it is gone."""
        if self.notices is None:
            return
        try:
            linger(self.notices, self.ended_key, self.ranks, timeout)
        except Exception:  # noqa: BLE001 - the store is gone or stopped
            pass
