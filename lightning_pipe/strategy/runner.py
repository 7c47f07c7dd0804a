"""Run a LightningModule's steps through a pipeline on every rank, and give every rank the last stage's results.

This is the strategy's core, and needs no Trainer: :class:`PipelineRunner` cuts the module, runs one training or
evaluation step through the engine, and then sends what the last stage computed (the loss, the combined logs, the
torchmetrics' batch state, the step's outputs) to every rank in one collective (:mod:`.results`), so that all ranks
return, log and checkpoint the same thing; the same collective checks that every rank read the same batch. Each
micro-batch's step code runs with torch's generators forked to a seed derived from the step's seed and the
micro-batch's index (:mod:`.randomness`), so that the first and the last stage draw the same random numbers. With
data-parallel replicas of the pipeline, the replicas average their gradients (:mod:`.engine.replicas`), and their last
stages first combine loss, logs and metrics into those of the whole batch.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from lightning_pipe.engine.config import PipelineConfig
from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import batch_rows, split_batch
from lightning_pipe.engine.replicas import GradientAverager, broadcast_state
from lightning_pipe.engine.runtime import next_serial
from lightning_pipe.engine.tree import tree_flatten
from lightning_pipe.strategy.buffers import BufferWatch
from lightning_pipe.strategy.cut_warnings import (FrozenCopies, refuse_sequence_hooks, warn_of_frequency_scaling,
                                                   warn_of_gradient_hooks, warn_of_layer_hooks, warn_of_split_buffers)
from lightning_pipe.strategy.captured import CapturedModule
from lightning_pipe.strategy.pipelined_model import PipelinedModel
from lightning_pipe.strategy.evaluation import EvaluationSteps
from lightning_pipe.strategy.first_checks import FirstBatchChecks
from lightning_pipe.strategy.hook_experiment import HookExperimentCalls
from lightning_pipe.strategy.logger_calls import LoggerCalls
from lightning_pipe.strategy.logs import LogRecorder, WholeBatchLogs
from lightning_pipe.strategy.metric_states import MetricTracker
from lightning_pipe.strategy.output_copies import OutputCopies
from lightning_pipe.strategy.randomness import derive_seed, forked_random
from lightning_pipe.strategy.reduction import Counts
from lightning_pipe.strategy.results import ResultChannel, StepResult
from lightning_pipe.strategy.sharing import DifferentBatches, SharedResults
from lightning_pipe.strategy.split import PipelinedSequence, SplitModule
from lightning_pipe.strategy.state_names import parameter_names
from lightning_pipe.strategy.step_effects import StepEffects
from lightning_pipe.strategy.step_runs import microbatch_run
from lightning_pipe.strategy.step_values import BATCH, ROWS, combine_outputs
from lightning_pipe.strategy.tied import TiedParameters, refuse_renormalized_ties
from lightning_pipe.strategy.training import TrainingSteps
from lightning_pipe.strategy.unfollowed import UnfollowedState, user_modules
from lightning_pipe.strategy.whole_batch import WholeBatchRuns

__all__ = ["PipelineRunner", "combine_outputs", "DifferentBatches"]  # combine_outputs: from .step_values



class PipelineRunner(TrainingSteps, EvaluationSteps, FirstBatchChecks, WholeBatchRuns, SharedResults):
    """A LightningModule cut into pipeline stages, one per rank, that runs its steps through the pipeline.

    Build it on every rank with :meth:`build` (collective). Every rank then calls :meth:`train` or :meth:`evaluate`
    with the same batch; each returns the same value on every rank.
    """


    def __init__(self, split: SplitModule | CapturedModule, pipeline: Pipeline, tied: TiedParameters,
                 replica_group: dist.ProcessGroup | None = None) -> None:
        self.split = split
        self.module: LightningModule = split.module  # type: ignore[assignment]
        self.pipeline = pipeline
        self.tied = tied
        tied.timeout = pipeline.config.wait_timeout
        self.whole_logs = WholeBatchLogs()  # logged values the micro-batches do not combine into
        self.recorder = LogRecorder(self.module, self.whole_logs.constants)
        self.metrics = MetricTracker(self.module)
        self.last_rank = dist.get_global_rank(pipeline.group, pipeline.stage_to_rank[pipeline.num_stages - 1])
        self.layers: str | None = None  # the attribute path build() was given
        # each parameter's names when the model was cut: a parameter renamed since (pruning's weight_orig) is still
        # numbered in the checkpoint's optimizer states as one device numbered it
        self.cut_names = parameter_names(self.module)
        # every rank builds its runners in the same order (counted per job): the count names this one
        self.scope = f"runner{next_serial('runner')}"
        # the ranks holding this rank's stages in the other replicas (None: one replica)
        self.replica_group = replica_group
        # Synchronous: averaged once per step, bucket by bucket as the backward ends. Asynchronous: before each of the
        # engine's optimizer steps inside the step (average_gradients).
        self.averager = None
        if replica_group is not None:
            broadcast_state(pipeline.modules(), replica_group)  # replicas start from the first one's weights
            self.averager = GradientAverager(pipeline.parameters(), replica_group)
        # Clipping norms count each stage once: only the first of its replicas (uneven replication) counts it.
        self._first_replica = all(ranks[0] == pipeline.rank for ranks in pipeline.stage_ranks if pipeline.rank in ranks)
        nccl = dist.get_backend(pipeline.group) == "nccl"
        self.collective_device = pipeline.device if nccl else torch.device("cpu")
        self.channel = ResultChannel(pipeline.group, self.last_rank, self.collective_device)
        self.channel.timeout, self.channel.notice = pipeline.config.wait_timeout, pipeline.comm.board.read
        self.channel.point_to_point = not nccl and not pipeline.comm.strict  # gloo's tags keep them apart
        self._steps = 0  # steps run, for the seeds of a caller that gives none
        # A flag any rank may raise for every rank, carried by each step's collective: the strategy's "SIGTERM".
        self.flag: Callable[[], bool] = lambda: False
        self.flagged = False  # whether any rank raised it at the last step
        # Called when this rank's flag rose after its step had sent it (gloo's messages go when the step starts): the
        # strategy holds it for the next step's messages.
        self.hold_flag: Callable[[], None] = lambda: None
        # How training_step's loss adds up over rows (:mod:`.reduction`); "auto" probes the first batches.
        self.loss_reduction = "auto"
        # What a step changes on the module (outputs kept for an epoch-end hook), made one device's on every rank.
        self.effects = StepEffects(self.module, self._pipelined_modules)
        self._init_whole_batch_runs()
        # What the step may change that the effects do not follow: warned of on the last stage (:mod:`.unfollowed`)
        self._user_modules: list[tuple[str, torch.nn.Module]] | None = None
        self.unfollowed = UnfollowedState(self.module, self._outside_user_modules)
        self.output_copies = OutputCopies()  # for steps that change the model's output in place
        # Calls the step makes on the loggers, which log on global rank 0 only (:mod:`.logger_calls`).
        self.logger_calls = LoggerCalls(self.module,
                                        lambda: self.module._trainer.loggers if self.module._trainer else [])
        # What hooks log through the loggers' experiments on a rank holding other layers than rank 0, made there
        self.hook_calls = HookExperimentCalls(self.logger_calls._loggers, dist.get_rank(),
                                              _records_hook_calls(pipeline))
        # their own gloo group: a gather abandoned when another rank failed leaves no stale collective in the world
        # group, where the ranks' last checkpoint (OnExceptionCheckpoint) then meets
        self.hook_calls_group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        # Buffers of this rank's share of the model (a captured model's segments register what they read as they
        # first run) that its forward changes, and batch norms: said once (:mod:`.buffers`).
        self.buffers = BufferWatch(lambda: [split.proxy] if split.proxy is not None else pipeline.modules(),
                                   pipeline.num_microbatches, parameters=not pipeline.asynchronous,
                                   runs_step=pipeline.is_last_rank,
                                   rematerialized=any(stage.checkpoint_activations
                                                      for stage in pipeline.stages.values()))
        self.frozen_copies: FrozenCopies | None = None  # copies of the model beside it (an EMA target), watched
        self._batch_norms_said = False  # at the first training step: after the hooks that freeze some (eval mode)
        self._rows_said = False  # at the first training step: a batch of fewer rows than micro-batches
        self._init_checks(split, pipeline)

    @classmethod
    def build(cls, module: LightningModule, *, layers: str | None, config: PipelineConfig, device: torch.device,
              group: dist.ProcessGroup | None = None, replica_group: dist.ProcessGroup | None = None,
              pipelines: Sequence[Sequence[int]] | None = None,
              materialize: Callable[[list[torch.nn.Module]], None] | None = None,
              split: SplitModule | None = None) -> PipelineRunner:
        """Cut ``module`` (collective: every rank calls it with an equal module) and run it as ``config`` says.

        ``group`` holds this rank's pipeline; with several replicas, ``replica_group`` the ranks holding the same
        stages in the other replicas, and ``pipelines`` the global ranks of every replica's pipeline. ``materialize``
        gives a module built on the meta device storage for this rank's stages (:mod:`.materialize`); ``split``, a
        module's layers found otherwise (:mod:`.chain`)."""
        split = split or SplitModule(module, layers)
        refuse_sequence_hooks(split.sequence, split.path)
        pipeline = Pipeline(split.sequence, config=config, group=group, device=device, materialize=materialize)
        tied = TiedParameters(split.sequence, pipeline.stage_sizes, pipeline.stage_ranks, pipeline.group, pipelines)
        refuse_renormalized_ties(tied, split.sequence)
        tied.synchronize_values()
        warn_of_split_buffers(split.sequence, pipeline)
        warn_of_layer_hooks(split.sequence, split.path, pipeline)
        warn_of_frequency_scaling(split.sequence, split.path, pipeline)
        warn_of_gradient_hooks(module, pipeline)
        local = [child for stage in pipeline.modules() for child in stage._modules.items()]  # a repeated layer: each
        runner = cls(split, pipeline, tied, replica_group)
        if "+" not in split.path:  # not a chain of sequences
            runner.frozen_copies = FrozenCopies(module, split.path, split.sequence, pipeline)
        split.install(local).owner = runner
        runner._hold_step_parameters()
        if split.deferred is not None:
            split.deferred.device = pipeline.device
        runner.layers = layers
        return runner

    @classmethod
    def build_captured(cls, captured: CapturedModule, *, layers: str | None, config: PipelineConfig,
                       device: torch.device, group: dist.ProcessGroup | None = None,
                       replica_group: dist.ProcessGroup | None = None,
                       pipelines: Sequence[Sequence[int]] | None = None,
                       materialize: Callable[[list[torch.nn.Module]], None] | None = None) -> PipelineRunner:
        """As :meth:`build`, for a model captured and cut into segments (:mod:`.captured`; collective)."""
        segments = captured.segments
        # Later captures (eval mode, new shapes) run on meta twins of the state: this rank's weights are on its device
        # then, the others' wherever the model was built; their graphs run on this rank's device.
        captured.splitter.to(device)
        captured.splitter.capture_on_meta = True
        try:
            pipeline = Pipeline(segments, config=config, group=group, device=device, materialize=materialize)
        except ValueError as error:
            if "every stage needs at least one layer" not in str(error):
                raise
            raise ValueError(_too_few_pieces(error, captured, len(segments))) from None
        tied = TiedParameters(torch.nn.Sequential(*segments), pipeline.stage_sizes, pipeline.stage_ranks,
                              pipeline.group, pipelines)
        refuse_renormalized_ties(tied, captured.model)
        tied.synchronize_values()
        warn_of_split_buffers(torch.nn.Sequential(*segments), pipeline)
        warn_of_gradient_hooks(captured.module, pipeline)
        local = [child for stage in pipeline.modules() for child in stage.children() if child in segments]
        runner = cls(captured, pipeline, tied, replica_group)
        read = {name for capture in captured.splitter.captures for program in capture.programs
                for kind, name in program.state if kind == "PARAMETER"}  # (the segments hold every parameter)
        runner.frozen_copies = FrozenCopies(captured.module, captured.path,  # (the module's own forward: its parts')
                                            captured.model if captured.path else captured.module, pipeline,
                                            {id(p) for name, p in captured.model.named_parameters() if name in read})
        captured.install(local).owner = runner
        runner._hold_step_parameters()
        if captured.deferred is not None:
            captured.deferred.device = pipeline.device
        runner.layers = layers
        return runner

    @property
    def config(self) -> PipelineConfig:
        """How the pipeline runs (a later Trainer may reuse this runner only with an equal config)."""
        return self.pipeline.config

    @staticmethod
    def of(module: LightningModule) -> PipelineRunner | None:
        """The runner that already cut ``module`` (by an earlier Trainer), if any."""
        own = module.__dict__.get("_pipelined_model")  # a module whose own forward was captured
        if own is not None and isinstance(own.owner, PipelineRunner):
            return own.owner
        for child in module.modules():
            if isinstance(child, (PipelinedSequence, PipelinedModel)) and isinstance(child.owner, PipelineRunner):
                return child.owner
        return None

    @property
    def layout(self) -> dict[str, Any]:
        """How the model is laid out over ranks: a checkpoint's optimizer states fit only the same layout."""
        pipe = self.pipeline
        layout = {"num_ranks": pipe.num_ranks, "stage_sizes": [int(n) for n in pipe.stage_sizes],
                  "stage_to_rank": [int(r) for r in pipe.stage_to_rank]}
        if pipe.replicas:
            layout["replicas"] = list(pipe.replicas)
        return layout

    def _hold_step_parameters(self) -> None:
        """The step's trainable parameters outside the model (a learned temperature, uncertainty weights of task
        losses, a head the step applies to the model's output): every rank keeps them, equal, with the gradient the
        last stage's run of the step gives them (collective)."""
        params = dict(self.module.named_parameters())
        named = [(name, params[name]) for name in self.split.outside_trainable if name in params]
        if not named:
            return
        if self.replica_group is not None:
            raise ValueError(f"training_step trains parameters outside the pipelined model "
                             f"({', '.join(name for name, _ in named[:5])}) and the pipeline has data-parallel "
                             f"replicas, which would not average them; move them into the model, or train without "
                             f"replicas")
        self.tied.add_step_parameters(named, self.pipeline.stage_ranks[-1])
        self.tied.synchronize_values()
        for stage in self.pipeline.stages.values():  # the step's code after the model is the last stage's loss
            stage.loss_parameters = [param for _, param in named]

    def counts_in_norm(self, param: torch.nn.Parameter) -> bool:
        """Whether this rank counts ``param`` in the pipeline's gradient norm: each parameter once, so neither the
        other holders of a tied parameter nor the other replicas of a stage (uneven replication) count it."""
        return self._first_replica and self.tied.counts_in_norm(param)

    def average_gradients(self) -> None:
        """Average this rank's gradients over its replicas now (asynchronous schedules, before each optimizer step
        inside the pipeline: the replicas run the same schedule, so they reach it together)."""
        if self.averager is not None:
            with self.averager.averaging(0):
                pass

    # -- what the training and evaluation steps share ------------------------------------------
    def _carried(self, step: str, result: StepResult, rows: int) -> None:
        """After a step of ``rows`` rows: learn the states the module carries with the rows, and warn of a tensor
        given to the model with each micro-batch's rows that the step did not store anew (:mod:`.carried`)."""
        if isinstance(self.split, CapturedModule):
            self.split.carried.after_step(step, {name: value if kind == "set" and key is None else None
                                                 for kind, name, key, value, *_ in result.effects}, rows)

    def _pipelined_modules(self) -> list[torch.nn.Module]:
        """The modules of this rank's share of the model (its stages, and the stand-in of a captured one)."""
        return [module for stage in [*self.pipeline.modules(), self.split.proxy] if stage is not None
                for module in stage.modules()]

    def _outside_user_modules(self) -> list[tuple[str, torch.nn.Module]]:
        if self._user_modules is None:
            self._user_modules = user_modules(self.module, self._pipelined_modules(), self.split.path.split("+"))
        return self._user_modules

    def _rows_window(self, rows: torch.Tensor, total: int) -> Any:
        """The step's run on a micro-batch of rows ``rows`` of a ``total``-row batch reads its rows of the states the
        module carries with the rows (:class:`~lightning_pipe.strategy.carried.CarriedRows`)."""
        if not isinstance(self.split, CapturedModule):
            return nullcontext()
        return self.split.carried.window(int(rows[0]), int(rows[-1]) + 1, total)

    def _prepare(self, step: str, batch: Any, rest: tuple, kwargs: Mapping[str, Any], seed: int) -> None:
        """A captured model: make the captures this step needs, on every rank (the step code runs as in input_fn)."""
        if isinstance(self.split, CapturedModule):
            device = self.pipeline.device

            total = batch_rows(batch)
            rows = split_batch(torch.arange(total), self.pipeline.num_microbatches)
            carried = self.split.carried

            def context(index: int) -> Any:
                return _entered(self.recorder.discarding(), self.logger_calls.discarding(),
                                forked_random(derive_seed(seed, index), device),
                                carried.window(int(rows[index][0]), int(rows[index][-1]) + 1, total))

            self.split.prepare(step, split_batch(batch, self.pipeline.num_microbatches, copy=True), rest, kwargs,
                               context)

    def _counts(self, batch: Any, step: str) -> Counts | None:
        """A ``loss_reduction`` function's counts of ``batch``'s micro-batches (training and evaluation steps, not
        predictions). In training every rank counts (with replicas, the total over all of them), so that a count of
        nothing is an error on every rank alike."""
        if not callable(self.loss_reduction) or step == "predict_step":
            return None
        return Counts.of(self.loss_reduction, split_batch(batch, self.pipeline.num_microbatches),
                         training=step == "training_step", group=self.replica_group, device=self.collective_device)

    def _seed(self, seed: int | None) -> int:
        self._steps += 1
        return seed if seed is not None else derive_seed(0, self._steps)

    def _first_rows(self, rows: int) -> dict[int, int]:
        """First row of each micro-batch -> its index (the engine splits the tagged batch the same way)."""
        starts = split_batch(torch.arange(rows), self.pipeline.num_microbatches)
        return {int(piece[0]): index for index, piece in enumerate(starts)}

    def _copies_parameters(self) -> list[torch.nn.Parameter]:
        return self.frozen_copies.parameters() if self.frozen_copies is not None else []

    def _input_fn(self, step: str, rest: tuple, kwargs: Mapping[str, Any], seed: int,
                  firsts: dict[int, int], total: int,
                  seen: dict[int, list[Any]] | None = None) -> Callable[[Any], Any]:
        """The first stage's input of each micro-batch of a ``total``-row batch: the step run up to the model (its
        tensors kept in ``seen`` by micro-batch, if given)."""
        device = self.pipeline.device

        def input_fn(tagged: Any) -> Any:
            rows = tagged[ROWS]
            index = firsts[int(rows[0])]
            # each micro-batch's code before the model runs from the module as the step found it, as one device's
            # single run does (a running mean the code updates: the next micro-batch read it updated), and what it
            # changes is undone: the last stage's runs make the step's changes (on a V schedule, here too)
            before = self.effects.snapshot()
            window = self.split.carried.window(int(rows[0]), int(rows[-1]) + 1, total) \
                if isinstance(self.split, CapturedModule) else nullcontext()
            versions = [] if step != "training_step" or self._parameter_writes_left <= 0 else \
                [(p, p._version) for p in (*self.pipeline.parameters(), *self._copies_parameters())]
            with self.recorder.discarding(), self.logger_calls.discarding(), window, \
                    forked_random(derive_seed(seed, index), device), \
                    microbatch_run(step, index, len(firsts), len(rows), total, tagged[BATCH]), \
                    self._pairings_explained():
                inputs = self.split.capture_input(step, tagged[BATCH], rest, kwargs)
            written = [p for p, version in versions if p._version != version]
            copy = self.frozen_copies.written(written) if written and self.frozen_copies is not None else None
            if copy is not None:  # (lightly's BYOL: update_momentum in the step; found by review: named clipping)
                raise RuntimeError(f"training_step changes {copy}'s parameters in place before calling the model: "
                                   f"{self.frozen_copies.pairing([copy], 'is a frozen copy of it')}")
            if written:
                raise RuntimeError(
                    "training_step changes the model's parameters in place before calling the model (clamp_, mul_, "
                    "copy_: weight clipping, a max-norm constraint, a shrink by hand); under a pipeline the step's "
                    "code runs once per micro-batch, and on some stages only, so the change would be made several "
                    "times, and in the middle of other micro-batches' backward. Do it in on_train_batch_start or "
                    "on_before_zero_grad (with torch.no_grad(), over self.parameters()), which every rank runs once "
                    "per batch over its own share, as on one device")
            self.effects.restore(before)
            if seen is not None:
                seen[index] = tree_flatten(inputs)[0]
            return inputs

        return input_fn


