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
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .notices import PipelineError
from .watchdog import DEFAULT_WAIT_TIMEOUT, activity, arm_exit_guard, explain_wait

__all__ = ["PeerLost", "collective", "wait_work"]


class PeerLost(PipelineError):
    """A wait for other ranks failed (``timed_out``: it ran out of time; else a connection closed). A failure posted
    by another rank, if there is one, is the better error to end with (:mod:`lightning_pipe.strategy.failures`)."""

    def __init__(self, message: str, origin_rank: int, timed_out: bool) -> None:
        super().__init__(message, origin_rank)
        self.timed_out = timed_out


def collective(call: Callable[..., Any], *args: Any, what: str, group: dist.ProcessGroup | None = None,
               timeout: float = DEFAULT_WAIT_TIMEOUT, **kwargs: Any) -> None:
    """``call(*args, group=group, async_op=True, **kwargs)`` (a ``torch.distributed`` collective), waited for at most
    ``timeout`` seconds; ``what`` says what it is, the same words on every rank (e.g. "the step's result all_reduce")."""
    wait_work(call(*args, group=group, async_op=True, **kwargs), what, group, timeout)


def wait_work(work: dist.Work, what: str, group: dist.ProcessGroup | None, timeout: float) -> None:
    """Wait for ``work``, a collective over ``group``, at most ``timeout`` seconds; raise :class:`PeerLost` if it
    runs out or a connection closes."""
    me = dist.get_rank()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    others = [rank for rank in ranks if rank != me]
    activity.doing(what, tuple(others))
    start = time.monotonic()
    try:
        work.wait(timedelta(seconds=timeout))
    except RuntimeError as error:
        timed_out = "timed out" in str(error).lower()
        if timed_out:
            arm_exit_guard()  # gloo's thread still waits in the collective: it must not hold this process's exit
        message, root = explain_wait(me, others or [me], what, time.monotonic() - start, lost=not timed_out,
                                     same=what)
        if not timed_out:
            message = f"{message} (torch: {str(error).splitlines()[0] if str(error) else type(error).__name__})"
        raise PeerLost(message, root, timed_out) from error
    finally:
        activity.doing(f"its own code after {what}")
