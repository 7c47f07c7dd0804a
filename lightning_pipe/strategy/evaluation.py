"""The evaluation steps of a runner (a mixin of :class:`~.runner.PipelineRunner`): ``validation_step``,
``test_step`` and ``predict_step`` of a batch, forward only through the pipeline, the step's code after the model run
per micro-batch on the last stage, and the batch's result shared with every rank (:mod:`.sharing`). A chain whose
evaluation step calls only its first links (an autoencoder's embeddings) runs those layers only (:mod:`.chain`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import batch_rows, owned, split_batch
from lightning_pipe.engine.tree import tree_map_tensors
from lightning_pipe.strategy.aside import run_aside
from lightning_pipe.strategy.batch_writes import BatchWrites, apply_writes
from lightning_pipe.strategy.chain import ChainSplit
from lightning_pipe.strategy.effect_runs import MicrobatchRuns
from lightning_pipe.strategy.failures import reported_failures
from lightning_pipe.strategy.fingerprint import batch_fingerprint
from lightning_pipe.strategy.logs import finite
from lightning_pipe.strategy.loss_graph import mean_count
from lightning_pipe.strategy.randomness import derive_seed, forked_random
from lightning_pipe.strategy.results import StepResult
from lightning_pipe.strategy.step_effects import Snapshot
from lightning_pipe.strategy.step_runs import microbatch_run
from lightning_pipe.strategy.step_values import check_rows, tagged

__all__ = ["EvaluationSteps"]


class EvaluationSteps:
    """The evaluation steps of a :class:`~.runner.PipelineRunner`, whose parts they use."""

    pipeline: Pipeline
    split: Any
    scope: str
    effects: Any
    recorder: Any
    metrics: Any
    logger_calls: Any
    unfollowed: Any
    output_copies: Any
    collective_device: torch.device
    _seed: Callable[[int | None], int]
    _prepare: Callable[..., None]
    _first_rows: Callable[[int], dict[int, int]]
    _checks_inputs: Callable[[str, int], bool]
    _checks_model_loss: Callable[..., bool]
    _input_fn: Callable[..., Any]
    _check_inputs: Callable[..., None]
    _check_model_loss: Callable[..., None]
    _warn_of_written_input: Callable[[str], None]
    _warn_of_model_loss: Callable[[str, StepResult], None]
    _result_posted: Callable[..., Any]
    _guard: Callable[..., Any]
    _share: Callable[..., StepResult]
    _carried: Callable[[str, StepResult, int], None]
    _counts: Callable[[Any, str], Any]
    _rows_window: Callable[[torch.Tensor, int], Any]
    _result: Callable[..., StepResult]
    _settle_effects: Callable[..., None]

    def evaluate(self, step: str, args: Sequence[Any], kwargs: Mapping[str, Any], seed: int | None = None) -> Any:
        """``validation_step``, ``test_step`` or ``predict_step`` of a batch, forward only; returns the step's
        outputs for the whole batch (micro-batch outputs concatenated along dim 0) on every rank. ``seed``: as for
        :meth:`train`."""
        with reported_failures(self.scope):
            return self._evaluate(step, args, kwargs, self._seed(seed))

    def _evaluate(self, step: str, args: Sequence[Any], kwargs: Mapping[str, Any], seed: int) -> Any:
        batch, rest = args[0], tuple(args[1:])
        rows = check_rows(batch, step)
        fingerprint = batch_fingerprint(batch, self.collective_device)
        pipe = self.pipeline
        start = self.effects.snapshot()
        self._prepare(step, batch, rest, kwargs, seed)
        marks = self.unfollowed.mark(step) if pipe.is_last_rank else None
        firsts = self._first_rows(rows)
        checks_inputs = self._checks_inputs(step, len(firsts))
        checks_loss = self._checks_model_loss(step)
        inputs: dict[int, list[Any]] | None = {} if checks_inputs or checks_loss else None
        pipe.input_fn = self._input_fn(step, rest, kwargs, seed, firsts, rows, inputs)
        pipe.loss_fn = None
        self.recorder.calls = []
        if not pipe.is_last_rank:  # (the last stage's, in _evaluate_last) as in training
            self.metrics.start()
        layers = self._chain_layers(step, batch, rest, kwargs, seed)
        with self._result_posted(fingerprint):
            _, last_outputs = pipe.eval_step(tagged(batch, rows), seed=seed, layers=layers)
            self._warn_of_written_input(step)
            if checks_inputs:
                self._check_inputs(step, batch, rest, kwargs, seed, inputs or {})
            if checks_loss:
                self._check_model_loss(inputs or {}, rows, step)
            encoded = None
            if pipe.is_last_rank:
                encoded = self._guard(step, lambda: self._evaluate_last(step, batch, last_outputs or [], rest, kwargs,
                                                                        seed, start), replicas=True)
                self.unfollowed.warn_of_changes(step, marks)
        result = self._share(encoded, fingerprint, step, start)
        if result.batch_writes:  # every rank's hooks after the step read the batch as the step left it
            apply_writes(batch, result.batch_writes)
        if checks_loss:
            self._warn_of_model_loss(step, result)
        self._carried(step, result, rows)
        return batch if result.returns_batch else result.output  # (a hook changing its outputs changes the batch)

    def _chain_layers(self, step: str, batch: Any, rest: tuple, kwargs: Mapping[str, Any], seed: int) -> int | None:
        """On every rank: the layers of a chain an evaluation step runs, where it calls only its first links (an
        autoencoder's test or predict through ``forward``, the encoder alone), found on the step's first batch
        (:meth:`.chain.ChainSplit.links_called`) with what that look does to the module undone; None for all."""
        if not isinstance(self.split, ChainSplit):
            return None
        if step not in self.split.called:
            microbatch = split_batch(batch, self.pipeline.num_microbatches, copy=True)[0]
            with run_aside(self.module, self.effects, self.recorder, self.logger_calls, self.metrics), \
                    forked_random(derive_seed(seed, 0), self.pipeline.device):
                self.split.links_called(step, microbatch, rest, kwargs)
        return self.split.layers_called(step)

    def _evaluate_last(self, step: str, batch: Any, last_outputs: list[Any], rest: tuple,
                       kwargs: Mapping[str, Any], seed: int, start: Snapshot) -> StepResult:
        self.metrics.start()
        outputs = []
        counts = self._counts(batch, step)
        runs = MicrobatchRuns(self.effects, start)  # each from the module as the step found it
        total = batch_rows(batch)
        pieces = split_batch(torch.arange(total), self.pipeline.num_microbatches)
        changed = False
        microbatches = split_batch(batch, self.pipeline.num_microbatches, copy=True)
        rows = [batch_rows(part, microbatch=True) for part in microbatches]
        writes = BatchWrites(microbatches, rows)
        unfinished: list[tuple[int, Any, int]] = []  # micro-batches that logged a value not finite: (index, output,
        # where its calls start)
        for index, (microbatch, output) in enumerate(zip(microbatches, last_outputs)):
            runs.before_run()
            weight = counts.counts[index] if counts is not None else None
            given, watched = self.output_copies.given(step, output)
            logged = len(self.recorder.calls)
            with self.recorder.recording(rows[index], weight), self.logger_calls.recording(), \
                    forked_random(derive_seed(seed, index), self.pipeline.device), \
                    self._rows_window(pieces[index], total), \
                    microbatch_run(step, index, len(pieces), rows[index], total, microbatch):
                outputs.append(self.split.run_step(step, given, microbatch, rest, kwargs))
            changed = self.output_copies.changed(step, output, watched) or changed
            if counts is None and any(not finite(arguments["value"]) for arguments, _ in self.recorder.calls[logged:]):
                unfinished.append((index, output, logged))
        sizes = rows[:len(outputs)]
        if 0 < len(unfinished) < len(microbatches):  # (every one: a model gone NaN, as one device's value)
            for index, output, logged in unfinished:
                self._weigh_means_over_nothing(step, output, batch, rest, kwargs, seed, index, logged, pieces[index])
        if runs.rewind():
            runs.remake()
        result = self._result(None, outputs, sizes, check_outside=False, counts=counts)
        result.batch_writes = writes.found(step)
        result.returns_batch = all(output is part for output, part in zip(outputs, microbatches))  # (anomalib's)
        kept = [] if changed else [(index, output, count) for index, (output, count) in enumerate(zip(last_outputs,
                                                                                                       sizes))]
        self._settle_effects(step, start, kept, len(sizes), batch, rest, kwargs, seed, result, counts)
        if result.returns_batch:  # every rank returns its batch, given the writes: nothing more travels
            result.output = None
        return result

    def _weigh_means_over_nothing(self, step: str, output: Any, batch: Any, rest: tuple,
                                  kwargs: Mapping[str, Any], seed: int, index: int, logged: int,
                                  piece: torch.Tensor) -> None:
        """A micro-batch's logged values that are not finite weigh nothing where they are a mean over nothing (a mask
        the step draws that misses its rows, every label of its rows ignored), as one device's mean over the batch
        leaves out its rows (found by review: NaN logged). Evaluation runs without gradients, so the step runs again
        aside, on a fresh copy of the micro-batch (the first run may have changed its own) from the pipeline's output
        with gradients, for its values' graphs (:func:`~.loss_graph.mean_count`); a run that fails leaves them be."""
        values: list[tuple[str, Any]] = []
        with torch.inference_mode(False):
            microbatch = owned(split_batch(batch, self.pipeline.num_microbatches)[index])
            # a leaf with gradients, given through a copy: the step may change its output in place
            output = tree_map_tensors(lambda value: value.detach().clone().requires_grad_().clone()
                                      if value.is_floating_point() else value.clone(), output)
        try:
            with run_aside(self.module, self.effects, self.recorder, self.logger_calls, self.metrics, logged=values), \
                    forked_random(derive_seed(seed, index), self.pipeline.device), \
                    self._rows_window(piece, batch_rows(batch)):
                self.split.run_step(step, output, microbatch, rest, kwargs)
        except Exception:  # noqa: BLE001 - a look only: the values stay as the step logged them
            return
        nothing = {name for name, value in values if isinstance(value, torch.Tensor) and mean_count(value) == 0}
        for arguments, _ in self.recorder.calls[logged:]:
            if arguments["name"] in nothing and not finite(arguments["value"]):
                arguments["weight"] = 0.0

