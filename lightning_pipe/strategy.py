"""PipelineStrategy: Lightning's adapter to the pipeline engine; launches like DDP and runs every step as a pipeline."""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.distributed import group as _group
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH, ReduceOp
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.strategies.strategy import TBroadcast
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import RandomSampler
from typing_extensions import override

from lightning_pipe.checkpoint import atomic_save, gather_checkpoint, training_state_of_rank
from lightning_pipe.engine.partition import Partition
from lightning_pipe.engine.runtime import configure_threads
from lightning_pipe.engine.schedules import SCHEDULES
from lightning_pipe.gradients import HeldGradients, clip_grad_norm_global
from lightning_pipe.step import PipelineRunner

__all__ = ["PipelineStrategy"]


class PipelineStrategy(ParallelStrategy):
    """Pipeline-parallel training: the LightningModule's ``nn.Sequential`` is cut into one stage per process.

    Args:
        schedule: the order of forwards and backwards of micro-batches: ``"1f1b"`` (PipeDream-flush), ``"gpipe"``
            (fill-drain), or any other name registered with the engine (``interleaved_1f1b``, ``zb_h1``, ...).
        num_microbatches: how many micro-batches each batch is split into (along dim 0).
        partition: how many layers each stage gets: ``"uniform"``, ``"parameters"`` (balanced by parameter
            count), or a list of layer counts, one per stage.
        layers: attribute path of the ``nn.Sequential`` to cut (``"model.blocks"``); by default the module's only
            outermost ``nn.Sequential``.
        checkpoint_activations: keep only each stage's input during forward and recompute the rest in backward
            (GPipe's re-materialization): less memory, one more forward.
        schedule_options: extra arguments of the schedule, e.g. ``{"virtual_stages": 2}``.

    The other arguments are those of Lightning's ``DDPStrategy``. Every process reads the same batches; the
    ``training_step`` must return the batch's *mean* loss, as usual.
    """

    strategy_name = "pipeline"

    def __init__(
        self,
        schedule: str = "1f1b",
        num_microbatches: int = 4,
        partition: Partition = "uniform",
        layers: str | None = None,
        checkpoint_activations: bool = False,
        schedule_options: dict[str, int] | None = None,
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
        self.schedule = _check_schedule(schedule)
        self.num_microbatches = _check_num_microbatches(num_microbatches)
        self.partition = _check_partition(partition)
        if layers is not None and not isinstance(layers, str):
            raise TypeError(f"layers must be the attribute path of an nn.Sequential (e.g. 'model.blocks'), "
                            f"not {type(layers).__name__}")
        self.layers = layers
        self.checkpoint_activations = bool(checkpoint_activations)
        self.schedule_options = dict(schedule_options or {})
        self._num_nodes = 1
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._runner: PipelineRunner | None = None
        self._gradients = HeldGradients()
        self._example_input_array: Any = None

    # -- processes and devices (as DDPStrategy) -----------------------------------------------------
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
    def is_distributed(self) -> bool:
        """False: the ranks of a pipeline are one replica of the model. Lightning then keeps the user's samplers
        (every rank reads the same batches, in the order one device would) and skips ``sync_dist`` of logged
        values, which every rank already holds alike."""
        return False

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Give a shuffling sampler the same random generator on every rank, so that all stages see the same batch."""
        sampler = getattr(dataloader, "sampler", None)
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            seed = os.environ.get("PL_GLOBAL_SEED")
            seed = self.broadcast(int(seed) if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
            sampler.generator = torch.Generator().manual_seed(seed)
        return dataloader

    @property
    def process_group_backend(self) -> str | None:
        return self._process_group_backend

    @property
    def runner(self) -> PipelineRunner:
        """The cut module and its pipeline (built in ``setup``)."""
        if self._runner is None:
            raise RuntimeError("the pipeline is built when the Trainer sets the strategy up; call trainer.fit, "
                               "validate, test or predict first")
        return self._runner

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        # Idle OpenMP threads of ranks sharing cores must sleep, not spin; read by each child as torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        configure_threads(self.num_processes)
        super().setup_environment()
        self.setup_distributed()

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._process_group_backend or _get_default_process_group_backend_for_device(
            self.root_device)
        assert self.cluster_environment is not None
        device_id = self.root_device if self.root_device.type != "cpu" else None
        _init_dist_connection(self.cluster_environment, self._process_group_backend, timeout=self._timeout,
                              device_id=device_id)

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    # -- cutting the module ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and not module.automatic_optimization:
            raise ValueError("PipelineStrategy runs forward and backward of every micro-batch itself and so supports "
                             "automatic optimization only; remove self.automatic_optimization = False")
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError("PipelineStrategy does not support a gradient scaler (precision='16-mixed'): each stage "
                             "would skip steps on its own; use precision='bf16-mixed' or '32-true'")
        self._build(module)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            self.setup_optimizers(trainer)
            self.runner.tied.check_optimizers(self.optimizers)
        self.setup_precision_plugin()
        # Lightning clips with the norm of this rank's gradients; a pipeline's norm covers every stage.
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _build(self, module: LightningModule) -> None:
        if self._runner is not None and self._runner.module is module:
            return  # a later run of this Trainer (fit, then test): the module is cut already
        settings = {"layers": self.layers, "schedule": self.schedule, "num_microbatches": self.num_microbatches,
                    "partition": self.partition, "checkpoint_activations": self.checkpoint_activations,
                    "schedule_options": self.schedule_options}
        runner = PipelineRunner.of(module)
        if runner is None:
            runner = PipelineRunner.build(module, device=self.root_device, **settings)
        elif (runner.settings, runner.pipeline.num_ranks) != (settings, self.world_size):
            raise ValueError(f"{type(module).__name__} was cut by an earlier Trainer into a pipeline with "
                             f"{runner.settings} on {runner.pipeline.num_ranks} processes; use the same strategy "
                             f"settings and devices, or a new module (YourModule.load_from_checkpoint(path))")
        configure_threads(self.num_processes)  # the engine guesses ranks per machine; Lightning knows
        self._runner = runner
        # ModelSummary would run the whole model on example_input_array, which no rank holds any more.
        self._example_input_array, module.example_input_array = module.example_input_array, None

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # -- steps --------------------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Forward and backward of every micro-batch; the gradients wait in ``self._gradients`` for ``backward``."""
        trainer = self.lightning_module.trainer
        with self.precision_plugin.train_step_context():
            with self._gradients.held_aside(self.lightning_module.parameters()):
                return self.runner.train(args, kwargs, loss_scale=1.0 / trainer.accumulate_grad_batches)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        """The pipeline ran backward in ``training_step``; hand its gradients over now that zero_grad is done."""
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self._gradients.release(self.runner.tied)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self.runner.evaluate("validation_step", args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self.runner.evaluate("test_step", args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self.runner.evaluate("predict_step", args, kwargs)

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        parameters = self.precision_plugin.main_params(optimizer)
        clip_grad_norm_global(parameters, clip_val, self.runner.tied.counts_in_norm, self.runner.pipeline.group)

    # -- checkpoints --------------------------------------------------------------------------------
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Gather every stage's share on global rank 0 and write one standard checkpoint there, atomically."""
        runner = self.runner
        full = gather_checkpoint(checkpoint, runner.split.state_keys, runner.layout, runner.pipeline.group)
        if self.is_global_zero:
            assert full is not None
            atomic_save(self.checkpoint_io, full, filepath, storage_options=storage_options)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        runner = self._runner if self._runner is not None and self._runner.module is module else None
        runner = runner or PipelineRunner.of(module)
        if runner is None:
            super().load_model_state_dict(checkpoint, strict=strict)  # before the cut: the whole module
        else:
            runner.split.load_state_dict(checkpoint["state_dict"], strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        optimizer_states, scheduler_states = training_state_of_rank(checkpoint, self.global_rank, self.runner.layout)
        for optimizer, state in zip(self.optimizers, optimizer_states):
            optimizer.load_state_dict(state)
            _optimizer_to_device(optimizer, self.root_device)
        checkpoint["lr_schedulers"] = scheduler_states  # Lightning restores the schedulers from here next

    # -- collectives (as DDPStrategy) ---------------------------------------------------------------
    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if not _distributed_is_initialized():
            return
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[self.root_device.index])
        else:
            torch.distributed.barrier()

    @override
    def broadcast(self, obj: TBroadcast, src: int = 0) -> TBroadcast:
        if not _distributed_is_initialized():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src, group=_group.WORLD)
        return box[0]

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None,
               reduce_op: ReduceOp | str | None = "mean") -> Tensor | Any:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and self._example_input_array is not None:
            module.example_input_array = self._example_input_array
            self._example_input_array = None
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register("pipedream", cls, description="Pipeline: PipeDream-flush (1F1B) schedule",
                                   override=True, schedule="1f1b")
        strategy_registry.register("gpipe", cls, description="Pipeline: GPipe (fill-drain, re-materialization)",
                                   override=True, schedule="gpipe", checkpoint_activations=True)


def _check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(sorted(SCHEDULES))}")
    return schedule


def _check_num_microbatches(num_microbatches: int) -> int:
    if isinstance(num_microbatches, bool) or not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")
    return num_microbatches


def _check_partition(partition: Partition) -> Partition:
    if isinstance(partition, str):
        if partition not in ("uniform", "parameters"):
            raise ValueError(f"unknown partition {partition!r}; use 'uniform', 'parameters' or a list of layer counts "
                             f"per stage, e.g. partition=[3, 5]")
        return partition
    if not isinstance(partition, Sequence) or not all(isinstance(n, int) and n >= 1 for n in partition):
        raise ValueError(f"partition {partition!r} must be 'uniform', 'parameters' or a list of layer counts, each "
                         f"at least 1, one per stage, e.g. partition=[3, 5]")
    return list(partition)

