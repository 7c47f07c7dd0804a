"""The tests' ways to start ranks: :mod:`lightning_pipe.engine.launch` for N local gloo ranks, and torchrun "nodes"."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lightning_pipe.engine import launch
from lightning_pipe.engine.launch import RankError, free_port, run_ranks

__all__ = ["RankError", "free_port", "run_ranks", "run_torchrun_nodes", "ROOT"]

ROOT = Path(__file__).resolve().parents[1]

# Many tests run a Trainer on their ranks: let the fork server import Lightning once for all of them.
launch.PRELOAD[:] = [*launch.PRELOAD, "lightning.pytorch", "lightning_pipe.strategy.pipeline"]


def run_torchrun_nodes(script: Path, *args: str, nnodes: int = 2, nproc_per_node: int = 2,
                       timeout: float = 60.0) -> list[str]:
    """Run ``script`` under ``torchrun --nnodes {nnodes}`` once per node rank, on 127.0.0.1, and return each node's
    output; fails the test if a node exits non-zero.

    One run of the two-node test takes ~15 s. Once in a full CI run (of several) the pair hung until the timeout,
    and it has not happened again alone; a second try on a fresh port keeps that from failing CI while the hang is
    found, and the first try's output is reported either way (see the warning)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    for attempt in range(2):
        port = free_port()
        nodes = [subprocess.Popen([*torchrun, "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
                                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                                   str(script), *args], cwd=script.parent, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for node in range(nnodes)]
        try:
            outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
            break
        except subprocess.TimeoutExpired:
            for node in nodes:
                node.kill()
            tails = "\n---\n".join(node.communicate()[0][-3000:] for node in nodes)
            if attempt == 1:
                pytest.fail(f"the {nnodes} torchrun nodes hung twice ({timeout:.0f} s each); their output:\n{tails}")
            warnings.warn(f"the {nnodes} torchrun nodes hung ({timeout:.0f} s) and were run again; their output:\n"
                          f"{tails}")
    failed = [f"node {rank} (exit {node.returncode}):\n{output[-3000:]}" for rank, (node, output)
              in enumerate(zip(nodes, outputs)) if node.returncode != 0]
    assert not failed, "\n---\n".join(failed)
    return outputs
