"""The local launcher: the port it keeps for its store (no other process of the machine is given it, while a store can
bind it), and what it says of a rank that hangs."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from lightning_pipe.engine.launch import RankError, free_port, reserved_port, run_ranks


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


def _stuck_in_a_named_place(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)


@pytest.mark.timeout(120)
def test_a_rank_that_hangs_is_named_with_where_it_is() -> None:
    """The timeout's error carries the hung rank's stack (every thread's), so an intermittent hang can be read from
    the one run that showed it; the rank that ended is not dumped."""
    with pytest.raises(RankError) as caught:
        run_ranks(_stuck_in_a_named_place, 2, timeout=15)
    text = str(caught.value)
    assert "ranks [1] did not finish" in text and "rank 0: ok" in text
    assert "--- where rank 1 is ---" in text and "_stuck_in_a_named_place" in text
    assert "where rank 0 is" not in text
