"""The gloo transport's fast path between ranks of one machine (engine/local_link.py): Unix sockets that behave as
gloo's isend/irecv for the communicator, with gloo kept for pairs on other machines and when turned off."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from lightning_pipe.engine import local_link, socket_ends
from lightning_pipe.engine.comm import Communicator, PipelineError
from tests.helpers import run_ranks

pytestmark = pytest.mark.timeout(180)


def _exchange_large(rank: int, world_size: int) -> dict:
    """Both ranks send each other 8 MB before either receives: the sockets' buffers take a fraction of it, so the
    rest must go on while the sender goes on to its receive (gloo's isend never blocks either)."""
    local_link.MAX_BYTES = 64 << 20  # this rank's process only: large messages through the sockets too
    comm = Communicator()
    peer = 1 - rank
    mine = torch.arange(2_000_000, dtype=torch.float32) + rank
    comm.exchange([((mine, {"step": 3}), peer, "F")], [(peer, "F")])  # the channel's first: on the side plane
    trees = comm.exchange([((mine, {"step": 3}), peer, "F")], [(peer, "F")])  # 8 MB on the wire
    small = comm.exchange([(torch.full((3,), float(rank)), peer, "B")], [(peer, "B")])
    comm.wait_sends()
    got, meta = trees[0]
    threaded = comm.links._senders[peer].thread is not None  # the part the kernel did not take at once
    local_link.MAX_BYTES = 256 << 10
    import torch.distributed as dist

    through_gloo: list[int] = []
    isend = dist.isend
    dist.isend = lambda buf, **options: through_gloo.append(buf.numel()) or isend(buf, **options)
    sized = Communicator()  # a message over MAX_BYTES keeps gloo, a small one takes the socket
    sized.exchange([(mine, peer, "F")], [(peer, "F")])  # side plane; its header through the socket
    large = sized.exchange([(mine, peer, "F")], [(peer, "F")])[0]
    sized.exchange([(torch.ones(2), peer, "B")], [(peer, "B")])
    _done(sized)
    return {"local": comm.links.local(peer), "equal": torch.equal(got, mine - rank + peer), "meta": meta,
            "small": small[0].tolist(), "messages": comm.messages_sent, "threaded": threaded,
            "large_equal": torch.equal(large, got), "through_gloo": through_gloo}


def _done(comm: Communicator) -> None:
    """Every send out and taken before the ranks end (a process that ends with a gloo send in flight resets it)."""
    import torch.distributed as dist

    comm.wait_sends()
    dist.barrier()


def test_ranks_of_one_machine_exchange_through_unix_sockets() -> None:
    results = run_ranks(_exchange_large, 2)
    for result, peer in zip(results, (1, 0)):
        assert result["local"], "the fast path was not taken between two ranks of this machine"
        assert result["equal"] and result["meta"] == {"step": 3}
        assert result["small"] == [float(peer)] * 3
        assert result["messages"] == 3
        assert result["large_equal"]
        assert len(result["through_gloo"]) == 1 and result["through_gloo"][0] > 8_000_000
    # The rank that sends while its peer is not reading yet fills the socket's buffer; the other may find its peer
    # already reading (after its own send), which drains its 8 MB as fast as it is written.
    assert any(result["threaded"] for result in results), "8 MB went out at once: the test no longer fills a buffer"


def _off(rank: int, world_size: int) -> dict:
    comm = Communicator()
    got = comm.exchange([(torch.ones(4) * rank, 1 - rank, "F")], [(1 - rank, "F")])[0]
    _done(comm)
    return {"links": comm.links is not None, "got": got.tolist(),
            "spin": comm.links.spin if comm.links is not None else None}


def test_the_fast_path_can_be_turned_off_and_is_off_in_strict_mode() -> None:
    for env in ({local_link.LOCAL_ENV: "0"}, {"LIGHTNING_PIPE_STRICT_P2P": "1"}):
        results = run_ranks(_off, 2, env=env)
        assert [r["links"] for r in results] == [False, False], env
        assert results[0]["got"] == [1.0] * 4 and results[1]["got"] == [0.0] * 4


def _one_rank_off(rank: int, world_size: int) -> dict:
    """Rank 1 alone turns the fast path off: it says so in the store, and rank 0 keeps gloo with it."""
    if rank == 1:
        os.environ[local_link.LOCAL_ENV] = "0"
    comm = Communicator()
    got = comm.exchange([(torch.full((3,), float(rank)), 1 - rank, "F")], [(1 - rank, "F")])[0]
    _done(comm)
    return {"links": comm.links is not None and comm.links.local(1 - rank), "got": got.tolist()}


def test_a_rank_with_the_fast_path_off_and_one_with_it_on_still_talk() -> None:
    results = run_ranks(_one_rank_off, 2, timeout=60)
    assert [r["links"] for r in results] == [False, False]
    assert results[0]["got"] == [1.0] * 3 and results[1]["got"] == [0.0] * 3


def _other_machines(rank: int, world_size: int) -> dict:
    """Ranks 0 and 1 share a "machine", rank 2 is on another: its pairs go through gloo, the others through sockets."""
    if rank == 2:
        local_link.machine_identity = lambda: "another machine"  # this rank's process only
    comm = Communicator()
    right, left = (rank + 1) % 3, (rank - 1) % 3
    got = comm.exchange([(torch.full((2,), float(rank)), right, "F")], [(left, "F")])[0]
    _done(comm)
    return {"got": got.tolist(), "local": [comm.links.local(p) for p in (left, right)]}


def test_pairs_on_other_machines_keep_gloo() -> None:
    results = run_ranks(_other_machines, 3)
    assert [r["got"] for r in results] == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]
    assert [r["local"] for r in results] == [[False, True], [True, False], [False, False]]


