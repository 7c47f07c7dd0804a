"""Which ranks are alive and what each is doing: a heartbeat per rank in the job's store, and the diagnosis of a wait
that ran out of time or a connection that closed, naming the rank at the root of it.

A rank that is killed closes its connections, and its peers notice at once; a rank that is stopped (SIGSTOP, a frozen
machine) or loops for ever in user code closes nothing, and its peers would wait for the process group's timeout
(30 minutes by default). So every rank runs a daemon thread that writes, once a second, ``{"beat": n, "doing": ...,
"for": seconds, "waits": [ranks]}`` under ``lightning_pipe/heartbeat/<global rank>`` in the job's store: a counter, what
its main thread does now (set through :data:`activity`: an action such as ``2F3``, or a wait for named ranks) and for
how long. A wait that takes longer than its deadline reads every rank's heartbeat twice, :data:`SAMPLE_S` apart, and
follows the ranks each one waits for to the root: a rank whose counter did not move *stopped answering*; a rank whose
counter moves while it has been doing one thing all along is alive but *made no progress* (an endless loop, or a step
slower than the deadline); a rank whose connection closed and whose counter stopped *is gone* (killed or crashed).

Every heartbeat also looks for the job's failure (:func:`mark_failed`) and keeps it once posted, saying so in the
store: a rank whose wait breaks when the failed rank's process ends still knows why after the store went with it
(global rank 0 holds it), and that rank, failing, stays until the others have read it (:func:`hold_for_readers`).
Once the job's failure is posted, a rank whose main thread is still inside the compute action
it began before it (user code that never returns) gets :class:`PipelineStuck` raised in that thread after
:data:`STUCK_GRACE_S`, and is ended if native code holds it :data:`STUCK_GRACE_S` later. A rank that gave up a wait
(or failed in the pipeline) leaves at exit without joining torch's threads, which may still wait on a peer that is
gone (:func:`arm_exit_guard`).

The heartbeat is JSON, read with ``json.loads``: like every notice in the store, data and never code. Store reads here
use a client of their own with a short timeout (:func:`~.store.short_store`): the store lives in one process (global
rank 0's under Lightning's launcher), and a stopped host must not stop the diagnosis that names it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .store import cached_store, short_store, store_gone

__all__ = ["DEFAULT_WAIT_TIMEOUT", "HEARTBEAT_S", "SAMPLE_S", "Activity", "activity", "start_heartbeat",
           "Peer", "sample_peers", "silent_ranks", "linger", "explain_wait", "arm_exit_guard", "posted_failure",
           "known_failure", "PipelineStuck", "mark_failed", "failure_line", "hold_for_readers", "STUCK_GRACE_S"]

DEFAULT_WAIT_TIMEOUT = 300.0
"""Seconds the pipeline's own waits (a message from a peer, the step's collectives) last before they fail: a step
normally takes seconds, and a rank that stopped must not keep the others for the process group's 30 minutes."""
HEARTBEAT_S = 1.0
"""Seconds between two heartbeats of a rank."""
SAMPLE_S = 2.5
"""Seconds between the two reads of the heartbeats that tell a live rank from a stopped one."""

STUCK_GRACE_S = 10.0
"""Seconds after a failure of the job that a rank still inside the compute action it began before it is ended."""

_KEY = "lightning_pipe/heartbeat/"
FAILED_KEY = "lightning_pipe/job_failed"
_READ_KEY = "lightning_pipe/job_failed_read"  # /<rank>: that rank's heartbeat has read the job's failure
_KNOWN: list[tuple[Any, dict[str, Any]] | None] = [None]  # (process group, the job's failure its heartbeat read)


class Activity:
    """What this process's main thread does now: ``state`` is ``(what, waited ranks, since)`` in one tuple, replaced
    whole (one assignment: the heartbeat thread never reads half of it). ``what`` is formatted only when a heartbeat is
    written (``str(what)``), so the executor can pass an action as it is."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: tuple[Any, tuple[int, ...], float] = ("starting", (), time.monotonic())

    def doing(self, what: Any, waits: tuple[int, ...] = ()) -> None:
        """This rank now does ``what`` (waiting for the global ranks ``waits``, if any)."""
        self.state = (what, waits, time.monotonic())


activity = Activity()
"""The activity of this process's main thread (one per process, as the heartbeat is)."""


