"""Run a LightningModule's steps through a pipeline on every rank, and give every rank the last stage's results.

This is the strategy's core, and needs no Trainer: :class:`PipelineRunner` cuts the module, runs one training or
evaluation step through the engine, and then sends what the last stage computed (the loss, the combined logs, the
torchmetrics' batch state, the step's outputs) to every rank in one broadcast, so that all ranks return, log and
checkpoint the same thing. With data-parallel replicas of the pipeline, the replicas average their gradients
(:mod:`.engine.replicas`), and their last stages first combine loss, logs and metrics into those of the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from lightning_pipe.engine.config import PipelineConfig
from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import batch_rows, split_batch
from lightning_pipe.strategy.failures import reported_failures
from lightning_pipe.strategy.logs import LoggedValue, LogRecorder, MetricTracker, combine_replica_logs
from lightning_pipe.engine.replicas import GradientAverager, broadcast_state
from lightning_pipe.strategy.split import PipelinedSequence, SplitModule
from lightning_pipe.strategy.tied import TiedParameters

__all__ = ["PipelineRunner", "combine_outputs"]


@dataclass
class _StepResult:
    """What the last stage sends every rank after a step."""

    loss: torch.Tensor | None = None
    output: Any = None
    logs: list[LoggedValue] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    rows: int = 0


class PipelineRunner:
    """A LightningModule cut into pipeline stages, one per rank, that runs its steps through the pipeline.

    Build it on every rank with :meth:`build` (collective). Every rank then calls :meth:`train` or :meth:`evaluate`
    with the same batch; each returns the same value on every rank.
    """

    _built = 0  # runners built in this process so far

    def __init__(self, split: SplitModule, pipeline: Pipeline, tied: TiedParameters,
                 replica_group: dist.ProcessGroup | None = None) -> None:
        self.split = split
        self.module: LightningModule = split.module  # type: ignore[assignment]
        self.pipeline = pipeline
        self.tied = tied
        self.recorder = LogRecorder(self.module)
        self.metrics = MetricTracker(self.module)
        self.last_rank = dist.get_global_rank(pipeline.group, pipeline.stage_to_rank[pipeline.num_stages - 1])
        self.layers: str | None = None  # the attribute path build() was given
        PipelineRunner._built += 1  # every rank builds its runners in the same order: the count names this one
        self.scope = f"runner{PipelineRunner._built}"
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

    @classmethod
    def build(cls, module: LightningModule, *, layers: str | None, config: PipelineConfig, device: torch.device,
              group: dist.ProcessGroup | None = None, replica_group: dist.ProcessGroup | None = None,
              pipelines: Sequence[Sequence[int]] | None = None) -> PipelineRunner:
        """Cut ``module`` (collective: every rank calls it with an equal module) and run it as ``config`` says.

        ``group`` holds this rank's pipeline; with several replicas, ``replica_group`` the ranks holding the same
        stages in the other replicas, and ``pipelines`` the global ranks of every replica's pipeline."""
        split = SplitModule(module, layers)
        pipeline = Pipeline(split.sequence, config=config, group=group, device=device)
        tied = TiedParameters(split.sequence, pipeline.stage_sizes, pipeline.stage_ranks, pipeline.group, pipelines)
        tied.synchronize_values()
        local = [child for stage in pipeline.modules() for child in stage.named_children()]
        runner = cls(split, pipeline, tied, replica_group)
        split.install(local).owner = runner
        runner.layers = layers
        return runner

    @property
    def config(self) -> PipelineConfig:
        """How the pipeline runs (a later Trainer may reuse this runner only with an equal config)."""
        return self.pipeline.config

    @staticmethod
    def of(module: LightningModule) -> PipelineRunner | None:
        """The runner that already cut ``module`` (by an earlier Trainer), if any."""
        for child in module.modules():
            if isinstance(child, PipelinedSequence) and isinstance(child.owner, PipelineRunner):
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

    # -- steps ------------------------------------------------------------------------------------
    def train(self, args: Sequence[Any], kwargs: Mapping[str, Any], loss_scale: float = 1.0,
              optimizer_step: Callable[[], Any] | None = None) -> Any:
        with reported_failures(self.scope):
            return self._train(args, kwargs, loss_scale, optimizer_step)

    def _train(self, args: Sequence[Any], kwargs: Mapping[str, Any], loss_scale: float,
               optimizer_step: Callable[[], Any] | None) -> Any:
        """``training_step`` of a batch: forward and backward of every micro-batch (gradients accumulate into this
        rank's parameters, scaled by ``loss_scale``); returns the batch's loss (or the step's dict) on every rank.

        Asynchronous schedules call ``optimizer_step`` at each of their optimizer steps; the loss returned is this
        batch's, which the last stage computes within this call (earlier stages finish its backward later)."""
        batch, rest = args[0], tuple(args[1:])
        pipe, outputs, sizes = self.pipeline, [], []

        def loss_fn(output: Any, microbatch: Any) -> torch.Tensor:
            rows = batch_rows(microbatch)
            with self.recorder.recording(rows):
                result = self.split.run_step("training_step", output, microbatch, rest, kwargs)
            loss, extra = _loss_of(result)
            outputs.append(extra)
            sizes.append(rows)
            return loss

        pipe.input_fn = self._input_fn("training_step", rest, kwargs)
        pipe.loss_fn = loss_fn
        self.recorder.calls = []
        if pipe.is_last_rank:
            self.metrics.start()
        averager = self.averager if not pipe.asynchronous else None  # asynchronous: at its optimizer steps
        averaging = averager.averaging(len(split_batch(batch, pipe.num_microbatches))) if averager else nullcontext()
        with averaging:  # replicas: each bucket of gradients is averaged as soon as the backward completes it
            loss = pipe.train_step(batch, loss_scale=loss_scale, optimizer_step=optimizer_step)
            if averager is not None:
                averager.start_remaining()
            result = None
            if pipe.is_last_rank:
                result = self._guard(lambda: self._result(loss, outputs, sizes, check_outside=True))
                result = self._across_replicas(result)
        result = self._share(result)
        assert result.loss is not None
        loss = result.loss.to(pipe.device)
        return {"loss": loss, **result.output} if result.output else loss

    def evaluate(self, step: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """``validation_step``, ``test_step`` or ``predict_step`` of a batch, forward only; returns the step's
        outputs for the whole batch (micro-batch outputs concatenated along dim 0) on every rank."""
        with reported_failures(self.scope):
            return self._evaluate(step, args, kwargs)

    def _evaluate(self, step: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        batch, rest = args[0], tuple(args[1:])
        pipe = self.pipeline
        pipe.input_fn = self._input_fn(step, rest, kwargs)
        pipe.loss_fn = None
        self.recorder.calls = []
        _, last_outputs = pipe.eval_step(batch)
        result = None
        if pipe.is_last_rank:
            result = self._guard(lambda: self._evaluate_last(step, batch, last_outputs or [], rest, kwargs))
            result = self._across_replicas(result)
        return self._share(result).output

    def _evaluate_last(self, step: str, batch: Any, last_outputs: list[Any], rest: tuple,
                       kwargs: Mapping[str, Any]) -> _StepResult:
        self.metrics.start()
        outputs, sizes = [], []
        for microbatch, output in zip(split_batch(batch, self.pipeline.num_microbatches), last_outputs):
            sizes.append(batch_rows(microbatch))
            with self.recorder.recording(sizes[-1]):
                outputs.append(self.split.run_step(step, output, microbatch, rest, kwargs))
        return self._result(None, outputs, sizes, check_outside=False)

    # -- the last stage's results, for every rank -------------------------------------------------
    def _input_fn(self, step: str, rest: tuple, kwargs: Mapping[str, Any]) -> Callable[[Any], Any]:
        def input_fn(microbatch: Any) -> Any:
            with self.recorder.discarding():
                return self.split.capture_input(step, microbatch, rest, kwargs)

        return input_fn

    def _result(self, loss: torch.Tensor | None, outputs: list[Any], sizes: list[int],
                check_outside: bool) -> _StepResult:
        if check_outside and (names := self.split.outside_parameters_with_grad()):
            return _StepResult(error=self.split.outside_error(names))
        logs = self.recorder.combine()
        metrics = self.metrics.batch_update({entry.metric for entry in logs if entry.metric is not None})
        output = combine_outputs(outputs, sizes)
        return _StepResult(None if loss is None else loss.detach().cpu(), output, logs, metrics, rows=sum(sizes))

    def _across_replicas(self, result: _StepResult) -> _StepResult:
        """On the last stage's ranks: the whole batch's loss, logs and metric states from every replica's share
        (each replica keeps its own outputs, as under DDP)."""
        if self.replica_group is None:
            return result
        shares: list[_StepResult | None] = [None] * dist.get_world_size(self.replica_group)
        dist.all_gather_object(shares, result, group=self.replica_group)
        errors = [share.error for share in shares if share is not None and share.error is not None]
        if errors:
            return _StepResult(error=errors[0])
        parts = [share for share in shares if share is not None]
        rows = sum(part.rows for part in parts)
        loss = None
        if result.loss is not None:
            weighted = sum(part.loss.double() * part.rows for part in parts if part.loss is not None)
            loss = (weighted / max(rows, 1)).to(result.loss.dtype)
        logs = combine_replica_logs([part.logs for part in parts])
        metrics = self.metrics.merge([part.metrics for part in parts])
        return _StepResult(loss, result.output, logs, metrics, rows=rows)

    def _guard(self, make: Callable[[], _StepResult]) -> _StepResult:
        try:
            return make()
        except Exception as error:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            return _StepResult(error=f"{type(error).__name__} on the last stage's rank {dist.get_rank()}: {error}")

    def _share(self, result: _StepResult | None) -> _StepResult:
        """Broadcast the last stage's result to every rank, bring metrics and logs up to date, raise its error."""
        box = [result]
        dist.broadcast_object_list(box, src=self.last_rank, group=self.pipeline.group)
        shared = box[0]
        assert shared is not None
        if shared.error is not None:
            self.metrics.apply({})
            raise RuntimeError(shared.error)
        self.metrics.apply(shared.metrics)
        self.recorder.replay(shared.logs, self.pipeline.device)
        return shared


def _loss_of(result: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(result, torch.Tensor):
        return result, {}
    if isinstance(result, Mapping) and isinstance(result.get("loss"), torch.Tensor):
        return result["loss"], {k: _detached(v) for k, v in result.items() if k != "loss"}
    raise ValueError(f"training_step returned {type(result).__name__}; under PipelineStrategy it must return the "
                     f"micro-batch's mean loss as a tensor, or a dict with the loss under 'loss' (a step cannot be "
                     f"skipped by returning None, since every stage takes part in it)")


def _detached(value: Any) -> Any:
    return combine_outputs([value], [1])


def combine_outputs(outputs: list[Any], sizes: list[int]) -> Any:
    """The outputs of a step's micro-batches as one output for the whole batch, on CPU.

    Tensors with a batch dimension are concatenated along dim 0, scalar tensors and numbers averaged with weights
    ``sizes`` (the micro-batches' rows); dicts, tuples and lists are combined entry by entry; other values are
    kept if all micro-batches agree, else listed.
    """
    first = outputs[0] if outputs else None
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        tensors = [t.detach().cpu() for t in outputs]
        if first.dim() == 0:
            weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
            return (torch.stack(tensors).double() * weights).sum().to(first.dtype if first.is_floating_point()
                                                                      else torch.get_default_dtype())
        return torch.cat(tensors)
    if isinstance(first, Mapping):
        return {key: combine_outputs([o[key] for o in outputs], sizes) for key in first}
    if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
        return type(first)(combine_outputs([o[i] for o in outputs], sizes) for i in range(len(first)))
    return first if all(o == first for o in outputs) else list(outputs)
