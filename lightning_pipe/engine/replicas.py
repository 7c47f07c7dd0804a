"""Replicas of a stage combine their gradients, bucket by bucket as the last backward ends: replicas of whole pipelines
(the mesh's data group) average them, replicas inside one pipeline (round-robin micro-batches) sum them.

Like DDP's reducer, parameters are grouped into buckets of about ``bucket_bytes`` in reverse order (a backward
finishes the last layers first). A parameter's gradient is final once it has been accumulated once per micro-batch
of the step; when every parameter of the next bucket in order is final, that bucket's all-reduce starts
(``torch.distributed.all_reduce(async_op=True)``), overlapping the rest of this stage's last backward and the
backwards still running on the other stages. Buckets always start in the same order on every replica, as
collectives require. What a step leaves unstarted (a parameter that got no gradient, or one written directly rather
than accumulated, as the first weight pass of a zero-bubble schedule does) goes at the end, in order.

A bucket of several gradients is reduced as one flat copy; a bucket of one large float32 gradient in place. Each
bucket also reduces one flag per parameter, "has a gradient", so that a parameter only some replicas computed a
gradient for gets the average on every replica (``None`` only where no replica had one): replicas stay equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["GradientAverager", "broadcast_state"]

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


class _Bucket:
    """Parameters reduced together, and the buffers and requests of the current step."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.buffer: torch.Tensor | None = None  # the flat gradients (or the one gradient itself, reduced in place)
        self.flags: torch.Tensor | None = None  # per parameter: replicas that had a gradient for it
        self.works: list[dist.Work] = []


class GradientAverager:
    """Averages the gradients of ``parameters`` over ``group`` (the replicas of this rank's stages) each step; with
    ``average=False`` sums them (replicas that each ran some of one batch's micro-batches)."""

    def __init__(self, parameters: Iterable[nn.Parameter], group: dist.ProcessGroup,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, average: bool = True) -> None:
        self.group = group
        self.average = average
        self.size = dist.get_world_size(group) if average else 1
        params = [p for p in dict.fromkeys(parameters) if p.requires_grad]  # each once, in order
        self.buckets: list[_Bucket] = []
        current: list[nn.Parameter] = []
        filled = 0
        for param in reversed(params):
            current.append(param)
            filled += param.numel() * param.element_size()
            if filled >= bucket_bytes:
                self.buckets.append(_Bucket(current))
                current, filled = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self._bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket.params}
        self._accumulations: dict[int, int] = {}
        self._final_in_bucket = [0] * len(self.buckets)
        self._next = 0  # the next bucket to start
        self._expected = 0  # accumulations that make a gradient final; 0 outside a step
        self._handles = [p.register_post_accumulate_grad_hook(self._accumulated) for p in params]
        self.params = params

    @contextmanager
    def averaging(self, num_microbatches: int) -> Iterator[None]:
        """Inside, a pipeline step accumulates gradients, ``num_microbatches`` times into each parameter on this rank;
        on leaving (normally), every gradient is the average (or sum) over the replicas.

        Summing replicas hold different shares of the step, and gradients already there (accumulated by earlier
        steps) are the same on all of them: those are set aside during the step and added back after the sum, so
        they count once. ``averaging(0)`` averages the gradients there now (no step inside).
        """
        self._accumulations = {}
        self._final_in_bucket = [0] * len(self.buckets)
        self._next = 0
        self._expected = num_microbatches
        earlier = {}
        if not self.average:
            earlier = {p: p.grad for p in self.params if p.grad is not None}
            for p in earlier:
                p.grad = None
        try:
            yield
        except BaseException:
            # Another replica may never match what was started (a failed pipeline ends the job, through the
            # launcher or the process group's timeout, as under DDP): drop the requests rather than wait.
            for bucket in self.buckets:
                bucket.works, bucket.buffer, bucket.flags = [], None, None
            _add_back(earlier)
            raise
        finally:
            self._expected = 0
        self.start_remaining()
        for bucket in self.buckets:
            for work in bucket.works:
                work.wait()
            self._write_back(bucket)
            bucket.works, bucket.buffer, bucket.flags = [], None, None
        _add_back(earlier)

    def start_remaining(self) -> None:
        """Start every bucket not started yet, in order (once the step's backwards are done on this rank)."""
        while self._next < len(self.buckets):
            self._start(self._next)
            self._next += 1

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- inside the step ----------------------------------------------------------------------------
    def _accumulated(self, param: torch.Tensor) -> None:
        if not self._expected:
            return
        key = id(param)
        count = self._accumulations.get(key, 0) + 1
        self._accumulations[key] = count
        if count != self._expected:
            return
        index = self._bucket_of[key]
        self._final_in_bucket[index] += 1
        while (self._next < len(self.buckets)
               and self._final_in_bucket[self._next] == len(self.buckets[self._next].params)):
            self._start(self._next)
            self._next += 1

    def _start(self, index: int) -> None:
        bucket = self.buckets[index]
        grads = [param.grad for param in bucket.params]
        device = bucket.params[0].device
        bucket.flags = torch.tensor([0.0 if g is None else 1.0 for g in grads], dtype=torch.float32, device=device)
        only = grads[0] if len(grads) == 1 else None
        if only is not None and only.dtype == torch.float32 and only.is_contiguous():
            bucket.buffer = only.detach()  # a bucket of one large parameter: reduced in place, no copies
        else:
            bucket.buffer = torch.cat([g.detach().reshape(-1).float() if g is not None
                                       else torch.zeros(p.numel(), dtype=torch.float32, device=device)
                                       for p, g in zip(bucket.params, grads)])
        bucket.works = [dist.all_reduce(bucket.buffer, group=self.group, async_op=True),
                        dist.all_reduce(bucket.flags, group=self.group, async_op=True)]

    @torch.no_grad()
    def _write_back(self, bucket: _Bucket) -> None:
        assert bucket.buffer is not None and bucket.flags is not None
        buffer = bucket.buffer.div_(self.size)
        offset = 0
        for param, flag in zip(bucket.params, bucket.flags.tolist()):
            n = param.numel()
            if flag > 0:  # some replica had a gradient: every replica takes the average
                average = buffer[offset:offset + n].view_as(param)
                if param.grad is None:
                    param.grad = average.to(param.dtype, copy=True)
                elif param.grad.data_ptr() != average.data_ptr():
                    param.grad.copy_(average)
            offset += n


@torch.no_grad()
def _add_back(earlier: dict[nn.Parameter, torch.Tensor]) -> None:
    for param, grad in earlier.items():
        param.grad = grad if param.grad is None else grad.add_(param.grad)


@torch.no_grad()
def broadcast_state(modules: Iterable[nn.Module], group: dist.ProcessGroup) -> None:
    """Give every replica in ``group`` the parameters and buffers of the group's first rank (collective), as DDP does
    at construction: replicas built with different random weights would otherwise train apart, silently."""
    source = dist.get_global_rank(group, 0)
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=source, group=group)
