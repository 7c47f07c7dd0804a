"""Messages between the ranks of one machine through Unix sockets: the gloo transport's fast path.

gloo carries a message between two processes of one machine over TCP with a background thread per pair, and posting
an operation, waking its thread and completing it costs tens to hundreds of microseconds per message (measured: a
2-rank ping-pong of 4 KiB, 143 us a round trip on gloo, 24 us on a Unix socket). On zero-cost layers that is most of
a pipeline action. So on plain gloo (not strict mode, not NCCL) the ranks of a group that share a machine (one
kernel and one network namespace) exchange their ordered messages over Unix sockets, those of up to
:data:`MAX_BYTES` (larger ones move better through gloo); pairs on different machines keep gloo. Both ends of a pair
decide alike, from the message's size and what each rank published in the job's store.

One connection per direction of a pair, made at the first send (``connect``) and taken at the first receive
(``accept``), so a rank connects only to the peers it talks to. Every message is framed by its length, and the
receiver checks it against the size it expects (the ordered wire's messages have sizes both ends know): two ends
that disagree fail at once instead of reading one message as another.

The operations behave as gloo's ``isend``/``irecv`` do for :class:`~.comm.Communicator`: they return works whose
``wait(timeout)`` raises ``RuntimeError`` when the deadline passes ("timed out ...") or the peer goes away
("connection closed by peer"); sends never block the caller (what the kernel does not take at once goes on through a
thread of the pair, in order); receives complete in the order they were posted, when waited for.
``LIGHTNING_PIPE_LOCAL_P2P=0`` turns the fast path off (gloo between every pair).
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LOCAL_ENV", "MAX_BYTES", "LocalLinks", "enabled", "machine_identity", "open_links", "publish", "receive",
           "send", "sent", "arrived"]

LOCAL_ENV = "LIGHTNING_PIPE_LOCAL_P2P"
_FRAME = struct.Struct("<Q")  # a message's length in bytes, ahead of it
_HELLO = struct.Struct("<i")  # the connecting rank's number, first on a new connection
_HELLO_S = 30.0  # how long a new connection may take to say who made it
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # a closed peer is an error, never a SIGPIPE
_SLICE_S = 0.25  # a blocked receive or accept looks at its deadline this often
SPIN_S = float(os.environ.get("LIGHTNING_PIPE_SPIN_US", "200")) * 1e-6
"""How long a receive whose message has not arrived spins before it sleeps (see :func:`_readable`)."""
MAX_BYTES = 256 << 10
"""The largest message a socket carries; larger ones keep gloo. A socket's message moves when its receiver waits for
it, gloo's meanwhile, into a receive posted ahead: with 5 ms of compute between messages, 2 ranks, one of 256 KiB
costs the same either way, 1 MiB 1% more over the socket, 4 MiB 7%, 16 MiB 17% (and without compute 16 MiB takes 19
ms against gloo's 14). Both ends know a message's size before it moves, so both take the same path."""


def enabled() -> bool:
    """Whether to try the fast path: Linux (abstract socket names), unless ``LIGHTNING_PIPE_LOCAL_P2P=0``."""
    return sys.platform == "linux" and os.environ.get(LOCAL_ENV, "1") not in ("0", "false", "False")


def _linked(links: LocalLinks | None, buf: torch.Tensor, peer: int) -> bool:
    return links is not None and buf.numel() * buf.element_size() <= MAX_BYTES and links.local(peer)


def send(links: LocalLinks | None, buf: torch.Tensor, peer: int, **gloo: Any) -> Any:
    """Send ``buf`` to ``peer`` through ``links`` where it shares this machine and is at most :data:`MAX_BYTES`
    long, else ``dist.isend(buf, **gloo)``."""
    return links.isend(buf, peer) if _linked(links, buf, peer) else dist.isend(buf, **gloo)


def receive(links: LocalLinks | None, buf: torch.Tensor, peer: int, **gloo: Any) -> Any:
    """Receive ``buf`` from ``peer`` as :func:`send` sent it (both ends know its size)."""
    return links.irecv(buf, peer) if _linked(links, buf, peer) else dist.irecv(buf, **gloo)


def sent(work: Any) -> bool:
    """Whether ``work`` is a send of a link that is over and succeeded (nothing left to wait for)."""
    return type(work) is _SendWork and work.done and work.error is None


def arrived(work: Any) -> bool:
    """Whether ``work`` is a receive of a link whose message is here (read now if it just came), without waiting."""
    return type(work) is _RecvWork and work.arrived()


def machine_identity() -> str:
    """What two processes share exactly when a Unix socket of one reaches the other: the kernel (its boot id) and
    the network namespace (abstract socket names live in it); and the process namespace, in which a peer's process
    number says whether it is alive."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/net", "/proc/self/ns/pid"):
        try:
            if path.endswith("boot_id"):
                with open(path) as boot_id:
                    parts.append(boot_id.read().strip())
            else:
                parts.append(str(os.stat(path).st_ino))
        except OSError:  # not knowable: no fast path (two containers may share a hostname)
            return ""
    return "/".join(parts)


