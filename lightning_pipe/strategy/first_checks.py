"""What the first batches of a run are checked for, once, because a pipeline would otherwise train otherwise than one
device without a sound: how the loss adds up over rows ("auto" probes, :mod:`.reduction`), a captured model's own
mean loss over a count the micro-batches do not share, the step's code reading the model's parameters; and, from its
base :class:`~.row_checks.RowChecks`, where rows of a batch may meet. A mixin of
:class:`~lightning_pipe.strategy.runner.PipelineRunner`, which holds the state these read."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from lightning_pipe.capture.patterns import all_match, with_values
from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import owned, split_batch
from lightning_pipe.strategy.captured import CapturedModule
from lightning_pipe.strategy.loss_graph import loss_form, parameters_reached
from lightning_pipe.strategy.pipelined_model import PipelinedModel
from lightning_pipe.strategy.positions import looked_at_again
from lightning_pipe.strategy.randomness import (
    derive_seed,
    forked_random,
    host_random_kept,
)
from lightning_pipe.strategy.loss_warnings import (
    constant_warning,
    count_warning,
    counted_mean_warning,
    drawn_count_warning,
    given_count_warning,
    graph_count_warning,
    model_loss_warning,
    neither_warning,
    untold_warning,
)
from lightning_pipe.strategy.reduction import DRAWS, Probe, verdict
from lightning_pipe.strategy.results import StepResult
from lightning_pipe.strategy.row_checks import RowChecks
from lightning_pipe.strategy.split import PipelinedSequence, SplitModule
from lightning_pipe.strategy.step_values import loss_of, output_gradients, without_gradients

__all__ = ["FirstBatchChecks"]

# why the first batches' probes may tell nothing of a loss that needs no word for it (one micro-batch; losses of 0;
# a diverged loss; draws, said by drawn_count_warning where they matter)
_TOLD_OTHERWISE = (DRAWS, "one micro-batch", "the micro-batches' mean and sum are equal",
                   "the loss is not finite (a NaN or an infinity)")

_MEAN_PROBES = 8  # batches probed after "auto" found a mean (a count over the batch may differ only later)
_PARAMETER_READ_CHECKS = 8  # training steps whose first loss is looked through for parameters the step reads
_EPOCH_PROBES = 2  # batches probed at each new epoch after "auto" found a mean (a class weighting from epoch k)


class FirstBatchChecks(RowChecks):
    """The first batches' checks of a runner: call :meth:`_init_checks` from its ``__init__``."""

    loss_reduction: Any

    def _init_checks(self, split: SplitModule | CapturedModule, pipeline: Pipeline) -> None:
        """Every check still to run, and for a fast-path sequence its stages keeping two micro-batches' inputs."""
        self._loss_warned = False  # the loss is a mean over a count the micro-batches do not share (said once)
        # the loss is a mean over a count a micro-batch can lack (labels ignored, a mask drawn in the step): each
        # micro-batch's loss is looked through for a count of 0, which then weighs nothing
        self._empty_means = False
        # batches of each step checked for a captured model's own such loss (on the first stage), and the steps warned
        self._loss_checks_left = dict.fromkeys(("training_step", "validation_step", "test_step"), 16)
        self._model_loss_warned: set[str] = set()
        self._model_loss_pending: str | None = None  # an evaluation step's, until its logs are known
        self._probes_left = 3  # batches probed until one tells (then _MEAN_PROBES more for a mean)
        self._count_probes_left = _MEAN_PROBES  # batches a loss_reduction function's count is checked on
        # loss_reduction="sum": the first batch checks that the loss is one (and, on an nn.Sequential, tells how
        # single numbers it returns add up)
        self._scalar_probes_left = 1
        self._mean_found = False  # "auto" found a mean: later batches still probed for one over another count
        # batches in a row whose loss had the same value on every part (a zero-initialized head's log C at the first
        # step is one; a loss divided by its own detached value, l / l.detach(), has it at every batch)
        self._constant_batches = 0
        self._logged: set[str] | None = None  # the names the training step logged so far (a new one: probed again)
        # the forms of the training step's loss so far (:func:`loss_form`; a new one: probed again), and the epoch
        # whose first batches were probed again (a weighting switched on at an epoch keeps the loss's form)
        self._loss_forms: set[tuple[str, ...]] = set()
        self._probed_epoch = 0
        self._batches = 0  # training batches so far: a mean is probed again at the 16th, 32nd, 64th, ... (a count
        # the first batches shared alike: padding that only a length-sorted set's later batches hold)
        # Training steps whose loss is looked through for the model's parameters read by the step's own code
        self._parameter_reads_left = _PARAMETER_READ_CHECKS
        self._listed_reads: set[int] = set()  # those of the last such step's parameters its loops listed
        self._reached_reads: set[int] = set()  # and those it reached by index or name (self.net.head)
        self._listed_seen = False  # the last step's code listed all of this rank's layers (_warn_of_listed_logs)
        self._listing_parts: tuple[list[PipelinedSequence], list[PipelinedModel]] | None = None
        self._listed_logs_warned = False
        self._held_ids: set[int] | None = None  # this rank's pipelined parameters, not tied (a gradient of them)
        # Training steps whose code before the model is watched for writing the parameters in place (weight clipping)
        self._parameter_writes_left = _PARAMETER_READ_CHECKS
        self._init_row_checks(split, pipeline)

    def _settle_reduction(self, probe: Probe, rest: tuple, kwargs: Mapping[str, Any], seed: int) -> float:
        """On the last stage, "auto": how the loss of this batch's micro-batches adds up (:mod:`.reduction`); the
        factor every rank's gradients of this batch take (the number of micro-batches for a sum, else 1)."""

        def step_loss(output: Any, batch: Any, draw: int) -> torch.Tensor:  # (each run draws the same random
            # numbers, and starts from the module as the step found it: group DRO's weights, updated by the step)
            with self.recorder.discarding(), self.logger_calls.discarding(), self.metrics.untouched(), \
                    host_random_kept(self.module) as held, \
                    forked_random(derive_seed(seed, 0) + draw, self.pipeline.device), self.effects.undone():
                if draw:  # the generators the module keeps draw other numbers too (put back after)
                    held.shift()
                return loss_of(self.split.run_step("training_step", output, owned(batch), rest, kwargs))[0]

        def run_whole(output: Any, batch: Any, draw: int) -> torch.Tensor:
            return without_gradients(lambda given: step_loss(given, batch, draw), output)

        def gradients(output: Any, batch: Any) -> list[torch.Tensor]:
            return output_gradients(lambda given: step_loss(given, batch, 0), output)

        if self.loss_reduction == "sum":  # told: checked that it is one; how the sequence's single numbers add up
            self._scalar_probes_left -= 1
            rule, why = verdict(probe, run_whole, self.split.output_kinds(True))
            if probe.scalar_kinds is not None and isinstance(self.split, SplitModule):
                self.split.scalar_kinds = probe.scalar_kinds
            if rule in ("mean", "neither", "lacking"):
                self._warn_once(sum_given_warning(why))
            return 1.0
        if probe.counts is not None:  # told a mean over a count: checked, never changed
            self._count_probes_left -= 1
            rule, why = self._constant_twice(*verdict(probe, run_whole, self.split.output_kinds(True)))
            if rule in ("neither", "constant"):
                self._warn_once(_warning(rule, why, count_warning))
                self._count_probes_left = 0
            return 1.0
        self._probes_left -= 1
        if self._mean_found:
            try:
                rule, why = self._constant_twice(*verdict(probe, run_whole, self.split.output_kinds(True)))
            except Exception:  # noqa: BLE001 - the first batch told already: a later look may give up (memory)
                self._probes_left = 0
                return 1.0
        else:  # (until a batch tells: a mean's gradient through the output looked at too)
            rule, why = self._constant_twice(*verdict(probe, run_whole, self.split.output_kinds(True), gradients))
        if probe.scalar_kinds is not None and isinstance(self.split, SplitModule):  # single numbers the sequence
            self.split.scalar_kinds = probe.scalar_kinds  # returns are summed (a VAE's KL): so logged and replayed
        if self._mean_found:  # a later batch of a loss found a mean: one normalized by a count that the first
            # batches happened to share alike (no ignored labels yet) shows here
            if rule in ("neither", "sum", "constant"):
                self._warn_once(rule == "neither" and graph_count_warning(probe) or _warning(rule, why,
                                                                                               neither_warning))
                self._probes_left = 0
                self._empty_means |= rule == "neither" and any(count is not None for count in probe.graph_counts)
            return 1.0
        if rule in ("neither", "constant"):  # (a mean that a micro-batch lacks, of a count drawn in the step)
            drawn = drawn_count_warning(probe) if why.endswith(DRAWS) else None
            counted = graph_count_warning(probe) if rule == "neither" else None
            self._warn_once(drawn or counted or _warning(rule, why, neither_warning))
            self._empty_means |= rule == "neither" and any(count is not None for count in probe.graph_counts)
            rule = "mean"
        if rule is None and self._probes_left <= 0 and why not in _TOLD_OTHERWISE \
                and any(count is None for count in probe.graph_counts):
            # (found by review: a summed CTC loss over 1-row micro-batches of a captured LSTM, whose outputs did not
            # put together, trained at a quarter of one device's gradients); a loss whose graph shows a mean is a mean
            # over rows, as the pipeline takes it, or over a count, which the checks of the model's inputs speak of
            self._warn_once(untold_warning(why))
        drawn = drawn_count_warning(probe) if rule is None and why == DRAWS else None
        if drawn is not None:  # (a masked-LM mask drawn in the step: found by review, 1.5% off, said nothing)
            self._warn_once(drawn)
            self._probes_left = 0
            self._empty_means = True
        if rule is not None:
            self._mean_found = rule == "mean" and not self._loss_warned
            self._probes_left = _MEAN_PROBES if self._mean_found else 0
            self.loss_reduction = rule
        if rule != "sum":
            return 1.0
        if len(set(probe.rows)) > 1:
            raise ValueError(f"training_step returns a loss summed over the batch's rows ({why}); a pipeline averages "
                             f"its micro-batches' losses, which would divide this loss's gradients by "
                             f"{len(probe.rows)}. Pass PipelineStrategy(loss_reduction='sum') so that each "
                             f"micro-batch's loss counts whole (what one device computes), or return a mean")
        for loss in probe.losses:
            self.recorder.add_up(loss)
        return float(len(probe.rows))

    def _constant_twice(self, rule: str | None, why: str) -> tuple[str | None, str]:
        """A verdict of "constant" stands at the second batch in a row that has it; at the first it tells nothing (a
        head initialized to zeros gives every part of the first batch the loss log C). A loss not finite on a
        micro-batch ("lacking") whose gradients are not finite either is an error: the step would make the weights
        NaN (where they are finite, a masked mean over nothing, it is "neither")."""
        if rule == "lacking":
            rule = "neither"
            if any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                   for module in self.pipeline.modules() for p in module.parameters()):
                raise ValueError(
                    f"training_step's loss is not one device's, and this step would make the weights NaN: {why}. "
                    f"Its gradients there are not finite either. Give every micro-batch what the loss needs (a "
                    f"sampler that puts rows of every class in each of the batch's {self.pipeline.num_microbatches} "
                    f"micro-batches), compute per-class statistics of the whole batch inside the model, or train "
                    f"with PipelineStrategy(num_microbatches=1)")
        if rule != "constant":
            self._constant_batches = 0
            return rule, why
        self._constant_batches += 1
        return (rule, why) if self._constant_batches >= 2 else (None, why)

    def _probe_new_terms(self, logged: Iterable[str]) -> None:
        """After a training batch on the last stage: a step that logs a name it never logged before (a loss term
        added after a warm-up, ``if self.global_step >= 1000``) has its next batches probed again, if "auto" found a
        mean: the new term may couple the rows, or be counted otherwise."""
        names = set(logged)
        if self._logged is not None and not names <= self._logged and self._mean_found and self._probes_left == 0:
            self._probes_left = _MEAN_PROBES
        self._logged = names | (self._logged or set())

    def _new_loss_form(self, loss: torch.Tensor, output: Any, probes: bool) -> bool:
        """On the last stage, a training batch's first micro-batch: whether the loss takes a form the step never gave
        before (a term added after a warm-up under the same logged name); such a batch has the next batches probed
        again (``probes``: where this batch is not probed already), if "auto" found a mean."""
        form = loss_form(loss, output)
        new = bool(self._loss_forms) and form not in self._loss_forms
        self._loss_forms.add(form)
        if new and probes and self._mean_found and not self._loss_warned and self._probes_left == 0:
            self._probes_left = _MEAN_PROBES
        return new

    def _probing(self) -> bool:
        """Whether this training step's batch is probed for how its loss adds up (:mod:`.reduction`): under "auto",
        until a batch tells, and then, for a mean, a few batches more; a ``loss_reduction`` function's count, on the
        first few batches (a loss adding terms averaged over other counts is not that count's mean)."""
        if callable(self.loss_reduction):
            return self._count_probes_left > 0
        if self.loss_reduction == "sum":
            return self._scalar_probes_left > 0
        epoch, self._batches = self._epoch(), self._batches + 1
        again = 0
        if epoch != self._probed_epoch:  # a new epoch's first batches: probed again for a mean (a class weighting
            self._probed_epoch = epoch  # switched on at an epoch: deferred re-weighting)
            again = _EPOCH_PROBES
        elif looked_at_again(self._batches, 16):
            again = 1
        if again and self._mean_found and not self._loss_warned:
            self._probes_left = max(self._probes_left, again)
        return self._probes_left > 0 and (self.loss_reduction == "auto" or self._mean_found)

    def _checks_model_loss(self, step: str = "training_step") -> bool:
        """Whether this step checks the captured model's own loss (first stage, a mean, a few batches; not
        predictions)."""
        training = step == "training_step"
        counted = callable(self.loss_reduction) and training  # a given count, checked against the model's
        # "sum" tells of training's loss (HF's num_items_in_batch), not of what an evaluation step logs; in
        # training, the model's own loss must not be a mean then
        told = self.loss_reduction in ("auto", "mean", "sum")
        return (isinstance(self.split, CapturedModule) and (told or counted)
                and self._loss_checks_left.get(step, 0) > 0 and 0 in self.pipeline.stages
                and not (self._loss_warned if training else step in self._model_loss_warned)
                and not (training and self.pipeline.asynchronous))

    def _check_model_loss(self, seen: dict[int, list[Any]], rows: int, step: str = "training_step",
                          given: list[float] | None = None) -> None:
        """A captured model's own loss (a Hugging Face model given labels) that is a mean over a count the
        micro-batches (``seen``: their model inputs, by index, of a ``rows``-row batch) do not share alike: warn,
        once per step (the step's probe cannot see inside the model, and at the start of training every row's loss
        may be alike; in evaluation the loss it logs and returns is then not one device's). ``given``: the counts of
        a ``loss_reduction`` function, which the model's means must be over."""
        assert isinstance(self.split, CapturedModule)
        self._loss_checks_left[step] -= 1
        training = step == "training_step"
        tensors = [seen[index] for index in sorted(seen)]
        # this batch's captures (not one made at set-up, before a hook gave the model its num_items_in_batch); the
        # model's inputs as they count its means: its tensors with its other arguments (return_dict=True) in place
        captures, inputs = [], []
        for capture in self.split.splitter.captures:
            full = [with_values(capture.in_patterns, flat) for flat in tensors]
            if capture.training == training and full and full[0] is not None \
                    and all_match(capture.in_patterns, full[0]):
                captures.append(capture)
                inputs = inputs or full
        sizes = [len(piece) for piece in split_batch(torch.arange(rows), self.pipeline.num_microbatches)]
        losses = [loss for capture in captures for loss in capture.mean_losses]
        counted = [mean for capture in captures for mean in capture.counted_means]
        whole = self._whole_inputs.pop(step, None)
        if whole is not None and captures:
            whole = with_values(captures[0].in_patterns, whole)
        if given is not None:  # loss_reduction's counts (training): the model's own means must be over them
            message = given_count_warning(losses, counted, inputs, given)
        elif training and self.loss_reduction == "sum":  # told a sum: the model's own loss must be no mean
            # (a count the code passes, num_items_in_batch, may be the whole batch's: then a sum, as told)
            means = [f"{loss.op} (a mean over its labels)" for loss in losses] + \
                [f"{mean.op} (a mean over {mean.expression or 'a count of its inputs'})"
                 for mean in counted if not mean.given]
            message = sum_given_warning(f"the model computes its loss as a mean: {', '.join(means[:3])}") \
                if means else None
        else:
            message = model_loss_warning(losses, inputs, step) or \
                counted_mean_warning(counted, inputs, sizes, step, whole)
        if message is None:
            return
        if step in self._drawing:  # labels the step makes from its draws: no function of the batch counts them
            message += (f". {step} draws random numbers before the model (a masked-LM mask drawn there?): labels made "
                        f"from them are not in the batch, so no loss_reduction function of the batch can count them; "
                        f"draw the mask in the DataLoader's collate_fn (transformers' "
                        f"DataCollatorForLanguageModeling does), so that the batch holds the labels")
        if training:
            self._warn_once(message)
        else:  # said once the step's logs are known (:meth:`_warn_of_model_loss`)
            told = (" (loss_reduction='sum' tells of training_step's loss, not of this step's logs)"
                    if self.loss_reduction == "sum" else "")
            self._model_loss_pending = (
                f"{message}. In {step}{told}, logging the value with its count as batch_size gives one device's too "
                f"(self.log('val_loss', loss, batch_size=int((batch['labels'] != -100).sum())), or the count above "
                f"for a causal LM), each micro-batch's value then weighing by its count")

    def _warn_of_model_loss(self, step: str, result: StepResult) -> None:
        """After an evaluation step whose check found the model's loss a mean its micro-batches do not share: warn,
        unless the last stage took the step's logs and output from a run on the whole batch (whose model output
        averages that loss by the counts: :meth:`~.whole_batch.WholeBatchRuns._model_counts`), or every value the
        step logged came with a batch size that differs between its micro-batches (a count: then Lightning weighs
        each micro-batch's value by it, as one device's mean over the whole batch)."""
        message, self._model_loss_pending = self._model_loss_pending, None
        values = [entry for entry in result.logs if entry.metric is None]
        if message is None or result.whole or (values and all(entry.by_count for entry in values)):
            return
        self._model_loss_warned.add(step)
        warnings.warn(message, stacklevel=3)

    @contextmanager
    def _parameter_gradients_refused(self) -> Iterator[None]:
        """Around a training step's run on the last stage: refuse a gradient the step's code takes of the pipelined
        model's parameters to put in its loss (``torch.autograd.grad(loss, self.parameters(), create_graph=True)``,
        a gradient-norm penalty), which would cover this rank's stages alone, each micro-batch's apart (found by
        review: trained 1.2e-3 off one device without a word; the loss's graph reaches the parameters only through
        the model's output there, which the reads' check allows). Watched where every ``torch.autograd.grad`` runs
        its backward, however it was imported (``from torch.autograd import grad``, WGAN-GP's idiom)."""
        if self._held_ids is None:
            self._held_ids = {id(param) for module in self.pipeline.modules() for param in module.parameters()} - {
                id(param) for param in self.tied.parameters()}
        held, run = self._held_ids, getattr(torch.autograd, "_engine_run_backward", None)
        if run is None:  # (a torch without it: not watched)
            yield
            return

        def checked(outputs: Any, *args: Any, **kwargs: Any) -> Any:
            # grad's call: (outputs, grad_outputs, retain_graph, create_graph, inputs, allow_unused,
            # accumulate_grad=False); backward's accumulates into .grad
            if not kwargs.get("accumulate_grad", True) and len(args) >= 4 and args[2]:
                taken = {id(tensor) for tensor in args[3] if isinstance(tensor, torch.Tensor)} & held
                # (all of this rank's: a listing of self.parameters(), which covers this rank's share alone)
                if taken and (self.pipeline.num_microbatches > 1 or taken == held):
                    raise ValueError(_GRADIENT_PENALTY)
            return run(outputs, *args, **kwargs)

        torch.autograd._engine_run_backward = checked
        try:
            yield
        finally:
            torch.autograd._engine_run_backward = run

    @contextmanager
    def _listing_reads(self, index: int) -> Iterator[None]:
        """Around a training step's first micro-batch: the parameters of a cut sequence's layers that the step's code
        listed (a loop over ``self.parameters()`` or ``self.modules()``) are noted, and those reached one by one, for
        :meth:`_check_parameter_reads` (the first steps); and whether a listing went through all of this rank's
        layers, for :meth:`_warn_of_listed_logs` (every step)."""
        if index != 0:
            yield
            return
        if self._listing_parts is None:  # (the cut is made: found once)
            self._listing_parts = ([part for part in self.module.modules() if isinstance(part, PipelinedSequence)],
                                   [part for part in self.module.modules() if isinstance(part, PipelinedModel)])
        sequences, models = self._listing_parts
        with contextlib.ExitStack() as stack:
            for part in (*sequences, *models):
                stack.enter_context(part.listings())
            try:
                yield
            finally:
                self._listed_reads = set().union(*(sequence.listed_parameters() for sequence in sequences))
                self._reached_reads = set().union(*(sequence.reached_parameters() for sequence in sequences))
                self._listed_seen = any(part.listed_whole for part in (*sequences, *models))

    def _check_parameter_reads(self, loss: torch.Tensor, output: Any, allowed: set[int]) -> None:
        """On the last stage, in the first training steps: refuse a loss that reaches the pipelined model's parameters
        other than through the model's ``output`` (an L2 penalty over ``self.parameters()`` in the step), which on
        this rank covers its own stages' alone: where it reaches one that the step's code found by listing the
        module's parameters or modules (:meth:`_listing_reads`: on one device that lists every rank's too), or most
        of this rank's (half or more, two at least); ``allowed``: those the step may read (tied, held on every
        rank)."""
        self._parameter_reads_left -= 1
        local = {id(param) for module in self.pipeline.modules() for param in module.parameters()} - allowed
        read = parameters_reached(loss, output, local)
        listed, self._listed_reads = read & self._listed_reads, set()
        unnamed, self._reached_reads = read - self._reached_reads, set()  # (a layer reached by index or name: as on
        # one device, an L2 penalty on the head alone, found by review refused)
        if not listed and (len(unnamed) < 2 or 2 * len(unnamed) < len(local)):  # not a term over the module's
            return  # parameters: one on the last layer's (a prototype loss from the head's weight) is one device's
        names = [name for name, param in self.module.named_parameters() if id(param) in read]
        raise ValueError(
            f"training_step's loss reads the pipelined model's parameters itself ({', '.join(names[:4])}"
            f"{', ...' if len(names) > 4 else ''}), not through the model's output: a penalty over self.parameters() "
            f"(an L2 term, L2-SP, EWC). The step's code runs on the last stage's rank, which holds only its own "
            f"stages' parameters, so the penalty would cover those alone and the other stages would get none of its "
            f"gradient. Add its gradient in on_after_backward instead, which every rank runs over its own "
            f"parameters (for an L2 term lambda * ||p||^2: for p in self.parameters(): p.grad.add_(p, alpha=2 * "
            f"lambda)), which is the same gradient. An optimizer's weight_decay is that only for SGD and Adam (with "
            f"weight_decay=2 * lambda); AdamW's decays the weights apart from the gradient. A penalty on gradients "
            f"taken in the step (torch.autograd.grad over self.parameters(): a gradient-norm or curvature penalty) "
            f"needs every parameter's gradient at once, which no rank of a pipeline has: train it on one device or "
            f"under DDP. If it is instead a value "
            f"the layers' forward kept for the step (an auxiliary loss, self.aux_loss, summed over self.modules()), "
            f"the last stage's rank holds only its own layers' values: return such values from forward (carried "
            f"along the sequence with the activations, or as the model's output), as a captured model must too")

    def _warn_of_listed_logs(self, calls: list[tuple[dict[str, Any], int]]) -> None:
        """On the last stage, after a training step whose code listed the pipelined model's layers (a loop over
        ``self.parameters()`` or ``self.modules()``, :meth:`_listing_reads`): warn once if it logged a value alike for
        every micro-batch, as one computed from that listing is (a weight norm, a count of layers), which covers this
        rank's stages alone (found by review: a weight norm logged 4.2 where one device's is 14.8, silently)."""
        listed, self._listed_seen = self._listed_seen, False
        if not listed or self._listed_logs_warned:
            return
        values: dict[str, list[float]] = {}
        for arguments, _ in calls:
            value = arguments.get("value")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                values.setdefault(arguments["name"], []).append(float(value.detach()))
            elif isinstance(value, (int, float)):
                values.setdefault(arguments["name"], []).append(float(value))
        alike = [name for name, seen in values.items() if len(seen) > 1 and len(set(seen)) == 1]
        if not alike:
            return
        self._listed_logs_warned = True
        warnings.warn(
            f"training_step lists the pipelined model's layers (a loop over self.parameters() or self.modules()) and "
            f"logs {', '.join(map(repr, alike[:4]))} alike for every micro-batch: the step's code runs on the last "
            f"stage's rank, where such a listing covers that rank's stages alone, so a value computed from it (a "
            f"weight norm, a count of layers or parameters) is that share, not one device's. Compute it in "
            f"on_before_optimizer_step, which every rank runs over its own stages, summing the shares over "
            f"trainer.strategy.pipeline_group (torch.distributed.all_reduce(square, group="
            f"trainer.strategy.pipeline_group)), and log it there; a value not made from the listing (a learning "
            f"rate) is logged as on one device", stacklevel=3)

    def _warn_once(self, message: str) -> None:
        if not self._loss_warned:
            self._loss_warned = True
            warnings.warn(message, stacklevel=3)



