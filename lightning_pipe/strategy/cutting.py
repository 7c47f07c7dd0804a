"""How PipelineStrategy cuts the module: which path (one ``nn.Sequential``, or a captured model), the cut (given or
planned from a profile of the first batch on global rank 0), and the runner that holds this rank's share.

A mixin of :class:`~lightning_pipe.strategy.pipeline.PipelineStrategy`, which holds the state it reads and writes
(the settings, the mesh, the runner, the run's position); ``setup`` calls :meth:`PipelineCutting._build`.
"""

from __future__ import annotations

import contextlib
import re
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from lightning_pipe.capture import CaptureError
from lightning_pipe.capture.coupling import COUNTS_ROWS, FIXED_ROWS
from lightning_pipe.strategy.fixed_rows import measured_rows
from lightning_pipe.engine.batchnorm import local_sync_batch_norms
from lightning_pipe.engine.calls import Calls
from lightning_pipe.engine.microbatch import batch_rows, owned, split_batch
from lightning_pipe.engine.runtime import configure_threads
from lightning_pipe.planner.cut_plan import AUTO_SCHEDULE, CutPlan, plan_cut
from lightning_pipe.planner.partition import ROUND_ROBIN
from lightning_pipe.engine.kept import kept_buffers
from lightning_pipe.strategy.capture_keeping import no_logging
from lightning_pipe.strategy.captured import CapturedModule
from lightning_pipe.strategy.chain import ChainSplit, chain_paths
from lightning_pipe.strategy.conversion import converted_later, restore
from lightning_pipe.strategy.materialize import LocalMaterializer, has_meta_tensors, refuse_planned_cut
from lightning_pipe.strategy.mesh import AUTO, DATA, PIPE
from lightning_pipe.strategy.model_choice import CAPTURED, CHAIN, choose_model, own_forward, undo_compile
from lightning_pipe.strategy.planned_cut import first_batch, plan_on_rank_zero
from lightning_pipe.strategy.recorded_init import recorded, recording
from lightning_pipe.strategy.runner import PipelineRunner
from lightning_pipe.strategy.share_warning import watch_state_dict
from lightning_pipe.strategy.split import find_sequence
from lightning_pipe.strategy.step_effects import StepEffects
from lightning_pipe.strategy.step_runs import microbatch_run

__all__ = ["PipelineCutting"]


