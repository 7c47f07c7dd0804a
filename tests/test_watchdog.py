"""The fault machinery without processes: settings, the diagnosis of a wait from heartbeats, the NaN checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_pipe.engine.anomaly import NonFiniteError, check_finite, check_gradients
from lightning_pipe.engine.launch import reserved_port
from lightning_pipe.engine.store import store_gone
from lightning_pipe.engine.watchdog import DEFAULT_WAIT_TIMEOUT, Activity, Peer, _root, failure_line
from lightning_pipe.strategy.settings import PipelineSettings


def test_wait_timeout_and_detect_anomaly_reach_the_engine() -> None:
    assert PipelineSettings().engine_config().wait_timeout == DEFAULT_WAIT_TIMEOUT == 300.0
    config = PipelineSettings(wait_timeout=12, detect_anomaly=True).engine_config()
    assert (config.wait_timeout, config.detect_anomaly) == (12.0, True)
    for bad in (0, -1, "5", True, None):
        with pytest.raises(ValueError, match="wait_timeout must be a number of seconds > 0"):
            PipelineSettings(wait_timeout=bad)
    with pytest.raises(ValueError, match="detect_anomaly=True .* use a synchronous schedule"):
        PipelineSettings(schedule="async_1f1b", detect_anomaly=True)
    with pytest.raises(TypeError, match="detect_anomaly must be True or False"):
        PipelineSettings(detect_anomaly="yes")


def test_the_root_of_a_wait_follows_the_ranks_each_one_waits_for() -> None:
    peers = {0: Peer(0, "alive", "waits", waits=(1,)), 1: Peer(1, "alive", "waits", waits=(2,)),
             2: Peer(2, "silent", "2F0"), 3: Peer(3, "alive", "waits", waits=(2,))}
    assert _root([1], peers, me=0) == (2, [1, 2])  # rank 0 waits for 1, which waits for the stopped rank 2
    peers[2] = Peer(2, "alive", "2F0", for_s=40.0)  # alive, in one action all along: it is the one to name
    assert _root([1], peers, me=0) == (2, [1, 2])
    peers[1] = Peer(1, "alive", "waits", waits=(0,))  # a cycle back to this rank ends the chain
    assert _root([1], peers, me=0) == (1, [1])
    ended = {0: Peer(0, "ended"), 1: Peer(1, "silent"), 2: Peer(2, "alive", "x", waits=(0,)), 3: Peer(3, "alive")}
    assert _root([0, 1, 2], ended, me=3) == (1, [1])  # rank 0 ended because of rank 1: name rank 1


def test_activity_is_replaced_whole() -> None:
    activity = Activity()
    activity.doing("2F0")
    what, waits, since = activity.state
    activity.doing("a wait", (1, 2))
    assert (what, waits) == ("2F0", ()) and activity.state[:2] == ("a wait", (1, 2)) and activity.state[2] >= since


def test_non_finite_values_are_named_where_they_first_appear() -> None:
    check_finite((torch.ones(2), {"x": torch.zeros(3)}, "text"), "the output", "stage 0")  # finite: nothing
    with pytest.raises(NonFiniteError, match=r"NaN first appeared in the loss \(tensor 1, shape \(2,\)\) at stage 3"):
        check_finite([torch.ones(1), torch.tensor([1.0, float("nan")])], "the loss", "stage 3")
    with pytest.raises(NonFiniteError, match="NaN and infinity"):
        check_finite(torch.tensor([float("inf"), float("nan")]), "x", "y")
    check_finite(torch.tensor([1, 2]), "integers are never non-finite", "here")
    layer = nn.Linear(2, 2)
    layer.weight.grad = torch.zeros(2, 2)
    layer.bias.grad = torch.tensor([0.0, float("inf")])
    with pytest.raises(NonFiniteError, match=r"infinity first appeared in the gradient of parameter 'bias'"):
        check_gradients(layer.named_parameters(), "stage 1, micro-batch 2")


def test_the_exit_guard_keeps_the_status_a_launcher_leaves_with() -> None:
    import subprocess
    import sys

    code = ("from lightning_pipe.engine import watchdog; import sys; watchdog.arm_exit_guard(); {}")
    for body, status in (("sys.exit(3)", 3), ("sys.exit('failed')", 1), ("raise ValueError('x')", 1), ("pass", 0)):
        done = subprocess.run([sys.executable, "-c", code.format(body)], capture_output=True, timeout=60)
        assert done.returncode == status, (body, done.returncode, done.stderr.decode()[-500:])


def _spawned_rank(rank: int, port: int) -> None:
    import os

    import torch.distributed as dist

    from lightning_pipe.engine.executor import Pipeline

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def loss(output: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        raise ValueError("a loss that fails")

    pipe = Pipeline([nn.Linear(2, 2), nn.Linear(2, 2)], loss_fn=loss, num_microbatches=2)
    pipe.train_step(torch.ones(2, 2))


@pytest.mark.timeout(120)
def test_a_rank_that_fails_under_torch_multiprocessing_spawn_is_reported_as_failed() -> None:
    """torch.multiprocessing.spawn catches a rank's error and leaves with sys.exit(1); the exit guard (armed after the
    pipeline gave up a wait) once turned that into status 0, so spawn reported success."""
    import torch.multiprocessing as mp

    from lightning_pipe.engine.launch import free_port

    with pytest.raises(Exception, match="a loss that fails|exited with exit code"):
        mp.spawn(_spawned_rank, args=(free_port(),), nprocs=2)


def test_a_wait_explained_after_the_store_went_names_the_failure_its_heartbeat_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Global rank 0 holds the job's store and lingers only a while for the others to explain their waits; a rank
    whose wait runs out after that still ends with the failure its heartbeat read, not "the store does not answer"."""
    import time

    import torch.distributed as dist

    from lightning_pipe.engine import watchdog

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(watchdog, "sample_peers", lambda *args, **kwargs: None)  # the store is gone
        message, root = watchdog.explain_wait(0, [1], "writing a checkpoint", 10.0)
        assert root == 0 and message.startswith("the job's store does not answer")  # nothing read: say so
        failure = {"time": time.time(), "rank": 1, "message": "PeerLost: rank 1 is gone"}
        monkeypatch.setattr(watchdog, "_KNOWN", [(dist.group.WORLD, failure)])
        message, root = watchdog.explain_wait(0, [1], "writing a checkpoint", 10.0)
        assert root == 1 and message == "rank 1 failed: PeerLost: rank 1 is gone; rank 0 waited 10 s for writing a " \
                                        "checkpoint"
    finally:
        dist.destroy_process_group()


