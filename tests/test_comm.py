"""Tensor trees cross ranks intact, one message each, and bytes from a peer are data, never code.

Structure, dtypes, shapes that change, gradient flags, exact non-tensor leaves; a message that outgrows its channel
goes through the side plane (the store) while the ordered wire keeps one message per transfer; a crafted message with
a pickle payload is refused without running it; a leaf that is not a JSON value is refused with its place named.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import struct
from collections import namedtuple
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_pipe.engine import wire
from lightning_pipe.engine.comm import Communicator, PipelineError
from lightning_pipe.engine.tree import tree_map_tensors
from tests.helpers import run_ranks

pytestmark = pytest.mark.timeout(120)

Pair = namedtuple("Pair", ["left", "right"])


@dataclasses.dataclass
class State:
    """A dataclass passed between the layers of an nn.Sequential (found by review: refused at the first send); a
    field the constructor does not take is made again by its __post_init__."""

    hidden: torch.Tensor
    scale: float = 1.0
    extra: Any = None
    rows: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.rows = self.hidden.shape[0]


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
        {f"t{i}": torch.full((2,), float(i)) for i in range(120)},  # a layout longer than the first message
        torch.randn(2, 3, generator=g)[:, 1],  # not contiguous
        # one-element columns (a micro-batch of one row), which count as contiguous with their stride
        (torch.randn(2, 3, generator=g)[:1, 1], torch.randn(2, 3, generator=g).to(torch.bfloat16)[:1, 1]),
        (torch.randn(3, generator=g, dtype=torch.complex64).conj(), torch.randn(2, generator=g, dtype=torch.complex64).conj().imag,
         torch.ones(3).expand(2, 3), torch.randn(2, 2, generator=g).t()),  # conjugate, negative, stride-0 views
        ("no tensors at all", 1),
        (torch.ones(2), torch.bfloat16, torch.device("cpu"), torch.Size([2, 3])),  # a dtype to compute in (review)
        State(torch.randn(2, 3, generator=g).requires_grad_(), 0.5, [torch.ones(1), {"k": None}]),
        (0.5, -0.0, float("inf"), 1e-310, True, 1, 2**70, {1: "int key", "1": "str key", None: False}),
        (0.5, -0.0, float("inf"), 1e-310, True, 1, 2**70, {1: "int key", "1": "str key", None: False}),  # unchanged
    ]


def _exchange(rank: int, world_size: int, strict: bool) -> tuple[list, int]:
    comm = Communicator(strict=strict)
    if rank == 0:
        for tree in _trees():
            comm.send(tree, dst=1, tag=0)
        comm.wait_sends()
        dist.barrier()  # rank 1 has read the side plane (the store rank 0 holds) before rank 0 ends
        return [], comm.messages_sent
    # Received tensors are views into one buffer; copy them so torch.save can send them back to the test.
    copy = lambda t: t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
    received = [tree_map_tensors(copy, comm.recv(src=0, tag=0)) for _ in _trees()]
    dist.barrier()
    return received, 0


def _assert_same(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.requires_grad == want.requires_grad
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert type(key) is type(next(k for k in got if k == key and type(k) is type(key)))
            _assert_same(got[key], want[key])
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same(a, b)
    elif isinstance(want, float):
        assert type(got) is float and (got == want or math.isnan(want) and math.isnan(got))
        assert math.copysign(1, got) == math.copysign(1, want)  # -0.0 stays -0.0
    elif dataclasses.is_dataclass(want):
        assert type(got) is type(want)
        for field in dataclasses.fields(want):
            _assert_same(getattr(got, field.name), getattr(want, field.name))
    else:
        assert type(got) is type(want) and got == want


@pytest.mark.parametrize("strict", [False, True], ids=["gloo", "strict"])
def test_trees_arrive_intact_one_message_each(strict: bool) -> None:
    (_, sent), (received, _) = run_ranks(_exchange, 2, strict)
    assert sent == len(_trees())  # layouts that outgrew the channel went through the store, not the wire
    for got, want in zip(received, _trees()):
        _assert_same(got, want)


def _growing(rank: int, world_size: int) -> list:
    comm = Communicator(strict=True)
    sizes = [3, 30_000, 100, 300_000, 5, 300_000, 400_000]
    if rank == 0:
        for i, n in enumerate(sizes):
            comm.send(torch.full((n,), float(i)), dst=1, tag=7)
        comm.wait_sends()
        dist.barrier()  # rank 1 has read the side plane (the store rank 0 holds) before rank 0 ends
        return [comm.messages_sent]
    got = []
    for _ in sizes:
        tensor = comm.recv(0, 7)
        got.append((tensor.numel(), float(tensor[0]), float(tensor[-1]), comm._received[(0, 7)].capacity))
    dist.barrier()
    return got


def test_messages_that_outgrow_the_channel_keep_one_message_each() -> None:
    """Every message on a channel is the channel's capacity (the largest so far); a larger one puts its layout and data
    in the store and both ends raise the capacity; smaller ones ride in the larger messages."""
    sent, got = run_ranks(_growing, 2)
    assert sent == [7]
    sizes = [3, 30_000, 100, 300_000, 5, 300_000, 400_000]
    assert [(n, first, last) for n, first, last, _ in got] == [(n, float(i), float(i)) for i, n in enumerate(sizes)]
    capacities = [capacity for *_, capacity in got]
    assert capacities == sorted(capacities) and capacities[0] == 4096 and capacities[-1] >= 1_600_000


def _large(rank: int, world_size: int, strict: bool) -> list:
    comm = Communicator(strict=strict)
    sizes = [2_100_000, 1_048_576, 5_000_000]  # 8.4 MB, exactly 4 MiB, 20 MB: over the store's 8 MiB per value
    if rank == 0:
        for i, n in enumerate(sizes):
            comm.send({"x": torch.arange(n, dtype=torch.float32) + i, "i": i}, dst=1, tag="big")
        comm.wait_sends()
        dist.barrier()  # the store lives in rank 0: it stays until rank 1 has read
        return []
    got = []
    for i, n in enumerate(sizes):
        tree = comm.recv(0, "big")
        got.append(bool(torch.equal(tree["x"], torch.arange(n, dtype=torch.float32) + i)) and tree["i"] == i)
    dist.barrier()
    return got


@pytest.mark.parametrize("strict", [False, True])
def test_messages_larger_than_a_store_value_go_through_the_side_plane_in_chunks(strict: bool) -> None:
    """A first or grown message of tens of MB (an activation of a real model) travels in store values of 4 MiB:
    torch's store refuses a value over 8 MiB with a closed connection."""
    assert run_ranks(_large, 2, strict)[1] == [True, True, True]


