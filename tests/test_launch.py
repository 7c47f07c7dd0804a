"""The port a launch keeps for its store: no other process of the machine is given it, while a store can bind it."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

from lightning_pipe.engine.launch import free_port, reserved_port


def test_a_reserved_port_is_given_to_no_one_else_but_a_store_can_serve_on_it() -> None:
    with reserved_port() as port:
        assert port not in {free_port() for _ in range(2000)}  # bind(("", 0)) anywhere skips it
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        for use_libuv in (True, False):  # torchrun's agent store, init_method="tcp://..."
            store = dist.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=10), use_libuv=use_libuv)
            store.set("key", "value")
            assert store.get("key") == b"value"
            del store
