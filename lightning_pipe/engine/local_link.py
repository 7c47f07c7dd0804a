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
thread of the pair, in order); receives complete in the order they were posted, when waited for (the two ends of a
connection: :mod:`.socket_ends`). ``LIGHTNING_PIPE_LOCAL_P2P=0`` turns the fast path off (gloo between every pair).
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .socket_ends import (SLICE_S, Parts, Receiver, RecvWork, Sender, SendWork, TimedOut, close_socket,
                          spin_seconds)

__all__ = ["LOCAL_ENV", "MAX_BYTES", "LocalLinks", "enabled", "machine_identity", "open_links", "publish", "receive",
           "send", "sent", "arrived", "linked"]

LOCAL_ENV = "LIGHTNING_PIPE_LOCAL_P2P"
_HELLO = struct.Struct("<i")  # the connecting rank's number, first on a new connection
_HELLO_S = 30.0  # how long a new connection may take to say who made it
MAX_BYTES = 256 << 10
"""The largest message a socket carries; larger ones keep gloo. A socket's message moves when its receiver waits for
it, gloo's meanwhile, into a receive posted ahead: with 5 ms of compute between messages, 2 ranks, one of 256 KiB
costs the same either way, 1 MiB 1% more over the socket, 4 MiB 7%, 16 MiB 17% (and without compute 16 MiB takes 19
ms against gloo's 14). Both ends know a message's size before it moves, so both take the same path."""


def enabled() -> bool:
    """Whether to try the fast path: Linux (abstract socket names), unless ``LIGHTNING_PIPE_LOCAL_P2P=0``."""
    return sys.platform == "linux" and os.environ.get(LOCAL_ENV, "1") not in ("0", "false", "False")


def linked(links: LocalLinks | None, nbytes: int, peer: int) -> bool:
    """Whether a message of ``nbytes`` to or from ``peer`` goes through ``links`` (both ends decide alike)."""
    return links is not None and nbytes <= MAX_BYTES and links.local(peer)


def send(links: LocalLinks | None, buf: torch.Tensor | Parts, peer: int, **gloo: Any) -> Any:
    """Send ``buf`` to ``peer`` through ``links`` where it shares this machine and is at most :data:`MAX_BYTES`
    long, else ``dist.isend(buf, **gloo)``. A message in :class:`~.socket_ends.Parts` was made for the socket
    (:func:`linked` said so)."""
    if type(buf) is Parts:
        return links.isend(buf, peer)
    return links.isend(buf, peer) if linked(links, buf.numel() * buf.element_size(), peer) else dist.isend(buf, **gloo)


def receive(links: LocalLinks | None, buf: torch.Tensor, peer: int, **gloo: Any) -> Any:
    """Receive ``buf`` from ``peer`` as :func:`send` sent it (both ends know its size)."""
    linked_ = linked(links, buf.numel() * buf.element_size(), peer)
    return links.irecv(buf, peer) if linked_ else dist.irecv(buf, **gloo)


def sent(work: Any) -> bool:
    """Whether ``work`` is a send of a link that is over and succeeded (nothing left to wait for)."""
    return type(work) is SendWork and work.done and work.error is None


def arrived(work: Any) -> bool:
    """Whether ``work`` is a receive of a link whose message is here (read now if it just came), without waiting."""
    return type(work) is RecvWork and work.arrived()


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


class LocalLinks:
    """One rank's Unix-socket connections to the ranks of its group on the same machine (see the module's doc).

    ``store`` and ``prefix`` are the communicator's: each rank publishes its machine and its listening address
    there, so that both ends of a pair decide alike whether the pair is local.
    """

    def __init__(self, store: Any, prefix: str, rank: int, timeout: Callable[[], float] = lambda: 300.0) -> None:
        self.store, self.prefix, self.rank = store, prefix, rank
        self.timeout = timeout  # seconds a rank may wait for a peer's address (the communicator's wait_timeout)
        self.spin = spin_seconds()  # read now: a rank sets its environment after the package is imported
        self.identity = machine_identity()
        self.address = f"\0lightning_pipe-{secrets.token_hex(8)}-{rank}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(self.address)
            self.listener.listen(128)
        except OSError:  # no abstract socket names here: every pair with this rank keeps gloo
            self.identity = ""
        self.listener.settimeout(SLICE_S)
        publish(store, prefix, rank, self.identity, self.address[1:])
        self._peers: dict[int, str | None] = {}  # peer -> its address when it shares this machine, else None
        self._pids: dict[int, int] = {}
        self._senders: dict[int, Sender] = {}
        self._receivers: dict[int, Receiver] = {}
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

    def isend(self, buf: torch.Tensor | Parts, dst: int) -> SendWork:
        sender = self._senders.get(dst)
        if sender is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sender = self._senders[dst] = Sender(sock, dst)
            try:
                sock.setblocking(True)  # whatever socket.setdefaulttimeout says: a send waits for the kernel
                sock.connect(self._peers[dst])
                sock.sendall(_HELLO.pack(self.rank))
            except OSError as error:  # the peer is gone: its sends fail when waited for, as gloo's would
                sender.error = error
        return sender.send(buf)

    def irecv(self, buf: torch.Tensor, src: int) -> RecvWork:
        receiver = self._receivers.get(src)
        if receiver is None:
            receiver = self._receivers[src] = Receiver(src, lambda deadline: self.accept(src, deadline), self.spin)
        return receiver.post(buf)

    def accept(self, peer: int, deadline: float | None) -> socket.socket:
        """The connection ``peer`` made to this rank (taking others that come first, for later)."""
        with self._accept_lock:
            while peer not in self._accepted:
                try:
                    sock, _ = self.listener.accept()
                except TimeoutError:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimedOut(f"timed out waiting for rank {peer} to connect") from None
                    if not _alive(self._pids[peer]):  # gone before its first message: no connection will close
                        raise RuntimeError(f"Connection closed by peer (rank {peer}, process {self._pids[peer]}, "
                                           "ended before it connected)") from None
                    continue
                who = _hello(sock)
                if who is None:  # closed or silent before saying who made it: not any peer's connection
                    close_socket(sock)
                    continue
                sock.setblocking(False)  # a receive spins a little, then waits in poll (see readable)
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
            close_socket(sock)
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