# -- the heartbeat ---------------------------------------------------------------------------------
class _Heartbeat(threading.Thread):
    def __init__(self, world: Any, rank: int) -> None:
        super().__init__(name="lightning-pipe-heartbeat", daemon=True)
        self.world = world
        self.key = f"{_KEY}{rank}"
        self.store = short_store("heartbeat", timeout=30.0)
        self.host = socket.gethostname()

        self.failure: dict[str, Any] | None = None  # the job's failure, once one is posted (:func:`mark_failed`)
        self.interrupted = False
        self.stopped = threading.Event()  # set at exit (:func:`_at_exit`)

    def run(self) -> None:
        beat, missed = 0, 0
        while (not self.stopped.is_set() and self.store is not None and dist.is_initialized()
               and dist.group.WORLD is self.world):
            beat += 1
            if missed < 3 or self.failure is None:  # a store gone after a failure: stop knocking (torch logs each)
                try:
                    self.store.set(self.key, _beat_text(beat, self.host))
                    missed = 0
                except Exception:  # noqa: BLE001 - the store's host is stopped (try again, it may come back) or gone
                    missed += 1
                    if self.failure is None and store_gone(self.store):
                        break  # nobody left to tell; after a failure this thread still ends a rank stuck in user code
            try:
                self._learn_failure()
                self._unstick()
            except Exception:  # noqa: BLE001 - no store to read the failure from: nothing to do
                pass
            self.stopped.wait(HEARTBEAT_S)

    def _learn_failure(self) -> None:
        """Read the job's failure once it is posted, keep it (:func:`posted_failure` falls back on it) and say so."""
        if self.failure is not None or not self.store.check([FAILED_KEY]):
            return
        self.failure = json.loads(self.store.get(FAILED_KEY).decode("utf-8", "replace"))
        if dist.group.WORLD is self.world:
            _KNOWN[0] = (self.world, self.failure)
            self.store.set(f"{_READ_KEY}/{dist.get_rank()}", "1")

    def _unstick(self) -> None:
        """If the job failed elsewhere while this rank's main thread was inside one compute action, or in its own
        code between the pipeline's actions (user code that never returns: an endless loop, a data loader's read
        that blocks), end it: an exception in the main thread after :data:`STUCK_GRACE_S`, and if it is still there
        (stuck in native code) the process after twice that. A wait for peers ends by its own deadline."""
        if self.failure is None:
            return
        what, waits, since = activity.state
        between = isinstance(what, str)
        if waits or between and not what.startswith(("its own code", "starting")):
            return
        failed_at = float(self.failure.get("time", time.time()))
        began = time.time() - (time.monotonic() - since)
        stuck = time.time() - failed_at
        if began > failed_at or stuck < STUCK_GRACE_S:
            return
        doing = f"{what} (loading a batch, a hook or a callback)" if between else what
        message = (f"rank {dist.get_rank()} was still in {doing} {stuck:.0f} s after the job failed (rank "
                   f"{self.failure.get('rank')}: {self.failure.get('message', '')}); ended by lightning_pipe's "
                   f"watchdog (user code there does not return: an endless loop, a read that blocks?)")
        if not self.interrupted:
            self.interrupted = True
            stuck_error = type("PipelineStuck", (PipelineStuck,), {"message": message})
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(threading.main_thread().ident),
                                                       ctypes.py_object(stuck_error))
        elif stuck > 2 * STUCK_GRACE_S:
            print(f"lightning_pipe: {message}; it did not take the exception: exiting", file=sys.stderr, flush=True)
            os._exit(1)


