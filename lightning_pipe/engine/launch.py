"""Run a function on N local gloo ranks, each in its own process, and return their results or their errors.

For tests, benchmarks and quick experiments on one machine (torchrun is the way to launch real jobs)."""

from __future__ import annotations

import faulthandler
import io
import multiprocessing
import os
import queue as queue_module
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from typing import Any

__all__ = ["RankError", "free_port", "reserved_port", "run_ranks", "PRELOAD"]

# Modules the fork server imports once for all ranks (extend it before the first run_ranks, e.g. with
# "lightning.pytorch" when the ranks run a Trainer: seconds saved per rank).
PRELOAD = ["torch", "torch.distributed", "lightning_pipe.engine.executor"]

# The signal on which a rank writes its threads' stacks (not SIGUSR1: SLURM's requeue signal under Lightning); none
# where the platform has no such signal.
_STACKS_SIGNAL = getattr(signal, "SIGUSR2", None)


class RankError(RuntimeError):
    """One or more ranks raised, died or hung; the message holds each failing rank's traceback."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now.

    Racy: the port is free again when this returns, and any process of the machine may take it before the caller
    binds it. To start a server on it later (a TCPStore, torchrun's agent), use :func:`reserved_port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def reserved_port() -> Iterator[int]:
    """A TCP port that no other process of the machine is given while the block runs, for a server started in it.

    The port stays bound (with ``SO_REUSEADDR``, not listening) until the block ends. Meanwhile the kernel picks
    it for no ``bind((host, 0))`` (a free_port() elsewhere, gloo's listeners, Lightning's port finding) and refuses
    a plain ``bind`` to it, while a server that binds it by number with ``SO_REUSEADDR``, as TCPStore does
    (torchrun's agent store, ``init_method="tcp://..."``), still can (Linux semantics). Connecting to it is
    refused until that server listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _context() -> multiprocessing.context.BaseContext:
    # A fork server that has imported torch forks each rank in milliseconds, and it never ran torch code,
    # so no OpenMP thread pool is copied into the children half-alive (plain fork after torch ran can hang).
    # Idle OpenMP threads must sleep, not spin, or ranks sharing the cores slow each other down. libgomp
    # reads this when torch loads, so it is set before the fork server (which preloads torch) starts.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, results: Any, args: tuple,
               env: dict[str, str], backend: str = "gloo", stacks: str | None = None) -> None:
    if stacks is not None and _STACKS_SIGNAL is not None:  # where this rank's threads' stacks go when the launcher
        # finds it hung
        faulthandler.register(_STACKS_SIGNAL, file=open(stacks, "w"), all_threads=True)  # noqa: SIM115 - kept open
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)})
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    try:
        options = {}
        if backend == "nccl":  # one GPU per rank, the communicator made at once (NCCL wants the device set first)
            torch.cuda.set_device(rank)
            options["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120), **options)
        # every rank has made its connections before any runs fn: one that failed at once would close them under a
        # peer still making its own ("connectFullMesh failed"), and that peer would end with this instead of the error
        dist.barrier()
        value = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(value, buffer)  # plain bytes through the queue: no shared memory outliving this process
        results.put((rank, True, buffer.getvalue()))
    except BaseException as error:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              env: dict[str, str] | None = None, expect_failure: bool = False, backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks and return the results by rank.

    ``backend="nccl"`` runs NCCL instead, rank ``r`` on ``cuda:r`` (one GPU per rank).

    ``fn`` must be importable (defined at module level). A rank's exception is raised here as
    :class:`RankError` with its traceback; a rank that has not finished after ``timeout`` seconds fails the
    test and every rank is killed. With ``expect_failure`` the list holds each rank's error text instead.
    """
    import torch

    ctx = _context()
    results = ctx.Queue()
    with reserved_port() as port:  # held until every rank has ended: rank 0's store binds it whenever it gets there
        outcome = _collect(ctx, fn, world_size, port, results, args, env, timeout, backend)
    failed = {rank: text for rank, (ok, text) in outcome.items() if not ok}
    if expect_failure:
        return [outcome[rank][1] if rank in failed else None for rank in range(world_size)]
    if failed:
        raise RankError("\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(failed.items())))
    return [torch.load(io.BytesIO(outcome[rank][1]), weights_only=False) for rank in range(world_size)]


def _collect(ctx: Any, fn: Callable[..., Any], world_size: int, port: int, results: Any, args: tuple,
             env: dict[str, str] | None, timeout: float, backend: str) -> dict[int, tuple[bool, Any]]:
    """Start the ranks and gather each one's (ok, payload); raise RankError if one hangs or dies silently."""
    folder = tempfile.TemporaryDirectory(prefix="lightning-pipe-stacks-")
    stacks = [os.path.join(folder.name, f"rank{rank}.txt") for rank in range(world_size)]
    processes = [ctx.Process(target=_rank_main, daemon=True,
                             args=(fn, rank, world_size, port, results, args, env or {}, backend, stacks[rank]))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise RankError(f"ranks {missing} did not finish within {timeout:.0f} s (deadlock?); "
                                f"finished: {_describe(outcome)}{_stacks(processes, missing, stacks)}")
            try:
                rank, ok, payload = results.get(timeout=min(1.0, left))
                outcome[rank] = (ok, payload)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(processes) if r not in outcome and p.exitcode is not None]
                if dead and results.empty():
                    time.sleep(0.5)  # a result may still be in the pipe
                    if results.empty():
                        raise RankError(f"ranks {dead} died without a result (exit codes "
                                        f"{[processes[r].exitcode for r in dead]}); {_describe(outcome)}") from None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        folder.cleanup()
    return outcome


def _stacks(processes: list[Any], ranks: list[int], files: list[str]) -> str:
    """Where each of ``ranks`` is stuck: every thread's Python stack, which each rank writes on SIGUSR2."""
    alive = [rank for rank in ranks if processes[rank].is_alive()] if _STACKS_SIGNAL is not None else []
    for rank in alive:
        with suppress(OSError):
            os.kill(processes[rank].pid, _STACKS_SIGNAL)
    time.sleep(1.0 if alive else 0.0)  # the handler writes at once, even while the rank is blocked in C code
    parts = []
    for rank in alive:
        with suppress(OSError), open(files[rank]) as file:
            text = file.read().strip()
            parts.append(f"\n--- where rank {rank} is ---\n{text[-6000:] if text else '(no stack written)'}")
    return "".join(parts)


def _describe(outcome: dict[int, tuple[bool, Any]]) -> str:
    parts = [f"rank {rank}: {'ok' if ok else text.splitlines()[0]}" for rank, (ok, text) in sorted(outcome.items())]
    return "; ".join(parts) or "none"