def _mismatch(rank: int, world_size: int) -> str:
    import torch.distributed as dist

    comm = Communicator()
    if rank == 0:
        comm._p2p_raw(torch.zeros(100, dtype=torch.uint8), 1, send=True).wait()
        dist.barrier()  # (over gloo) the socket stays open until rank 1 has read: an end closed early resets it
        return ""
    try:
        comm._p2p_raw(torch.zeros(64, dtype=torch.uint8), 0, send=False).wait()
        outcome = "accepted"
    except RuntimeError as error:
        outcome = str(error)
    dist.barrier()
    return outcome


def test_two_ends_that_disagree_on_a_size_fail_at_once() -> None:
    error = run_ranks(_mismatch, 2)[1]
    assert "rank 0 sent a message of 100 bytes where this rank expected 64" in error


def _peer_closes(rank: int, world_size: int) -> str:
    comm = Communicator()
    comm.wait_timeout = 60
    if rank == 0:
        comm.send(torch.ones(2), 1, "F")
        comm.wait_sends()
        comm.links.close()  # its connections end without a word: no error posted, no error message
        dist.barrier()  # (its process, which holds the store, stays until rank 1 has looked its address up there)
        return ""
    comm.recv(0, "F")
    start = time.monotonic()
    try:
        comm.recv(0, "F")
    except PipelineError as error:
        return f"{time.monotonic() - start:.0f} s: {error}"
    finally:
        dist.barrier()
    return "no error"


def test_a_closed_connection_ends_the_wait_long_before_its_deadline() -> None:
    error = run_ranks(_peer_closes, 2)[1]
    seconds, _, text = error.partition(" s: ")
    assert int(seconds) < 30, error
    assert "connection closed by peer" in text.lower() and "rank 0" in text, error


def test_a_peer_that_dies_before_connecting_ends_the_wait_long_before_its_deadline() -> None:
    """gloo connects every pair when the group starts; a socket connects at a pair's first message, so a peer that
    dies before it never closes a connection: the wait for it looks at its process instead."""
    import subprocess
    import sys

    from torch.distributed import TCPStore

    from tests.helpers import free_port

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    links = local_link.LocalLinks(store, "test/dies", 0)
    peer = subprocess.Popen([sys.executable, "-c", (
        "import os; from torch.distributed import TCPStore; from lightning_pipe.engine import local_link; "
        f"store = TCPStore('127.0.0.1', {port}, is_master=False); links = local_link.LocalLinks(store, 'test/dies', 1); "
        "links.local(0); os._exit(3)")])
    assert links.local(1)
    work = links.irecv(torch.empty(16, dtype=torch.uint8), 1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"Connection closed by peer \(rank 1, process \d+, ended before it connected"):
        work.wait(120)
    assert time.monotonic() - start < 30
    assert peer.wait(30) == 3
    links.close()


# -- one process, several "ranks" (the same machine by construction) --------------------------------------------
def _ranks(*ranks: int, timeout: float = 60.0) -> list[local_link.LocalLinks]:
    from torch.distributed import HashStore

    store = HashStore()
    return [local_link.LocalLinks(store, "test", rank, lambda: timeout) for rank in ranks]


def test_a_connection_slow_to_say_who_made_it_does_not_break_another_peers_messages() -> None:
    import socket
    import threading

    zero, one = _ranks(0, 1)
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(zero.address)  # accepted first; says it is rank 2 only after 0.6 s
    threading.Timer(0.6, lambda: slow.sendall(local_link._HELLO.pack(2))).start()
    stray = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stray.connect(zero.address)
    stray.close()  # gone before saying anything
    assert one.local(0) and zero.local(1)
    one.isend(torch.arange(8, dtype=torch.uint8), 0).wait(5)
    got = torch.empty(8, dtype=torch.uint8)
    zero.irecv(got, 1).wait(10)
    assert got.tolist() == list(range(8))
    assert 2 in zero._accepted  # kept for rank 2's first receive
    for links in (zero, one):
        links.close()
    slow.close()


