"""PipeDream's asynchronous schedules under Lightning: optimizer steps inside the pipeline, drains before reading.

Under ``async_1f1b`` and ``2bw`` the engine steps the optimizer itself, at the schedule's ``O`` actions, while
micro-batches of the batch before are still in flight. Lightning's automatic optimization is kept whole around it:
Lightning calls ``optimizer_step`` once per batch (one ``global_step``), the strategy runs the closure there
(``training_step`` -> the pipeline, ``zero_grad``, ``backward``), and each ``O`` action of the engine calls the real
``optimizer.step()`` through the precision plugin, so ``on_before_optimizer_step``, gradient clipping by value and
the optimizer's own hooks run at every real step, and LR schedulers step once per batch as usual.

The gradients of micro-batches still in flight at the end of a batch (2BW's partial sums) are carried past
Lightning's ``zero_grad`` to the next batch. Before anything reads the weights (validation, a checkpoint, the end of
an epoch, the end of fit) the pipeline is drained: every update still owed is applied, and the weights are then
exactly those after ``global_step`` batches' updates.

With data-parallel replicas of the pipeline (``num_stages`` < devices), the replicas run the same schedule on their
shares of the data and average their gradients right before each of these optimizer steps, as PipeDream's replicated
stages do, so they take the same updates and stay equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import Precision
from torch.optim import Optimizer
from typing_extensions import override

from lightning_pipe.strategy.optimizers import world_collectives_refused
from lightning_pipe.strategy.runner import PipelineRunner

__all__ = ["AsyncSteps", "DrainPipeline", "check_async_fit"]


class AsyncSteps:
    """The real optimizer steps an asynchronous pipeline takes inside a Lightning step, and its drains."""

    def __init__(self) -> None:
        self.runner: PipelineRunner | None = None  # set by attach() once the strategy has cut the module
        self.precision: Precision | None = None
        self._optimizer: Optimizer | None = None
        self._model: LightningModule | None = None
        self._kwargs: dict[str, Any] = {}
        self._carried: dict[int, torch.Tensor] = {}  # id(param) -> gradient of micro-batches still in flight
        self.steps_taken = 0  # real optimizer steps, all batches together (async_1f1b: m per batch)

    def attach(self, runner: PipelineRunner, precision: Precision) -> None:
        """The pipeline to drain and the precision plugin that steps the optimizer (the strategy's, after setup)."""
        self.runner, self.precision = runner, precision

    def run_closure(self, optimizer: Optimizer, closure: Callable[[], Any], model: LightningModule,
                    **kwargs: Any) -> Any:
        """Lightning's ``optimizer_step`` of one batch: the closure runs the pipeline, which steps by itself."""
        self._optimizer, self._model, self._kwargs = optimizer, model, kwargs
        return closure()

    def optimizer_step(self) -> None:
        """One real step of this rank's optimizer (an ``O`` action): hooks and clipping as Lightning runs them."""
        if self._optimizer is None or self._model is None or self.runner is None or self.precision is None:
            raise RuntimeError("an asynchronous pipeline reached an optimizer step outside Lightning's optimizer_step; "
                               "training_step must run through trainer.fit with automatic optimization")
        self.runner.average_gradients()  # replicas of the pipeline: one update from all their micro-batches
        with world_collectives_refused(self._optimizer):  # (a DDP-made optimizer's collective: refused here too)
            self.precision.optimizer_step(self._optimizer, model=self._model, closure=_no_closure, **self._kwargs)
        self.steps_taken += 1

    @contextmanager
    def carried(self, parameters: Iterable[nn.Parameter]) -> Iterator[None]:
        """Inside, the parameters hold the gradients the last batch left in flight; afterwards those of this batch's
        micro-batches still in flight are taken out again (out of reach of Lightning's ``zero_grad``)."""
        params = list(parameters)
        before = [p.grad for p in params]
        for p in params:
            p.grad = self._carried.get(id(p))
        try:
            yield
        finally:
            self._carried = {id(p): p.grad for p in params if p.grad is not None}
            for p, grad in zip(params, before):
                p.grad = grad

    def drain(self) -> None:
        """Finish every micro-batch in flight and apply its update (collective: every rank of the pipeline)."""
        runner = self.runner
        if runner is None or self.precision is None or not runner.pipeline.asynchronous:
            return
        module = runner.module
        modes = {m: m.training for m in module.modules()}
        # Validation runs under inference_mode; the backwards and updates owed need autograd and ordinary tensors,
        # and a re-materialized forward must run in training mode as the original one did.
        with torch.inference_mode(False), torch.enable_grad(), self.precision.train_step_context():
            module.train()
            try:
                with self.carried(module.parameters()):
                    runner.pipeline.flush(self.optimizer_step)
            finally:
                for m, training in modes.items():
                    m.training = training
        if self._carried:
            raise RuntimeError("gradients were left over after draining the pipeline; this is a bug, please report it")


class DrainPipeline(Callback):
    """Drains an asynchronous pipeline before validation, at the end of each training epoch and of fit; the
    strategy puts it first among the Trainer's callbacks, so every other callback sees the drained weights."""

    def __init__(self, steps: AsyncSteps) -> None:
        self.steps = steps

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps.drain()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps.drain()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps.drain()


def check_async_fit(trainer: Trainer, schedule: str, has_ties: bool, step_parameters: Sequence[str] = ()) -> None:
    """Refuse, before the first step, what an asynchronous schedule cannot do inside Lightning."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    # a GradientAccumulationScheduler sets accumulate_grad_batches at each epoch's start: its counts too
    scheduled = [count for callback in trainer.callbacks if isinstance(callback, GradientAccumulationScheduler)
                 for count in callback.scheduling.values() if count != 1]
    if trainer.accumulate_grad_batches != 1 or scheduled:
        given = (f"accumulate_grad_batches={trainer.accumulate_grad_batches}" if not scheduled else
                 f"the GradientAccumulationScheduler (accumulating {scheduled[0]} batches)")
        raise ValueError(f"schedule={schedule!r} updates the weights inside the pipeline (no flush between batches), "
                         f"so Lightning cannot accumulate gradients over batches; remove {given} and raise "
                         f"num_microbatches or the batch size instead")
    if trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":  # Lightning's default
        raise ValueError(f"schedule={schedule!r} steps each stage at a different time, so there is no global gradient "
                         f"norm to clip by; use gradient_clip_algorithm='value', or a synchronous schedule ('1f1b')")
    if has_ties:
        raise ValueError(f"schedule={schedule!r} steps each stage at a different time, so parameters tied across "
                         f"stages (e.g. an LM head sharing the embedding's weight) would drift apart; untie them, put "
                         f"both uses on one stage (partition=...), or use a synchronous schedule ('1f1b')")
    if step_parameters:
        raise ValueError(f"schedule={schedule!r} steps each stage at a different time, and training_step trains "
                         f"parameters outside the pipelined model ({', '.join(step_parameters[:5])}), which every rank "
                         f"holds and would step at its own time; move them into the model, or use a synchronous "
                         f"schedule ('1f1b')")


def _no_closure() -> None:
    """The closure the optimizer calls: the pipeline already ran the backward of this step's micro-batch(es)."""
    return None
