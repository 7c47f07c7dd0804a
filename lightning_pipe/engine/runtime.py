"""Process-level settings for pipeline ranks: each rank's share of the CPU cores."""

from __future__ import annotations

import os

import torch

__all__ = ["available_cores", "local_world_size", "configure_threads"]


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_world_size(default: int = 1) -> int:
    """Ranks on this machine, as launchers (torchrun, Lightning, SLURM) announce it."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return default


def configure_threads(ranks_on_this_machine: int) -> int:
    """Give this rank ``cores // ranks`` threads (at least 1), unless the user set OMP_NUM_THREADS.

    Without it every rank starts one thread per core and the ranks oversubscribe the machine: measured here,
    4 ranks on 2 cores ran a fill-drain pipeline at 1.8-2.9x its ideal time, against 1.05-1.1x with one
    thread each. Returns the number of threads in use.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, available_cores() // max(1, ranks_on_this_machine)))
    return torch.get_num_threads()