class PipelineCutting:
    """The cutting of the module, for ``PipelineStrategy.setup``."""

    _runner: PipelineRunner | None
    _cut_plan: CutPlan | None
    _planned_replicas: tuple[int, ...] | None
    _materializer: Any
    _conversion_sources: dict[int, torch.Tensor]  # a precision's conversion deferred to the cut, until _build
    _example_input_array: Any

    def _build(self, module: LightningModule, trainer: Trainer) -> None:
        try:
            self._cut(module, trainer)
        except BaseException:
            # a capture that failed before the cut: the model's originals back, converted whole as before, so that the
            # module stays usable (a later fit captures it again)
            restore(module, self._conversion_sources, self.precision_plugin)
            raise
        finally:
            self._conversion_sources = {}

    def _cut(self, module: LightningModule, trainer: Trainer) -> None:
        if self._runner is not None and self._runner.module is module:
            _refuse_rebuilt(module, self._runner)
            _defer_batchnorm_again(self._runner)
            return  # a later run of this Trainer (fit, then test): the module is cut already
        settings, auto_replicas = self.settings, self.settings.replicas == AUTO
        runner = PipelineRunner.of(module)
        if runner is not None:
            _defer_batchnorm_again(runner)
        configure_threads(self.num_processes)  # the engine guesses ranks per machine; Lightning knows
        chain = None
        if runner is None:
            undone = undo_compile(module)
            if undone:
                rank_zero_warn(f"PipelineStrategy runs the pipeline's stages eagerly: torch.compile of {undone} is "
                               f"undone (a compiled model would call the whole model, not this rank's stages, and "
                               f"the cut, its checks and the capture run the layers' own code, a part compiled "
                               f"inside a layer too); they train as they would uncompiled. Compiling the stages "
                               f"themselves is not supported yet")
            refuse_lazy_layers(module)
            local_sync_batch_norms(module)  # (its process group's ranks hold other stages: engine.batchnorm)
            refuse_planned_cut(module, settings.plans_cut)
            if choose_model(module, settings.layers, settings.split_points, thawing(trainer))[0] == CHAIN:
                chain = self._chain(module)
        captured = self._capture(module, trainer) if runner is None else None
        if runner is not None and settings.plans_cut:  # an earlier Trainer planned the cut: any plan of it will do
            earlier = runner.config
            auto = settings.schedule == AUTO_SCHEDULE
            config = settings.engine_config(
                partition=earlier.partition, schedule=earlier.schedule if auto else None,
                num_microbatches=earlier.num_microbatches if auto else None,
                replicas=earlier.replicas if auto_replicas else self.mesh_shape.stage_replicas)
        elif settings.plans_cut:
            plan = self._cut_plan = self._plan(trainer, module, captured)
            config = settings.engine_config(
                partition=plan.partition, schedule=plan.schedule, num_microbatches=plan.num_microbatches,
                replicas=plan.replicas if auto_replicas else self.mesh_shape.stage_replicas)
        else:
            config = settings.engine_config(replicas=self.mesh_shape.stage_replicas)
        if auto_replicas:  # the planner chose the replicas: the layout follows from them
            self._planned_replicas = config.replicas
        shape, mesh = self.mesh_shape, self._mesh
        if runner is None:
            groups = {"group": mesh.get_group(PIPE), "replica_group": mesh.get_group(DATA),
                      "pipelines": shape.pipelines()} if mesh is not None else {}
            if captured is not None:  # built on meta (configure_model): captured on meta, materialized per rank
                self._materializer = LocalMaterializer.for_module(module, captured.model, self.root_device,
                                                                  self._position.base, holders=captured.segments,
                                                                  whole_buffers=True, sources=self._conversion_sources)
                if self._materializer is not None:
                    self._materializer.step_state = captured.own_unread_parameters()
                runner = PipelineRunner.build_captured(captured, layers=settings.layers, config=config,
                                                       device=self.root_device, materialize=self._materializer,
                                                       **groups)
            elif chain is not None:  # built on meta: each rank materializes its layers, as for one nn.Sequential
                self._materializer = LocalMaterializer.for_module(module, chain.sequence, self.root_device,
                                                                  self._position.base)
                runner = PipelineRunner.build(module, layers=None, config=config, device=self.root_device,
                                              split=chain, materialize=self._materializer, **groups)
            else:
                _, sequence = find_sequence(module, settings.layers)
                self._materializer = LocalMaterializer.for_module(module, sequence, self.root_device,
                                                                  self._position.base)
                runner = PipelineRunner.build(module, layers=settings.layers, config=config, device=self.root_device,
                                              materialize=self._materializer, **groups)
        elif (runner.config, runner.layers, runner.pipeline.num_ranks, runner.replica_group is None) != (
                config, settings.layers, shape.pipeline_ranks, mesh is None):
            raise ValueError(f"{type(module).__name__} was cut by an earlier Trainer into a pipeline with "
                             f"{runner.config} on {runner.pipeline.num_ranks} processes; use the same strategy "
                             f"settings and devices, or a new module (YourModule.load_from_checkpoint(path))")
        runner.loss_reduction = settings.loss_reduction
        if (self._materializer is not None and self._materializer.seeded and trainer.state.fn == TrainerFn.FITTING
                and not trainer.ckpt_path):
            rank_zero_warn(f"{type(module).__name__} was built on the meta device (in configure_model, or under "
                           f"Trainer.init_module(), which builds there under PipelineStrategy unless "
                           f"empty_init=False): each rank gives its own layers their initial values as the model's "
                           f"construction computes them, its random draws seeded by tensor or module name: the same "
                           f"on every layout and from the same distributions, but not the draws the model built whole "
                           f"would make, so training starts elsewhere than on one device. A load_state_dict or an "
                           f"initialization (model.apply(init_fn)) run after the init_module block, before fit, "
                           f"reached no weight: there are none yet. To start from given weights, load them: "
                           f"fit(ckpt_path=...), or load_state_dict in configure_model (docs/checkpoints.md, 'Initial "
                           f"weights'); or build with Trainer.init_module(empty_init=False)")
        self._runner = runner
        watch_state_dict(module, runner.split.state_keys)  # its state_dict() after the fit is a share
        # ModelSummary would run the whole model on example_input_array, which no rank holds any more.
        self._example_input_array, module.example_input_array = module.example_input_array, None

    def _chain(self, module: LightningModule) -> ChainSplit:
        """Layers in several nn.Sequential attributes the step calls in turn (:mod:`lightning_pipe.strategy.chain`)."""
        paths = chain_paths(module)
        assert paths is not None
        if self.settings.plans_cut:
            raise ValueError(f"{type(module).__name__} keeps its layers in {paths}, which the step calls in turn: "
                             f"PipelineStrategy pipelines them as one chain, whose cut is given, not planned; use "
                             f"partition='uniform', 'parameters' or a list of layer counts, or put the layers in one "
                             f"nn.Sequential to plan the cut")
        return ChainSplit(module, paths)

    def _capture(self, module: LightningModule, trainer: Trainer) -> CapturedModule | None:
        """A model that is not one nn.Sequential: captured on every rank from the first micro-batch of the running
        stage's first batch (:mod:`lightning_pipe.strategy.captured`); ``None`` for the nn.Sequential path."""
        path, layers = choose_model(module, self.layers, self.settings.split_points, thawing(trainer))
        if path != CAPTURED:
            return None
        assert layers is not None
        # The precision's conversion (bf16-true, 64-true) first: the captures then see the dtypes, inputs and
        # autocast that the steps will run with. A model the step calls (not the module's own forward) is converted on
        # meta stand-ins, and each rank converts its share after the cut (strategy/conversion.py), unless the cut is
        # planned (the profile runs every layer).
        # A conversion of tensors built on meta is recorded with their construction, to be replayed after the cut.
        with recording() if recorded() else contextlib.nullcontext():
            if self.settings.plans_cut or not layers:
                self.precision_plugin.convert_module(module)
            else:
                self._conversion_sources = converted_later(module, module.get_submodule(layers),
                                                           self.precision_plugin)
        group = self._mesh.get_group(PIPE) if self._mesh is not None else None

        def capture(path: str) -> CapturedModule:
            points = _points_for(module, path, layers, self.settings.split_points)
            return CapturedModule(module, path, points, group, self._collective_device(),
                                  allow_autograd_functions=self.settings.allow_autograd_functions,
                                  dynamic_shapes=self.settings.dynamic_shapes,
                                  rematerialized=self.settings.checkpoint_activations)

        captured = capture(layers)
        how = (f"the model at {layers!r} is captured from the first batch of {{hook}}: give the Trainer data, or make "
               f"the model one nn.Sequential")
        with torch.random.fork_rng(devices=[]):  # a shuffling loader draws from the global generator
            batch, step = first_batch(trainer, how)
        microbatches = split_batch(self._as_step_gets(batch), self.num_microbatches)
        microbatch, pristine = microbatches[0], [owned(part) for part in microbatches[:2]]  # (the capture's run of
        # the step may change its micro-batch: batch.pop("labels"))
        with self._step_context(step):
            if self.layers is None and layers and own_forward(module):
                # the step may reach the model only through the module's forward (self(x) calling vae.encode, decode)
                whole = capture("")
                through_forward = torch.tensor([int(not captured.step_calls_model(step, microbatch)
                                                    and whole.step_calls_model(step, microbatch))],
                                               device=self._collective_device())
                torch.distributed.all_reduce(through_forward, op=torch.distributed.ReduceOp.MIN, group=group)
                if through_forward.item():  # on every rank alike
                    captured = whole
            try:
                rows, total = batch_rows(microbatch, microbatch=True), batch_rows(self._as_step_gets(batch))
                with captured.carried.window(0, rows, total), \
                        microbatch_run(step, 0, len(microbatches), rows, total, microbatch):  # (an error in the step's
                    # code says which micro-batch it ran on, as in the steps: found by review)
                    captured.capture_first(step, microbatch, training=step == "training_step")
            except CaptureError as error:
                hint = _rows_by_rows(self._as_step_gets(batch), self.num_microbatches, str(error))
                if hint is None:
                    raise
                raise CaptureError(f"{error}\n{hint}") from error
        last = captured.splitter.captures[-1]
        meeting = last.rows_meet
        if meeting is not None and self.num_microbatches > 1:
            alone = (f"a pipeline runs each of its {self.num_microbatches} micro-batches alone, so each row meets only "
                     f"the rows of its micro-batch")
            rows = batch_rows(microbatch, microbatch=True)
            # (a graph's edge list among the inputs: nodes a multiple of the graphs in the first micro-batch were
            # taken for views, found by review)
            if last.example_rows is not None and rows and (last.example_rows % rows or last.edge_list
                                                           and last.example_rows != rows):  # rows the step made:
                # nodes (a multiple of the batch's rows, without edges, is views put together, SimCLR's: no hedge)
                alone += (f" (here the model's rows, dim 0 of its inputs, {last.example_rows} in the first "
                          f"micro-batch, are not the batch's, {rows}: where they are parts of the batch's rows that "
                          f"the step puts together, as the nodes of a batch of graphs, and meet only within a row of "
                          f"the batch, as messages along each graph's edges do, it trains as on one device)")
            measured = ("unknown", 0.0)
            if meeting.startswith(FIXED_ROWS) and self.global_rank == 0:  # (which warns) a number that may only size
                # a tensor: the model run joined and apart
                with self._step_context(step):
                    measured = measured_rows(captured, step, pristine, self.root_device)
            if measured[0] == "apart" and COUNTS_ROWS not in meeting:
                pass  # the number only sizes tensors: the outputs of two micro-batches agree run together and apart
            elif measured[0] == "meet":
                rank_zero_warn(f"{type(captured.model).__name__}: {meeting}; run eagerly, its outputs for the first "
                               f"two micro-batches differ run together and apart (relative difference "
                               f"{measured[1]:.2g}): the number pairs or limits the rows. "
                               f"{alone[0].upper()}{alone[1:]}, so the loss and its gradients are not one device's: "
                               f"num_microbatches=1 gives one device's")
            elif meeting.startswith(FIXED_ROWS):  # no telling what the number does
                rank_zero_warn(f"{type(captured.model).__name__}: {meeting}. Where the number only sizes a tensor "
                               f"(self.cls.expand(len(x), -1, -1)) this trains as on one device, and x.shape[0] in "
                               f"place of len(x) keeps one capture for every size; where it pairs or limits the rows "
                               f"(labels torch.arange(len(logits)), a capacity), {alone}, and the loss and its "
                               f"gradients are not one device's: num_microbatches=1 gives one device's")
            else:
                rank_zero_warn(f"{type(captured.model).__name__}: {meeting}: {alone}, and where that reaches the "
                               f"output the loss and its gradients are not one device's (a value a torch.where picks "
                               f"for some rows only, as a scaler's default for series with nothing observed, reaches "
                               f"it for those rows alone). For one device's, pass num_microbatches=1"
                               + ("; a contrastive loss over fewer rows also trains, with fewer negatives per row"
                                  if "contrastive" in meeting else ""))
        return captured

    def _as_step_gets(self, batch: Any) -> Any:
        """``batch`` as Lightning's loops hand it to a step: converted by the precision plugin, through the module's
        ``on_before_batch_transfer``, then to the device (with ``on_after_batch_transfer``)."""
        batch = self.precision_plugin.convert_input(batch)
        module = self.lightning_module
        if module is not None:
            batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
        return self.batch_to_device(batch)

    def _step_context(self, step: str) -> Any:
        """The precision plugin's context for ``step`` (autocast for bf16-mixed, the default dtype for bf16-true)."""
        plugin = self.precision_plugin
        return {"training_step": plugin.train_step_context, "validation_step": plugin.val_step_context,
                "test_step": plugin.test_step_context, "predict_step": plugin.predict_step_context}[step]()

    def _plan(self, trainer: Trainer, module: LightningModule, captured: CapturedModule | None = None) -> CutPlan:
        """Global rank 0 profiles the first batch and plans the cut; every rank gets the plan, or rank 0's error."""
        how = (f"partition={self.partition!r}, schedule={self.schedule!r} profiles the first batch of {{hook}}; give "
               f"the Trainer data, or cut with partition='uniform' or a list of layer counts")

        def make() -> CutPlan:
            # (a shuffling loader draws from the global generator; the step code run to reach the layers, buffers
            # and what else it changes on the module: a counter of its calls would start one ahead on this rank)
            with torch.random.fork_rng(devices=[]), kept_buffers([module]), StepEffects(module).undone():
                batch, step = first_batch(trainer, how)
                cache = self.profile_cache
                if cache is None:
                    cache = os.path.join(trainer.default_root_dir, ".lightning_pipe_profiles")
                inputs = None
                if captured is not None:  # the segments are the layers; their input, the model call's, flattened
                    sequence = torch.nn.Sequential(*captured.segments)
                    batch = self._as_step_gets(batch)  # as the capture's (the model is converted)
                    with torch.no_grad(), no_logging(module), self._step_context(step):
                        inputs = captured.capture_input(step, batch, (0,), {})
                    if isinstance(inputs, Calls):  # several calls of the model: each costs as the first does
                        inputs = inputs.each[0]
                else:
                    _, sequence = find_sequence(module, self.layers)
                    batch = self.batch_to_device(batch)
                return plan_cut(module, sequence, batch, inputs=inputs, partition=str(self.partition),
                                schedule=self.schedule, num_microbatches=self.num_microbatches,
                                **self._planned_layout(), device=self.root_device, memory_cap=self.memory_cap,
                                schedule_options=self.schedule_options, cache=cache or None, step=step)

        return plan_on_rank_zero(self, make)

    def _planned_layout(self) -> dict[str, Any]:
        """What the planner is told of the layout: the stages and their replicas, or (``replicas="auto"``) the ranks
        it may place stages and replicas on."""
        shape = self.mesh_shape
        if self.settings.replicas == AUTO:
            return {"num_stages": self.settings.num_stages, "replicas": ROUND_ROBIN, "num_devices": shape.world_size}
        return {"num_stages": shape.num_stages, "replicas": list(shape.stage_replicas) or None}


