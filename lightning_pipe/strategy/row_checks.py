"""What the first batches of each epoch are checked for, once, where rows of a batch may meet: the step's code before
the model mixing rows or drawing random numbers per batch (:mod:`.step_inputs`), the model writing the batch's
tensors in place, and a fast-path sequence's layers letting rows meet (:mod:`lightning_pipe.engine.rows`; a captured
model's graph is looked into at capture instead: :mod:`lightning_pipe.capture.coupling`). The base of
:class:`~lightning_pipe.strategy.first_checks.FirstBatchChecks`, which reads what these leave (the whole batch's model
inputs, the steps that draw)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch import LightningModule

from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import batch_rows, owned, split_batch
from lightning_pipe.engine.rows import rows_meet, rows_meet_in_training
from lightning_pipe.engine.tree import tree_flatten
from lightning_pipe.strategy.aside import run_aside
from lightning_pipe.strategy.captured import CapturedModule
from lightning_pipe.strategy.logger_calls import LoggerCalls
from lightning_pipe.strategy.logs import LogRecorder
from lightning_pipe.strategy.metric_states import MetricTracker
from lightning_pipe.strategy.randomness import (
    derive_seed,
    forked_random,
    global_random_states,
    same_random_states,
    set_global_random_states,
)
from lightning_pipe.strategy.split import SplitModule
from lightning_pipe.strategy.step_effects import StepEffects
from lightning_pipe.strategy.step_inputs import inputs_warning, mixing_warning, shifted_rows

__all__ = ["RowChecks", "STEPS"]

STEPS = ("training_step", "validation_step", "test_step", "predict_step")


class RowChecks:
    """The row checks of a runner: :meth:`_init_row_checks` is called from ``FirstBatchChecks._init_checks``."""

    split: SplitModule | CapturedModule
    module: LightningModule
    pipeline: Pipeline
    recorder: LogRecorder
    metrics: MetricTracker
    logger_calls: LoggerCalls
    effects: StepEffects
    _checks_model_loss: Callable[[str], bool]

    def _init_row_checks(self, split: SplitModule | CapturedModule, pipeline: Pipeline) -> None:
        """Every row check still to run, and for a fast-path sequence its stages keeping two micro-batches' inputs."""
        # Layers of a fast-path sequence that let the rows of a batch meet: tried on the first training batch's first
        # two micro-batches (:mod:`lightning_pipe.engine.rows`; a captured model's graph is looked into instead).
        self._rows_unchecked = isinstance(split, SplitModule) and pipeline.num_microbatches > 1
        # The step's code before the model, on the first batch of each step in each epoch (code may start mixing rows
        # later: mixup from epoch 5): does it mix rows (.step_inputs)? Each warning is given once.
        self._inputs_unchecked = set(STEPS)
        self._inputs_epoch = 0
        self._inputs_warned: set[str] = set()
        self._drawing: set[str] = set()  # steps whose code before the model draws random numbers (a masked-LM mask)
        self._input_write_warned = False
        # a step's whole first batch's model inputs (:meth:`_check_inputs`), for the model's loss check that follows
        self._whole_inputs: dict[str, list[Any]] = {}
        for stage in pipeline.stages.values() if self._rows_unchecked else ():
            stage.kept_inputs = []

    def _checks_inputs(self, step: str, microbatches: int) -> bool:
        """Whether this step's batch checks the step's code before the model (the first of each step's batches of
        several micro-batches in each epoch, on the first stage)."""
        epoch = self._epoch()
        if epoch != self._inputs_epoch:  # (a step warned of already is not run again)
            self._inputs_epoch, self._inputs_unchecked = epoch, set(STEPS) - self._inputs_warned
        return step in self._inputs_unchecked and microbatches > 1 and 0 in self.pipeline.stages

    def _epoch(self) -> int:
        trainer = getattr(self.module, "_trainer", None)
        return int(getattr(trainer, "current_epoch", 0) or 0)

    def _check_inputs(self, step: str, batch: Any, rest: tuple, kwargs: Mapping[str, Any], seed: int,
                      seen: dict[int, list[Any]]) -> None:
        """Warn if the step's code before the model gives it other inputs for the whole ``batch`` than for its
        micro-batches one by one (``seen``); for code that draws random numbers (other draws for the whole batch),
        if the first micro-batch's rows of its inputs change when only the batch's other rows do
        (:mod:`.step_inputs`)."""
        self._inputs_unchecked.discard(step)
        first = self.pipeline.stages.get(0)
        if first is not None and first.wrote_input:  # the model wrote its inputs, the batch's tensors, in place (said
            return  # by _warn_of_written_input): neither they nor the batch are what the step's code gave
        where = f"the first batch of epoch {self._inputs_epoch}" if self._inputs_epoch else "the first batch"

        def inputs(data: Any) -> list[Any]:
            if isinstance(self.split, CapturedModule):
                return self.split.input_leaves(step, data, rest, kwargs)
            return tree_flatten(self.split.capture_input(step, data, rest, kwargs))[0]

        message = None
        try:
            with run_aside(self.module, self.effects, self.recorder, self.logger_calls, self.metrics) as aside, \
                    forked_random(derive_seed(seed, 0), self.pipeline.device):
                states = global_random_states()
                whole = inputs(owned(batch))
                if same_random_states(global_random_states(), states) and not aside.drew():
                    message = inputs_warning(step, [seen[index] for index in sorted(seen)], whole, where)
                    if self._checks_model_loss(step):
                        self._whole_inputs[step] = whole
                else:  # drew: the same draws again, on a batch whose rows after the first micro-batch changed
                    self._drawing.add(step)
                    rows = batch_rows(batch)
                    first = batch_rows(split_batch(batch, self.pipeline.num_microbatches)[0], microbatch=True)
                    set_global_random_states(states)
                    aside.undo()
                    shifted = inputs(shifted_rows(owned(batch), rows, first))
                    message = mixing_warning(step, rows, first, whole, shifted, where)
        except Exception:  # noqa: BLE001 - a step that cannot run on the whole batch here: no telling
            return
        if message is not None and step not in self._inputs_warned:
            self._inputs_warned.add(step)
            warnings.warn(message, stacklevel=2)

    def _check_rows(self) -> None:
        """Warn of each stage of this rank whose layers let the rows of a batch meet (the first training step's)."""
        self._rows_unchecked = False
        assert isinstance(self.split, SplitModule)
        for index, stage in sorted(self.pipeline.stages.items()):
            kept, stage.kept_inputs = stage.kept_inputs, None
            if not kept or len(kept) != 2:
                continue
            difference, mode = rows_meet(stage.module, *kept, self.pipeline.device), "in eval mode"
            if difference is None and stage.module.training:
                difference = rows_meet_in_training(stage.module, *kept, self.pipeline.device)
                mode = "in training, with dropout and batch norms in eval mode"
            if difference is not None:
                names = list(stage.module._modules)
                warnings.warn(
                    f"stage {index}'s layers ({names[0]}..{names[-1]} of the nn.Sequential at {self.split.path!r}) "
                    f"give two micro-batches other outputs run together than run apart ({mode}, without "
                    f"gradients; relative difference {difference:.2g}): they let the rows of a batch meet, through "
                    f"attention or a recurrence along dim 0 (a time-major batch, (T, B), given to batch_first=False "
                    f"layers: the pipeline splits every batch along dim 0, so micro-batches cut the sequences in "
                    f"time; give batches with their rows first) or a statistic over the rows brought back into them "
                    f"(x - x.mean(0), a minibatch standard deviation, a batch norm keeping no running statistics, "
                    f"a mean-only batch norm of your own; also across the cut: h.mean() or x.shape[0] that the "
                    f"stage before passes on, used on the rows here), or a value over the rows passed on beside the "
                    f"activations "
                    f"that is neither the micro-batches' mean nor their sum (an MoE load-balancing loss, a product of "
                    f"two means over the batch; a maximum). A pipeline runs each micro-batch alone, so this trains "
                    f"otherwise than one device; num_microbatches=1 gives one device's.", stacklevel=2)

    def _warn_of_written_input(self, step: str) -> None:
        """On the first stage's rank: warn once if the model wrote the tensors it was given in place (a
        ``Normalize(inplace=True)`` as its first layer): the step's code after the model runs on the last stage's
        rank, with that rank's own batch, which the write never reached (found by review: an autoencoder's loss
        against its normalized input, 0.997 where one device's is 1.531)."""
        stage = self.pipeline.stages.get(0)
        if stage is None or not stage.wrote_input or self._input_write_warned or isinstance(self.split, CapturedModule):
            return  # (a captured model's graph shows it, in any segment: said at capture)
        self._input_write_warned = True
        warnings.warn(f"the pipelined model writes the tensors {step} gives it in place (x.sub_(mean).div_(std), a "
                      f"transforms.Normalize(inplace=True) used as a layer, x.clamp_(...)): on one device the step's "
                      f"code after the model then reads the batch so changed (a reconstruction loss against x), but "
                      f"under a pipeline that code runs on the last stage's rank, whose batch the write never "
                      f"reached. Make the op out of place in the model (x = (x - mean) / std), or do it in the step "
                      f"before calling the model", stacklevel=3)
