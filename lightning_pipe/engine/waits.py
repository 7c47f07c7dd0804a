"""How the communicator waits: every wait for another rank has a deadline, and a wait that fails or runs out says why.

A mixin of :class:`~.comm.Communicator` (which holds the state it reads: the group, the failure board, the ranks'
global numbers, what the current step awaits). A failure a rank posted is raised as it is; otherwise the ranks'
heartbeats (:mod:`.watchdog`) tell the rank that stopped answering, made no progress or is gone, and the error names
it and the message this rank waited for.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .notices import FailureBoard, PipelineError, failed_elsewhere, own_error
from .watchdog import activity, arm_exit_guard, explain_wait, known_failure, posted_failure

__all__ = ["Waits"]


class Waits:
    """Waiting with deadlines, for :class:`~.comm.Communicator`."""

    nccl: bool
    rank: int
    wait_timeout: float
    board: FailureBoard
    started: float
    failed: PipelineError | None
    awaiting: Sequence[Any]
    _global: list[int]
    _pending: list[Any]

    def _release_staged(self, block: bool) -> None:
        raise NotImplementedError

    def _wait(self, works: list[dist.Work], peers: list[int], sends: Sequence[Any] = (),
              channel: Hashable | None = None) -> None:
        """Wait for ``works`` (receives from ``peers``, or with ``sends`` the labels of sends to them), within
        :attr:`wait_timeout`; a failure or a wait that runs out raises the :class:`PipelineError` that explains it."""
        self._release_staged(block=True)  # never wait on a peer while holding back a send
        start = time.monotonic()
        awaited = _Awaited(self, peers, sends, channel)
        activity.doing(awaited, tuple(self._global[p] for p in peers))
        if self.nccl:
            self._poll(works, awaited, start)
        deadline = start + self.wait_timeout
        for work in works:
            try:
                work.wait(timedelta(seconds=max(1e-3, deadline - time.monotonic())))
            except RuntimeError as error:
                if own_error(error):
                    raise
                raise self._lost(error, awaited, start) from error

    def _poll(self, works: list[dist.Work], awaited: _Awaited, start: float) -> None:
        """NCCL: wait for ``works`` without blocking in them, reading the store now and then for a failure."""
        pause, last_check = 0.0, time.monotonic()
        deadline = start + self.wait_timeout
        while not all(work.is_completed() for work in works):
            time.sleep(pause)
            pause = min(1e-3, pause * 2 or 2e-5)
            if time.monotonic() - last_check > 0.05:
                last_check = time.monotonic()
                error = self.board.read() or self._failed_elsewhere(known_failure(self.started), awaited)
                if error is not None:
                    self.failed = error
                    raise error
                if last_check > deadline:
                    raise self._lost(_TimedOut(f"timed out after {self.wait_timeout:.0f} s"), awaited, start)

    def _wait_sends(self, skip: frozenset | set = frozenset()) -> None:
        self._release_staged(block=True)
        pending = [entry for entry in self._pending if not self._skipped(entry[3], skip)]
        self._pending = [entry for entry in self._pending if self._skipped(entry[3], skip)]
        if not pending:
            return
        peers = sorted({dst for _, _, dsts, _ in pending for dst in dsts})
        self._wait([work for work, *_ in pending], peers, [label for *_, label in pending])

    @staticmethod
    def _skipped(label: Any, skip: frozenset | set) -> bool:
        if isinstance(label, frozenset):  # the labels of a group's sends (NCCL: one work for the group)
            return bool(label & skip)
        return label in skip

    def _lost(self, error: RuntimeError, awaited: _Awaited, start: float) -> PipelineError:
        """The error to raise for a wait that failed: the failure a rank posted, if any; else what the ranks'
        heartbeats say of the peers this rank waited for (:func:`~.watchdog.explain_wait`)."""
        timed_out = isinstance(error, _TimedOut) or "timed out" in str(error).lower()
        if timed_out:
            arm_exit_guard()  # what torch still waits for must not hold this process's exit
        posted = self.board.read(wait=0.5 if timed_out else 1.0)
        if posted is None:  # a rank that failed outside the pipeline's steps (a hook), perhaps with the store
            posted = self._failed_elsewhere(known_failure(self.started) if timed_out else posted_failure(), awaited)
        if posted is None:
            me = self._global[self.rank]
            message, root = explain_wait(me, [self._global[p] for p in awaited.peers] or list(self._global),
                                         str(awaited), time.monotonic() - start, lost=not timed_out,
                                         interrupt=self.board.posted)
            if not timed_out:
                message = f"{message} (torch: {str(error).splitlines()[0] if str(error) else type(error).__name__})"
            posted = self.board.read() or PipelineError(message, self._group_rank(root))
        self.failed = posted
        return posted

    def _failed_elsewhere(self, failure: tuple[int, str] | None, awaited: _Awaited) -> PipelineError | None:
        """The error to raise for the job's failure ``failure`` (``(global rank, first line)``) posted by another
        rank (a hook's error, outside the pipeline's steps); ``None`` for none or this rank's own."""
        origin = self._group_rank(failure[0]) if failure is not None else None
        return failed_elsewhere(failure, self._global[self.rank], f": {awaited}", origin)

    def _group_rank(self, global_rank: int) -> int:
        return self._global.index(global_rank) if global_rank in self._global else -1


class _TimedOut(RuntimeError):
    """A wait that ran past :attr:`Communicator.wait_timeout` (NCCL's polls; gloo raises its own)."""


class _Awaited:
    """What a wait waits for, in words when asked (a heartbeat or an error: never on the way of a message)."""

    __slots__ = ("comm", "peers", "sends", "channel")

    def __init__(self, comm: Waits, peers: list[int], sends: Sequence[Any], channel: Hashable | None) -> None:
        self.comm, self.peers, self.sends, self.channel = comm, peers, sends, channel

    def __str__(self) -> str:
        ranks = self.comm._global
        if self.sends:
            labels = sorted({str(_label(item)) for label in self.sends
                             for item in (label if isinstance(label, frozenset) else [label])})
            who = " and ".join(f"rank {ranks[p]}" for p in self.peers)
            return f"{who} to take its message{'s' if len(labels) > 1 else ''} {', '.join(labels)}"
        parts = []
        for peer in self.peers:
            transfer = next((t for t in self.comm.awaiting if t.src == peer
                             and (self.channel is None or t.channel == self.channel)), None)
            if transfer is None:
                parts.append(f"a message from rank {ranks[peer]}"
                             + (f" on channel {self.channel!r}" if self.channel is not None else ""))
            else:
                kind = "activation" if transfer.kind == "F" else "gradient"
                parts.append(f"rank {ranks[peer]}'s {kind} of micro-batch {transfer.microbatch} "
                             f"({transfer.stage}{transfer.kind}{transfer.microbatch})")
        return " and ".join(parts) or "a peer"


def _label(label: Any) -> str:
    if isinstance(label, tuple) and len(label) == 3:
        kind, stage, microbatch = label
        return f"{stage}{kind}{microbatch}"
    return str(label)