def _seconds(timeout: timedelta | float | None) -> float | None:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else timeout


def _bytes_of(buf: torch.Tensor) -> memoryview:
    return memoryview(buf.numpy()).cast("B")


class _Work:
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


class _SendWork(_Work):
    __slots__ = ("peer",)

    def __init__(self, buf: torch.Tensor, peer: int, done: bool = False) -> None:
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


class _RecvWork(_Work):
    __slots__ = ("receiver", "got")

    def __init__(self, buf: torch.Tensor, receiver: _Receiver) -> None:
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


class _Sender:
    """The sending end of one connection: what the kernel takes at once is sent by the caller, the rest in order by
    a thread of its own."""

    def __init__(self, sock: socket.socket, peer: int) -> None:
        self.sock, self.peer = sock, peer
        self.backlog: deque[tuple[_SendWork, list[memoryview]]] = deque()
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)
        self.error: BaseException | None = None
        self.closed = False
        self.thread: threading.Thread | None = None

    def send(self, buf: torch.Tensor) -> _SendWork:
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
                        return _SendWork(buf, self.peer, done=True)
            work = _SendWork(buf, self.peer)
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
        _close(self.sock, shutdown=True)  # wakes a thread blocked in sendmsg


def _send_some(sock: socket.socket, views: list[memoryview], flags: int) -> list[memoryview]:
    """Send what the kernel takes of ``views`` (all of it, unless ``flags`` has MSG_DONTWAIT); return the rest."""
    while views:
        try:
            sent = sock.sendmsg(views, [], flags | _NOSIGNAL)
        except BlockingIOError:
            return views
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views = views[1:]
        if views and sent:
            views = [views[0][sent:], *views[1:]]
    return views


class _Receiver:
    """The receiving end of one connection: posted receives complete in order, each when it (or a later one) is
    waited for."""

    def __init__(self, links: LocalLinks, peer: int) -> None:
        self.links, self.peer = links, peer
        self.sock: socket.socket | None = None
        self.posted: deque[_RecvWork] = deque()
        self.lock = threading.Lock()
        self.frame = bytearray(_FRAME.size)
        self.error: BaseException | None = None

    def post(self, buf: torch.Tensor) -> _RecvWork:
        work = _RecvWork(buf, self)
        self.posted.append(work)
        return work

    def complete(self, work: _RecvWork, deadline: float | None, block: bool = True) -> None:
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
                        self.sock = self.links.accept(self.peer, deadline)
                    self._read(self.posted[0], deadline, block)
                except _NotYet:
                    return
                except _TimedOut as timeout:
                    raise RuntimeError(str(timeout)) from None
                except (OSError, RuntimeError) as error:
                    self.error = error if isinstance(error, RuntimeError) else RuntimeError(
                        f"Connection closed by peer (rank {self.peer}): {error}")
                    if self.sock is not None:  # the sender learns at once that nothing more is taken
                        _close(self.sock, shutdown=True)
                    continue
                self.posted.popleft().finish()

    def _read(self, work: _RecvWork, deadline: float | None, block: bool) -> None:
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
                    raise _NotYet from None
                if not _readable(self.sock, deadline):
                    raise _TimedOut(f"timed out waiting for a message from rank {self.peer}") from None
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
            _close(self.sock, shutdown=True)


