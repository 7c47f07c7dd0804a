"""Point-to-point transfer of tensor trees between pipeline ranks, with their shapes, dtypes and errors.

A transfer is one message: a small prefix (kind, length of the metadata), the pickled metadata (the tree's
structure, each tensor's shape, dtype and requires-grad flag, and any non-tensor leaves), then all tensors'
bytes. Every message costs a fixed ~0.2-1 ms on gloo (more when ranks share cores), so one message per
transfer matters more than the copy that packing takes.

The receiver cannot know a message's size before it arrives, but gloo accepts a message smaller than the
buffer posted for it. Both ends therefore track each channel's *capacity*, the largest message seen on it:
a message that fits is sent as is into a buffer of that capacity; a larger one is announced first by a
prefix-only message giving its size, after which both ends raise the capacity. NCCL requires exact sizes, so
there every message is announced (two messages). Receives can be posted ahead (:meth:`post_recv`), so a
message whose receiver is not yet waiting still moves at once.

A message can instead carry an error: a failing rank sends one on every channel it writes to, so a
neighbour waiting on it raises that error and passes it on, and no rank is left blocked on a receive.
"""

from __future__ import annotations

import pickle
import struct
import time
from typing import Any

import torch
import torch.distributed as dist

from .tree import tree_flatten, tree_unflatten

__all__ = ["PipelineError", "Communicator"]

_PREFIX = struct.Struct("<BxxxQ")  # kind, 3 pad bytes, length of the metadata (or of the announced message)
_ALIGN = 16  # tensors start at multiples of this, so their bytes can be viewed as any dtype
_DATA, _ERROR, _ANNOUNCE = 0, 1, 2
_INITIAL_CAPACITY = 4096


class PipelineError(RuntimeError):
    """A rank of the pipeline failed; the message names the rank and carries its error and traceback."""

    def __init__(self, message: str, origin_rank: int) -> None:
        super().__init__(message)
        self.origin_rank = origin_rank


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