class PipelineStuck(RuntimeError):
    """Raised in a rank's main thread that stayed in one compute action after the job failed elsewhere."""

    message = "the pipeline failed elsewhere while this rank was stuck"

    def __init__(self, *args: Any) -> None:
        super().__init__(*(args or (self.message,)))


def mark_failed(store: Any, rank: int, message: str) -> None:
    """Record that the job failed (first one wins): ranks stuck in user code end themselves (:class:`_Heartbeat`)."""
    store.compare_set(FAILED_KEY, "", json.dumps({"time": time.time(), "rank": rank, "message": failure_line(message)}))


def failure_line(message: str) -> str:
    """An error's message on one line for the other ranks: its first line, and its last where it has several (a
    DataLoader worker's error says "Caught ValueError in DataLoader worker process 0." first and what went wrong
    last, after the worker's traceback: found by review, the cause never reached the other ranks)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "an error"
    return (lines[0] if len(lines) == 1 else f"{lines[0][:300]} ... {lines[-1][:300]}")[:600]


def posted_failure(wait: float = 0.0) -> tuple[int, str] | None:
    """The job's failure as :func:`mark_failed` recorded it, ``(rank, first line)``, waiting up to ``wait`` seconds for
    one (a failing rank posts it as it ends, a moment after its connections close); where the store is gone (with
    the rank that held it), the failure this rank's heartbeat read before; ``None`` if there is none."""
    store = short_store()
    deadline = time.monotonic() + wait
    while store is not None:
        try:
            if store.check([FAILED_KEY]):
                return _as_pair(json.loads(store.get(FAILED_KEY).decode("utf-8", "replace")))
        except Exception:  # noqa: BLE001 - the store went with the rank that held it
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return known_failure()


def known_failure(since: float | None = None) -> tuple[int, str] | None:
    """The job's failure as this rank's heartbeat read it, ``(rank, first line)``, without asking the store (which may
    be gone with the rank that held it); ``None`` if it read none, or none posted after ``since`` (``time.time()``)."""
    known = _KNOWN[0]
    if known is None or not dist.is_initialized() or known[0] is not dist.group.WORLD:
        return None
    if since is not None and float(known[1].get("time", 0.0)) < since:
        return None
    return _as_pair(known[1])


def _as_pair(failure: dict[str, Any]) -> tuple[int, str]:
    return int(failure.get("rank", -1)), str(failure.get("message", ""))


def hold_for_readers(timeout: float = 3.0) -> None:
    """On the process that holds the job's store (global rank 0 under Lightning's launchers), after it posted the
    job's failure: wait up to ``timeout`` seconds until every other rank's heartbeat has read it (or that rank is
    silent or ended), so that a rank whose wait breaks when this process ends still ends with this error rather than
    "the store does not answer". Elsewhere, or without heartbeats, it returns at once."""
    if _STARTED[0] is None or _STARTED[0] is not dist.group.WORLD:
        return  # no heartbeats here (so none to read it elsewhere either)
    store = short_store()
    if store is None or store_gone(store):
        return
    try:
        linger(store, _READ_KEY, range(dist.get_world_size()), timeout)
    except Exception:  # noqa: BLE001 - the store does not answer: nothing to hold
        pass


def _beat_text(beat: int, host: str, ended: bool = False) -> str:
    what, waits, since = activity.state
    return json.dumps({"beat": beat, "doing": str(what), "for": round(time.monotonic() - since, 1),
                       "waits": list(waits), "time": time.time(), "pid": os.getpid(), "host": host,
                       "ended": ended})


_STARTED: list[Any] = [None]  # the default process group whose heartbeat runs
_BEATING: list[_Heartbeat | None] = [None]  # its thread


def start_heartbeat() -> None:
    """Start this rank's heartbeat (once per default process group; collective-free, so any rank may call it)."""
    if not dist.is_initialized() or _STARTED[0] is dist.group.WORLD:
        return
    _STARTED[0] = dist.group.WORLD
    activity.doing("its own code before the pipeline's first step")
    short_store()  # the main client, while the store answers: a failure later must not connect to a store gone
    _BEATING[0] = _Heartbeat(dist.group.WORLD, dist.get_rank())
    _BEATING[0].start()
    _register_exit_hook()


