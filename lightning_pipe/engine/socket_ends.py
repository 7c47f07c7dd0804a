"""The two ends of one Unix-socket connection between ranks (:mod:`.local_link` makes and routes them).

Messages are framed by their length; the receiving end checks it against the size it expects. :class:`Sender`: what
the kernel takes at once is sent by the caller, the rest in order by a thread of the connection, so a send never
blocks. :class:`Receiver`: receives complete in the order they were posted, each when it (or a later one) is waited
for, or without waiting when its message is here (:meth:`RecvWork.arrived`). Works behave as gloo's: ``wait(timeout)``
raises ``RuntimeError`` when the deadline passes ("timed out ...") or the peer goes away ("connection closed by
peer"). A receive whose message is not here spins a little before it sleeps (:func:`readable`).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import torch

__all__ = ["SPIN_ENV", "spin_seconds", "SLICE_S", "NOSIGNAL", "Parts", "Work", "SendWork", "RecvWork", "Sender",
           "Receiver", "TimedOut", "NotYet", "readable", "close_socket"]

_FRAME = struct.Struct("<Q")  # a message's length in bytes, ahead of it
NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # a closed peer is an error, never a SIGPIPE
SLICE_S = 0.25  # a blocked receive or accept looks at its deadline this often
SPIN_ENV = "LIGHTNING_PIPE_SPIN_US"


def spin_seconds() -> float:
    """How long a receive whose message has not arrived spins before it sleeps (see :func:`readable`):
    ``LIGHTNING_PIPE_SPIN_US`` microseconds, 200 by default, read when a rank's links are made."""
    text = os.environ.get(SPIN_ENV, "200")
    try:
        microseconds = float(text)
    except ValueError:
        raise ValueError(f"{SPIN_ENV}={text!r} is not a number: give the microseconds a receive spins before it "
                         f"sleeps (default 200; 0 never spins)") from None
    return max(0.0, microseconds) * 1e-6

def _seconds(timeout: timedelta | float | None) -> float | None:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else timeout


def _bytes_of(buf: torch.Tensor) -> memoryview:
    return memoryview(buf.numpy()).cast("B")


class Parts:
    """A message as pieces of bytes, sent as one (``sendmsg``'s gather): a header, and the bytes of tensors where
    they lie, without a copy into one buffer first. ``nbytes``: their total."""

    __slots__ = ("pieces", "nbytes")

    def __init__(self, pieces: list, nbytes: int) -> None:
        self.pieces, self.nbytes = pieces, nbytes


class Work:
    """One operation: done at once, or when a thread or a later wait completes it."""

    __slots__ = ("buf", "done", "error", "_event")

    def __init__(self, buf: torch.Tensor, done: bool = False) -> None:
        self.buf = buf  # kept alive until the operation is over
        self.done = done
        self.error: BaseException | None = None
        self._event: threading.Event | None = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done = True
        if self._event is not None:
            self._event.set()

    def is_completed(self) -> bool:
        return self.done


class SendWork(Work):
    __slots__ = ("peer",)

    def __init__(self, buf: torch.Tensor | Parts, peer: int, done: bool = False) -> None:
        super().__init__(buf, done)
        self.peer = peer

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        if not self.done:
            seconds = _seconds(timeout)
            assert self._event is not None  # a send not done at once is in the backlog, with its event
            if not self._event.wait(seconds):
                raise RuntimeError(f"timed out after {seconds:.0f} s waiting for rank {self.peer} to take a message")
        if self.error is not None:
            raise RuntimeError(f"Connection closed by peer (rank {self.peer}): {self.error}") from self.error
        return True


