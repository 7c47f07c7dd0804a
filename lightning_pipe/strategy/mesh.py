"""The 2-D mesh of pipeline x data parallelism: how many ranks per pipeline and replicas, and each rank's groups.

Ranks form a ``DeviceMesh`` of shape ``(num_stages, replicas)`` with dims named ``("pipe", "data")``, row-major:
global rank ``r`` is pipeline rank ``r // replicas`` of replica ``r % replicas``. The ranks of a column run one
pipeline (the ``"pipe"`` group: P2P activations and gradients); the ranks of a row hold the same stage (the
``"data"`` group: gradient all-reduce). Replicas of a stage are thus neighbours in rank order, on one machine when
the devices per machine are a multiple of ``replicas``: the large gradient all-reduces stay inside a machine and the
small activation messages cross machines.

Uneven replication (``replicas=[3, 1]``, PipeDream's "3-1") is not a mesh: the ranks form one pipeline whose stage
``s`` has ``replicas[s]`` ranks, numbered stage by stage, taking the micro-batches in turn
(:mod:`lightning_pipe.engine.schedules.replicated`); every rank reads the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_pipe.engine.schedules import replicated as schedules_replicated

__all__ = ["AUTO", "MeshShape", "check_replicas", "build_mesh"]

PIPE, DATA = "pipe", "data"
AUTO = "auto"  # replicas="auto": the planner chooses each stage's replicas


@dataclass(frozen=True)
class MeshShape:
    """``num_stages`` ranks per pipeline times ``replicas`` pipelines; or, with ``stage_replicas``, one pipeline of
    ``num_stages`` stages with that many ranks each."""

    num_stages: int
    replicas: int
    stage_replicas: tuple[int, ...] = ()

    @classmethod
    def of(cls, world_size: int, num_stages: int | None, replicas: int | tuple[int, ...] | None) -> MeshShape:
        """The shape for ``world_size`` ranks (``devices * num_nodes``); says how to fix a mismatch."""
        if isinstance(replicas, tuple):
            if num_stages is not None and num_stages != len(replicas):
                raise ValueError(f"num_stages={num_stages} but replicas={list(replicas)} lists {len(replicas)} "
                                 f"stages; drop num_stages")
            if len(set(replicas)) == 1:  # [2, 2]: even replication of that many stages
                num_stages, replicas = len(replicas), replicas[0]
            elif sum(replicas) != world_size:
                raise ValueError(f"replicas={list(replicas)} places {sum(replicas)} ranks, but devices * num_nodes = "
                                 f"{world_size}; make them equal")
            else:  # uneven: one pipeline
                return cls(len(replicas), 1, replicas)
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
    def pipeline_ranks(self) -> int:
        """Ranks in one pipeline."""
        return sum(self.stage_replicas) if self.stage_replicas else self.num_stages

    @property
    def world_size(self) -> int:
        return self.pipeline_ranks * self.replicas

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(pipeline rank, replica index) of global ``rank``."""
        return divmod(rank, self.replicas)

    def pipelines(self) -> list[list[int]]:
        """The global ranks of each replica's pipeline, in pipeline rank order."""
        return [[rank * self.replicas + replica for rank in range(self.pipeline_ranks)]
                for replica in range(self.replicas)]


def check_replicas(replicas: int | Sequence[int] | str | None) -> int | tuple[int, ...] | str | None:
    """``replicas`` as one count for every stage (an integer), one count per stage (a tuple; uneven replication if
    they differ), ``"auto"`` (the planner chooses), or ``None``."""
    if replicas is None or replicas == AUTO:
        return replicas
    if isinstance(replicas, (bool, str)) or not isinstance(replicas, (int, Sequence)):
        raise TypeError(f"replicas must be a positive integer (replicas of every stage), a list of them (one per "
                        f"stage) or 'auto', not {replicas!r}")
    counts = [replicas] if isinstance(replicas, int) else list(replicas)
    if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
        raise ValueError(f"replicas={replicas!r} must be a positive integer, or a list of them, one per stage")
    if isinstance(replicas, int):
        return replicas
    return tuple(schedules_replicated.check_replicas(counts) if len(set(counts)) > 1 else counts)


def build_mesh(shape: MeshShape, device_type: str) -> DeviceMesh:
    """The mesh of ``shape`` over the default process group (collective: every rank calls it)."""
    if dist.get_world_size() != shape.world_size:
        raise RuntimeError(f"the mesh needs {shape.world_size} ranks, but {dist.get_world_size()} were started")
    return init_device_mesh(device_type, (shape.num_stages, shape.replicas), mesh_dim_names=(PIPE, DATA))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