_HOOKS: dict[str, Any] = {"registered": False, "armed": False, "failed": False, "code": 0}


def _register_exit_hook() -> None:
    if _HOOKS["registered"]:
        return
    _HOOKS["registered"] = True
    previous = sys.excepthook

    def excepthook(kind: type[BaseException], value: BaseException, trace: Any) -> None:
        _HOOKS["failed"] = True
        previous(kind, value, trace)

    sys.excepthook = excepthook
    leave = sys.exit

    def exit_with(status: Any = None) -> None:
        # A launcher that catches the rank's error and leaves with sys.exit(1) (torch.multiprocessing.spawn,
        # Lightning's ddp_spawn) must not have its status turned into 0 by the exit guard below.
        if status is not None and status != 0:
            _HOOKS["code"] = status if isinstance(status, int) else 1
        leave(status)

    sys.exit = exit_with
    atexit.register(_at_exit)  # registered early, so it runs late: after the user's and Lightning's exit handlers


def _at_exit() -> None:
    """Mark this rank's heartbeat as ended; if a wait was given up (:func:`arm_exit_guard`), leave at once: a
    collective still blocked on a stopped peer would otherwise hold the process's exit for the process group's
    timeout (torch joins its threads).

    The heartbeat stops first, and a normal exit waits for it (a few seconds at most): a daemon thread still inside a
    store call while the process tears torch down printed the store's errors (torch 2.14), and is the likely cause of
    a finished rank that rarely ended with "terminate called without an active exception"."""
    beating = _BEATING[0]
    if beating is not None:
        beating.stopped.set()
        if not _HOOKS["armed"]:
            beating.join(timeout=3 * HEARTBEAT_S)
    store = cached_store()  # never a new client here: connecting to a store that is gone blocks
    clean = not (_HOOKS["armed"] or _HOOKS["failed"] or _HOOKS["code"])
    if _STARTED[0] is not None and dist.is_initialized():
        try:
            if store is not None and not store_gone(store):
                store.set(f"{_KEY}{dist.get_rank()}", _beat_text(-1, socket.gethostname(), ended=True))
                if clean and dist.get_rank() == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                    _wait_for_the_others(5.0)
        except Exception:  # noqa: BLE001 - nobody left to tell
            pass
    if clean and dist.is_initialized():
        # Destroyed here, while the interpreter is whole: left to its finalization, gloo's threads could end a
        # finished rank with "terminate called without an active exception" (an abort, exit status 134, after the
        # script succeeded; seen once under torchrun). Lightning does this for NCCL only. Only at a clean exit:
        # a rank that failed (or gave up a wait, which armed the guard below) leaves without it, since torch would
        # wait for its operations still posted to peers that are gone.
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    if _HOOKS["armed"]:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(_HOOKS["code"] or (1 if _HOOKS["failed"] else 0))


def _wait_for_the_others(timeout: float) -> None:
    """On the process holding the job's store (global rank 0 under Lightning's launchers), at a clean exit: wait up
    to ``timeout`` seconds until every other rank's heartbeat has ended (or gone silent). The store ends with this
    process, and a rank whose heartbeat still wrote to it then printed torch's "sendBytes failed ... Broken pipe"
    with its C++ stack, after a run that succeeded (found by review)."""
    others = set(range(1, dist.get_world_size()))
    deadline = time.monotonic() + timeout
    while others and time.monotonic() < deadline and not others <= silent_ranks(ended=True):
        time.sleep(0.05)


def arm_exit_guard() -> None:
    """This process gave up a wait that may still be blocked inside torch: make it exit without waiting for it."""
    _register_exit_hook()
    _HOOKS["armed"] = True


# -- reading the others' heartbeats ------------------------------------------------------------------
@dataclass
class Peer:
    """What one rank's heartbeats say."""

    rank: int
    state: str  # "alive" | "silent" (its counter did not move) | "ended" | "unknown" (never heard of)
    doing: str = ""
    for_s: float = 0.0  # how long it has been doing it, at its last heartbeat
    waits: tuple[int, ...] = ()
    quiet_s: float = 0.0  # seconds since its last heartbeat, by this machine's clock
    host: str = ""
    pid: int = 0