@contextmanager
def _entered(*contexts: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield



def _records_hook_calls(pipeline: Pipeline) -> bool:
    """Whether this rank records what hooks log through the loggers' experiments (:mod:`.hook_experiment`): the first
    rank of a stage of global rank 0's pipeline that rank 0 does not hold (other ranks hold copies of those layers)."""
    ranks = dist.get_process_group_ranks(pipeline.group)  # global ranks, by rank in the pipeline's group
    stages = [[ranks[rank] for rank in stage] for stage in pipeline.stage_ranks]
    mine = dist.get_rank()
    return 0 in ranks and any(stages[index][0] == mine and 0 not in stages[index] for index in pipeline.stages)


def _too_few_pieces(error: ValueError, captured: CapturedModule, pieces: int) -> str:
    """The cut's error for a captured model of fewer pieces than stages: a model of one layer says so (Lightning's
    BoringModel, one Linear, was told to name split points, which cannot help it); another names its children, where
    split points may cut."""
    where = f"the model at {captured.path!r}" if captured.path else "the model"
    layers = [name for name, module in captured.model.named_modules()
              if any(True for _ in module.parameters(recurse=False))]
    if len(layers) <= 1:
        head = re.match(r"cannot cut \d+ layers? into \d+ stages", str(error))
        return (f"{head.group(0) if head else error}: {where} ({type(captured.model).__name__}) is a single layer, "
                f"which one stage holds whole; a pipeline needs a model of at least as many layers as stages. Train "
                f"it on one device, without the strategy")
    children = ", ".join(repr(name) for name, _ in captured.model.named_children())
    return (f"{error}. The capture found {pieces} piece{'s' if pieces != 1 else ''} in {where}: name where to cut with "
            f"PipelineStrategy(split_points=[...]) (module names, as model.named_modules() gives them, each starting "
            f"a stage; its children: {children or 'none'}). Layers a forward runs inside one torch.no_grad() region "
            f"are one piece, which trains none of them")

