"""Point-to-point transfer of tensor trees between pipeline ranks: one message each, in the order a comm plan gives.

The ordered wire. Messages between two ranks are matched by order alone (NCCL ignores tags; here gloo gets one tag
too), so a rank issues them exactly as its :class:`~.schedules.transfers.CommPlan` says, one group per step
(:meth:`Communicator.exchange`): ``batch_isend_irecv`` on NCCL, one ``isend``/``irecv`` each on gloo.

One message per transfer, of a size the receiver knows before it posts (NCCL needs exact sizes; each gloo message
costs a fixed ~0.2-1 ms here, so one per transfer matters more than the copy that packing takes). Both ends keep, per
``(peer, channel)`` (a channel is a stream of like messages, e.g. one stage's activations), the layout last sent and
the channel's *capacity*, the largest message so far: every message is exactly that large. The message says whether
its layout is the last one (then it is header and data only), or a new one that it carries; a message that would
not fit puts its layout and data on the *side plane* (the job's store, in values of at most 4 MiB, written before the
message leaves, read and deleted by the receiver) and keeps only its header on the wire, after which both ends raise the capacity. The side
plane blocks nothing, so the ordered wire keeps one message per transfer even when shapes change: the first batch,
a partial last batch, a longer sequence. See :mod:`.wire` for the format; nothing received is unpickled.

Failures: a rank that fails posts its error, as text, to the store (:mod:`.notices`), and sends an error message
(same size as the message the peer expects next) to each peer it still owed one, so that a neighbour waiting on it
raises that error and passes it on. gloo's waits block (its ``is_completed`` says nothing before ``wait``): a peer
that went away surfaces as a lost connection, which then reads the error from the store. NCCL's waits poll their
work and the store. Every wait has a deadline, :attr:`Communicator.wait_timeout` (gloo: the wait's own timeout, which
also closes the group's connections, so the peers waiting on this rank learn of it at once; NCCL: the poll's). A
wait that runs out, or a connection that closes with no error posted, is explained from the ranks' heartbeats
(:mod:`.watchdog`): the error names the rank that stopped answering, made no progress or is gone, and the message
this rank waited for ("rank 1 waited 300 s for rank 2's activation of micro-batch 3 (2F3)").

Modes. ``strict=True`` (or ``LIGHTNING_PIPE_STRICT_P2P=1``) emulates NCCL's stream on gloo: a group is issued only
once the one before it has completed, its sends included, so that an order NCCL would deadlock on deadlocks on CPU
too. On CUDA, packing and unpacking run on a communication stream of their own, buffers are kept alive for the
streams that use them (``record_stream``, the pinned-memory allocator's events), and gloo carries CUDA tensors
through pinned host memory: a send's copy to the host then overlaps the next compute, and the send leaves when the
copy is done, before this rank next waits on a peer.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Hashable, Sequence
from contextlib import contextmanager
from datetime import timedelta
from operator import attrgetter
from typing import Any, Iterator

import torch
import torch.distributed as dist

from . import local_link, wire
from .notices import FailureBoard, PipelineError, from_notice, notice_text
from .runtime import next_serial
from .socket_ends import Parts
from .waits import Waits
from .watchdog import DEFAULT_WAIT_TIMEOUT, start_heartbeat

__all__ = ["PipelineError", "Communicator", "STRICT_ENV", "INITIAL_CAPACITY"]

STRICT_ENV = "LIGHTNING_PIPE_STRICT_P2P"
INITIAL_CAPACITY = 4096  # bytes of a channel's first message (its first layout and small trees fit)
SIDE_CHUNK = 4 << 20  # bytes per store value of a side message (torch's libuv store refuses values over 8 MiB)
_ERROR = 3  # an error notice on the wire: header, then "<origin rank>\n<text>"


class Communicator(Waits):
    """Sends and receives tensor trees to and from the other ranks of one process group.

    ``device`` is where received tensors are placed. NCCL moves CUDA tensors; gloo moves CPU tensors (CUDA tensors
    through pinned host memory). Every rank of ``group`` builds its Communicators in the same order (their names in
    the store are counted per group).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                 strict: bool | None = None) -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.device = torch.device(device)
        self.nccl = dist.get_backend(self.group) == "nccl"
        self.strict = os.environ.get(STRICT_ENV, "") not in ("", "0") if strict is None else strict
        self.wire_device = self.device if self.nccl else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        ranks = tuple(dist.get_global_rank(self.group, r) for r in range(self.size))
        serial = next_serial(("p2p", ranks))
        self.prefix = f"lightning_pipe/p2p/{'-'.join(map(str, ranks))}/{serial}"
        self.board = FailureBoard(self.prefix, self.size, ranks)
        self.started = time.time()  # a job failure posted before this pipeline existed is not one of its own
        self.error_grace_s = 5.0  # how long a failing rank waits for its peers to take its error messages
        self.wait_timeout = DEFAULT_WAIT_TIMEOUT  # seconds any one wait for peers may last (see the module's doc)
        # the transfers of the step being exchanged (:class:`~.schedules.transfers.Transfer`), which the executor sets:
        # what a wait that runs out says it waited for
        self.awaiting: Sequence[Any] = ()
        self._global = ranks
        self.failed: PipelineError | None = None
        self.messages_sent = 0  # on the ordered wire: one per transfer (tests and benchmarks read it)
        self._sent: dict[tuple[int, Hashable], wire.Channel] = {}
        self._received: dict[tuple[int, Hashable], wire.Channel] = {}
        self._side_out: dict[int, int] = defaultdict(int)
        self._side_in: dict[int, int] = defaultdict(int)
        self._pending: list[tuple[dist.Work, Any, tuple[int, ...], Hashable]] = []  # sends not known to have
        # completed: work, message, peers, label
        self._staged: deque[tuple[Any, torch.Tensor, int, Hashable]] = deque()  # gloo + CUDA: sends whose copy to the
        # host is still running (event, message, dst, label)
        self.timeline: list[tuple[str, Any, Any]] | None = None  # CUDA: (what, start event, end event) when recording
        # Plain gloo posts receives ahead (see expect): nothing waits behind a posted receive there.
        self.ahead = not self.nccl and not self.strict
        self._expected: dict[int, deque[Hashable]] = defaultdict(deque)
        self._posted: dict[int, deque[tuple[Hashable, torch.Tensor, dist.Work]]] = defaultdict(deque)
        if self.cuda:
            self._comm_stream = torch.cuda.Stream(self.device)
            self._read_stream = torch.cuda.Stream(self.device)
        # Plain gloo between ranks of one machine: Unix sockets instead (engine/local_link.py).
        self.links = (local_link.open_links(self, self.board.store, self.prefix, self.rank,
                                            attrgetter("wait_timeout"))
                      if self.ahead and self.board.store is not None else None)
        if self.nccl:
            # Batched point-to-point runs on the group's device communicator, which all ranks must create together.
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)
        start_heartbeat()

    # -- one step ---------------------------------------------------------------------------------
    def exchange(self, sends: Sequence[tuple[Any, int, Hashable]], recvs: Sequence[tuple[int, Hashable]],
                 labels: Sequence[Hashable] | None = None) -> list[Any]:
        """Send each ``(tree, dst, channel)`` and receive from each ``(src, channel)``, as one group; return the
        received trees in order once they have arrived. Sends are not waited for (see :meth:`wait_sends`, which
        ``labels``, one per send, lets skip some); their tensors are copied, so they may change as soon as this
        returns.

        Both ends must issue the messages between them in one order (the comm plan's): the ``k``-th message this
        rank sends ``dst`` is the ``k``-th ``dst`` receives from it, whatever the channels.
        """
        if self.failed is not None:
            raise self.failed
        if self.strict:  # one stream: the group before must have completed, its sends included
            self._wait_sends()
        labels = labels if labels is not None else [None] * len(sends)
        out = [(dst, self._pack(tree, dst, channel), label) for (tree, dst, channel), label in zip(sends, labels)]
        self.messages_sent += len(out)
        if self.ahead:
            self._issue(out, [])
            return [self._receive_posted(src, channel) for src, channel in recvs]
        into = [(src, channel, self._buffer(self._state(self._received, src, channel).capacity))
                for src, channel in recvs]
        works = self._issue(out, [(src, buffer) for src, _, buffer in into])
        if not into:
            return []
        self._wait(works, [src for src, _, _ in into])
        return [self._unpack(src, channel, buffer) for src, channel, buffer in into]

    def expect(self, incoming: dict[int, list[Hashable]]) -> None:
        """The channels of the messages this rank receives next from each peer, in wire order (its comm plan's).

        On plain gloo, receives are then posted ahead, so that a message moves as soon as it is sent rather than
        when this rank asks for it (gloo moves a message only to a posted receive): per peer up to
        :attr:`AHEAD_PER_PEER`, and per channel one at a time, since a message that outgrew its channel raises the
        size of the next one. The order of the messages between two ranks is the plan's either way, and on gloo a
        posted receive holds back nothing; strict mode and NCCL post each receive in its step (a posted receive
        sits in NCCL's stream in front of the sends after it)."""
        if not self.ahead:
            return
        for src, channels in incoming.items():
            self._expected[src].extend(channels)
            self._pump(src)

    AHEAD_PER_PEER = 4

    def _pump(self, src: int) -> None:
        expected, posted = self._expected[src], self._posted[src]
        while expected and len(posted) < self.AHEAD_PER_PEER and all(c != expected[0] for c, _, _ in posted):
            channel = expected.popleft()
            buffer = self._buffer(self._state(self._received, src, channel).capacity)
            posted.append((channel, buffer, self._irecv(buffer, src)))

    def _receive_posted(self, src: int, channel: Hashable) -> Any:
        """The next message from ``src`` (on ``channel``), through the receive posted ahead for it."""
        posted = self._posted[src]
        if not posted:
            self._pump(src)
        if posted:
            posted_channel, buffer, work = posted.popleft()
            if posted_channel != channel:
                raise RuntimeError(f"rank {self.rank} expected a message on channel {posted_channel!r} from rank {src} "
                                   f"next, but the step receives one on {channel!r}: the plan and the receives differ")
        else:  # nothing expected (a direct send/recv): post it now
            buffer = self._buffer(self._state(self._received, src, channel).capacity)
            work = self._irecv(buffer, src)
        if self._staged or not local_link.arrived(work):  # (the wait first lets out the sends held for a copy)
            self._wait([work], [src], channel=channel)
        tree = self._unpack(src, channel, buffer)
        self._pump(src)
        return tree

    def send(self, tree: Any, dst: int, tag: Hashable = 0) -> None:
        """Send ``tree`` to group rank ``dst`` on channel ``tag`` (a group of one send)."""
        self.exchange([(tree, dst, tag)], [])

    def recv(self, src: int, tag: Hashable = 0) -> Any:
        """Receive the next message from group rank ``src``, which must be on channel ``tag`` (a group of one)."""
        return self.exchange([], [(src, tag)])[0]

    def wait_sends(self, skip: frozenset | set = frozenset()) -> None:
        """Block until every send so far has left this rank, but those labelled with one of ``skip`` (messages whose
        receiver takes them later, in its next step)."""
        self._wait_sends(skip)

    # -- sending ----------------------------------------------------------------------------------
    @staticmethod
    def _state(table: dict, peer: int, channel: Hashable) -> wire.Channel:
        state = table.get((peer, channel))
        if state is None:
            state = table[(peer, channel)] = wire.Channel(INITIAL_CAPACITY)
        return state

    def _buffer(self, nbytes: int) -> torch.Tensor:
        pinned = self.cuda and not self.nccl  # gloo + CUDA: staged through pinned host memory
        return torch.empty(nbytes, dtype=torch.uint8, device=self.wire_device, pin_memory=pinned)

    def _pack(self, tree: Any, dst: int, channel: Hashable) -> torch.Tensor | Parts:
        leaves, layout = wire.describe(tree)
        state = self._state(self._sent, dst, channel)
        if layout == state.layout:
            body, sizes, data_len = b"", state.sizes, state.data_len
        else:
            body = wire.encode_layout(layout)
            sizes = [t.numel() * t.element_size() for t in leaves]
            data_len = sum(wire.aligned(n) for n in sizes)
        start = wire.aligned(wire.HEADER.size + len(body))
        if start + data_len <= state.capacity:
            head = wire.HEADER.pack(wire.DATA if not body else wire.LAYOUT, 0, 0, len(body), data_len) + body
            if not self.cuda and local_link.linked(self.links, state.capacity, dst):
                # through a socket: header and tensors gathered by the send itself, no buffer in between
                message: torch.Tensor | Parts = Parts(wire.message_pieces(head, leaves, sizes, start, state.capacity),
                                                      state.capacity)
            else:
                message = self._buffer(state.capacity)
                self._write(message, head, leaves, sizes, start)
        else:  # too large for the channel's messages: layout and data go on the side plane
            body = body or wire.encode_layout(layout)
            payload = self._buffer_cpu(wire.aligned(len(body)) + data_len)
            self._write(payload, body, leaves, sizes, wire.aligned(len(body)), staged=False)
            self._side_set(dst, payload)
            message = self._buffer(state.capacity)
            self._write(message, wire.HEADER.pack(wire.SIDE, 0, 0, len(body), data_len), [], [], 0)
            state.capacity = wire.aligned(wire.HEADER.size + len(body)) + data_len
        if body:  # the peer learns this layout from this message
            state.set_layout(layout, sizes)
        return message

    @staticmethod
    def _buffer_cpu(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def _write(self, message: torch.Tensor, head: bytes, leaves: list[torch.Tensor], sizes: list[int], start: int,
               staged: bool = True) -> None:
        """Header (and layout) at the start of ``message``, each tensor's bytes from ``start`` on (aligned)."""
        if message.device.type == "cpu" and not (self.cuda and leaves):
            wire.write_host(message, head, leaves, sizes, start)
            return
        head_bytes = torch.frombuffer(bytearray(head), dtype=torch.uint8) if head else None
        on_gpu = message.device.type == "cuda" or any(t.device.type == "cuda" for t in leaves)
        with self._on_comm_stream(on_gpu, "pack"):
            if head_bytes is not None:
                if message.device.type == "cuda":
                    head_bytes = head_bytes.pin_memory()
                message[: len(head)].copy_(head_bytes, non_blocking=True)
            offset = start
            for tensor, nbytes in zip(leaves, sizes):
                if nbytes:
                    if tensor.device.type == "cuda":
                        tensor.record_stream(self._comm_stream)  # its memory is not reused before the copy
                    target = message[offset: offset + nbytes].view(tensor.dtype).view(tensor.shape)
                    target.copy_(tensor.detach(), non_blocking=staged and message.device.type != tensor.device.type)
                offset += wire.aligned(nbytes)

    @contextmanager
    def _on_comm_stream(self, active: bool, what: str) -> Iterator[None]:
        """Run copies on the communication stream, after what the compute stream has queued so far."""
        if not (active and self.cuda):
            yield
            return
        compute = torch.cuda.current_stream(self.device)
        self._comm_stream.wait_stream(compute)
        with torch.cuda.stream(self._comm_stream):
            start = torch.cuda.Event(enable_timing=True) if self.timeline is not None else None
            if start is not None:
                start.record()
            yield
            if start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.timeline.append((what, start, end))

    def _side_set(self, dst: int, payload: torch.Tensor) -> None:
        store = self.board.store
        if store is None:
            raise RuntimeError("a message outgrew its channel and must go through the job's store, but this process "
                               "group has none; initialize torch.distributed with a TCP or file store")
        key = f"{self.prefix}/side/{self.rank}-{dst}/{self._side_out[dst]}"
        self._side_out[dst] += 1
        data = payload.numpy()
        for index, start in enumerate(range(0, max(1, len(data)), SIDE_CHUNK)):  # the receiver counts them alike
            store.set(f"{key}/{index}", data[start: start + SIDE_CHUNK].tobytes())

    def _issue(self, out: list[tuple[int, torch.Tensor]], into: list[tuple[int, torch.Tensor]]) -> list[dist.Work]:
        """Issue one group; return the works to wait on for the receives."""
        if self.nccl:
            ops = [dist.P2POp(dist.isend, buf, group=self.group, group_peer=dst) for dst, buf, _ in out]
            ops += [dist.P2POp(dist.irecv, buf, group=self.group, group_peer=src) for src, buf in into]
            # NCCL's stream waits for the communication stream (the packing copies), which waits for the compute
            # queued so far: a receive buffer may be memory that queued compute still reads (freed on its stream).
            self._comm_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._comm_stream):
                works = dist.batch_isend_irecv(ops)
            if out:  # the group's works cover its sends: keep their messages alive until they complete
                labels = frozenset(label for *_, label in out)
                dsts = tuple(sorted({dst for dst, _, _ in out}))
                self._pending.extend((work, tuple(buf for _, buf, _ in out), dsts, labels) for work in works)
            return works
        if self.cuda and not self.strict:  # gloo + CUDA: a send leaves once its copy to the host is done
            for dst, buf, label in out:
                event = torch.cuda.Event()
                event.record(self._comm_stream)
                self._staged.append((event, buf, dst, label))
            self._release_staged(block=False)
        else:
            if self.cuda and out:
                self._comm_stream.synchronize()
            for dst, buf, label in out:
                work = self._isend(buf, dst)
                if not local_link.sent(work):  # (a local link's send is often out at once)
                    self._pending.append((work, buf, (dst,), label))
        return [self._irecv(buf, src) for src, buf in into]

    def _isend(self, buf: torch.Tensor, dst: int) -> Any:
        return local_link.send(self.links, buf, dst, group=self.group, group_dst=dst)

    def _irecv(self, buf: torch.Tensor, src: int) -> Any:
        return local_link.receive(self.links, buf, src, group=self.group, group_src=src)

    def _release_staged(self, block: bool) -> None:
        while self._staged and (block or self._staged[0][0].query()):
            event, buf, dst, label = self._staged.popleft()
            event.synchronize()
            self._pending.append((self._isend(buf, dst), buf, (dst,), label))

    # -- receiving --------------------------------------------------------------------------------
    def _head(self, buffer: torch.Tensor, start: int, length: int) -> bytes:
        """Bytes ``start:start + length`` of a received message, on the host."""
        if buffer.device.type == "cuda":
            with torch.cuda.stream(self._read_stream):  # a stream with nothing queued: no wait for compute
                return buffer[start: start + length].cpu().numpy().tobytes()
        return bytes(memoryview(buffer.numpy())[start: start + length])

    def _unpack(self, src: int, channel: Hashable, buffer: torch.Tensor) -> Any:
        state = self._state(self._received, src, channel)
        if buffer.numel() < wire.HEADER.size:
            raise wire.WireError(f"a message from rank {src} is shorter than a header")
        head = self._head(buffer, 0, wire.HEADER.size)
        if head[0] == _ERROR:
            raise self._error_from(src, buffer)
        kind, layout_len, data_len = wire.read_header(head)
        data = buffer
        if kind == wire.SIDE:
            data = self._side_get(src, wire.aligned(layout_len) + data_len)
            if data.numel() < wire.aligned(layout_len) + data_len:
                raise wire.WireError(f"a side message from rank {src} is shorter than its header says")
            self._set_layout(state, data[:layout_len].numpy().tobytes())
            start = wire.aligned(layout_len)
            state.capacity = wire.aligned(wire.HEADER.size + layout_len) + data_len
        elif kind == wire.LAYOUT:
            if wire.HEADER.size + layout_len > buffer.numel():
                raise wire.WireError(f"a message from rank {src} says its layout is longer than the message")
            self._set_layout(state, self._head(buffer, wire.HEADER.size, layout_len))
            start = wire.aligned(wire.HEADER.size + layout_len)
        else:
            if state.layout is None:
                raise wire.WireError(f"rank {src} sent data on channel {channel!r} before any layout")
            start = wire.HEADER.size
        if state.data_len != data_len or start + data_len > data.numel():
            raise wire.WireError(f"a message from rank {src} holds {data_len} bytes of data, but its layout describes "
                                 f"{state.data_len} (in a message of {data.numel()} bytes)")
        return wire.rebuild(state.spec, self._leaves(data, start, state.places))

    def _set_layout(self, state: wire.Channel, body: bytes) -> None:
        state.set_received(*wire.decode_layout(body))

    def _leaves(self, data: torch.Tensor, start: int, places: list) -> list[torch.Tensor]:
        leaves = [data[start + offset: start + offset + nbytes].view(dtype).view(shape) if nbytes
                  else torch.empty(shape, dtype=dtype, device=data.device)
                  for offset, nbytes, dtype, shape, _ in places]
        if data.device != self.device:
            with self._on_comm_stream(self.cuda, "unpack"):
                leaves = [leaf.to(self.device, non_blocking=True) for leaf in leaves]
            if self.cuda:  # the copies ran on the communication stream; compute uses them after
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(self._comm_stream)
                for leaf in leaves:
                    leaf.record_stream(compute)
        return [wire.as_received(leaf, requires_grad) for leaf, (*_, requires_grad) in zip(leaves, places)]

    def _side_get(self, src: int, nbytes: int) -> torch.Tensor:
        """The next side message from ``src``, ``nbytes`` long (its header says so), in chunks as it was written."""
        store = self.board.store
        key = f"{self.prefix}/side/{src}-{self.rank}/{self._side_in[src]}"
        self._side_in[src] += 1
        payload = bytearray()
        for index in range(max(1, -(-nbytes // SIDE_CHUNK))):
            payload += store.get(f"{key}/{index}")
            try:
                store.delete_key(f"{key}/{index}")  # housekeeping: the chunk is read
            except (RuntimeError, dist.DistError):  # the store's host ended once its last message was out
                pass
        return torch.frombuffer(payload, dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)

    # -- failures ---------------------------------------------------------------------------------
    def _error_from(self, src: int, buffer: torch.Tensor) -> PipelineError:
        _, _, _, length, _ = wire.HEADER.unpack(self._head(buffer, 0, wire.HEADER.size))
        text = self._head(buffer, wire.HEADER.size, min(length, buffer.numel() - wire.HEADER.size))
        posted = self.board.read()  # the whole text, where the wire's copy had to be cut to the message's size
        error = posted or from_notice(text.decode("utf-8", "replace"), unknown_rank=src)
        self.failed = error
        return error

    def abort(self, error: PipelineError, owed_to: Sequence[tuple[int, Hashable]],
              expected_from: Sequence[tuple[int, Hashable]]) -> None:
        """This pipeline failed (here, or at ``error.origin_rank``): post ``error`` to the store, send an error message
        to each ``(peer, channel)`` that would otherwise wait for this rank's next message on it, post the receive a
        peer may be blocked sending on each of ``expected_from``, and give them ``error_grace_s`` to be taken.
        Never raises."""
        self.board.post(error)
        self.failed = self.failed or error
        notice = notice_text(error).encode()
        works = []
        try:
            self._release_staged(block=True)  # sends already promised go first: the error follows them on the wire
            for dst, channel in owed_to:
                size = self._state(self._sent, dst, channel).capacity
                text = notice[: size - wire.HEADER.size]
                buf = self._buffer_cpu(size)
                buf[: wire.HEADER.size + len(text)].copy_(torch.frombuffer(
                    bytearray(wire.HEADER.pack(_ERROR, 0, 0, len(text), 0) + text), dtype=torch.uint8))
                works.append(self._p2p_raw(buf.to(self.wire_device), dst, send=True))
            for src, channel in expected_from:
                buf = self._buffer(self._state(self._received, src, channel).capacity)
                works.append(self._p2p_raw(buf, src, send=False))
        except Exception:  # noqa: BLE001 - a peer's connection may be closed already; nothing left to tell it
            pass
        _wait_for_a_while([w for w in works if w is not None], self.error_grace_s)
        self._pending.clear()
        self._staged.clear()

    def _p2p_raw(self, buf: torch.Tensor, peer: int, send: bool) -> dist.Work | None:
        """One operation outside the plan. On NCCL as a batch of one: an unbatched operation would set up a
        communicator for the pair, which the peer would have to join."""
        if self.nccl:
            op = dist.P2POp(dist.isend if send else dist.irecv, buf, group=self.group, group_peer=peer)
            return dist.batch_isend_irecv([op])[0]
        return self._isend(buf, peer) if send else self._irecv(buf, peer)


def _wait_for_a_while(works: list[dist.Work], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``works`` (gloo's waits block, so in a helper thread), then give up."""
    if not works:
        return

    deadline = time.monotonic() + timeout

    def wait_all() -> None:
        for work in works:
            try:
                work.wait(timedelta(seconds=max(1e-3, deadline - time.monotonic())))
            except Exception:  # noqa: BLE001 - the peer went away, or took too long; its message no longer matters
                return

    thread = threading.Thread(target=wait_all, daemon=True)
    thread.start()
    thread.join(timeout)