def thawing(trainer: Trainer) -> bool:
    """Whether a fine-tuning callback (Lightning's ``BackboneFinetuning``, any ``BaseFinetuning``) will unfreeze
    parameters that are frozen now: the model to pipeline then holds them too."""
    from lightning.pytorch.callbacks import BaseFinetuning

    return any(isinstance(callback, BaseFinetuning) for callback in trainer.callbacks)


def _rows_by_rows(batch: Any, microbatches: int, error: str) -> str | None:
    """What to tell of a batch holding a tensor over its rows twice (an adjacency of one whole graph's nodes, a
    similarity of its rows), which a split along dim 0 gives each micro-batch as a slice of ``rows / m`` rows by all
    ``rows`` columns, where the capture failed on sizes (``error``, its message); None if it holds none (token ids,
    padded targets as long as the batch has rows: integers), the error is another, or there is one micro-batch."""
    leaves = [leaf for leaf in torch.utils._pytree.tree_leaves(batch) if isinstance(leaf, torch.Tensor)]
    rows = batch_rows(batch) if leaves and microbatches > 1 else 0
    if not re.search(r"\b(shapes?|sizes?|dims?|mismatch|multiplied)\b", error):
        return None
    square = [tuple(leaf.shape) for leaf in leaves if leaf.dim() >= 2 and leaf.shape[0] == leaf.shape[1] == rows > 1
              and (leaf.is_floating_point() or leaf.dtype == torch.bool)]
    if not square:
        return None
    return (f"The batch holds a tensor of shape {square[0]} over its {rows} rows twice (an adjacency of one graph's "
            f"nodes, a similarity of the rows): a pipeline splits every tensor of a batch along dim 0 into "
            f"{microbatches} micro-batches, so the model gets {rows // microbatches} of its rows against all {rows} "
            f"columns. A model over one whole graph cannot be split into micro-batches: pass num_microbatches=1, or "
            f"give batches of several graphs (their rows first, as (graphs, nodes, nodes))")