def test_a_store_whose_server_ended_is_told_gone_through_the_process_groups_prefixes() -> None:
    """The failure and exit paths ask before they write (torch logs each failed write with its C++ stack)."""
    from datetime import timedelta

    import torch.distributed as dist

    with reserved_port() as port:
        server = dist.TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=10), wait_for_workers=False)
        client = dist.PrefixStore("default_pg", dist.PrefixStore("0", dist.TCPStore(
            "127.0.0.1", port, 1, False, timedelta(seconds=10), wait_for_workers=False)))
        assert not store_gone(client)
        client.set("key", "value")  # the look did not disturb the server
        assert dist.PrefixStore("default_pg", dist.PrefixStore("0", server)).get("key") == b"value"
        del server
        assert store_gone(client)
    assert not store_gone(dist.HashStore())  # not a TCPStore: taken as answering


def test_a_failure_of_several_lines_reaches_the_other_ranks_with_its_last_line() -> None:
    """A DataLoader worker's error says what went wrong on its last line, after the worker's traceback (found by
    review: the other ranks read "Caught ValueError in DataLoader worker process 0." alone)."""
    worker = ("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              "  File \"data.py\", line 9, in __getitem__\n    raise ValueError(...)\nValueError: bad item 17\n")
    assert failure_line(worker) == ("Caught ValueError in DataLoader worker process 0. ... ValueError: bad item 17")
    assert failure_line("  one line\n") == "one line" and failure_line("") == "an error"
    assert len(failure_line("x" * 2000 + "\n" + "y" * 2000)) <= 600
