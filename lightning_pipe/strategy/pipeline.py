"""PipelineStrategy: Lightning's adapter to the pipeline engine; launches like DDP and runs every step as a pipeline."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import ReduceOp
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import (
    _optimizers_to_device,
)
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from typing_extensions import override

from lightning_pipe.engine.deadline import job_failure_notice
from lightning_pipe.engine.cut import Partition
from lightning_pipe.engine.schedules import schedule_kind
from lightning_pipe.engine.watchdog import DEFAULT_WAIT_TIMEOUT
from lightning_pipe.planner.cut_plan import AUTO_SCHEDULE, CutPlan
from lightning_pipe.strategy.asynchronous import (
    AsyncSteps,
    DrainPipeline,
    check_async_fit,
)
from lightning_pipe.strategy.callbacks import (check_callbacks, count_throughput_per_pipeline, fit_to_the_cut,
                                               summarize_before_cut)
from lightning_pipe.strategy.captured import CapturedModule
from lightning_pipe.strategy.checkpointing import PipelineCheckpoints, fit_start_after_restore
from lightning_pipe.strategy.cutting import PipelineCutting
from lightning_pipe.strategy.hook_logs import gather_hook_logs, release_hook_logs
from lightning_pipe.strategy.data_order import (
    SharedOrder, check_distributed_samplers, loading_notice, order_notice, own_sampler_notice, share_order,
)
from lightning_pipe.strategy.failures import raise_together
from lightning_pipe.strategy.grad_scaler import agree_on_overflow, refuse_self_unscaling
from lightning_pipe.strategy.gradients import GlobalNorms, HeldGradients
from lightning_pipe.strategy.materialize import LocalMaterializer
from lightning_pipe.strategy.mesh import AUTO, MeshShape, build_mesh
from lightning_pipe.strategy.metric_states import sync_callback_metrics
from lightning_pipe.strategy.optimizers import (differing_groups_warning, drop_placeholders, empty_optimizers_allowed,
                                                group_settings, placeholders, refuse_searching_optimizers,
                                                whole_orders, whole_set_warning)
from lightning_pipe.strategy.plain import all_gather_text, gather_stacked
from lightning_pipe.strategy.positions import RunPosition
from lightning_pipe.strategy.processes import ProcessStrategy
from lightning_pipe.strategy.randomness import Stream, derive_seed, forked_random
from lightning_pipe.strategy.runner import PipelineRunner
from lightning_pipe.strategy.settings import PipelineSettings
from lightning_pipe.strategy.settings_checks import check_settings
from lightning_pipe.strategy.share_warning import read_by_the_user
from lightning_pipe.strategy.step_hooks import PipelineSteps
from lightning_pipe.strategy.split import SplitModule, listings_of

__all__ = ["PipelineStrategy"]


class PipelineStrategy(PipelineSteps, PipelineCutting, PipelineCheckpoints, ProcessStrategy):
    """Pipeline-parallel training: the LightningModule's model (an ``nn.Sequential``, or any module its step calls that
    can be captured) is cut into one stage per process.

    Args:
        schedule: the order of forwards and backwards of micro-batches: ``"1f1b"`` (PipeDream-flush), ``"gpipe"``
            (fill-drain), or any other name registered with the engine (``interleaved_1f1b``, ``zb_h1``, ...);
            ``"auto"``: the planner simulates the synchronous schedules (``gpipe``, ``1f1b``, ``interleaved_1f1b``,
            ``zb_h1``, ``zb_v``) at several micro-batch counts on a profile of the first batch and runs the fastest
            that fits ``memory_cap``, with its partition (see "Planned cuts" below).
        num_microbatches: how many micro-batches each batch is split into (along dim 0); under ``schedule="auto"``
            only the size of the profiled micro-batch (the count is chosen).
        partition: how many layers each stage gets: ``"uniform"``, ``"parameters"`` (balanced by parameter
            count), a list of layer counts, one per stage, or a plan from a profile of the first batch:
            ``"profile"`` (PipeDream's dynamic program, ranked by simulating the schedule), ``"time"`` (balanced
            forward + backward time) or ``"memory"`` (fastest cut under ``memory_cap``).
        layers: attribute path of the model to cut: an ``nn.Sequential`` (``"model.blocks"``: cut between its
            layers, no tracing) or any module the step calls (``"model"``: captured, see
            :mod:`lightning_pipe.strategy.captured`). By default the module's only outermost ``nn.Sequential`` when it
            holds every trainable parameter, else the child module holding them all (``self.model``) or, when several
            hold them, the module's own ``forward``, captured (:mod:`lightning_pipe.strategy.model_choice`).
            ``""``: the LightningModule's own ``forward``, captured (a step that calls its layers one by one, a
            linear probe whose frozen backbone and head are separate children).
        checkpoint_activations: keep only each stage's input during forward and recompute the rest in backward
            (GPipe's re-materialization): less memory, one more forward.
        schedule_options: extra arguments of the schedule, e.g. ``{"virtual_stages": 2}``.
        vertical_sync: with ``schedule="async_1f1b"``, every stage runs a micro-batch on the weight version stage 0
            used for it (PipeDream's vertical sync), instead of its own newest weights.
        num_stages: ranks per pipeline; ``devices * num_nodes`` must be ``num_stages * replicas``. By default all
            ranks form one pipeline. With several replicas the ranks form a ``DeviceMesh`` with dims
            ``("pipe", "data")`` (see :mod:`lightning_pipe.strategy.mesh`): each replica runs the schedule on its share of
            the data (a ``DistributedSampler`` over the replicas) and each stage's replicas average their gradients
            (bucketed, overlapping the end of the backward: :mod:`lightning_pipe.engine.replicas`).
        replicas: replicas of every stage, instead of ``num_stages`` (even replication: the mesh above); or a list
            with one count per stage, e.g. ``[3, 1]`` (uneven replication, PipeDream's "3-1": one pipeline whose
            stage ``s`` has ``replicas[s]`` ranks taking its micro-batches in turn, summing their gradients; see
            :mod:`lightning_pipe.engine.schedules.replicated`); or ``"auto"`` with ``partition="profile"``: the
            planner chooses the counts with the cut. Uneven layouts run ``schedule="1f1b"`` or ``"gpipe"``, and
            their last stage has one rank.
        memory_cap: bytes per device that a planned cut must fit (parameters, gradients, optimizer state as for
            Adam, and the activations the schedule keeps in flight); for ``partition="profile" | "time" | "memory"``
            and ``schedule="auto"``. ``None``: no cap.
        profile_cache: folder where planned cuts keep their layer profiles, reused while the model and batch shapes
            are unchanged; ``None``: ``<default_root_dir>/.lightning_pipe_profiles``; ``False``: no cache.
        split_points: where to cut a captured model, by module names as ``model.named_modules()`` gives them
            (``["transformer.h.2", ("transformer.ln_f", "end")]``); by default before every repeated block and after
            the last. ``partition`` then counts segments (the pieces between cuts) instead of layers.
        allow_autograd_functions: capture a model whose forward applies custom ``torch.autograd.Function`` s
            unchecked: the graph keeps their forward ops and differentiates those itself, which is right only if
            each backward is its forward's exact derivative. By default each one is checked so on random inputs of
            its shapes (Bloom's GeLU passes) and one that fails is refused, naming it and the difference.
        dynamic_shapes: capture a model once per mode with symbolic sizes, serving every batch size and sequence
            length (the default; it falls back to one capture per shape where export cannot); ``False`` captures once
            per input shape from the start: for models of fixed input size whose symbolic capture is slow (window
            attention over symbolic heights and widths, as DaViT's, can take torch's shape solver many minutes).
        checkpoint_format: ``"full"``: one standard Lightning file, gathered on global rank 0 (small models, and
            ``load_from_checkpoint`` on one device); ``"sharded"``: a folder at the checkpoint's path into which every
            rank writes its own stages' weights and optimizer state in parallel (torch.distributed.checkpoint), keyed
            by the unpipelined model's names, so that it resumes on any layout (see :mod:`lightning_pipe.strategy.
            sharded`). Either is loaded by ``fit(ckpt_path=...)``; ``python -m lightning_pipe.checkpoint`` converts.
        loss_reduction: how ``training_step``'s loss adds up over the batch's rows: ``"mean"`` (``F.mse_loss``,
            ``F.cross_entropy``), ``"sum"`` (``loss.sum()``: each micro-batch's loss then counts whole), or
            ``"auto"``: the first batch with several micro-batches tells (:mod:`lightning_pipe.strategy.reduction`).
            Or a function of a micro-batch counting what the loss is a mean over, for a loss normalized by a count
            over the batch (``lambda batch: (batch["labels"] != -100).sum()``: labels ignored at -100, as in
            Hugging Face's losses; class weights): each micro-batch's loss, and each value it logs, is then weighted
            by its count's share of the whole batch's (over every data-parallel replica), which gives one device's
            gradients.
        wait_timeout: seconds any one of the pipeline's waits for other ranks (a message, the step's collectives) may
            last; a rank that stops answering (stopped, frozen, looping in user code) then ends every rank with an
            error naming it and what was awaited (:mod:`lightning_pipe.engine.watchdog`). Default 300; raise it for
            steps, or work on one rank between steps, that take longer.
        detect_anomaly: check every forward output, loss and gradient for NaN or infinity, and end training on every
            rank with the step, micro-batch and stage where one first appeared (synchronous schedules; costs one
            reduction per tensor checked).

    The other arguments are those of Lightning's ``DDPStrategy``. Every process reads the same batches.

    Same batches, same random numbers. Every rank of a pipeline loads the batch itself (the first stage its inputs,
    the last its targets), and runs the step's own code (before the layers on the first stage, around them on the
    last). So that both ends agree: the dataloaders get samplers and worker seeds drawn from a seed every rank agrees
    on and the epoch (:mod:`lightning_pipe.strategy.data_order`); a fingerprint of each rank's batch is compared at
    every step, and a difference is an error naming its likely cause; and the step code of each micro-batch draws
    from torch's generators forked to a seed derived from that seed, the step's place in the run and the micro-batch
    (:mod:`lightning_pipe.strategy.randomness`), the same on every rank and after a resume, while the layers inside
    the stages draw from their own streams. A checkpoint keeps the position in the data: a fit resumed from a
    mid-epoch checkpoint continues with the batches the uninterrupted run would have seen. Exact equality with a
    one-device run holds for step code without random numbers; step code with them draws per micro-batch here.

    The asynchronous schedules (``"async_1f1b"``: PipeDream with weight stashing, registered as ``pipedream_async``;
    ``"2bw"``: PipeDream-2BW, ``pipedream_2bw``) run 1F1B across batches without a flush and step the optimizer
    inside the pipeline. Lightning's counters then mean:

    - one Lightning step (``global_step``, ``optimizer_step`` hook, ``interval="step"`` LR schedulers) is one batch.
      Under ``async_1f1b`` each stage's optimizer takes one real step per micro-batch, ``num_microbatches`` per
      batch, each with that micro-batch's mean-loss gradient; under ``2bw`` one per batch, with the batch's.
      ``on_before_optimizer_step`` and clipping by value run at every real step.
    - the loss returned and logged at step ``k`` is batch ``k``'s: the last stage computes it during step ``k``,
      from forwards that ran on older weights (stage ``s`` lags ``num_stages - 1 - s`` micro-batch updates under
      ``async_1f1b``, and batch ``k`` runs on the weights after batch ``k - 2`` under ``2bw``); the earlier
      stages apply its gradient during step ``k + 1``.
    - the pipeline is drained (every update still owed applied) before validation, before a checkpoint is written,
      at the end of every epoch and of fit, so those see exactly the weights after ``global_step`` batches. A
      drain ends the overlap: the next batch starts the pipeline afresh. A batch of fewer rows than
      ``num_microbatches`` runs alone after a drain too.

    They refuse ``accumulate_grad_batches > 1``, clipping by norm (each stage steps at its own time), parameters
    tied across stages and ``schedule_options`` (one stage per rank).

    Planned cuts (``partition="profile"``, ``"time"``, ``"memory"``, or ``schedule="auto"``): when the Trainer sets
    the strategy up, global rank 0 takes the first batch of the stage's dataloader (fit: ``train_dataloader``),
    runs the step up to the ``nn.Sequential`` to capture its input, profiles every layer on one micro-batch of it
    (:func:`~lightning_pipe.planner.profile_layers`, cached in ``profile_cache``) and plans one pipeline of
    ``num_stages`` ranks (:mod:`lightning_pipe.planner.cut_plan`); it logs the plan and broadcasts the layer counts (and the
    chosen schedule and micro-batch count) to every rank, and every rank cuts with them. Replicas use the same cut.
    An error while planning (no plan fits ``memory_cap``, say) is raised on every rank. :attr:`cut_plan` holds the
    plan afterwards. Random state is left as it was, so training matches one device's.
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
        vertical_sync: bool = False,
        num_stages: int | None = None,
        replicas: int | Sequence[int] | None = None,
        memory_cap: float | None = None,
        profile_cache: str | os.PathLike[str] | bool | None = None,
        split_points: Any = None,
        allow_autograd_functions: bool = False,
        dynamic_shapes: bool = True,
        checkpoint_format: str = "full",
        loss_reduction: str | Callable[[Any], Any] = "auto",
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        detect_anomaly: bool = False,
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
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         timeout=timeout)
        self.settings = PipelineSettings(
            schedule=schedule, num_microbatches=num_microbatches, partition=partition, layers=layers,
            checkpoint_activations=checkpoint_activations, schedule_options=schedule_options or {},
            vertical_sync=vertical_sync, num_stages=num_stages, replicas=replicas, memory_cap=memory_cap,
            profile_cache=profile_cache, split_points=split_points,
            allow_autograd_functions=allow_autograd_functions, dynamic_shapes=dynamic_shapes,
            wait_timeout=wait_timeout,
            detect_anomaly=detect_anomaly, checkpoint_format=checkpoint_format, loss_reduction=loss_reduction)
        self._async = AsyncSteps() if self.settings.asynchronous else None
        self._planned_replicas: tuple[int, ...] | None = None  # replicas="auto": the planner's uneven counts
        self._mesh: DeviceMesh | None = None
        self._runner: PipelineRunner | None = None
        self._gradients = HeldGradients()
        self._global_norms: GlobalNorms | None = None  # the gradient hooks' clip_grad_norm_ (several ranks)
        self._example_input_array: Any = None
        self._cut_plan: CutPlan | None = None
        self._position = RunPosition()
        self._materializer: LocalMaterializer | None = None  # a module built on the meta device, until checked
        # each optimizer's groups as one device lists them, by name (configure_optimizers saw the whole model)
        self._whole_orders: list[list[list[str]]] | None = None
        self._conversion_sources: dict[int, torch.Tensor] = {}  # a precision's conversion deferred to the cut
        self._sharded_path: str | None = None  # the sharded checkpoint folder being loaded
        self._saved_random_states: dict[str, Any] | None = None  # this rank's, from a checkpoint, until its first batch

    # The settings, by name (read-only: they are fixed when the strategy is made).
    schedule = property(lambda self: self.settings.schedule)
    num_microbatches = property(lambda self: self.settings.num_microbatches)
    partition = property(lambda self: self.settings.partition)
    layers = property(lambda self: self.settings.layers)
    checkpoint_activations = property(lambda self: self.settings.checkpoint_activations)
    schedule_options = property(lambda self: dict(self.settings.schedule_options))
    vertical_sync = property(lambda self: self.settings.vertical_sync)
    memory_cap = property(lambda self: self.settings.memory_cap)
    profile_cache = property(lambda self: self.settings.profile_cache)
    checkpoint_format = property(lambda self: self.settings.checkpoint_format)
    loss_reduction = property(lambda self: self.settings.loss_reduction)
    wait_timeout = property(lambda self: self.settings.wait_timeout)
    detect_anomaly = property(lambda self: self.settings.detect_anomaly)

    @property
    @override
    def world_size(self) -> int:
        """Every process of the job (stages x replicas), as Lightning counts them. Read by the user's code (a batch
        divided by it, a learning rate scaled by it: the linear scaling rule), said once to be more than the
        data-parallel size (found by review: the learning rate doubled on 2 stages, silently)."""
        size = super().world_size
        if size > 1 and not self.__dict__.get("_world_size_said") and read_by_the_user():
            self._world_size_said = True
            try:
                replicas = self.mesh_shape.replicas
            except ValueError:  # (a layout the set-up will refuse, with its own error)
                replicas = size
            if replicas < size:
                rank_zero_warn(f"trainer.world_size is {size} under PipelineStrategy: every process of the job "
                               f"({size // replicas} pipeline ranks x {replicas} replica(s)), not the number of "
                               f"copies of the model that read their own data. Code that divides the batch by it "
                               f"(batch_size // trainer.world_size) or scales the learning rate by it divides or "
                               f"scales by the pipeline's ranks too, which one device's run does not; the "
                               f"data-parallel size is trainer.strategy.distributed_sampler_kwargs['num_replicas'] "
                               f"({replicas})", category=PossibleUserWarning)
        return size

    @property
    def plans_cut(self) -> bool:
        """Whether a profile decides the cut (``partition="profile" | "time" | "memory"`` or ``schedule="auto"``)."""
        return self.settings.plans_cut

    @property
    def cut_plan(self) -> CutPlan | None:
        """The planned partition, schedule and micro-batch count every rank cut with (``None`` if not planned, or not
        yet: it is made when the Trainer sets the strategy up)."""
        return self._cut_plan

    @property
    def is_distributed(self) -> bool:
        """Whether there are several replicas of the pipeline. With one, Lightning keeps the user's samplers (every
        rank reads the same batches, in the order one device would); with several, it gives each a
        ``DistributedSampler`` over the replicas only (:attr:`distributed_sampler_kwargs`)."""
        return self.num_processes > 0 and self.mesh_shape.replicas > 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """The ranks of one pipeline read the same share of the data: one share per replica."""
        shape = self.mesh_shape
        return {"num_replicas": shape.replicas, "rank": shape.coordinates(self.global_rank)[1]}

    @property
    def mesh_shape(self) -> MeshShape:
        """Ranks per pipeline x replicas, from ``num_stages`` / ``replicas`` and ``devices * num_nodes``."""
        world = self.num_processes * self.num_nodes
        if self.settings.replicas == AUTO:  # one pipeline; one rank per stage until the planner replicates some
            if self.settings.num_stages is not None and self.settings.num_stages > world:
                raise ValueError(f"num_stages={self.settings.num_stages} is more than the {world} devices * num_nodes")
            shape = MeshShape.of(world, None, self._planned_replicas)
        else:
            shape = MeshShape.of(world, self.settings.num_stages, self.settings.replicas)
        if shape.stage_replicas and (self.schedule == AUTO_SCHEDULE or not schedule_kind(self.schedule).replicated):
            raise ValueError(f"uneven replication (replicas={list(shape.stage_replicas)}) runs schedule '1f1b' "
                             f"(strategy 'pipedream') or 'gpipe', not {self.schedule!r}: its stages take micro-batches "
                             f"in turn (1F1B round-robin); name one of those, or give every stage the same replicas")
        return shape

    @property
    @override
    def global_rank(self) -> int:
        answering = getattr(self, "_answering_as", None)
        return answering if answering is not None else super().global_rank

    @contextlib.contextmanager
    def answering_as_first_stage(self) -> Iterator[None]:
        """While the step's code runs, on any stage: ``global_rank`` (``self.global_rank``,
        ``trainer.is_global_zero``) answers as the pipeline's first stage, the rank one device or DDP would run the
        step on, so that code under ``if self.trainer.is_global_zero:`` runs where the step's results are made (the
        last stage's run), as on one device, instead of on no rank. ``rank_zero_only`` functions are another matter
        (:mod:`.logger_calls`)."""
        if self.num_processes == 0 or getattr(self, "_answering_as", None) is not None:
            yield
            return
        first = getattr(self, "_first_stage_rank", None)  # the layout is fixed once set up: found once (each
        if first is None:  # micro-batch's run of the step asks)
            shape = self.mesh_shape
            first = self._first_stage_rank = shape.pipelines()[shape.coordinates(super().global_rank)[1]][0]
        self._answering_as = first
        try:
            yield
        finally:
            self._answering_as = None

    @override
    def _configure_launcher(self) -> None:
        _ = self.mesh_shape  # an unsupported layout fails here, before any process starts
        super()._configure_launcher()

    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        shape = self.mesh_shape
        self._mesh = build_mesh(shape, self.root_device.type) if shape.replicas > 1 else None
        self._position.agree_seed(self._collective_device())

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """A copy of a DataLoader that yields the same batches on every rank, in an order drawn from the agreed seed
        and the epoch, resumable mid-epoch (:mod:`lightning_pipe.strategy.data_order`)."""
        trainer = self._trainer()
        if trainer is None:
            return dataloader
        training = trainer.state.stage == RunningStage.TRAINING
        replica = self.mesh_shape.coordinates(self.global_rank)[1]
        stage = trainer.state.stage.value if trainer.state.stage else ""
        named = {"train": "training", "sanity_check": "validation", "validate": "validation"}.get(stage, stage)
        check_distributed_samplers(dataloader, self.mesh_shape.replicas, replica, f"the {named} DataLoader")
        self._say_once("order", order_notice(dataloader) if training else None)
        shared = share_order(dataloader, lambda order: self._position.data_start(trainer, training, order), replica)
        if training and shared is not dataloader:
            self._position.adopt_train_order(shared._pipeline_order)
            shared._pipeline_order.said = functools.partial(self._say_own_sampler, shared._pipeline_order)
            shared._pipeline_order.loading_said = functools.partial(self._say_loading, shared._pipeline_order)
        return shared

    def _say_once(self, what: str, notice: str | None) -> None:
        """Say ``notice`` on rank 0, once per strategy for each kind of notice ``what`` (of the order, of the
        loading)."""
        said = self.__dict__.setdefault("_notices_said", set())
        if notice is not None and what not in said:
            said.add(what)
            rank_zero_info(notice)

    def _say_loading(self, order: SharedOrder) -> None:
        """A training batch loaded in the main process drew from torch's generator: say once that such draws are
        not one device's (:func:`~.data_order.loading_notice`)."""
        order.loading_said = None
        self._say_once("loading", loading_notice())

    def _say_own_sampler(self, order: SharedOrder) -> None:
        """A training order drew from its generator: where a sampler of the user's drew, say once that the order is
        not one device's (:func:`~.data_order.own_sampler_notice`)."""
        order.said = None
        self._say_once("order", own_sampler_notice(order))

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """As Lightning, with the module's transfer hooks drawing their random numbers (a GPU augmentation in
        ``on_after_batch_transfer``) from a seed of the step's position, the same on every rank."""
        trainer = self._trainer()
        if trainer is not None and self._runner is not None:
            sync_callback_metrics(trainer.callbacks, self._runner.replica_group)
        if trainer is None or self._position.seed is None or trainer.state.stage is None:
            return super().batch_to_device(batch, device, dataloader_idx)
        if trainer.state.stage == RunningStage.TRAINING:
            self._resume_global_random_states()
        seed = derive_seed(self._position.step_seed(trainer), Stream.BATCH_TRANSFER)
        with forked_random(seed, self.root_device):
            return super().batch_to_device(batch, device, dataloader_idx)

    @property
    def runner(self) -> PipelineRunner:
        """The cut module and its pipeline (built in ``setup``)."""
        if self._runner is None:
            raise RuntimeError("the pipeline is built when the Trainer sets the strategy up; call trainer.fit, "
                               "validate, test or predict first")
        return self._runner

    @property
    def pipeline_group(self) -> Any:
        """The process group of this rank's pipeline, one rank per stage (the world for one pipeline): a sum over it of
        what each rank computes over its own stages' parameters (a weight norm's square in ``on_train_epoch_end``) is
        the whole model's."""
        return self.runner.pipeline.group

    # -- cutting the module ---------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        assert module is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        for loop in (trainer.validate_loop, trainer.test_loop, trainer.predict_loop):  # under torch.no_grad, as fit's
            loop.inference_mode = False  # validation and gloo's: inference tensors have no version counter, and the
            # stages' copies and the steps' runs aside need ordinary ones (found by review: NCCL's evaluation failed)
        check_callbacks(trainer.callbacks, trainer.loggers)
        scaler = getattr(self.precision_plugin, "scaler", None)
        check_settings(trainer, module, one_process=self.world_size == 1,
                       sync_batchnorm=getattr(self, "_layer_sync", None) is not None,
                       foreign_io=self.checkpoint_format == "sharded"
                       and type(self.checkpoint_io) is not TorchCheckpointIO,
                       io_name=type(self.checkpoint_io).__name__,
                       scaled_asynchronous=self.schedule if scaler is not None and self.settings.asynchronous else None)
        self._position.start(trainer)
        # Every rank logs the same values (the last stage's, combined over the replicas): Lightning's advice to sync
        # epoch-level logs across devices does not apply, and following it would only add a collective.
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True\)`")
        if fitting:
            summarize_before_cut(trainer.callbacks, module)
        self._build(module, trainer)
        count_throughput_per_pipeline(trainer.callbacks, self.mesh_shape.replicas, self.mesh_shape.world_size)
        fit_start_after_restore(trainer, module)
        pipeline = self.runner.pipeline
        if fitting:
            fit_to_the_cut(trainer.callbacks, module, isinstance(self.runner.split, CapturedModule),
                           functools.partial(gather_stacked, group=pipeline.group, device=self._collective_device()),
                           pipeline.rank,
                           functools.partial(all_gather_text, group=pipeline.group, device=self._collective_device()),
                           self.runner.tied.counts_in_norm, self.runner.tied.tie_name)
            if scaler is not None:  # every stage skips a step together, and the scales stay equal
                agree_on_overflow(scaler, pipeline.group, self._collective_device(), self.settings.wait_timeout)
        if self._async is None and pipeline.num_ranks > 1:  # every rank reaches the hooks together
            clip = GlobalNorms(pipeline.group, self.runner.counts_in_norm, self.settings.wait_timeout,
                               module.parameters, lambda: [group["params"] for optimizer in trainer.optimizers
                                                           for group in optimizer.param_groups],
                               functools.partial(listings_of, module),
                               functools.partial(job_failure_notice, pipeline.comm.board))
            gather_hook_logs(module, self._pipeline_texts(), trainer.callbacks, clip, self.runner.split.tied_names)
            self._global_norms = clip  # (what a rank clipped alone, for a wait's diagnosis)
        self._fold_sigterm_check(trainer)
        self.runner.hook_calls.install(stepping=lambda: bool(self.__dict__.get("_stepping")))
        if self._async is not None:
            self._async.attach(self.runner, self.precision_plugin)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            self.setup_optimizers(trainer)
            self.runner.tied.check_optimizers(self.optimizers, {id(p): n for n, p in module.named_parameters()})
            if pipeline.num_ranks > 1:
                message = differing_groups_warning(all_gather_text(group_settings(self.optimizers), pipeline.group,
                                                                   self._collective_device()))
                if message is not None:
                    rank_zero_warn(message)
            if scaler is not None:
                refuse_self_unscaling(self.optimizers)
            if self._async is not None:
                check_async_fit(trainer, self.schedule, has_ties=any(not tie.step for tie in self.runner.tied.ties),
                                step_parameters=sorted(self.runner.tied.step_names))
                if not any(isinstance(c, DrainPipeline) and c.steps is self._async for c in trainer.callbacks):
                    trainer.callbacks.insert(0, DrainPipeline(self._async))  # first: the others see drained weights
        self.setup_precision_plugin()
        # Lightning clips with the norm of this rank's gradients; a pipeline's norm covers every stage.
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]
        self.precision_plugin.clip_grad_by_value = self._clip_grad_by_value  # type: ignore[method-assign]
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        """The module's ``configure_optimizers`` on every rank (see :mod:`lightning_pipe.strategy.optimizers`): a
        stage with nothing to train gets an optimizer that changes nothing, and an error on any rank is raised on
        every rank here, before any of them waits for another in a step."""
        error: BaseException | None = None
        try:
            split = self._runner.split if self._runner is not None else None
            elsewhere = split.parameters_held_elsewhere() if isinstance(split, CapturedModule) else []
            # placeholders in other ranks' layers of an nn.Sequential
            whole = split.whole(self.root_device) if isinstance(split, SplitModule) else contextlib.nullcontext([])
            with whole as layers, placeholders(self.lightning_module, self.root_device, elsewhere) as made, \
                    empty_optimizers_allowed(made, self.root_device):
                super().setup_optimizers(trainer)
                self._whole_orders = whole_orders(self.lightning_module, self.optimizers) if layers or elsewhere \
                    else None
            drop_placeholders(self.optimizers, made + layers)
            self._optimized = (self.lightning_module, self.runner.cut_names)  # what their parameters are named in
            refuse_searching_optimizers(self.optimizers)
            if (message := whole_set_warning(self.optimizers)) is not None and self.runner.pipeline.num_ranks > 1:
                rank_zero_warn(message)
        except Exception as caught:
            error = caught
            if "multiple optimizers is only supported with manual optimization" in str(caught):
                error = RuntimeError(
                    f"{caught} Under PipelineStrategy manual optimization is not supported either (the pipeline runs "
                    f"each micro-batch's backward itself): where the optimizers are of one kind, give one optimizer a "
                    f"parameter group each instead ([{{'params': self.encoder.parameters(), 'lr': 1e-4}}, {{'params': "
                    f"self.head.parameters(), 'lr': 1e-2}}]), which trains as on one device; alternating updates of "
                    f"different models (a GAN's) cannot be pipelined: train them with strategy='ddp'")
        raise_together(error, "configure_optimizers", None, self._collective_device())  # every replica too

    def _trainer(self) -> Trainer | None:
        """The Trainer running the module, if any (``LightningModule.trainer`` raises without one)."""
        module = self.lightning_module
        return getattr(module, "_trainer", None) if module is not None else None

    def _collective_device(self) -> torch.device:
        """Where the tensors of this strategy's collectives live: the device under NCCL, else the CPU."""
        backend = self._process_group_backend or ""
        return self.root_device if "nccl" in backend else torch.device("cpu")

    @override
    def reduce(self, tensor: Tensor | Any, group: Any | None = None,
               reduce_op: ReduceOp | str | None = "mean") -> Tensor | Any:
        """``trainer.strategy.reduce`` (a sum of what each rank counted, as under DDP): over the data-parallel
        replicas, as :meth:`all_gather`, since every rank of a pipeline holds the same values (over the world it
        counted each replica's once per stage)."""
        runner = self._runner
        if (group is not None and group is not torch.distributed.group.WORLD) or runner is None:
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
        if runner.replica_group is None or not isinstance(tensor, Tensor):
            return tensor
        return super().reduce(tensor, group=runner.replica_group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """``self.all_gather`` (whose group is the world unless given): over the data-parallel replicas, one entry
        per replica, since every rank of a pipeline holds the same values; with one replica a leading dim of 1, as
        DDP gives, since ``trainer.world_size`` counts every process (found by review: DDP's idiom
        ``self.all_gather(z).flatten(0, 1) if self.trainer.world_size > 1 else z`` failed on the tensor as it is)."""
        runner = self._runner
        if (group is not None and group is not torch.distributed.group.WORLD) or runner is None:
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)
        if runner.replica_group is None:
            return tensor.unsqueeze(0)
        return super().all_gather(tensor, group=runner.replica_group, sync_grads=sync_grads)

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None:
            trainer = getattr(module, "_trainer", None)
            release_hook_logs(module, trainer.callbacks if trainer is not None else ())
        if self._runner is not None:
            self._runner.hook_calls.uninstall()
        if module is not None and self._example_input_array is not None:
            module.example_input_array = self._example_input_array
            self._example_input_array = None
        if module is not None and any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            # a module still on the meta device (setup failed before this rank's share got storage): Lightning's
            # move to the CPU would fail and hide the error that ended the run
            module.cpu = lambda: module  # type: ignore[method-assign]
            try:
                super().teardown()
            finally:
                del module.cpu
            return
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register("pipedream", cls, description="Pipeline: PipeDream-flush (1F1B) schedule",
                                   override=True, schedule="1f1b")
        strategy_registry.register("gpipe", cls, description="Pipeline: GPipe (fill-drain, re-materialization)",
                                   override=True, schedule="gpipe", checkpoint_activations=True)
        strategy_registry.register("pipedream_async", cls, override=True, schedule="async_1f1b",
                                   description="Pipeline: PipeDream's asynchronous 1F1B with weight stashing")
        strategy_registry.register("pipedream_2bw", cls, override=True, schedule="2bw",
                                   description="Pipeline: PipeDream-2BW (asynchronous, double-buffered weights)")


# Lightning is fully imported by now (this module imports it), so the names can be registered; importing
# ``lightning_pipe`` makes sure this module is imported as soon as Lightning is (see ``lightning_pipe/__init__``).
PipelineStrategy.register_strategies(StrategyRegistry)