class Communicator:
    """Sends and receives tensor trees to and from other ranks of one process group.

    ``device`` is where received tensors are placed. gloo moves CPU tensors; NCCL moves CUDA tensors.
    Messages on one channel ``(peer, tag)`` arrive in the order they were sent.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.device = torch.device(device)
        nccl = dist.get_backend(self.group) == "nccl"
        # NCCL moves only CUDA tensors; gloo moves CPU tensors (its point-to-point ops take no CUDA tensors).
        self.wire_device = self.device if nccl else torch.device("cpu")
        self.exact_sizes = nccl
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self._capacity: dict[tuple[str, int, int], int] = {}  # ("send"/"recv", peer, tag) -> bytes
        self._posted: dict[tuple[int, int], tuple[dist.Work, torch.Tensor] | None] = {}

    # -- sending ----------------------------------------------------------------------------------
    def send(self, tree: Any, dst: int, tag: int) -> None:
        """Send ``tree`` to group rank ``dst`` on channel ``tag`` without waiting for it to arrive.

        The tensors are copied into the message, so they may be changed as soon as this returns.
        """
        leaves, spec = tree_flatten(tree)
        metas = [(tuple(t.shape), t.dtype, t.requires_grad) for t in leaves]
        meta = pickle.dumps((spec, metas), protocol=pickle.HIGHEST_PROTOCOL)
        start = _aligned(_PREFIX.size + len(meta))
        sizes = [t.numel() * t.element_size() for t in leaves]
        message = torch.empty(start + sum(_aligned(n) for n in sizes), dtype=torch.uint8, device=self.wire_device)
        self._write_head(message, _DATA, meta)
        offset = start
        for tensor, nbytes in zip(leaves, sizes):
            if nbytes:
                message[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
            offset += _aligned(nbytes)
        self._send_message(message, dst, tag)

    def send_error(self, message: str, origin_rank: int, dst: int, tag: int) -> None:
        """Tell ``dst`` that ``origin_rank`` failed; never blocks (``dst`` may already be gone)."""
        body = pickle.dumps((message, origin_rank), protocol=pickle.HIGHEST_PROTOCOL)
        buffer = torch.empty(_PREFIX.size + len(body), dtype=torch.uint8, device=self.wire_device)
        self._write_head(buffer, _ERROR, body)
        try:
            self._send_message(buffer, dst, tag)
        except Exception:  # noqa: BLE001 - the peer's connection may be closed already; nothing left to tell it
            pass

    def _write_head(self, message: torch.Tensor, kind: int, body: bytes) -> None:
        head = bytearray(_PREFIX.pack(kind, len(body))) + body
        message[: len(head)].copy_(torch.frombuffer(head, dtype=torch.uint8))

    def _send_message(self, message: torch.Tensor, dst: int, tag: int) -> None:
        size = message.numel()
        key = ("send", dst, tag)
        if self.exact_sizes or size > self._capacity.get(key, _INITIAL_CAPACITY):
            announce = torch.frombuffer(bytearray(_PREFIX.pack(_ANNOUNCE, size)), dtype=torch.uint8)
            self._isend(announce.to(self.wire_device), dst, tag)
            self._capacity[key] = max(size, self._capacity.get(key, _INITIAL_CAPACITY))
        self._isend(message, dst, tag)

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        work = dist.isend(tensor, group_dst=dst, group=self.group, tag=tag)
        self._pending.append((work, tensor))  # keep the buffer alive until the send completes
        if len(self._pending) > 32:
            self._pending = [(w, buf) for w, buf in self._pending if not w.is_completed()]

    def drain(self, timeout: float) -> None:
        """Give unfinished sends (an error notice above all) up to ``timeout`` seconds to leave, then drop them.

        gloo moves a message only once the receiver has posted its receive, so a rank that exits right after
        announcing its error would cut the notice off mid-way; a peer that never reads it costs the timeout.
        """
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            try:
                self._pending = [(work, buf) for work, buf in self._pending if not work.is_completed()]
            except RuntimeError:  # the peer is gone; its sends will never complete
                break
            time.sleep(0.01)
        self._pending.clear()

    def wait_sends(self) -> None:
        """Block until every send so far has left this rank."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    # -- receiving --------------------------------------------------------------------------------
    def post_recv(self, src: int, tag: int) -> None:
        """Post the receive of the next message on channel ``(src, tag)`` now, so it moves as soon as it is
        sent; :meth:`recv` then waits for it. At most one receive is posted ahead per channel: a message larger
        than the capacity arrives announced, and a second buffer posted at the old capacity could not take it.
        """
        if self._posted.get((src, tag)):
            return
        size = _PREFIX.size if self.exact_sizes else self._capacity.get(("recv", src, tag), _INITIAL_CAPACITY)
        buffer = torch.empty(size, dtype=torch.uint8, device=self.wire_device)
        work = dist.irecv(buffer, group_src=src, group=self.group, tag=tag)
        self._posted[(src, tag)] = (work, buffer)

    def recv(self, src: int, tag: int) -> Any:
        """Receive the next tree sent by group rank ``src`` on channel ``tag``; tensors land on ``device``.

        Raises :class:`PipelineError` if ``src`` (or a rank behind it) failed instead of sending.
        """
        message = self._next_message(src, tag)
        kind, length = _PREFIX.unpack(message[: _PREFIX.size].cpu().numpy().tobytes())
        body = pickle.loads(message[_PREFIX.size : _PREFIX.size + length].cpu().numpy().tobytes())
        if kind == _ERROR:
            error_message, origin_rank = body
            raise PipelineError(error_message, origin_rank)
        spec, metas = body
        offset = _aligned(_PREFIX.size + length)
        leaves = []
        for shape, dtype, requires_grad in metas:
            nbytes = _numel(shape) * dtype.itemsize
            view = message[offset : offset + nbytes].view(dtype).view(shape).detach()
            if view.device != self.device:
                view = view.to(self.device)
            leaves.append(view.requires_grad_() if requires_grad else view)
            offset += _aligned(nbytes)
        return tree_unflatten(leaves, spec)

    def _next_message(self, src: int, tag: int) -> torch.Tensor:
        self.post_recv(src, tag)  # a no-op if it was posted ahead
        work, buffer = self._posted.pop((src, tag))
        self._wait(work, src)
        kind, size = _PREFIX.unpack(buffer[: _PREFIX.size].cpu().numpy().tobytes())
        if kind != _ANNOUNCE:
            return buffer
        # A larger message follows, announced with its size: from now on the channel's buffers are that large.
        self._capacity[("recv", src, tag)] = max(size, self._capacity.get(("recv", src, tag), _INITIAL_CAPACITY))
        buffer = torch.empty(size, dtype=torch.uint8, device=self.wire_device)
        self._wait(dist.irecv(buffer, group_src=src, group=self.group, tag=tag), src)
        return buffer

    def _wait(self, work: dist.Work, src: int) -> None:
        try:
            work.wait()
        except RuntimeError as error:
            raise PipelineError(
                f"rank {self.rank} lost its connection to rank {src} while receiving ({error}); "
                f"rank {src} probably failed or was killed: see its output",
                origin_rank=src,
            ) from error


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