def _defer_batchnorm_again(runner: PipelineRunner) -> None:
    """A model cut before, whose batch norms ``restore_batchnorm`` made plain again (for one device or DDP): its
    stages defer them again."""
    for stage in runner.pipeline.stages.values():
        stage.defer_batchnorm_again()


def refuse_lazy_layers(module: nn.Module) -> None:
    """A lazy layer (``nn.LazyLinear``) has no shape until its first call, and the cut needs every layer's: said on
    every rank alike, with the fix."""
    lazy = [name for name, param in module.named_parameters()
            if isinstance(param, nn.parameter.UninitializedParameter)]
    if lazy:
        layers = sorted({name.rpartition(".")[0] or name for name in lazy})
        raise ValueError(f"{type(module).__name__} has lazy layers whose weights have no shape yet: {layers} "
                         f"(nn.LazyLinear, nn.LazyConv2d, ...); PipelineStrategy cuts the model before its first step, "
                         f"so it needs every weight's shape. Give their input sizes (nn.Linear(in_features, ...)), or "
                         f"run the model once on an example batch before trainer.fit (model(example_input); for a "
                         f"model built in configure_model(), there, right after building it), which gives the lazy "
                         f"layers their shapes")


def _refuse_rebuilt(module: LightningModule, runner: PipelineRunner) -> None:
    """A ``configure_model()`` that built the layers again for a later run of the Trainer (fit, then validate): its
    new modules are on the meta device, in place of the cut ones."""
    if PipelineRunner.of(module) is runner and not has_meta_tensors(module):
        return
    rebuilt = sorted({name.split(".")[0] for name, t in (*module.named_parameters(), *module.named_buffers())
                      if t.is_meta})
    raise ValueError(f"configure_model() built {', '.join(rebuilt) or 'the layers'} of {type(module).__name__} again "
                     f"after the module was cut into the pipeline: Lightning calls configure_model() before every "
                     f"fit, validate, test and predict, and asks it to build the model once. Begin it with a guard, "
                     f"e.g. `if self.layers is not None: return` (on one device the unguarded hook silently replaces "
                     f"the trained layers by new ones)")


def _points_for(module: nn.Module, path: str, model_path: str, points: Any) -> Any:
    """The user's split points, named in the model at ``model_path`` (``"l3"``) or in the module (``"model.l3"``), as
    the model at ``path`` names them: its own capture strips the model's prefix, the module's whole forward's (which
    reaches the model) adds it. Either spelling cuts the same place."""
    if points is None or not model_path:
        return points
    prefix = f"{model_path}."
    root = module.get_submodule(path) if path else module
    names = {name for name, _ in root.named_modules(remove_duplicate=False) if name}

    def named(name: Any) -> Any:
        if not isinstance(name, str) or name in names:
            return name
        if path == model_path and name.startswith(prefix) and name[len(prefix):] in names:
            return name[len(prefix):]
        if path == "" and f"{prefix}{name}" in names:
            return f"{prefix}{name}"
        return name

    if isinstance(points, Mapping):
        return {named(name): where for name, where in points.items()}
    if isinstance(points, str) or isinstance(points, tuple) and len(points) == 2 and points[1] in ("begin", "end"):
        return points  # a malformed value: its own error says so
    return [named(point) if isinstance(point, str) else (named(point[0]), *point[1:])
            if isinstance(point, tuple) and point else point for point in points]