_GRADIENT_PENALTY = (
    "training_step takes gradients of the pipelined model's parameters with create_graph=True "
    "(torch.autograd.grad(loss, self.parameters(), create_graph=True): a gradient-norm or curvature penalty). The "
    "step's code runs on the last stage's rank, which holds only its own stages' parameters, once per micro-batch, "
    "so the penalty would cover those alone, each micro-batch's apart; it needs every parameter's gradient of the "
    "whole batch at once, which no rank of a pipeline has: train it on one device or under DDP")


def sum_given_warning(why: str) -> str:
    """What to tell a user who passed ``loss_reduction="sum"`` for a loss that is not a sum over the batch's rows."""
    return (f"PipelineStrategy(loss_reduction='sum') says training_step's loss is a sum over the batch's rows (each "
            f"micro-batch's loss then counts whole), but it is not: {why}. The pipeline adds up its micro-batches' "
            f"losses, which for a mean is not one device's loss (with equal micro-batches, its gradients times their "
            f"number). Leave loss_reduction='auto' (the default), which finds a mean, or give a function of the "
            f"micro-batch counting what the mean is over (loss_reduction=lambda batch: (batch['labels'] != -100)"
            f".sum() for labels ignored at -100)")


def _warning(rule: str, why: str, otherwise: Callable[[str], str]) -> str:
    """What to tell of a loss :func:`~.reduction.verdict` judged ``rule`` ("constant", or ``otherwise``'s case)."""
    return constant_warning(why) if rule == "constant" else otherwise(why)
