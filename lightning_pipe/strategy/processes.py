"""The processes of a pipeline strategy as Lightning's DDPStrategy has them: devices, ranks, launch and collectives."""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.strategies.strategy import TBroadcast
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_pipe.engine.deadline import PeerLost, explained
from lightning_pipe.engine.notices import PipelineError
from lightning_pipe.engine.runtime import configure_threads
from lightning_pipe.engine.store import short_store, store_gone
from lightning_pipe.engine.watchdog import DEFAULT_WAIT_TIMEOUT, activity, hold_for_readers, mark_failed
from lightning_pipe.strategy.launcher import MARGIN, PatientLauncher
from lightning_pipe.strategy.plain import all_gather_text, broadcast_value
from lightning_pipe.strategy.randomness import random_states_digest

__all__ = ["ProcessStrategy"]


class ProcessStrategy(ParallelStrategy):
    """One process per device, launched and connected as ``DDPStrategy`` does (script launcher, torchrun, SLURM)."""

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout

    # -- processes and devices ----------------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally and self.num_processes > 1:
            _refuse_without_a_script()
        # Idle OpenMP threads of ranks sharing cores must sleep, not spin; read by each child as torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        self._launcher = PatientLauncher(self.cluster_environment, self.num_processes, self.num_nodes,
                                         grace=self.wait_timeout + MARGIN)

    @property
    def wait_timeout(self) -> float:
        """Seconds after which a wait of this process for another rank gives up: the launcher kills the ranks it
        started no sooner after one failed."""
        return DEFAULT_WAIT_TIMEOUT

    @override
    def setup_environment(self) -> None:
        configure_threads(self.num_processes)
        super().setup_environment()
        self.setup_distributed()

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device)
        assert self.cluster_environment is not None
        # Binding a device makes torch create every later group by splitting this one: NCCL's fast path, but broken for
        # gloo on CUDA devices (torch 2.11: DeviceMesh fails to copy gloo's options). Bind for NCCL only.
        device_id = self.root_device if "nccl" in self._process_group_backend else None
        _init_dist_connection(self.cluster_environment, self._process_group_backend, timeout=self._timeout,
                              device_id=device_id)
        short_store()  # the client a failure posts through, made while the store answers (it may not, by then)
        # Every rank ran the same script up to here, so their global generators agree, and agree with one device's:
        # kept (a model built in setup(), a random_split, draws in hooks come out as on one device). Only where
        # they differ (code that drew on some ranks only) are they reseeded alike, as DDP reseeds always.
        nccl = "nccl" in self._process_group_backend
        digests = all_gather_text(random_states_digest(), None, self.root_device if nccl else None)
        if len(set(digests)) > 1:
            reset_seed()

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # -- collectives (as DDPStrategy) ---------------------------------------------------------------
    @override
    @explained("a barrier")
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not _distributed_is_initialized():
            return
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[self.root_device.index])
        else:
            torch.distributed.barrier()

    @override
    @explained("a broadcast")
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        # as JSON text in tensors, never pickled (:mod:`.plain`): Lightning broadcasts paths, flags and numbers
        nccl = torch.distributed.get_backend() == "nccl"
        return broadcast_value(obj, src, group=_group.WORLD, device=self.root_device if nccl else None)

    @override
    @explained("a reduce")
    def reduce(self, tensor: Tensor | Any, group: Any | None = None,
               reduce_op: ReduceOp | str | None = "mean") -> Tensor | Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    @explained("a reduce")
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """Over every process of the job (a decision to stop, to save), whatever group :meth:`reduce` takes."""
        if not _distributed_is_initialized():
            return decision
        count = _sync_ddp_if_available(torch.tensor(int(decision), device=self.root_device), None, reduce_op="sum")
        return bool(count == self.world_size) if all else bool(count)

    @override
    @explained("an all_gather")
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def on_exception(self, exception: BaseException) -> None:
        """This rank's run raised (a hook, a callback, the step): post it for the job (the first one wins), so that a
        rank waiting for this one in a collective ends with this error rather than a closed connection. Where this
        rank holds the job's store (global rank 0), it then stays until the others' heartbeats have read the error
        (a few seconds at most), since the store ends with this process."""
        # A pipeline error is posted already (or came from another rank), but for a wait this rank gave up on (the
        # others never came to a collective it is in: a checkpoint saved on one rank only): its explanation is this
        # rank's to post. An interrupt is posted as one (the others said "killed ... or the out-of-memory killer").
        given_up = isinstance(exception, PeerLost) and exception.timed_out
        if not _distributed_is_initialized():
            return
        activity.doing("ending after a failure")  # not stuck in its own code: the watchdog leaves it to end
        if isinstance(exception, PipelineError) and not given_up:
            # another rank's failure, posted already: where this process holds the job's store, it stays until the
            # others have read it too (a rank still waiting said "the store does not answer" when it ended first)
            hold_for_readers()
            return
        store = short_store()
        if store is not None and not store_gone(store) and type(exception).__name__ != "SIGTERMException":
            what = ("KeyboardInterrupt: interrupted (Ctrl+C, SIGINT)" if isinstance(exception, KeyboardInterrupt)
                    else f"{type(exception).__name__}: {exception}")
            with contextlib.suppress(Exception):  # the store may be gone with the rank that held it
                mark_failed(store, torch.distributed.get_rank(), what)
            hold_for_readers()


def _refuse_without_a_script() -> None:
    """The launcher starts each other rank by running the main script again (as DDP's does): from ``python -c`` it
    ran ``python <cwd>/-c`` and the job was killed; from an interactive session or a notebook Lightning's own refusal
    advises ``strategy='ddp_notebook'``, which drops the pipeline."""
    import __main__

    from lightning.fabric.utilities.imports import _IS_INTERACTIVE

    script = sys.argv[0] if sys.argv else ""
    # (a script whose path no longer resolves, after Hydra's job.chdir, is one Lightning's launcher finds again)
    if _IS_INTERACTIVE or getattr(__main__, "__spec__", None) is None and script in ("-c", "-", ""):
        where = "an interactive session or a notebook" if _IS_INTERACTIVE or not script else f"{script!r}"
        raise RuntimeError(f"PipelineStrategy starts each other rank by running your script again, as DDP does, and "
                           f"was started from {where}, which it cannot run again: put the code in a file and run "
                           f"`python train.py` or `python -m package.module` (or launch the ranks with torchrun). "
                           f"strategy='ddp_notebook' would not pipeline the model")