def _read(store: Any, ranks: Sequence[int]) -> dict[int, dict[str, Any]]:
    seen = {}
    for rank in ranks:
        key = f"{_KEY}{rank}"
        if store.check([key]):
            try:
                value = json.loads(store.get(key).decode("utf-8", "replace"))
            except ValueError:
                continue
            if isinstance(value, dict):
                seen[rank] = value
    return seen


def sample_peers(ranks: Iterable[int], window: float = SAMPLE_S,
                 interrupt: Callable[[], bool] = lambda: False) -> dict[int, Peer] | None:
    """Each of ``ranks``' state from two reads of the heartbeats ``window`` seconds apart (``interrupt()`` is asked
    every 0.1 s and ends the window early when true); ``None`` if the store does not answer."""
    ranks = list(ranks)
    store = short_store()
    if store is None:
        return {rank: Peer(rank, "unknown") for rank in ranks}
    try:
        first = _read(store, ranks)
        deadline = time.monotonic() + window
        while time.monotonic() < deadline and not interrupt():
            time.sleep(0.1)
        second = _read(store, ranks)
    except Exception:  # noqa: BLE001 - the store's host stopped or went away
        return None
    peers = {}
    for rank in ranks:
        now = second.get(rank)
        if now is None:
            peers[rank] = Peer(rank, "unknown")
            continue
        before = first.get(rank, {})
        state = "ended" if now.get("ended") else "alive" if now.get("beat") != before.get("beat") else "silent"
        peers[rank] = Peer(rank, state, str(now.get("doing", "")), float(now.get("for", 0.0)),
                           tuple(int(r) for r in now.get("waits", ()) if isinstance(r, int)),
                           max(0.0, time.time() - float(now.get("time", time.time()))), str(now.get("host", "")),
                           int(now.get("pid", 0)))
    return peers


def silent_ranks(quiet_s: float = 2 * HEARTBEAT_S + 0.5, ended: bool = False) -> set[int]:
    """The ranks of the job that sent no heartbeat for ``quiet_s`` seconds without having ended (killed or stopped:
    they will read no notice, and a rank waiting for the others to read one need not wait for them); with ``ended``,
    the ranks whose process has ended too."""
    store = short_store()
    if store is None or not dist.is_initialized():
        return set()
    try:
        beats = _read(store, range(dist.get_world_size()))
    except Exception:  # noqa: BLE001 - the store does not answer
        return set()
    now = time.time()
    return {rank for rank, beat in beats.items() if (ended and beat.get("ended"))
            or (not beat.get("ended") and now - float(beat.get("time", now)) > quiet_s)}


def linger(store: Any, key: str, ranks: Sequence[int], timeout: float) -> None:
    """Mark this rank as ended under ``key``; the process that holds the store (global rank 0, unless torchrun's agent
    holds it) then waits up to ``timeout`` seconds until each of the global ``ranks`` has ended too or is silent
    (:func:`silent_ranks`), so that they can still read a notice or the heartbeats before the store goes."""
    me = dist.get_rank()
    store.set(f"{key}/{me}", "1")
    if me != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    deadline, silent, next_look = time.monotonic() + timeout, set(), time.monotonic() + 0.5
    while time.monotonic() < deadline:
        if all(rank in silent or store.check([f"{key}/{rank}"]) for rank in ranks):
            return
        time.sleep(0.05)
        if time.monotonic() > next_look:
            silent, next_look = silent_ranks(ended=True), time.monotonic() + 0.5


def _store_host() -> str:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return "torchrun's agent on the first node"
    return "global rank 0's process"