class RecvWork(Work):
    __slots__ = ("receiver", "got")

    def __init__(self, buf: torch.Tensor, receiver: Receiver) -> None:
        super().__init__(buf)
        self.receiver = receiver
        self.got = 0  # bytes read so far, frame included

    def wait(self, timeout: timedelta | float | None = None) -> bool:
        if not self.done:
            seconds = _seconds(timeout)
            self.receiver.complete(self, None if seconds is None else time.monotonic() + seconds)
        if self.error is not None:
            raise self.error
        return True

    def arrived(self) -> bool:
        """Complete the receive if its message (and those posted before it) is here already, without waiting; whether
        it succeeded. A failure is kept for :meth:`wait` to raise."""
        if not self.done:
            self.receiver.complete(self, None, block=False)
        return self.done and self.error is None


class Sender:
    """The sending end of one connection: what the kernel takes at once is sent by the caller, the rest in order by
    a thread of its own."""

    def __init__(self, sock: socket.socket, peer: int) -> None:
        self.sock, self.peer = sock, peer
        self.backlog: deque[tuple[SendWork, list[memoryview]]] = deque()
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)
        self.error: BaseException | None = None
        self.closed = False
        self.thread: threading.Thread | None = None

    def send(self, buf: torch.Tensor | Parts) -> SendWork:
        """Send ``buf`` as one message. A :class:`Parts` message refers to its owner's tensors: what the kernel does
        not take at once is copied before this returns, since the owner may change them then."""
        if type(buf) is Parts:
            views = [memoryview(_FRAME.pack(buf.nbytes)), *buf.pieces]
        else:
            data = _bytes_of(buf)
            views = [memoryview(_FRAME.pack(len(data))), data]
        with self.lock:  # (a closed sender has its error: see close)
            if self.error is None and not self.backlog:
                try:
                    views = _send_some(self.sock, views, socket.MSG_DONTWAIT)
                except OSError as error:
                    self._fail(error)
                else:
                    if not views:
                        return SendWork(buf, self.peer, done=True)
            if type(buf) is Parts:
                views = [memoryview(bytes(view)) for view in views]
            work = SendWork(buf, self.peer)
            if self.error is not None:
                work.finish(self.error)
                return work
            work._event = threading.Event()
            self.backlog.append((work, views))
            if self.thread is None:
                self.thread = threading.Thread(target=self._drain, name=f"lightning_pipe-send-{self.peer}",
                                               daemon=True)
                self.thread.start()
            self.ready.notify()
            return work

    def _drain(self) -> None:
        while True:
            with self.lock:
                while not self.backlog and not self.closed:
                    self.ready.wait()
                if self.closed:
                    return
                work, views = self.backlog[0]
            try:
                while views:
                    views = _send_some(self.sock, views, 0)
            except OSError as error:
                with self.lock:
                    self._fail(error)
                return
            with self.lock:
                if self.backlog and self.backlog[0][0] is work:  # else close() failed it meanwhile
                    self.backlog.popleft()
            work.finish()

    def _fail(self, error: BaseException) -> None:
        """The connection broke (lock held): every send not out fails with it, and so does every later one."""
        self.error = error
        while self.backlog:
            self.backlog.popleft()[0].finish(error)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._fail(ConnectionError("this rank closed its connections"))
            self.ready.notify()
        close_socket(self.sock, shutdown=True)  # wakes a thread blocked in sendmsg


def _send_some(sock: socket.socket, views: list[memoryview], flags: int) -> list[memoryview]:
    """Send what the kernel takes of ``views`` (all of it, unless ``flags`` has MSG_DONTWAIT); return the rest."""
    while views:
        try:
            sent = sock.sendmsg(views, [], flags | NOSIGNAL)
        except BlockingIOError:
            return views
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views = views[1:]
        if views and sent:
            views = [views[0][sent:], *views[1:]]
    return views