class _TimedOut(Exception):
    pass


class _NotYet(Exception):
    """A receive that does not wait found its message not (wholly) here yet."""


class LocalLinks:
    """One rank's Unix-socket connections to the ranks of its group on the same machine (see the module's doc).

    ``store`` and ``prefix`` are the communicator's: each rank publishes its machine and its listening address
    there, so that both ends of a pair decide alike whether the pair is local.
    """

    def __init__(self, store: Any, prefix: str, rank: int, timeout: Callable[[], float] = lambda: 300.0) -> None:
        self.store, self.prefix, self.rank = store, prefix, rank
        self.timeout = timeout  # seconds a rank may wait for a peer's address (the communicator's wait_timeout)
        self.identity = machine_identity()
        self.address = f"\0lightning_pipe-{secrets.token_hex(8)}-{rank}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(self.address)
            self.listener.listen(128)
        except OSError:  # no abstract socket names here: every pair with this rank keeps gloo
            self.identity = ""
        self.listener.settimeout(_SLICE_S)
        publish(store, prefix, rank, self.identity, self.address[1:])
        self._peers: dict[int, str | None] = {}  # peer -> its address when it shares this machine, else None
        self._pids: dict[int, int] = {}
        self._senders: dict[int, _Sender] = {}
        self._receivers: dict[int, _Receiver] = {}
        self._accepted: dict[int, socket.socket] = {}  # connections taken before their receiver needed them
        self._accept_lock = threading.Lock()

        _OPEN.add(self)

    def local(self, peer: int) -> bool:
        """Whether ``peer`` shares this machine (both ends get the same answer)."""
        if peer not in self._peers:
            identity, address, pid = self._published(peer).split("\n")
            self._peers[peer] = "\0" + address if identity and identity == self.identity else None
            self._pids[peer] = int(pid)
        return self._peers[peer] is not None

    def _published(self, peer: int) -> str:
        """What ``peer`` published, waiting for it at most the communicator's ``wait_timeout``: a peer publishes when
        it builds its communicator, so one that never does has stopped or failed before (its error is posted)."""
        key, timeout = _key(self.prefix, peer), self.timeout()
        try:
            self.store.wait([key], timedelta(seconds=timeout))
        except RuntimeError as error:
            if "timeout" not in str(error).lower() and "timed out" not in str(error).lower():
                raise
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for rank {peer} to build this pipeline's "
                               f"communicator (it publishes its address then): it stopped or failed before") from None
        return self.store.get(key).decode()

    def isend(self, buf: torch.Tensor, dst: int) -> _SendWork:
        sender = self._senders.get(dst)
        if sender is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sender = self._senders[dst] = _Sender(sock, dst)
            try:
                sock.setblocking(True)  # whatever socket.setdefaulttimeout says: a send waits for the kernel
                sock.connect(self._peers[dst])
                sock.sendall(_HELLO.pack(self.rank))
            except OSError as error:  # the peer is gone: its sends fail when waited for, as gloo's would
                sender.error = error
        return sender.send(buf)

    def irecv(self, buf: torch.Tensor, src: int) -> _RecvWork:
        receiver = self._receivers.get(src)
        if receiver is None:
            receiver = self._receivers[src] = _Receiver(self, src)
        return receiver.post(buf)

    def accept(self, peer: int, deadline: float | None) -> socket.socket:
        """The connection ``peer`` made to this rank (taking others that come first, for later)."""
        with self._accept_lock:
            while peer not in self._accepted:
                try:
                    sock, _ = self.listener.accept()
                except TimeoutError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise _TimedOut(f"timed out waiting for rank {peer} to connect") from None
                    if not _alive(self._pids[peer]):  # gone before its first message: no connection will close
                        raise RuntimeError(f"Connection closed by peer (rank {peer}, process {self._pids[peer]}, "
                                           "ended before it connected)") from None
                    continue
                who = _hello(sock)
                if who is None:  # closed or silent before saying who made it: not any peer's connection
                    _close(sock)
                    continue
                sock.setblocking(False)  # a receive spins a little, then waits in poll (see _readable)
                self._accepted[who] = sock
            return self._accepted.pop(peer)

    def close(self) -> None:
        """Close every connection and the listener (the threads of the senders end)."""
        _OPEN.discard(self)
        for sender in self._senders.values():
            sender.close()
        for receiver in self._receivers.values():
            receiver.close()
        self._forget()

    def _forget(self) -> None:
        """Close this process's copies of every socket, without ending the connections themselves, and drop them."""
        for sock in (*(sender.sock for sender in self._senders.values()),
                     *(receiver.sock for receiver in self._receivers.values() if receiver.sock is not None),
                     *self._accepted.values(), self.listener):
            _close(sock)
        self._senders.clear()
        self._receivers.clear()
        self._accepted.clear()


