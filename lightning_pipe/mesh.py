"""The 2-D mesh of pipeline x data parallelism: how many ranks per pipeline and replicas, and each rank's groups.

Ranks form a ``DeviceMesh`` of shape ``(num_stages, replicas)`` with dims named ``("pipe", "data")``, row-major:
global rank ``r`` is pipeline rank ``r // replicas`` of replica ``r % replicas``. The ranks of a column run one
pipeline (the ``"pipe"`` group: P2P activations and gradients); the ranks of a row hold the same stage (the
``"data"`` group: gradient all-reduce). Replicas of a stage are thus neighbours in rank order, on one machine when
the devices per machine are a multiple of ``replicas``: the large gradient all-reduces stay inside a machine and the
small activation messages cross machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MeshShape", "check_replicas", "build_mesh"]

PIPE, DATA = "pipe", "data"


@dataclass(frozen=True)
class MeshShape:
    """``num_stages`` ranks per pipeline times ``replicas`` pipelines."""

    num_stages: int
    replicas: int

    @classmethod
    def of(cls, world_size: int, num_stages: int | None, replicas: int | None) -> MeshShape:
        """The shape for ``world_size`` ranks (``devices * num_nodes``); says how to fix a mismatch."""
        if num_stages is None and replicas is None:
            return cls(world_size, 1)
        if num_stages is None:
            assert replicas is not None
            num_stages, rest = divmod(world_size, replicas)
            if rest or num_stages < 1:
                raise ValueError(f"replicas={replicas} does not divide the {world_size} devices (devices * num_nodes); "
                                 f"use a divisor of {world_size}")
        elif replicas is None:
            replicas, rest = divmod(world_size, num_stages)
            if rest or replicas < 1:
                raise ValueError(f"num_stages={num_stages} does not divide the {world_size} devices (devices * "
                                 f"num_nodes): devices * num_nodes must equal num_stages * replicas; use num_stages in "
                                 f"{_divisors(world_size)}")
        if num_stages * replicas != world_size:
            raise ValueError(f"num_stages={num_stages} x replicas={replicas} = {num_stages * replicas} ranks, but "
                             f"devices * num_nodes = {world_size}; make them equal")
        return cls(num_stages, replicas)

    @property
    def world_size(self) -> int:
        return self.num_stages * self.replicas

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(pipeline rank, replica index) of global ``rank``."""
        return divmod(rank, self.replicas)

    def pipelines(self) -> list[list[int]]:
        """The global ranks of each replica's pipeline, in stage order."""
        return [[stage * self.replicas + replica for stage in range(self.num_stages)]
                for replica in range(self.replicas)]


def check_replicas(replicas: int | Sequence[int] | None) -> int | None:
    """``replicas`` as one count per stage (or ``None``); refuses uneven replication, which is not built yet."""
    if replicas is None:
        return None
    if isinstance(replicas, bool) or not isinstance(replicas, (int, Sequence)):
        raise TypeError(f"replicas must be a positive integer (replicas of every stage), not {replicas!r}")
    counts = [replicas] if isinstance(replicas, int) else list(replicas)
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise ValueError(f"replicas={replicas!r} must be a positive integer, or a list of them, one per stage")
    if len(set(counts)) > 1:
        raise ValueError(f"uneven replication (replicas={counts}, PipeDream's '{'-'.join(map(str, counts))}' "
                         f"configuration) is not supported by PipelineStrategy yet: every stage must have the same "
                         f"number of replicas. Use replicas={max(counts)} with more devices, replicas=1, or a "
                         f"partition that balances the stages without replication")
    return counts[0]


def build_mesh(shape: MeshShape, device_type: str) -> DeviceMesh:
    """The mesh of ``shape`` over the default process group (collective: every rank calls it)."""
    if dist.get_world_size() != shape.world_size:
        raise RuntimeError(f"the mesh needs {shape.world_size} ranks, but {dist.get_world_size()} were started")
    return init_device_mesh(device_type, (shape.num_stages, shape.replicas), mesh_dim_names=(PIPE, DATA))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
