"""The tests' ways to start ranks: :mod:`lightning_pipe.engine.launch` for N local gloo ranks, and torchrun "nodes"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from lightning_pipe.engine import launch
from lightning_pipe.engine.launch import RankError, free_port, reserved_port, run_ranks

__all__ = ["RankError", "free_port", "run_ranks", "run_torchrun_nodes", "ROOT"]

ROOT = Path(__file__).resolve().parents[1]

# Many tests run a Trainer on their ranks: let the fork server import Lightning once for all of them.
launch.PRELOAD[:] = [*launch.PRELOAD, "lightning.pytorch", "lightning_pipe.strategy.pipeline"]


def run_torchrun_nodes(script: Path, *args: str, nnodes: int = 2, nproc_per_node: int = 2,
                       timeout: float = 240.0) -> list[str]:
    """Run ``script`` under ``torchrun --nnodes {nnodes}`` once per node rank, on 127.0.0.1, and return each node's
    output; fails the test if a node exits non-zero or the nodes have not ended after ``timeout`` seconds.

    The master port stays reserved (:func:`~lightning_pipe.engine.launch.reserved_port`) until the nodes end. It used to
    be a free_port(), free again before node 0's agent bound it seconds later: a process of the machine that took
    it meanwhile made node 0 fail at once (EADDRINUSE) and left node 1 waiting for the rendezvous (600 s), which
    looked like a hang of the pair. A node that fails now ends the run at once, with every node's output. Only a
    process that binds the reserved port by number (its own racy free port) can still take it: node 0 then fails
    with EADDRINUSE on the master port, and only that failure is run again, on a new port.

    The two-node test takes ~20 s alone, but 30-75 s while other test suites load the 2 cores (load average
    10-16); so ``timeout`` is generous, and a run that reaches it reports how much CPU each process still used:
    none in a deadlock, some in a run that is only slow."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    for attempt in range(3):
        with reserved_port() as port:
            codes, outputs, hung = _run_nodes(script, args, nnodes, nproc_per_node, port, timeout, env)
        taken = codes[0] != 0 and "EADDRINUSE" in outputs[0] and f"port: {port}," in outputs[0]
        if not taken or attempt == 2:
            break
        warnings.warn(f"another process bound the master port {port} by number; run again on a new port")
    report = "\n---\n".join(f"node {rank} (exit {code}):\n{output[-3000:]}"
                             for rank, (code, output) in enumerate(zip(codes, outputs)) if hung or code)
    if hung:
        pytest.fail(f"the {nnodes} torchrun nodes had not ended after {timeout:.0f} s; CPU seconds each process "
                    f"used in its last 5 s:\n{hung}\ntheir output:\n{report}")
    assert not report, report
    return outputs


def _run_nodes(script: Path, args: tuple[str, ...], nnodes: int, nproc_per_node: int, port: int, timeout: float,
               env: dict[str, str]) -> tuple[list[int], list[str], str]:
    """Each node's exit code and output, and if they were all still running at ``timeout`` what each of their
    processes was doing (else "")."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
                "--nproc-per-node", str(nproc_per_node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    with ExitStack() as stack:
        # Outputs go to files: a pipe that is not read while another node is waited for fills up and blocks.
        files = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(nnodes)]
        nodes = [subprocess.Popen([*torchrun, "--node-rank", str(node), str(script), *args], cwd=script.parent,
                                  env=env, stdout=file, stderr=subprocess.STDOUT) for node, file in enumerate(files)]
        try:
            hung = _activity(nodes) if _wait_for_nodes(nodes, timeout) else ""
        finally:
            _kill_nodes(nodes)  # whatever is left: agents and the workers they started in sessions of their own
        for file in files:
            file.seek(0)
        outputs = [file.read() for file in files]
    return [node.returncode for node in nodes], outputs, hung


def _wait_for_nodes(nodes: list[subprocess.Popen], timeout: float, grace: float = 10.0) -> bool:
    """Wait until every node has ended, or one has failed and the others had ``grace`` seconds to end too (a node
    whose peer failed may wait for it much longer than the test does). Whether the nodes were still running at
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(node.poll() is None for node in nodes):
        if any(node.returncode for node in nodes):
            deadline = min(deadline, time.monotonic() + grace)
            grace = float("inf")  # the first failure sets it
        if time.monotonic() > deadline:
            return not any(node.returncode for node in nodes)
        time.sleep(0.1)
    return False


def _activity(nodes: list[subprocess.Popen], seconds: float = 5.0) -> str:
    """CPU seconds each process of each node uses in ``seconds``: a deadlocked worker uses none."""
    pids = [(rank, pid) for rank, node in enumerate(nodes) for pid in [node.pid, *_descendants(node.pid)]]
    before = {pid: _cpu_seconds(pid) for _, pid in pids}
    time.sleep(seconds)
    lines = []
    for rank, pid in pids:
        now, then = _cpu_seconds(pid), before[pid]
        role = "agent" if pid == nodes[rank].pid else "worker"
        lines.append(f"  node {rank} {role} {pid}: {'ended' if now is None or then is None else f'{now - then:.2f}'}")
    return "\n".join(lines)


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def _kill_nodes(nodes: list[subprocess.Popen]) -> None:
    """Kill each node that is still running and every process under it (torchrun starts each worker in a session
    of its own: killing the agent alone leaves them running)."""
    for node in nodes:
        if node.poll() is None:
            for pid in [*_descendants(node.pid), node.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        node.wait()


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (children first), from /proc; none where there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def allow_workers() -> None:
    """Test ranks are daemonic processes, which may not start DataLoader workers; the calling one may (the workers
    end with their rank: DataLoader workers watch their parent)."""
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False


def quiet_trainer(devices: int, strategy: Any, **options: Any) -> Any:
    """A CPU ``Trainer`` on ``devices`` processes with no logger, progress bar, model summary or checkpoints, unless
    ``options`` say otherwise."""
    import lightning as L

    defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False}
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, **{**defaults, **options})


@contextmanager
def installed_package(folder: Path, name: str, source: str) -> Iterator[Any]:
    """A package ``name`` of ``source`` as if installed (under ``folder``/site-packages, on ``sys.path``), imported;
    afterwards ``sys.path`` and ``sys.modules`` as they were (a real package of the name comes back)."""
    import importlib

    package = folder / "site-packages" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(source)
    saved = sys.modules.pop(name, None)
    sys.path.insert(0, str(folder / "site-packages"))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(folder / "site-packages"))
        sys.modules.pop(name, None)
        if saved is not None:
            sys.modules[name] = saved