def test_a_send_the_kernel_does_not_take_at_once_ignores_the_default_socket_timeout() -> None:
    import socket
    import threading

    zero, one = _ranks(0, 1)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.2)
    try:
        assert zero.local(1) and one.local(0)
        data = torch.arange(8 << 20, dtype=torch.int64).to(torch.uint8)  # 8 MB: far more than a socket buffer
        work = zero.isend(data, 1)
        assert not work.is_completed()
        got = torch.empty_like(data)
        timer = threading.Timer(1.0, lambda: one.irecv(got, 0).wait(30))  # the receiver comes after 1 s
        timer.start()
        work.wait(30)
        timer.join()
        assert torch.equal(got, data)
    finally:
        socket.setdefaulttimeout(previous)
        zero.close()
        one.close()


def test_a_peer_that_never_publishes_is_waited_for_within_the_timeout() -> None:
    (zero,) = _ranks(0, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 1 s waiting for rank 5 to build this pipeline's"):
        zero.local(5)
    assert time.monotonic() - start < 10
    zero.close()


def test_a_rank_without_the_fast_path_says_so_and_its_pairs_keep_gloo() -> None:
    from torch.distributed import HashStore

    store = HashStore()
    local_link.publish(store, "test", 1)  # LIGHTNING_PIPE_LOCAL_P2P=0 on rank 1, or no abstract sockets there
    zero = local_link.LocalLinks(store, "test", 0, lambda: 5.0)
    assert not zero.local(1)
    zero.close()


def test_a_forked_child_does_not_keep_its_parents_connections_open() -> None:
    """A DataLoader worker forked by a rank holds copies of the rank's sockets; if it kept them, a rank that dies
    would look alive to its peers until its workers end."""
    zero, one = _ranks(0, 1)
    assert zero.local(1) and one.local(0)
    zero.isend(torch.ones(4, dtype=torch.uint8), 1).wait(5)
    one.irecv(torch.empty(4, dtype=torch.uint8), 0).wait(5)  # both ends connected
    child = os.fork()
    if child == 0:  # the worker: lives on for a while
        time.sleep(10)
        os._exit(0)
    try:
        socket_ends.close_socket(zero._senders[1].sock)  # rank 0 "dies": its descriptor closes, no shutdown
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            one.irecv(torch.empty(4, dtype=torch.uint8), 0).wait(20)
        assert time.monotonic() - start < 5
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        one.close()


def _arrivals(rank: int, world_size: int) -> dict:
    """A receive asked whether its message is here, without waiting: no before it is sent, yes once it came (the
    first message from a peer, which brings its connection, is waited for); and a receive whose peer closed says no,
    and raises the closed connection when waited for."""
    import torch.distributed as dist

    comm = Communicator()
    links = comm.links
    if rank == 0:
        local_link.send(links, torch.zeros(8, dtype=torch.uint8), 1).wait(5)  # the connection's first message
        dist.barrier()  # rank 1 looked before the next send
        local_link.send(links, torch.arange(8, dtype=torch.uint8), 1).wait(5)
        dist.barrier()  # rank 1 received it
        links.close()
        dist.barrier()
        return {}
    local_link.receive(links, torch.ones(8, dtype=torch.uint8), 0).wait(5)
    buf = torch.zeros(8, dtype=torch.uint8)
    work = local_link.receive(links, buf, 0)
    before = local_link.arrived(work)
    dist.barrier()
    deadline, after = time.monotonic() + 10, False
    while not after and time.monotonic() < deadline:
        after = local_link.arrived(work)
        time.sleep(0.001)
    dist.barrier()
    dist.barrier()  # rank 0 closed its connection
    closed = local_link.receive(links, torch.zeros(8, dtype=torch.uint8), 0)
    closed_arrived = local_link.arrived(closed)
    try:
        closed.wait(5)
        error = ""
    except RuntimeError as caught:
        error = str(caught)
    return {"before": before, "after": after, "got": buf.tolist(), "closed_arrived": closed_arrived,
            "error": error, "send_is_not_a_receive": local_link.arrived(object()), "comm": comm is not None}


def test_a_receive_can_ask_whether_its_message_is_here_without_waiting() -> None:
    result = run_ranks(_arrivals, 2)[1]
    assert result["before"] is False and result["after"] is True
    assert result["got"] == list(range(8))
    assert result["closed_arrived"] is False and "closed" in result["error"].lower()
    assert result["send_is_not_a_receive"] is False


def test_the_spin_before_sleeping_is_read_from_the_environment_with_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv(socket_ends.SPIN_ENV, "50")
    assert socket_ends.spin_seconds() == pytest.approx(50e-6)
    monkeypatch.setenv(socket_ends.SPIN_ENV, "-3")
    assert socket_ends.spin_seconds() == 0.0
    monkeypatch.setenv(socket_ends.SPIN_ENV, "fast")
    with pytest.raises(ValueError, match="LIGHTNING_PIPE_SPIN_US='fast' is not a number"):
        socket_ends.spin_seconds()


def test_receives_that_never_spin_still_arrive() -> None:
    results = run_ranks(_off, 2, env={socket_ends.SPIN_ENV: "0"})
    assert [r["links"] for r in results] == [True, True]
    assert [r["spin"] for r in results] == [0.0, 0.0], "the rank's environment, set after import, was not read"
    assert results[0]["got"] == [1.0] * 4 and results[1]["got"] == [0.0] * 4