def open_links(owner: Any, store: Any, prefix: str, rank: int, timeout_of: Callable[[Any], float]) -> LocalLinks | None:
    """``owner``'s links (closed when it goes), or ``None`` where the fast path is off (published as such, so that a
    peer with one keeps gloo with this rank instead of waiting). ``timeout_of(owner)``: how long to wait for a peer's
    address. Every rank of the group calls this together (the communicator's or the result channel's making)."""
    if not enabled():
        publish(store, prefix, rank)
        return None
    ref = weakref.ref(owner)
    links = LocalLinks(store, prefix, rank, lambda: timeout_of(ref()) if ref() is not None else 300.0)
    weakref.finalize(owner, links.close)
    return links


def publish(store: Any, prefix: str, rank: int, identity: str = "", address: str = "") -> None:
    """Publish where this rank listens; with no ``identity``, that it has no fast path (its pairs keep gloo), so
    that a peer with one does not wait for an address that never comes."""
    store.set(_key(prefix, rank), f"{identity}\n{address}\n{os.getpid()}")


def _key(prefix: str, rank: int) -> str:
    return f"{prefix}/local/{rank}"


_OPEN: weakref.WeakSet[LocalLinks] = weakref.WeakSet()


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) must not hold its parent's connections open: close its copies of them,
    without ending the connections themselves, which the parent still uses."""
    for links in list(_OPEN):
        links._forget()
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _hello(sock: socket.socket) -> int | None:
    """The rank a new connection says it comes from, or ``None`` if it closes or says nothing in time."""
    sock.settimeout(_HELLO_S)
    hello = bytearray(_HELLO.size)
    view, got = memoryview(hello), 0
    try:
        while got < _HELLO.size:
            count = sock.recv_into(view[got:])
            if count == 0:
                return None
            got += count
    except OSError:
        return None
    return _HELLO.unpack(hello)[0]


def _readable(sock: socket.socket, deadline: float | None) -> bool:
    """Wait until ``sock`` has something to read (or has closed); ``False`` if ``deadline`` passes first.

    First it spins for :data:`SPIN_S`, yielding the core at each turn: a process that sleeps in the kernel takes tens
    of microseconds to wake (more in a virtual machine), as long as a whole zero-cost action, and in a pipeline the
    next message is usually that close. Then it sleeps in ``poll``."""
    fd = sock.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    give_up = time.perf_counter() + SPIN_S
    while time.perf_counter() < give_up:
        if poller.poll(0):
            return True
        os.sched_yield()
    while not poller.poll(_SLICE_S * 1e3):
        if deadline is not None and time.monotonic() > deadline:
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that number: alive
        return True
    try:  # a zombie (ended, its parent has not reaped it yet) counts as ended
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _close(sock: socket.socket, shutdown: bool = False) -> None:
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
