"""Collectives with a deadline: a step's all_reduce, broadcast or all_gather that waits for a rank that stopped
answering fails within the pipeline's ``wait_timeout`` with an error naming that rank, instead of the process group's
timeout (30 minutes by default) with a message that blames the connection.

``collective(dist.all_reduce, tensor, what="...", group=group, timeout=300)`` issues the collective asynchronously and
waits for it at most ``timeout`` seconds; a wait that runs out, or a connection that closes, is explained from the
ranks' heartbeats (:func:`~.watchdog.explain_wait`): :class:`PeerLost` names the rank at the root of it and what was
awaited. The heartbeat says "in <what>" meanwhile, so ranks waiting in the same collective are not blamed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .notices import FailureBoard, PipelineError, error_text, failed_elsewhere, own_error
from .store import short_store
from .watchdog import (
    DEFAULT_WAIT_TIMEOUT,
    activity,
    arm_exit_guard,
    explain_wait,
    known_failure,
    mark_failed,
    posted_failure,
    sample_peers,
)

__all__ = ["PeerLost", "collective", "wait_work", "wait_messages", "explained", "lost_connection", "job_failure_notice",
           "left_behind"]

_LEFT_BEHIND_S = 10.0  # seconds a peer waits for this rank inside a step before left_behind parts them
# What gloo, NCCL and the store say when a peer has gone away (the symptom of a failure elsewhere, not its cause).
_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "got 0 bytes",
         "connection was likely closed")


def lost_connection(error: BaseException) -> bool:
    """Whether ``error`` says a peer went away rather than what went wrong."""
    return isinstance(error, dist.DistNetworkError) or any(text in str(error).lower() for text in _LOST)


class PeerLost(PipelineError):
    """A wait for other ranks failed (``timed_out``: it ran out of time; else a connection closed). A failure posted
    by another rank, if there is one, is the better error to end with (:mod:`lightning_pipe.strategy.failures`)."""

    def __init__(self, message: str, origin_rank: int, timed_out: bool) -> None:
        super().__init__(message, origin_rank)
        self.timed_out = timed_out


def collective(call: Callable[..., Any], *args: Any, what: str, group: dist.ProcessGroup | None = None,
               timeout: float = DEFAULT_WAIT_TIMEOUT, notice: Callable[[], PipelineError | None] | None = None,
               **kwargs: Any) -> None:
    """``call(*args, group=group, async_op=True, **kwargs)`` (a ``torch.distributed`` collective), waited for at most
    ``timeout`` seconds; ``what`` says what it is, the same words on every rank (e.g. "the step's result all_reduce").
    ``notice()``, asked a few times a second while the wait lasts, returns a failure another rank posted: it is
    raised at once (a rank that failed elsewhere may keep this collective waiting while it reports)."""
    wait_work(call(*args, group=group, async_op=True, **kwargs), what, group, timeout, notice)


def wait_work(work: dist.Work, what: str, group: dist.ProcessGroup | None, timeout: float,
              notice: Callable[[], PipelineError | None] | None = None) -> None:
    """Wait for ``work``, a collective over ``group``, at most ``timeout`` seconds; raise :class:`PeerLost` if it
    runs out or a connection closes, or what ``notice()`` returns (see :func:`collective`).

    On gloo the wait blocks in slices of a quarter second (a timed-out ``wait`` leaves gloo's work running), so it
    wakes the moment the collective completes; NCCL's ``wait`` with a timeout may abort the communicator, so there it
    polls ``is_completed`` with pauses that grow from 20 us to 1 ms. Between slices it looks at the clock and the
    notices; the final ``wait`` raises a lost connection."""
    start = time.monotonic()
    if not work.is_completed():
        me = dist.get_rank()
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        others = [rank for rank in ranks if rank != me]
        activity.doing(what, tuple(others))
        blocking = dist.get_backend(group) != "nccl"
        deadline, pause, next_look = start + timeout, 0.0, start + _LOOK_S
        while not work.is_completed():
            if blocking:
                try:
                    work.wait(timedelta(seconds=_LOOK_S))
                    break
                except RuntimeError as error:  # the slice ran out, or the collective failed (the wait below raises
                    if own_error(error):  # it), or a signal handler raised: this rank's own failure
                        raise
                    if work.is_completed():
                        break
            else:
                time.sleep(pause)
                pause = min(1e-3, pause * 2 or 2e-5)
            now = time.monotonic()
            if now < next_look:
                continue
            next_look = now + _LOOK_S
            posted = notice() if notice is not None else None
            if posted is not None:
                arm_exit_guard()  # the collective still waits in gloo's thread: it must not hold this process's exit
                raise posted
            if now > deadline:
                arm_exit_guard()
                message, root = explain_wait(me, others or [me], what, now - start, same=what)
                raise PeerLost(message, root, timed_out=True)
        activity.doing(f"its own code after {_done(what)}")
    try:
        work.wait()
    except RuntimeError as error:  # a connection closed: explain it
        if own_error(error):
            raise
        me = dist.get_rank()
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        others = [rank for rank in ranks if rank != me]
        posted = notice() if notice is not None else None
        if posted is None and notice is not None:  # a failing rank posts its error as it ends, a moment after its
            # connections close (one that diagnosed this wait: left_behind)
            posted = failed_elsewhere(posted_failure(wait=2.0), me, f" in {what}")
        if posted is not None:
            raise posted from error
        message, root = explain_wait(me, others or [me], what, time.monotonic() - start, lost=True, same=what)
        message = f"{message} (torch: {str(error).splitlines()[0] if str(error) else type(error).__name__})"
        raise PeerLost(message, root, timed_out=False) from error


def wait_messages(works: Sequence[dist.Work], what: str, peers: Sequence[int], timeout: float,
                  notice: Callable[[], PipelineError | None] | None = None) -> None:
    """Wait for point-to-point ``works`` (sends to and receives from the global ranks ``peers``), within ``timeout``
    seconds in all; a wait that runs out, or a connection that closes, raises :class:`PeerLost` naming the rank at the
    root of it, or the failure another rank posted (``notice()``, read then: it asks the job's store).

    Unlike a collective's, a gloo send's or receive's work ends with its first wait, timed out or not: each is waited
    for once, up to the deadline."""
    start, me = time.monotonic(), dist.get_rank()
    activity.doing(what, tuple(peers))
    for work in works:
        try:
            work.wait(timedelta(seconds=max(1e-3, start + timeout - time.monotonic())))
        except RuntimeError as error:
            if own_error(error):
                raise
            arm_exit_guard()  # receives still posted to a peer that is gone must not hold this process's exit
            if notice is not None and (posted := notice()) is not None:
                raise posted from error
            timed_out = "timed out" in str(error).lower()
            message, root = explain_wait(me, list(peers) or [me], what, time.monotonic() - start, lost=not timed_out,
                                         same=what)
            message = f"{message} (torch: {str(error).splitlines()[0] if str(error) else type(error).__name__})"
            raise PeerLost(message, root, timed_out) from error
    activity.doing(f"its own code after {_done(what)}")


@contextmanager
def explained(what: str, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Turn a lost connection or a timeout raised in the block (collectives that cannot be waited for with a deadline,
    such as Lightning's or a checkpoint's) into a :class:`PeerLost` naming the rank at the root of it. Also a
    decorator."""
    if not dist.is_initialized():
        yield
        return
    start, me = time.monotonic(), dist.get_rank()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    others = [rank for rank in ranks if rank != me] or [me]
    activity.doing(what, tuple(others))
    try:
        yield
    except PeerLost as error:  # a watched wait inside (a checkpoint's opening collective) explained it: posted for
        # the job, for ranks waiting on others that are alive; the store's host then waits a little for them. Where a
        # connection closed, the rank that ended may have posted why as it ended (a hook's error): that is the error.
        posted = None if error.timed_out else failed_elsewhere(posted_failure(wait=2.0), me, f" in {what}")
        if posted is not None:
            raise posted from error
        store = short_store()
        if store is not None:
            with suppress(Exception):  # the store may be gone with the rank that held it
                mark_failed(store, me, error_text(error))
        FailureBoard("lightning_pipe/explained", dist.get_world_size()).linger(5.0)
        raise
    except PipelineError:
        raise
    except RuntimeError as error:
        timed_out = "timed out" in str(error).lower()
        if not (timed_out or lost_connection(error)):
            raise
        # a rank failed and said why: that is the error to end with
        explanation = failed_elsewhere(posted_failure(wait=2.0) if not timed_out else None, me, f" in {what}")
        if explanation is None:
            message, root = explain_wait(me, others, what, time.monotonic() - start, lost=not timed_out, same=what)
            explanation = PeerLost(f"{message} (torch: {str(error).splitlines()[0]})", root, timed_out)
        # the store's host (global rank 0) waits a little for the others to explain it too, or they find no store
        FailureBoard("lightning_pipe/explained", dist.get_world_size()).linger(5.0)
        raise explanation from error
    activity.doing(f"its own code after {_done(what)}")


_LOOK_S = 0.25  # seconds between two looks at the clock and the notices while a collective waits


def job_failure_notice(board: FailureBoard, what: str) -> Callable[[], PipelineError | None]:
    """A ``notice`` for :func:`collective`: the failure posted on ``board``, or else one the job's heartbeats read
    since now (a rank that failed in a collective of another group, or outside any pipeline), as the error to end
    with."""
    since, me = time.time(), dist.get_rank()

    def notice() -> PipelineError | None:
        return board.read() or failed_elsewhere(known_failure(since), me, f" in {what}")

    return notice


def left_behind(notice: Callable[[], PipelineError | None], what: str, group: Any, after_s: float = _LEFT_BEHIND_S,
                gave_up: bool = False, why: str | Callable[[str], str] = "") -> Callable[[], PipelineError | None]:
    """``notice`` for a collective where the ranks meet between steps (the end of the fit, say), which also looks at
    the other ranks' heartbeats every ``after_s`` seconds: one that has waited that long for this rank inside a step
    (a rank that stopped alone never sends it what it waits for) ends the wait at once, rather than at its timeout
    (5 minutes by default).
    ``gave_up``: the error raised then says this rank gave up on the wait (``PeerLost.timed_out``); ``why`` ends its
    message (or makes its end from what the peer waits in)."""
    me = dist.get_rank()
    others = [rank for rank in dist.get_process_group_ranks(group) if rank != me]
    start = time.monotonic()
    next_look = [start + after_s]

    def check() -> PipelineError | None:
        posted = notice()
        now = time.monotonic()
        if posted is not None or now < next_look[0]:
            return posted
        next_look[0] = now + after_s
        for peer in (sample_peers(others, window=0.0) or {}).values():
            if peer.state != "ended" and me in peer.waits and peer.doing != what and peer.for_s >= after_s:
                return PeerLost(f"rank {me} waited {now - start:.0f} s for {what}. Rank {peer.rank} has waited "
                                f"{peer.for_s:.0f} s for rank {me} in {peer.doing}"
                                f"{why(peer.doing) if callable(why) else why}", me, timed_out=gave_up)
        return None

    return check


def _done(what: str) -> str:
    """A wait's name for what a rank did after it: without the guess at why it might not come that the name carries
    for a failed wait (``"comparing the groups (a step skipped on some ranks only ...?)"``), which sent a reader of
    "still in its own code after ..." after code they may not have (found by review)."""
    return what.split(" (", 1)[0] if what.endswith("?)") else what
