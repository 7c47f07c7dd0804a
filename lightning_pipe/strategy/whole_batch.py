"""The step's run on the whole batch, on the last stage, after the pipeline's run on its micro-batches: where the
step changes the module, calls the loggers, returns Python numbers, logs values that are not means over rows, returns
outputs in which rows meet, or updates metrics with values that are not per row, the micro-batches' results do not
make one device's, so the step runs once more, without gradients, on the whole batch's model outputs (kept for it),
and that run's effects, logs, outputs and metric updates stand. What needs it is found on the first batches of each
step kind (:data:`~.logs.CHECKED_BATCHES`) and said once. A mixin of
:class:`~lightning_pipe.strategy.runner.PipelineRunner`, which holds the state these read."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from lightning_pipe.capture.coupling import FIXED_ROWS
from lightning_pipe.capture.patterns import all_match, with_values
from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import batch_rows, owned, split_batch
from lightning_pipe.strategy.aside import run_aside
from lightning_pipe.strategy.captured import CapturedModule
from lightning_pipe.strategy.effect_runs import MicrobatchRuns, kept_whole, settle
from lightning_pipe.strategy.logger_calls import LoggerCalls
from lightning_pipe.strategy.logs import CHECKED_BATCHES, LogRecorder, WholeBatchLogs
from lightning_pipe.strategy.metric_states import MetricTracker
from lightning_pipe.strategy.randomness import (
    derive_seed,
    forked_random,
    global_random_states,
    host_random_kept,
    same_random_states,
)
from lightning_pipe.strategy.loss_warnings import neither_warning
from lightning_pipe.strategy.reduction import LOSS_TOLERANCE, Counts
from lightning_pipe.strategy.results import StepResult
from lightning_pipe.strategy.split import SplitModule
from lightning_pipe.strategy.step_effects import Snapshot, StepEffects
from lightning_pipe.strategy.step_values import (
    as_in_training, call_weights, combine_outputs, listed, loss_of, needs_whole_batch, same_output, sizes_apart,
    without_gradients,
)
from lightning_pipe.strategy.values import sendable

__all__ = ["WholeBatchRuns"]


class WholeBatchRuns:
    """The whole-batch runs of a runner: call :meth:`_init_whole_batch_runs` from its ``__init__``."""

    split: SplitModule | CapturedModule
    module: LightningModule
    pipeline: Pipeline
    recorder: LogRecorder
    whole_logs: WholeBatchLogs
    metrics: MetricTracker
    logger_calls: LoggerCalls
    effects: StepEffects
    replica_group: dist.ProcessGroup | None
    _mean_found: bool  # the first batches' check of the loss (:mod:`.first_checks`)
    _loss_warned: bool
    _warn_once: Callable[[str], None]

    def _init_whole_batch_runs(self) -> None:
        self._keeps_outputs = False  # the last stage keeps the training micro-batches' outputs (a step changed some)
        # steps (and dataloaders) whose returned outputs the micro-batches' do not put together (rows that meet: out -
        # out.mean(0), torch.arange(len(x))), found on their first batches: their outputs come from the whole batch's
        # run
        self._whole_outputs: set[str] = set()
        self._outputs_checked: dict[str, int] = {}  # batches checked so far (:data:`~.logs.CHECKED_BATCHES`)
        # and those whose metric updates differ so (a SumMetric of the loss): taken from that run
        # (:mod:`.metric_states`)
        self._whole_metrics: dict[str, list[str]] = {}
        self._metrics_checked: dict[str, int] = {}
        self._effects_warned: set[str] = set()

    def _counts_loss(self, step: str) -> bool:
        """Whether the captured model's loss in ``step``'s mode is a mean over a count (labels other than an ignored
        one, class weights) that micro-batches may not share as their rows."""
        training = step == "training_step"
        return isinstance(self.split, CapturedModule) and any(
            capture.counted_means or any(loss.weighted or loss.ignore_index is None or loss.ignore_index < 0
                                         for loss in capture.mean_losses)
            for capture in self.split.splitter.captures if capture.training == training)

    def _model_counts(self, step: str, batch: Any, rest: tuple, kwargs: Mapping[str, Any],
                      microbatches: int, seed: int) -> list[float | tuple[float, ...]] | None:
        """What a captured model's own loss is a mean over in each micro-batch (Hugging Face's, over the labels other
        than -100 after its causal shift), counted from each one's model inputs, so that the whole batch's output
        made from the micro-batches' averages that loss by them, as one device's is (averaged by rows, a validation
        loss logged with its count as batch_size was taken for another); for a step calling the model several times
        (two halves of each sequence, each with its labels), a tuple per micro-batch of each call's count (a call
        whose inputs no counted mean reads, its rows); None where the model takes no such mean or the inputs do not
        tell. The step's code before the model runs again per micro-batch as the first stage ran it (its random
        numbers, its rows of a carried state), its effects undone."""
        if not isinstance(self.split, CapturedModule):
            return None
        training = step == "training_step"
        # (those with a mean over a count first: a capture of the same inputs without one may come before them)
        captures = sorted((capture for capture in self.split.splitter.captures if capture.training == training),
                          key=lambda capture: not any(mean.linear for mean in capture.counted_means))
        weights: list[float | tuple[float, ...]] = []
        total = batch_rows(batch)
        pieces = split_batch(torch.arange(total), microbatches)
        counted = False  # some call's inputs gave a count
        try:
            with run_aside(self.module, self.effects, self.recorder, self.logger_calls, self.metrics) as aside:
                for index, microbatch in enumerate(split_batch(batch, microbatches)):
                    rows = pieces[index]
                    with self.split.carried.window(int(rows[0]), int(rows[-1]) + 1, total), \
                            forked_random(derive_seed(seed, index), self.pipeline.device):
                        calls = self.split.call_leaves(step, owned(microbatch), rest, kwargs)
                    aside.undo()
                    each: list[float] = []
                    for tensors in calls:
                        count = _call_count(captures, tensors, len(rows))
                        if count is None:
                            return None  # no capture of these inputs, or means over several counts
                        counted = counted or count[1]
                        each.append(count[0])
                    weights.append(each[0] if len(each) == 1 else tuple(each))
        except Exception:  # noqa: BLE001 - code before the model that cannot run again here: no telling
            return None
        return weights if counted and all(sum(call_weights(weights, call)) > 0 for call in range(len(calls))) \
            else None

    def _settle_effects(self, step: str, start: Snapshot, kept: list[tuple[int, Any, int]], microbatches: int,
                        batch: Any, rest: tuple, kwargs: Mapping[str, Any], seed: int, result: StepResult,
                        counts: Counts | None = None, runs: MicrobatchRuns | None = None) -> None:
        """On the last stage: the step's changes to the module since ``start`` and its calls on the loggers, as one
        device makes them (:mod:`.step_effects`, :mod:`.logger_calls`), put in ``result`` for every rank; so too
        Python numbers the step returns (``len(x)``, ``acc.item()``), which no combination of the micro-batches'
        gives for every kind of number."""
        # the calls' inputs of other sizes besides the rows in the micro-batches (read before the runs below add the
        # whole batch's)
        lengths_apart = any(len(sizes) > 1 for sizes in self.split.call_sizes().values())
        returned: list[Any] = []
        # Asynchronous schedules step the optimizer (and its hooks) inside the pipeline's run of a training step,
        # which a rerun would undo: their micro-batches' changes stand (they are not one device's anyway).
        microbatches = 1 if self.pipeline.asynchronous and step == "training_step" else microbatches
        kind = self._logs_kind(step, rest, microbatches)
        index = rest[0] if rest and isinstance(rest[0], int) else None  # (batch_idx)
        logged = LogRecorder(self.module) if kind is not None and self.whole_logs.wanted(
            kind, [entry.name for entry in result.logs], index) else None
        if kind is not None and logged is None:
            self.whole_logs.watch(kind, result.logs)
        drew: list[bool] = []  # whether the whole batch's run drew random numbers (then its logs are another sample)
        logs_checked = False

        def replay(whole: Any, for_logs: bool = False) -> None:
            logs_before = len(logged.calls) if logged is not None else 0
            calls_before, mark = len(self.logger_calls.calls), self.effects.snapshot()

            def attempt(whole: Any) -> tuple[Any, bool]:  # (a second attempt starts from the same logs and numbers)
                if logged is not None:
                    del logged.calls[logs_before:]
                del self.logger_calls.calls[calls_before:]
                recording = logged.recording(batch_rows(batch)) if logged is not None else self.recorder.discarding()
                loggers = self.logger_calls.discarding() if for_logs else self.logger_calls.recording()
                with recording, self.metrics.replaying(), host_random_kept(self.module) as held, loggers, \
                        forked_random(derive_seed(seed, 0), self.pipeline.device):
                    before = global_random_states()
                    output = self.split.run_step(step, whole, owned(batch), rest, kwargs)
                    return output, not same_random_states(global_random_states(), before) or held.moved()

            output, drawn = as_in_training(attempt, whole) if step == "training_step" else \
                without_gradients(attempt, whole, lambda: self.effects.restore(mark))
            returned.append(output)
            drew.append(drawn)

        def ran_whole() -> bool:  # the step ran on the whole batch, the last time without drawing random numbers
            return bool(returned) and bool(drew) and not drew[-1]

        def run_whole() -> bool:  # the same, running it for that where it has not run and changed nothing
            if not returned and not self.effects.changed(start):
                self._replay_for_logs(kept_whole(kept, microbatches, weights, kinds), replay)
            return ran_whole()

        def as_output(output: Any) -> Any:  # what the step returned on the whole batch, as the batch's output
            return combine_outputs([loss_of(output)[1] if step == "training_step" else output], [1])

        made = self.logger_calls.take()
        # the outputs are checked as the logs are (predict_step's too, which logs nothing)
        checked = kind if kind is not None or microbatches <= 1 or self.replica_group is not None \
            or step != "predict_step" else step
        numbers = needs_whole_batch(result.output) or (checked is not None and checked in self._whole_outputs)
        kinds = self.split.output_kinds(step == "training_step")  # how the model's single numbers add up over rows
        weights = [float(count) for count in counts.counts] if counts is not None else None
        # evaluation only: in training the loss is the micro-batches' combination that the gradients follow (a
        # count the user gives with loss_reduction weighs both), and the first stage warns where it is not one device's
        counting = step != "training_step" and counts is None and bool(kept) and microbatches > 1 \
            and self._counts_loss(step)
        # why the micro-batches' model outputs may not put together into the whole batch's (said where they do not)
        apart = "their rows along no one dim, or a number whose sum or mean over rows the model does not show"
        if counting:
            weights = self._model_counts(step, batch, rest, kwargs, microbatches, seed)
            if weights is not None:  # the counts weigh the means they count, not a mean over rows beside them
                kinds = self.split.output_kinds(False, counted=True)
            else:  # a mean over a count that cannot be counted here: no whole output with that loss
                kinds = lambda structure: None  # noqa: E731 - every single number's kind not known
                apart = ("the model's loss is a mean over a count of its labels that no one count of each "
                         "micro-batch's model inputs gives: means over different counts added, or inputs the step's "
                         "code before the model could not make again here")
        # (the model's inputs of other lengths too: not a model padding each micro-batch to its own longest row, as
        # pad_packed_sequence does, nor outputs of a size that is a multiple of the rows)
        trimmed = lengths_apart and len(kept) == microbatches > 1 and sizes_apart(
            [output for _, output, _ in kept], [rows for _, _, rows in kept])
        if trimmed:
            self._warn_effects(_TRIMMED.format(step=step))
        needs = ["self.logger"] * bool(made) + ["outputs that only the whole batch gives (Python numbers, tensors "
                                                "without the batch's rows first)"] * numbers
        if checked is not None and checked in self._whole_metrics:
            needs.append(f"updates of {', '.join(self._whole_metrics[checked])}")
        result.effects, replayed = settle(self.effects, step, start, kept, microbatches, replay, self._warn_effects,
                                          needs=needs, weights=weights, kinds=kinds, runs=runs)
        if logged is not None:  # a step whose changes stand as its micro-batches made them is not run again
            assert kind is not None
            whole = None if replayed else kept_whole(kept, microbatches, weights, kinds)
            logs_checked = True  # (if the run below drew nothing)
            ran = replayed or (not self.effects.changed(start) and whole is not None
                               and self._replay_for_logs(whole, replay))
            if not replayed and whole is None and len(kept) == microbatches and result.logs and not trimmed:
                self._warn_effects(f"{step}'s logged values are not checked against a run of the step on the whole "
                                   f"batch: its micro-batches' model outputs do not put together into the whole "
                                   f"batch's ({apart}), so a value that is not a mean over rows (a maximum, "
                                   f"loss.exp(), len(x)) is logged as the micro-batches' combination, not as one "
                                   f"device logs it. Return outputs with the batch's rows along one dim (views stacked "
                                   f"along the rows, self.model(torch.cat([x1, x2])): call the model once per view "
                                   f"instead, z1, z2 = self.model(x1), self.model(x2))")
            flagged = self.whole_logs.settle(kind, result.logs, logged if ran and drew and not drew[-1] else None,
                                             index)
            if flagged:
                over = "over what loss_reduction counts" if callable(getattr(self, "loss_reduction", None)) else \
                    "over rows"
                self._warn_effects(f"{step} logs {', '.join(sorted(flagged))}, which are not means {over}, so no "
                                   f"combination of the micro-batches' values gives them: the last stage keeps each "
                                   f"batch's model outputs and runs the step once more, without gradients, on the "
                                   f"whole batch for them{self._as_one_device()}. To spare that memory and time, log "
                                   f"means {over} in the step and derive the rest later (a perplexity from the "
                                   f"epoch's mean loss)")
        if checked is not None and not numbers and _counted(self._outputs_checked, checked):
            if run_whole():  # the micro-batches' outputs put together: the whole batch's?
                whole = as_output(returned[-1])
                if not same_output(whole, result.output):
                    self._whole_outputs.add(checked)
                    self._keeps_outputs = True
                    result.output = whole
                    self._warn_effects(f"{step} returns outputs in which the batch's rows meet (out - out.mean(0), "
                                       f"torch.arange(len(x)), a softmax over rows, a loss averaged over a count of "
                                       f"the whole batch's: masked tokens), so the micro-batches' outputs put "
                                       f"together differ from the whole batch's: the last stage keeps each batch's "
                                       f"model outputs and runs the step once more, without gradients, on the whole "
                                       f"batch for them{self._as_one_device()}")
        if step == "training_step" and ran_whole():
            self._compare_loss(result, loss_of(returned[-1])[0])
        if checked is not None:
            self._settle_metrics(step, checked, result, run_whole, ran_whole)
        if (replayed and numbers) or ran_whole():  # the whole batch's output (numbers and all), from a run of the
            # step on it (for its effects, logs, outputs or metrics) that drew nothing
            result.output = as_output(returned[0] if numbers else returned[-1])
        elif numbers:  # as the micro-batches gave them (settle said so)
            result.output = listed(result.output)
        calls = self.logger_calls.take()  # the whole batch's (a replay that failed part way: dropped)
        calls = calls if replayed else made
        sent = [call for call in calls if sendable(call[2]) and sendable(call[3])]
        if len(sent) < len(calls):
            self._warn_effects(f"{step} logs through self.logger values that cannot be sent to rank 0, where the "
                               f"loggers write (tensors, numbers, strings, NumPy arrays and lists, tuples and dicts of "
                               f"them can): images as tensors or arrays, not figures or logger-specific objects")
        result.logger_calls = sent
        result.whole = logs_checked and ran_whole()  # the logs compared with (or taken from) that run
        self.split.call_sizes()  # (the runs on the whole batch's: not the next step's micro-batches')

    def _compare_loss(self, result: StepResult, whole: Any) -> None:
        """A training batch the step ran on whole anyway (for its logs, outputs or metrics), past the batches whose
        loss was checked first: where "auto" found a mean over rows, the whole batch's loss must be the micro-batches'
        combination; else (a term switched on after a warm-up: a KL summed over the batch from step 1000) warn, once."""
        if not self._mean_found or self._loss_warned or result.loss is None \
                or not isinstance(whole, torch.Tensor) or whole.numel() != 1:
            return
        combined, value = float(result.loss), float(whole.detach().double())
        tolerance = max(LOSS_TOLERANCE, 4 * torch.finfo(whole.dtype).eps) if whole.is_floating_point() else 0.0
        if not math.isfinite(value) or math.isfinite(combined) and \
                abs(combined - value) <= tolerance * max(abs(value), abs(combined), 1e-12):
            return  # (finite on the whole batch but not over its micro-batches: they differ, said below)
        self._warn_once(neither_warning(
            f"on the whole batch the step's loss is {value:.6g}, its micro-batches' combination {combined:.6g}, at a "
            f"batch past the first ones checked: the first ones' micro-batches had losses too alike to tell (every "
            f"token's loss near log(vocabulary) at the start), or a term was switched on later, such as a KL "
            f"warm-up's"))

    def _settle_metrics(self, step: str, checked: str, result: StepResult, run_whole: Callable[[], bool],
                        ran_whole: Callable[[], bool]) -> None:
        """The metrics the step updated as one device's (:mod:`.metric_states`): on the first batches of each step kind
        (``checked``), the micro-batches' updates compared with a run of the step on the whole batch (``run_whole()``
        makes one where none ran); metrics updated otherwise there are taken from such a run (``ran_whole()``) at
        every batch of that kind."""
        if self.metrics.updated() and _counted(self._metrics_checked, checked):
            found = self.metrics.differing() if run_whole() else []
            if found:
                found = sorted({*self._whole_metrics.get(checked, []), *found})
                self._whole_metrics[checked] = found
                self._keeps_outputs = True
                self._warn_effects(f"{step} updates {', '.join(found)} with values that are not per row (a loss, a "
                                   f"batch statistic: SumMetric, MaxMetric, CatMetric or MeanMetric of the loss, a "
                                   f"running window), so its micro-batches' updates do not make the whole batch's "
                                   f"update: the last stage keeps each batch's model outputs and runs the step once "
                                   f"more, without gradients, on the whole batch for them{self._as_one_device()}. To "
                                   f"spare that, update metrics per row, or weight a loss by its rows "
                                   f"(MeanMetric: metric(loss, weight=len(x)))")
        if checked in self._whole_metrics and ran_whole():
            self.metrics.adopt(self._whole_metrics[checked])
            result.metrics = self.metrics.batch_update({entry.metric for entry in result.logs
                                                        if entry.metric is not None})

    def _as_one_device(self) -> str:
        """What a run of the step on the whole batch's model output gives: one device's values, unless the captured
        model lets the batch's rows meet (warned at its capture), whose outputs per micro-batch are not one device's."""
        captures = self.split.splitter.captures if isinstance(self.split, CapturedModule) else []
        # (a number of rows the graph fixed, run eagerly, may only size tensors: said at the capture where it does not)
        if any(capture.rows_meet and not capture.rows_meet.startswith(FIXED_ROWS) for capture in captures):
            return (" (one device's values for the model's outputs; those differ from one device's here, where the "
                    "model lets the rows of a batch meet, as warned when it was captured)")
        return " (one device's values)"

    def _logs_kind(self, step: str, rest: tuple, microbatches: int) -> str | None:
        """What :class:`WholeBatchLogs` checks this step's logs under (each evaluation dataloader on its own first
        batch: its step may log other names); None where they are not checked: one micro-batch, an asynchronous
        training step (its optimizer steps inside the run), ``predict_step``, replicas (each would decide and run
        alone, and a step calling a collective would wait on the others)."""
        if microbatches <= 1 or step == "predict_step" or self.replica_group is not None \
                or (self.pipeline.asynchronous and step == "training_step"):
            return None
        return step if step == "training_step" or len(rest) < 2 else f"{step}/{rest[1]}"

    def _replay_for_logs(self, whole: Any, replay: Callable[..., None]) -> bool:
        """Run the step on the whole batch's output (None: not kept whole) for its logs alone (a step that changed
        nothing on the module: whatever this run changes is undone); whether it ran."""
        if whole is None:
            return False
        mark = self.effects.snapshot()
        try:
            replay(whole, for_logs=True)
        except Exception:  # noqa: BLE001 - the micro-batches' combination stands
            return False
        finally:
            if self.effects.changed(mark) and not self.effects.restore(mark):
                self._warn_effects("the run of the step on the whole batch for its logs changed the module in a way "
                                   "that could not be undone (a list emptied, a large tensor changed in place)")
        return True

    def _warn_effects(self, message: str) -> None:
        if message not in self._effects_warned:  # once, not at every step
            self._effects_warned.add(message)
            warnings.warn(message, stacklevel=4)


_TRIMMED = ("{step}'s micro-batches gave the model inputs of different sizes besides their rows, and its outputs "
            "differ so (found by review: a speech step trimming the padding to the longest row, x[:, :lengths.max()]"
            "): the step's code sizes the model's input from each micro-batch's values, where one device's whole "
            "batch has one size. This trains as one device only where the model ignores the padding past each row's "
            "length (masks, per-frame or causal layers; not a bidirectional RNN or a mean over padded frames), and "
            "values the step logs that are not means over rows, or outputs in which rows meet, are the micro-"
            "batches' combination, as no whole batch's output can be put together. Trim or pad in the DataLoader's "
            "collate_fn instead (to the batch's longest row), which gives every micro-batch the batch's size")


def _call_count(captures: list[Any], tensors: list[Any], rows: int) -> tuple[float, bool] | None:
    """What the loss of a call of the model on ``tensors`` (a micro-batch's ``rows`` rows) is a mean over, and whether
    a counted mean gave it (else the rows: a call whose capture takes no such mean); None where no capture takes
    these inputs or its means count otherwise."""
    for capture in captures:
        full = with_values(capture.in_patterns, tensors)
        if full is None or not all_match(capture.in_patterns, full):
            continue
        if not capture.counted_means:
            return float(rows), False
        found = {mean.counted(full) for mean in capture.counted_means if mean.linear}
        if len(found) != 1 or None in found:
            return None
        return float(found.pop()), True  # type: ignore[arg-type]
    return None


def _counted(checks: dict[str, int], kind: str) -> bool:
    """Whether this batch of step ``kind`` is one of its first :data:`~.logs.CHECKED_BATCHES` checked in ``checks``
    (then counted)."""
    if checks.get(kind, 0) >= CHECKED_BATCHES:
        return False
    checks[kind] = checks.get(kind, 0) + 1
    return True
