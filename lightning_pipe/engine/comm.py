"""Point-to-point transfer of tensor trees between pipeline ranks, with their shapes, dtypes and errors.

Every transfer is two messages on one channel: a fixed-size header (the pickled tree structure, each
tensor's shape, dtype and requires-grad flag, and any non-tensor leaves), then one flat byte payload holding
all tensors. Two messages whatever the tree, because each message costs a fixed ~0.1-0.3 ms on gloo; the
header lets shapes change from one micro-batch or batch to the next. A header can instead carry an error:
a failing rank sends one on every channel it writes to, so a neighbour waiting on it raises that error and
passes it on, and no rank is left blocked on a receive.
"""

from __future__ import annotations

import math
import pickle
import struct
import time
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.engine.tree import tree_flatten, tree_unflatten

__all__ = ["PipelineError", "Communicator", "HEADER_BYTES"]

HEADER_BYTES = 1024  # pickled metadata of a few dozen tensors fits; a larger header follows in a 3rd message
_ALIGN = 16  # every tensor starts at a multiple of this in the payload, so its bytes can be viewed as its dtype
_DATA, _ERROR, _LONG = 0, 1, 2


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
    Sends are asynchronous: the tensors sent must not be modified in place until :meth:`wait_sends`.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu") -> None:
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.device = torch.device(device)
        backend = dist.get_backend(self.group)
        # NCCL moves only CUDA tensors; gloo moves CPU tensors (its point-to-point ops take no CUDA tensors).
        self.wire_device = self.device if backend == "nccl" else torch.device("cpu")
        self._pending: list[tuple[dist.Work, Any]] = []

    # -- sending ----------------------------------------------------------------------------------
    def send(self, tree: Any, dst: int, tag: int) -> None:
        """Send ``tree`` to group rank ``dst`` on channel ``tag`` without waiting for it to arrive."""
        leaves, spec = tree_flatten(tree)
        metas = [(tuple(t.shape), t.dtype, t.requires_grad) for t in leaves]
        self._send_header((_DATA, spec, metas), dst, tag)
        if any(t.numel() for t in leaves):
            self._isend(self._pack(leaves), dst, tag)
        self._prune()

    def send_error(self, message: str, origin_rank: int, dst: int, tag: int) -> None:
        """Tell ``dst`` that ``origin_rank`` failed; never blocks (``dst`` may already be gone)."""
        try:
            self._send_header((_ERROR, message, origin_rank), dst, tag)
        except Exception:  # noqa: BLE001 - the peer's connection may be closed already; nothing left to tell it
            pass

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
        """Block until every send so far has left this rank (its buffers may then be reused)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _send_header(self, content: tuple, dst: int, tag: int) -> None:
        data = pickle.dumps(content, protocol=pickle.HIGHEST_PROTOCOL)
        header = bytearray(HEADER_BYTES)
        if len(data) + 5 <= HEADER_BYTES:
            header[:5] = struct.pack("<BI", content[0], len(data))
            header[5 : 5 + len(data)] = data
            self._isend(self._from_bytes(header), dst, tag)
        else:  # rare: a tree with very many leaves; say how long the real header is, then send it
            header[:5] = struct.pack("<BI", _LONG, len(data))
            self._isend(self._from_bytes(header), dst, tag)
            self._isend(self._from_bytes(bytearray(data)), dst, tag)

    def _from_bytes(self, data: bytearray) -> torch.Tensor:
        return torch.frombuffer(data, dtype=torch.uint8).to(self.wire_device)

    def _pack(self, leaves: list[torch.Tensor]) -> torch.Tensor:
        if len(leaves) == 1:  # no copy for the common case of one contiguous tensor
            return leaves[0].detach().to(self.wire_device).contiguous().reshape(-1).view(torch.uint8)
        total = sum(_aligned(t.numel() * t.element_size()) for t in leaves)
        payload = torch.empty(total, dtype=torch.uint8, device=self.wire_device)
        offset = 0
        for tensor in leaves:
            nbytes = tensor.numel() * tensor.element_size()
            payload[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor.detach())
            offset += _aligned(nbytes)
        return payload

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        work = dist.isend(tensor, group_dst=dst, group=self.group, tag=tag)
        self._pending.append((work, tensor))  # keep the buffer alive until the send completes

    def _prune(self) -> None:
        if len(self._pending) > 16:
            self._pending = [(work, buf) for work, buf in self._pending if not work.is_completed()]

    # -- receiving --------------------------------------------------------------------------------
    def recv(self, src: int, tag: int) -> Any:
        """Receive the next tree sent by group rank ``src`` on channel ``tag``; tensors land on ``device``.

        Raises :class:`PipelineError` if ``src`` (or a rank behind it) failed instead of sending.
        """
        content = self._recv_header(src, tag)
        if content[0] == _ERROR:
            _, message, origin_rank = content
            raise PipelineError(message, origin_rank)
        _, spec, metas = content
        if not metas:
            return tree_unflatten([], spec)
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype, _ in metas]
        if len(metas) == 1 or not any(sizes):
            buffers = [torch.empty(shape, dtype=dtype, device=self.wire_device) for shape, dtype, _ in metas]
            if any(sizes):
                self._recv_into(buffers[0].view(-1).view(torch.uint8), src, tag)
            return tree_unflatten([self._finish(b, meta[2]) for b, meta in zip(buffers, metas)], spec)
        payload = torch.empty(sum(_aligned(n) for n in sizes), dtype=torch.uint8, device=self.wire_device)
        self._recv_into(payload, src, tag)
        leaves, offset = [], 0
        for (shape, dtype, requires_grad), nbytes in zip(metas, sizes):
            view = payload[offset : offset + nbytes].view(dtype).view(shape)
            leaves.append(self._finish(view.detach(), requires_grad))
            offset += _aligned(nbytes)
        return tree_unflatten(leaves, spec)

    def _finish(self, tensor: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        if tensor.device != self.device:
            tensor = tensor.to(self.device)
        return tensor.requires_grad_(requires_grad) if requires_grad else tensor

    def _recv_header(self, src: int, tag: int) -> tuple:
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=self.wire_device)
        self._recv_into(header, src, tag)
        raw = header.cpu().numpy().tobytes()
        kind, length = struct.unpack_from("<BI", raw)
        if kind == _LONG:
            body = torch.empty(length, dtype=torch.uint8, device=self.wire_device)
            self._recv_into(body, src, tag)
            return pickle.loads(body.cpu().numpy().tobytes())
        return pickle.loads(raw[5 : 5 + length])

    def _recv_into(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        try:
            dist.irecv(tensor, group_src=src, group=self.group, tag=tag).wait()
        except RuntimeError as error:
            raise PipelineError(
                f"rank {self.rank} lost its connection to rank {src} while receiving ({error}); "
                f"rank {src} probably failed or was killed: see its output",
                origin_rank=src,
            ) from error