class Receiver:
    """The receiving end of one connection: posted receives complete in order, each when it (or a later one) is
    waited for."""

    def __init__(self, peer: int, accept: Callable[[float | None], socket.socket], spin: float = 0.0) -> None:
        self.peer, self.accept = peer, accept  # accept(deadline): the connection the peer made to this rank
        self.spin = spin  # seconds a receive spins before it sleeps
        self.sock: socket.socket | None = None
        self.posted: deque[RecvWork] = deque()
        self.lock = threading.Lock()
        self.frame = bytearray(_FRAME.size)
        self.error: BaseException | None = None

    def post(self, buf: torch.Tensor) -> RecvWork:
        work = RecvWork(buf, self)
        self.posted.append(work)
        return work

    def complete(self, work: RecvWork, deadline: float | None, block: bool = True) -> None:
        """Read the posted receives in order up to ``work``; without ``block``, only what has arrived."""
        with self.lock:
            while not work.done:
                if self.error is not None:
                    while self.posted:
                        self.posted.popleft().finish(self.error)
                    break
                try:
                    if self.sock is None:
                        if not block:
                            return
                        self.sock = self.accept(deadline)
                    self._read(self.posted[0], deadline, block)
                except NotYet:
                    return
                except TimedOut as timeout:
                    raise RuntimeError(str(timeout)) from None
                except (OSError, RuntimeError) as error:
                    self.error = error if isinstance(error, RuntimeError) else RuntimeError(
                        f"Connection closed by peer (rank {self.peer}): {error}")
                    if self.sock is not None:  # the sender learns at once that nothing more is taken
                        close_socket(self.sock, shutdown=True)
                    continue
                self.posted.popleft().finish()

    def _read(self, work: RecvWork, deadline: float | None, block: bool) -> None:
        data = _bytes_of(work.buf)
        total = _FRAME.size + len(data)
        frame = memoryview(self.frame)
        while work.got < total:
            got = work.got
            views = [frame[got:], data] if got < _FRAME.size else [data[got - _FRAME.size:]]
            try:
                count = self.sock.recvmsg_into(views)[0]
            except BlockingIOError:
                if not block:
                    raise NotYet from None
                if not readable(self.sock, deadline, self.spin):
                    raise TimedOut(f"timed out waiting for a message from rank {self.peer}") from None
                continue
            if count == 0:
                raise RuntimeError(f"Connection closed by peer (rank {self.peer} closed its socket)")
            if got < _FRAME.size <= got + count:
                (length,) = _FRAME.unpack(self.frame)
                if length != len(data):
                    raise RuntimeError(f"rank {self.peer} sent a message of {length} bytes where this rank expected "
                                       f"{len(data)}: the two ends disagree on the order of their messages")
            work.got = got + count

    def close(self) -> None:
        if self.sock is not None:
            close_socket(self.sock, shutdown=True)


class TimedOut(Exception):
    """A wait for the peer (its connection or its message) ran past its deadline."""


class NotYet(Exception):
    """A receive that does not wait found its message not (wholly) here yet."""


def readable(sock: socket.socket, deadline: float | None, spin: float) -> bool:
    """Wait until ``sock`` has something to read (or has closed); ``False`` if ``deadline`` passes first.

    First it spins for ``spin`` seconds, yielding the core at each turn: a process that sleeps in the kernel takes tens
    of microseconds to wake (more in a virtual machine), as long as a whole zero-cost action, and in a pipeline the
    next message is usually that close. Then it sleeps in ``poll``."""
    fd = sock.fileno()
    if fd < 0:  # closed meanwhile (by an abort's thread)
        raise OSError("the socket was closed")
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    give_up = time.perf_counter() + spin
    while time.perf_counter() < give_up:
        if poller.poll(0):
            return True
        os.sched_yield()
    while not poller.poll(SLICE_S * 1e3):
        if deadline is not None and time.monotonic() > deadline:
            return False
    return True


def close_socket(sock: socket.socket, shutdown: bool = False) -> None:
    """Close ``sock``; with ``shutdown``, end the connection itself first (which a forked child must never do: its
    parent's connection is the same)."""
    try:
        if shutdown:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