class _Boom:
    """Unpickling this creates a file: the marker that a pickle payload ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(rank: int, world_size: int, marker: str) -> list[str]:
    """Rank 0 writes raw bytes to the wire where rank 1 expects a message: pickle payloads and malformed layouts."""
    payload = pickle.dumps(_Boom(marker))
    layouts = [
        payload,  # a pickle where the layout's JSON belongs
        b'["n","os","system",[["S","echo hi"]]]',  # a "namedtuple" that is a function
        b'["n","collections","OrderedDict",[]]',  # a class that is not a namedtuple
        b'["c","os","system",[]]',  # a "dataclass" that is a function
        b'["T","int64",[2],true]',  # a gradient for an integer tensor
        b'["T","float32",[2],false]',  # a layout whose data length does not match
    ]
    data_lengths = [0, 0, 0, 0, 16, 64]
    if rank == 0:
        messages = []
        for layout, data_len in zip(layouts, data_lengths):
            message = bytearray(4096)
            head = wire.HEADER.pack(wire.LAYOUT, 0, 0, len(layout), data_len) + layout
            message[: len(head)] = head
            messages.append(message)
        message = bytearray(4096)
        message[:16] = wire.HEADER.pack(wire.DATA, 0, 0, 0, 16)  # data before any layout
        messages.append(message)
        message = bytearray(message)
        message[:16] = struct.pack("<BBHIQ", 9, 0, 0, 0, 0)  # a kind that does not exist
        messages.append(message)
        for message in messages:  # through the communicator's own wire (a Unix socket, or gloo), past its checks
            Communicator()._p2p_raw(torch.frombuffer(message, dtype=torch.uint8), 1, send=True).wait()
        return []
    errors = []
    for channel in range(len(layouts) + 2):
        comm = Communicator()  # fresh channels: each message is the channel's first
        try:
            comm.recv(0, channel)
            errors.append("accepted")
        except wire.WireError as error:
            errors.append(str(error))
    return errors


def test_a_crafted_message_is_refused_without_running_it(tmp_path) -> None:
    marker = tmp_path / "pickle_ran"
    errors = run_ranks(_crafted, 2, str(marker))[1]
    assert not os.path.exists(marker), "a pickle payload from a peer was executed"
    assert "not valid JSON" in errors[0]
    assert "cannot rebuild namedtuple os.system" in errors[1]
    assert "cannot rebuild namedtuple collections.OrderedDict" in errors[2]
    assert "cannot rebuild dataclass os.system" in errors[3]
    assert "gradient of a torch.int64 tensor" in errors[4]
    assert "holds 64 bytes of data, but its layout describes 16" in errors[5]
    assert "before any layout" in errors[6]
    assert "kind 9" in errors[7]


def test_a_leaf_that_is_not_a_json_value_is_refused_by_name() -> None:
    tree = (torch.ones(2), {"scale": 0.5, "config": object()})
    with pytest.raises(wire.WireError, match=r"cannot send tree\[1\]\['config'\], a builtins.object: only tensors, "
                                             r"JSON values"):
        wire.describe(tree)
    with pytest.raises(wire.WireError, match=r"tree\.right, a builtins.bytes"):
        wire.describe(Pair(torch.ones(1), b"raw"))
    with pytest.raises(wire.WireError, match=r"tree key \(1, 2\)"):
        wire.describe({(1, 2): torch.ones(1)})


def test_layouts_round_trip_exactly_without_pickle() -> None:
    tree = Pair((torch.ones(2, 3, dtype=torch.bfloat16).requires_grad_(), [None, True, 7, "s"]),
                {"f": -0.0, "n": float("nan"), 3: 1e-310})
    leaves, layout = wire.describe(tree)
    decoded, spec, tensors = wire.decode_layout(wire.encode_layout(layout))
    assert decoded == layout  # what the sender compares: equal layouts mean the same tree
    assert tensors == [(torch.bfloat16, (2, 3), True)]
    rebuilt = wire.rebuild(spec, leaves)
    assert type(rebuilt) is Pair and rebuilt.left[1] == [None, True, 7, "s"] and type(rebuilt.left[1][1]) is bool
    assert math.copysign(1, rebuilt.right["f"]) == -1 and math.isnan(rebuilt.right["n"])
    assert rebuilt.right[3] == 1e-310
    assert wire.describe((1,))[1] != wire.describe((True,))[1] != wire.describe((1.0,))[1]  # types stay apart


def _error_on_the_wire(rank: int, world_size: int) -> str:
    comm = Communicator()
    if rank == 0:
        comm.send(torch.ones(3), dst=1, tag="F")
        comm.abort(PipelineError("rank 0 failed in 0F1: ValueError: boom", 0), owed_to=[(1, "F")], expected_from=[])
        return ""
    comm.recv(0, "F")
    try:
        comm.recv(0, "F")
    except PipelineError as error:
        return f"{error.origin_rank}: {error}"
    return "no error"


def test_an_error_message_ends_the_receiver_with_the_senders_error() -> None:
    assert run_ranks(_error_on_the_wire, 2)[1] == "0: rank 0 failed in 0F1: ValueError: boom"


def test_a_message_gathered_in_pieces_is_byte_for_byte_the_written_one() -> None:
    """The socket path sends a message as pieces (header, tensors where they lie, zeros): the same bytes the buffer
    path writes, for every kind of tensor the trees above hold."""
    for tree in _trees():
        leaves, layout = wire.describe(tree)
        sizes = [t.numel() * t.element_size() for t in leaves]
        body = wire.encode_layout(layout)
        start = wire.aligned(wire.HEADER.size + len(body))
        total = start + sum(wire.aligned(n) for n in sizes) + 48
        head = wire.HEADER.pack(wire.LAYOUT, 0, 0, len(body), total - start - 48) + body
        written = torch.zeros(total, dtype=torch.uint8)  # (the buffer path leaves its padding as it was)
        wire.write_host(written, head, leaves, sizes, start)
        pieces = wire.message_pieces(head, leaves, sizes, start, total)
        gathered = b"".join(bytes(piece) for piece in pieces)
        assert len(gathered) == total
        assert gathered == bytes(written.numpy()), layout