def explain_wait(me: int, awaited: Sequence[int], what: str, waited: float, *, lost: bool = False,
                 same: str | None = None, interrupt: Callable[[], bool] = lambda: False) -> tuple[str, int]:
    """Why global rank ``me`` waited ``waited`` seconds for ``what`` from the global ranks ``awaited`` in vain (its
    deadline passed, or with ``lost`` its connection closed): the message to raise, and the rank at the root of it
    (-1: none found). Ranks doing ``same`` (the collective ``me`` is in) are waiting too and are not blamed."""
    world = dist.get_world_size() if dist.is_initialized() else max([me, *awaited]) + 1
    peers = sample_peers(range(world), interrupt=interrupt)
    waited_text = f"rank {me} waited {waited:.0f} s for {what}"
    if peers is None:
        known = known_failure()  # read by this rank's heartbeat before the store went (its host ended with it)
        if known is not None and known[0] != me:
            return f"rank {known[0]} failed: {known[1]}; {waited_text}", known[0]
        return (f"the job's store does not answer (it is served by {_store_host()}, which may have stopped or gone); "
                f"{waited_text}"), 0
    candidates = [rank for rank in awaited if rank != me and not (same and peers[rank].doing == same
                                                                      and peers[rank].state == "alive")]
    found = _root(candidates or list(awaited), peers, me)
    if found is None:
        cause = "its connection closed" if lost else "no rank looks stopped"
        return f"{cause}; {waited_text}", awaited[0] if len(awaited) == 1 else -1
    root, chain = found
    peer = peers[root]
    via = "".join(f", which waits for rank {rank}" for rank in chain[1:]) if len(chain) > 1 else ""
    where = f" (pid {peer.pid} on {peer.host})" if peer.pid else ""
    if peer.state in ("silent", "unknown") and lost and root in awaited:
        head = (f"rank {root} is gone: its connection closed and it sends no heartbeat{where} (killed, e.g. by "
                f"SIGKILL or the out-of-memory killer, or crashed: see its output and the system log)")
    elif peer.state == "silent":
        head = (f"rank {root} stopped answering: no heartbeat for {max(peer.quiet_s, SAMPLE_S):.0f} s{where} (the "
                f"process is stopped, e.g. by SIGSTOP or a debugger, or frozen, or its machine is unreachable; it "
                f"was last in {peer.doing})")
    elif peer.state == "ended":
        head = f"rank {root} has ended{where} (see its output for why)"
    elif peer.state == "unknown":
        head = f"rank {root} stopped answering: it never sent a heartbeat"
    else:
        head = (f"rank {root} is alive but made no progress: it has been in {peer.doing} for {peer.for_s:.0f} s (an "
                f"endless loop in user code, a collective in the step's own code that no other rank joins (each "
                f"stage runs that code at its own time: call it in a hook every rank runs), or work slower than the "
                f"pipeline's wait timeout: raise wait_timeout)")
    if lost and root not in awaited:
        head = f"rank {me} lost its connection to rank {awaited[0] if len(awaited) == 1 else 'a peer'}; " + head
    return f"{head}; {waited_text}{via}", root


_BLAME = {"silent": 0, "unknown": 1, "ended": 2, "alive": 3}  # which root explains a wait best, first


def _root(candidates: Sequence[int], peers: dict[int, Peer], me: int) -> tuple[int, list[int]] | None:
    """The first rank, following what each candidate waits for, that is not itself waiting: a stopped, ended or busy
    rank; with the chain of ranks that led to it. A silent rank (stopped or gone) explains a wait better than one
    that ended (often because of that silent one), which explains it better than a busy one."""
    best: tuple[int, list[int]] | None = None
    for start in candidates:
        chain, rank = [start], start
        while True:
            peer = peers.get(rank)
            if peer is None:
                break
            nexts = [r for r in peer.waits if r not in chain and r != me and r in peers]
            if peer.state != "alive" or not nexts:
                break
            rank = min(nexts, key=lambda r: _BLAME[peers[r].state])
            chain.append(rank)
        root = chain[-1]
        if root in peers and (best is None or _BLAME[peers[root].state] < _BLAME[peers[best[0]].state]):
            best = (root, chain)
    return best
