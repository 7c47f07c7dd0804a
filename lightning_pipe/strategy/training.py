"""The training step of a runner (a mixin of :class:`~.runner.PipelineRunner`): ``training_step`` of a batch,
forward and backward of every micro-batch through the pipeline, the step's code after the model run per micro-batch
on the last stage (its loss weighted by the micro-batch's share of the batch, :mod:`.reduction`), and the batch's
result, made once on the last stage, shared with every rank (:mod:`.sharing`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import batch_rows, split_batch
from lightning_pipe.engine.replicas import GradientAverager
from lightning_pipe.engine.tree import tree_map_tensors
from lightning_pipe.strategy.batch_writes import BatchWrites, apply_writes, read_after
from lightning_pipe.strategy.buffers import BufferWatch, warn_of_batch_norms
from lightning_pipe.strategy.cut_warnings import FrozenCopies
from lightning_pipe.strategy.effect_runs import MicrobatchRuns
from lightning_pipe.strategy.failures import reported_failures
from lightning_pipe.strategy.fingerprint import batch_fingerprint
from lightning_pipe.strategy.randomness import derive_seed, forked_random
from lightning_pipe.strategy.loss_graph import mean_count
from lightning_pipe.strategy.reduction import Probe, nothing_counted
from lightning_pipe.strategy.results import StepResult
from lightning_pipe.strategy.step_runs import microbatch_run
from lightning_pipe.strategy.step_values import BATCH, ROWS, check_rows, loss_of, needs_whole_batch, tagged
from lightning_pipe.strategy.validation_clock import agree_on_validation, validation_due

__all__ = ["TrainingSteps"]


class TrainingSteps:
    """The training step of a :class:`~.runner.PipelineRunner`, whose parts it uses."""

    pipeline: Pipeline
    split: Any
    module: Any
    scope: str
    tied: Any
    effects: Any
    recorder: Any
    metrics: Any
    logger_calls: Any
    unfollowed: Any
    output_copies: Any
    whole_logs: Any
    buffers: BufferWatch
    averager: GradientAverager | None
    frozen_copies: FrozenCopies | None
    collective_device: torch.device
    loss_reduction: Any
    _batch_norms_said: bool
    _rows_said: bool
    _keeps_outputs: bool
    _parameter_reads_left: int
    _parameter_writes_left: int
    _rows_unchecked: bool
    _seed: Callable[[int | None], int]
    _prepare: Callable[..., None]
    _first_rows: Callable[[int], dict[int, int]]
    _counts: Callable[[Any, str], Any]
    _input_fn: Callable[..., Any]
    _rows_window: Callable[[torch.Tensor, int], Any]
    _carried: Callable[[str, StepResult, int], None]
    _probing: Callable[[], bool]
    _checks_inputs: Callable[[str, int], bool]
    _checks_model_loss: Callable[..., bool]
    _check_inputs: Callable[..., None]
    _check_model_loss: Callable[..., None]
    _check_rows: Callable[[], None]
    _check_parameter_reads: Callable[..., None]
    _new_loss_form: Callable[..., bool]
    _listing_reads: Callable[[int], Any]
    _parameter_gradients_refused: Callable[[], Any]
    _logs_kind: Callable[..., Any]
    _warn_of_written_input: Callable[[str], None]
    _warn_of_listed_logs: Callable[..., None]
    _settle_reduction: Callable[..., float]
    _probe_new_terms: Callable[..., None]
    _settle_effects: Callable[..., None]
    _result_posted: Callable[..., Any]
    _result: Callable[..., StepResult]
    _guard: Callable[..., Any]
    _share: Callable[..., StepResult]

    def train(self, args: Sequence[Any], kwargs: Mapping[str, Any], loss_scale: float = 1.0,
              optimizer_step: Callable[[], Any] | None = None, seed: int | None = None) -> Any:
        """``training_step`` of a batch: forward and backward of every micro-batch (gradients accumulate into this
        rank's parameters, scaled by ``loss_scale``); returns the batch's loss (or the step's dict) on every rank.

        ``seed`` (the same on every rank) seeds the step code's random numbers: micro-batch ``i`` runs with torch's
        generators forked to ``derive_seed(seed, i)`` on every rank that runs its step code. Asynchronous schedules
        call ``optimizer_step`` at each of their optimizer steps; the loss returned is this batch's, which the last
        stage computes within this call (earlier stages finish its backward later)."""
        if self.frozen_copies is not None:
            self.frozen_copies.before_step()
        with reported_failures(self.scope), self._pairings_explained():
            result = self._train(args, kwargs, loss_scale, optimizer_step, self._seed(seed))
        if self.frozen_copies is not None:
            self.frozen_copies.after_step()
        if not self._batch_norms_said:  # after the step: those its forward ran
            self._batch_norms_said = True
            warn_of_batch_norms(self.pipeline.modules(), self.pipeline.num_microbatches)
        return result

    @contextmanager
    def _pairings_explained(self) -> Iterator[None]:
        """A shape error pairing a frozen copy's parameters with this rank's share of the model's (an EMA update in
        the step) says so before the engine posts it, so that every rank's message does (found by review)."""
        try:
            yield
        except Exception as error:
            if self.frozen_copies is not None:
                self.frozen_copies.explain(error)
            raise

    def _train(self, args: Sequence[Any], kwargs: Mapping[str, Any], loss_scale: float,
               optimizer_step: Callable[[], Any] | None, seed: int) -> Any:
        batch, rest = args[0], tuple(args[1:])
        rows = check_rows(batch, "training_step")
        if not self._rows_said:
            self._rows_said = True
            _warn_of_few_rows(rows, self.pipeline.num_microbatches)
        fingerprint = batch_fingerprint(batch, self.collective_device)
        pipe, outputs, sizes = self.pipeline, [], []
        firsts = self._first_rows(rows)
        summed = self.loss_reduction == "sum" and not pipe.asynchronous  # asynchronous: one update per micro-batch
        counts = self._counts(batch, "training_step")
        probe = Probe(batch, counts=counts.counts if counts is not None else None) if self._probing() \
            and pipe.is_last_rank and not pipe.asynchronous and len(firsts) > 1 else None
        start = self.effects.snapshot()
        kept: list[tuple[int, Any, int]] | None = [] if pipe.is_last_rank else None  # (index, output, rows)
        # each micro-batch's run of the step from the module as the step found it (asynchronous: one update each)
        runs = MicrobatchRuns(self.effects, start) if pipe.is_last_rank and not pipe.asynchronous else None
        self._prepare("training_step", batch, rest, kwargs, seed)
        marks = self.unfollowed.mark("training_step") if pipe.is_last_rank else None
        checks_loss = self._checks_model_loss()
        checks_inputs = self._checks_inputs("training_step", len(firsts))
        inputs: dict[int, list[Any]] | None = {} if checks_loss or checks_inputs else None  # the model's, by
        # micro-batch (first stage)
        logs_kind = self._logs_kind("training_step", rest, len(firsts))
        for_logs = logs_kind is not None and self.whole_logs.wanted(logs_kind)  # outputs kept for WholeBatchLogs

        # what the step sets on its micro-batches, for a hook after it of one's own
        writes = BatchWrites() if pipe.is_last_rank and read_after(self.module, "on_train_batch_end") else None
        changed: list[int] = []  # micro-batches whose model output the step changed in place (before copies)
        nothing_rows = 0  # the rows of micro-batches whose loss, found a mean over nothing, weighs nothing ("auto")

        def loss_fn(output: Any, tagged: Any) -> torch.Tensor:
            nonlocal for_logs, nothing_rows
            microbatch, index = tagged[BATCH], firsts[int(tagged[ROWS][0])]
            microbatch_rows = batch_rows(microbatch, microbatch=True)
            weight = counts.counts[index] if counts is not None else None
            if runs is not None:
                runs.before_run()
            given, watched = self.output_copies.given("training_step", output)
            logged = len(self.recorder.calls)
            if writes is not None:
                writes.add(index, microbatch, microbatch_rows)
            with self.recorder.recording(microbatch_rows, weight), self.logger_calls.recording(), \
                    forked_random(derive_seed(seed, index), pipe.device), self._rows_window(tagged[ROWS], rows), \
                    microbatch_run("training_step", index, len(firsts), microbatch_rows, rows, microbatch), \
                    self._listing_reads(index), self._pairings_explained(), self._parameter_gradients_refused():
                result = self.split.run_step("training_step", given, microbatch, rest, kwargs)
            if self.output_copies.changed("training_step", output, watched):
                changed.append(index)
            if kept is not None and not for_logs and logs_kind is not None and not outputs \
                    and self.whole_logs.new(logs_kind, [call["name"] for call, _ in self.recorder.calls]):
                for_logs = True  # its first micro-batch logs a name no batch logged before: checked as the first
            loss, extra = loss_of(result)
            # a mean over nothing (every label of its rows ignored, a mask drawn empty), NaN, where "auto" looks
            empty = counts is None and not summed and (probe is not None or self._empty_means) \
                and mean_count(loss) == 0
            if empty:  # its logged values are left out, as one device's mean over the batch leaves out its rows
                self.recorder.weigh_nothing(logged)
                self._empty_means = True
                nothing_rows += microbatch_rows
            if index == 0 and loss.requires_grad:  # (a loss of a new form: a term added after a warm-up)
                new = self._new_loss_form(loss, output, probe is None and kept is not None and not pipe.asynchronous)
                if self._parameter_reads_left > 0 or new:
                    self._check_parameter_reads(loss, output, {id(param) for param in self.tied.parameters()})
                    if new:  # its parameters found by listing, on the next batch
                        self._parameter_reads_left = max(self._parameter_reads_left, 1)
            outputs.append(extra)
            sizes.append(microbatch_rows)
            if kept is not None and (self._keeps_outputs or self.logger_calls.calls
                                     or needs_whole_batch(extra, microbatch_rows)
                                     or self.effects.changed(start)):
                self._keeps_outputs = True  # from now on: a step that changes the module replays on the whole batch
            if kept is not None and (self._keeps_outputs or for_logs):
                kept.append((index, tree_map_tensors(torch.Tensor.detach, output), microbatch_rows))
            if probe is not None:
                probe.add(output, loss, microbatch_rows)
            if summed:  # the engine weights a micro-batch by its share of rows: a sum counts whole
                self.recorder.add_up(loss)
                return loss * (rows / microbatch_rows)
            if empty or counts is not None and counts.empty(index):  # a mean over nothing (NaN): it weighs nothing
                return nothing_counted(output, loss, told=not empty)
            if counts is not None:  # a mean over what loss_reduction counts: by its share of the batch's count
                return loss * counts.scale(index, rows, microbatch_rows)
            return loss

        pipe.input_fn = self._input_fn("training_step", rest, kwargs, seed, firsts, rows, inputs)
        pipe.loss_fn = loss_fn
        self.recorder.calls = []
        # every rank: the last stage's runs make the batch's state; what another rank's part of the step updated
        # (a metric updated before the model, on the first stage) is dropped when that state comes
        self.metrics.start()
        averager = self.averager if not pipe.asynchronous else None  # asynchronous: at its optimizer steps
        averaging = averager.averaging(len(split_batch(batch, pipe.num_microbatches))) if averager else nullcontext()
        with self._result_posted(fingerprint), averaging:  # replicas: each bucket of gradients is averaged as soon
            # as the backward completes it
            versions = self.buffers.before()
            loss = pipe.train_step(tagged(batch, rows), loss_scale=loss_scale, optimizer_step=optimizer_step,
                                   seed=seed)
            self.buffers.after(versions)
            if self._rows_unchecked:
                self._check_rows()
            if averager is not None:
                averager.start_remaining()
            self._warn_of_written_input("training_step")
            if checks_inputs:
                self._check_inputs("training_step", batch, rest, kwargs, seed, inputs or {})
            if checks_loss:
                self._check_model_loss(inputs or {}, rows, given=counts.counts if counts is not None else None)
            encoded = None
            if changed:  # the outputs kept were changed by the step: no run on the whole batch from them
                probe, kept = None, []
            if pipe.is_last_rank:
                self._warn_of_listed_logs(self.recorder.calls)

                def make() -> StepResult:
                    # the probe runs from the step's start too, and what it changes is undone
                    rewound = probe is not None and runs is not None and runs.rewind()
                    mark = self.effects.snapshot() if probe is not None and not rewound else None
                    scale = self._settle_reduction(probe, rest, kwargs, seed) if probe is not None else 1.0
                    if rewound:
                        assert runs is not None
                        runs.remake()
                    elif mark is not None and self.effects.changed(mark):
                        self.effects.restore(mark)
                    self._probe_new_terms(arguments["name"] for arguments, _ in self.recorder.calls)
                    total = loss if loss is None or scale == 1.0 else loss * scale
                    # the rows' weights over the rows that weigh something, as the logged values (found by review)
                    weighed = rows - nothing_rows if nothing_rows and scale == 1.0 else None
                    if weighed and total is not None:
                        total = total * (rows / weighed)
                    result = self._result(total, outputs, sizes, check_outside=True, counts=counts)
                    result.grad_scale, result.weighed_rows = scale, weighed
                    result.validate = validation_due(self.module)
                    result.batch_writes = writes.found("training_step") if writes is not None else None
                    self._settle_effects("training_step", start, kept or [], len(sizes), batch, rest, kwargs, seed,
                                         result, counts, runs)
                    return result

                encoded = self._guard("training_step", make, replicas=True)
                self.unfollowed.warn_of_changes("training_step", marks)
        result = self._share(encoded, fingerprint, "training_step", start)
        if result.batch_writes:  # every rank's on_train_batch_end reads the batch as the step left it
            apply_writes(batch, result.batch_writes)
        agree_on_validation(self.module, result.validate)
        self._carried("training_step", result, rows)
        self._parameter_writes_left -= 1
        assert result.loss is not None
        if result.grad_scale != 1.0:  # the first batch's loss was a sum: its micro-batches count whole
            self.loss_reduction = "sum"
        factor = result.grad_scale
        if result.weighed_rows and not pipe.asynchronous:  # micro-batches counting nothing weighed
            factor *= result.rows / result.weighed_rows  # nothing: the others' rows make the step's mean (replicas:
            # every replica's, the gradients averaged over replicas of equal rows)
        if factor != 1.0:  # the step's own parameters too (a learned temperature: found by review)
            for param in {id(p): p for p in (*pipe.parameters(), *self.module.parameters())}.values():
                if param.grad is not None:
                    param.grad.mul_(factor)
        loss = result.loss.to(pipe.device)
        return {"loss": loss, **result.output} if result.output else loss


def _warn_of_few_rows(rows: int, num_microbatches: int) -> None:
    """Say, at the first training step, that a batch of fewer rows than ``num_microbatches`` runs one micro-batch
    per row (the setting was lowered without a word before: found by review)."""
    if rows < num_microbatches:
        rank_zero_warn(f"num_microbatches={num_microbatches}, but the first training batch has {rows} rows: a batch "
                       f"splits into at most one micro-batch per row, so each step runs {rows} micro-batches of one "
                       f"row. Give the DataLoader a batch_size of at least {num_microbatches} (a multiple of it "
                       f"splits evenly), or pass num_microbatches={rows} or fewer")
