"""Tensor trees cross ranks intact: structure, dtypes, shapes that change, gradient flags, long headers."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from lightning_pipe.engine.comm import Communicator
from lightning_pipe.engine.tree import tree_map_tensors
from tests.helpers import run_ranks

pytestmark = pytest.mark.timeout(120)

Pair = namedtuple("Pair", ["left", "right"])


def _trees() -> list:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=g),
        (torch.randn(2, 5, generator=g).requires_grad_(), torch.arange(7), "label", 3.5, None),
        {"h": torch.randn(4, 2, generator=g).to(torch.bfloat16), "mask": torch.rand(4, generator=g) > 0.5,
         "nested": [torch.randn(1, generator=g).to(torch.float16), {"c": torch.randn(2, generator=g,
                                                                                     dtype=torch.complex64)}]},
        torch.randn(6, 1, generator=g),  # same channel, another shape
        Pair(torch.zeros(0, 3), torch.tensor(2.0, dtype=torch.float64)),  # empty and 0-dim tensors
        {f"t{i}": torch.full((2,), float(i)) for i in range(120)},  # header longer than one header message
        torch.randn(2, 3, generator=g)[:, 1],  # not contiguous
        ("no tensors at all", 1),
    ]


def _exchange(rank: int, world_size: int) -> list:
    comm = Communicator()
    if rank == 0:
        for tree in _trees():
            comm.send(tree, dst=1, tag=0)
        comm.wait_sends()
        return []
    # Received tensors are views into one buffer; copy them so torch.save can send them back to the test.
    copy = lambda t: t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
    return [tree_map_tensors(copy, comm.recv(src=0, tag=0)) for _ in _trees()]


def _assert_same(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.requires_grad == want.requires_grad
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            _assert_same(got[key], want[key])
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same(a, b)
    else:
        assert got == want


def test_trees_arrive_intact() -> None:
    received = run_ranks(_exchange, 2)[1]
    for got, want in zip(received, _trees()):
        _assert_same(got, want)


def _growing(rank: int, world_size: int) -> list:
    comm = Communicator()
    sizes = [3, 30_000, 100, 300_000, 5, 300_000, 400_000]
    if rank == 0:
        for i, n in enumerate(sizes):
            comm.send(torch.full((n,), float(i)), dst=1, tag=7)
        comm.wait_sends()
        return []
    got = []
    for _ in sizes:
        comm.post_recv(0, 7)  # posted ahead, at the capacity known so far; larger messages arrive announced
        tensor = comm.recv(0, 7)
        got.append((tensor.numel(), float(tensor[0])))
    return got


def test_messages_larger_than_the_channel_capacity_are_announced() -> None:
    assert run_ranks(_growing, 2)[1] == [(3, 0.0), (30_000, 1.0), (100, 2.0), (300_000, 3.0), (5, 4.0),
                                         (300_000, 5.0), (400_000, 6.0)]
