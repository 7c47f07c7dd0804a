"""The Trainer's step hooks of PipelineStrategy: every step run as a pipeline, gradients handed over at ``backward``,
global clipping, and Lightning's per-step SIGTERM check folded into the step's own collective.

A mixin of :class:`~lightning_pipe.strategy.pipeline.PipelineStrategy`, which holds the state it reads (the runner,
the run's position, the held gradients, the asynchronous steps).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_pipe.engine.deadline import collective, explained, job_failure_notice, left_behind
from lightning_pipe.engine.notices import PipelineError
from lightning_pipe.strategy.grad_scaler import scaled
from lightning_pipe.strategy.gradient_hooks import clip_grad_value
from lightning_pipe.strategy.gradients import GLOBAL_NORM, clip_grad_norm_global
from lightning_pipe.strategy.collective_guard import collectives_refused
from lightning_pipe.strategy.optimizers import differing_values_warning, group_values, world_collectives_refused
from lightning_pipe.strategy.plain import all_gather_text

__all__ = ["PipelineSteps"]

_SHARING_HOOK_CALLS = "sharing what hooks logged through the loggers' experiments"
_SHARING_HOOK_LOGS = "sharing what gradient and epoch-end hooks logged"
_COMPARING_GROUPS = ("comparing the optimizer's parameter groups after its step (a step skipped on some ranks only, "
                     "by an optimizer_step of yours deciding from this rank's gradients?)")
# Where the ranks meet between steps: the end of the fit, the start of validation within it (Lightning validates at
# once when trainer.should_stop is set), the first batch of a training epoch after the first. A rank waiting there
# while a peer waits for it inside a step left the training epoch alone (deadline.left_behind).
_LEFT_ALONE = ("trainer.should_stop set on some ranks only (under `if trainer.is_global_zero:`, in a rank_zero_only "
               "hook, or from this rank's own values)? Set it on every rank, as the step's own code does. Or training "
               "data of another length on some ranks (a dataset whose length differs by rank or node): every rank of "
               "a pipeline reads the same batches")
_ENDING_THE_FIT = f"ending the fit (on_train_end), while others train on: {_LEFT_ALONE}"
_STARTING_VALIDATION = f"starting validation within the fit, while others train on: {_LEFT_ALONE}"
_STARTING_AN_EPOCH = f"starting a training epoch, while others train on in the one before: {_LEFT_ALONE}"
# Where an evaluation ends: a rank whose data ran out first waits there while its peers wait for it inside a step.
def _ending(stage: str, doing: str, going_on: str, limit: str) -> str:
    return (f"ending {doing}, while others {going_on} on: {stage} data of another length on some ranks (a dataset "
            f"whose length differs by rank or node, {limit} set on some ranks only)? Every rank of a pipeline reads "
            f"the same batches")


_ENDING_EVALUATION = {"validation": _ending("validation", "validation", "validate", "limit_val_batches"),
                      "test": _ending("test", "the test", "test", "limit_test_batches"),
                      "prediction": _ending("prediction", "prediction", "predict", "limit_predict_batches")}
_MEETINGS = (_ENDING_THE_FIT, _STARTING_VALIDATION, _STARTING_AN_EPOCH, *_ENDING_EVALUATION.values())
_NOT_RESUMABLE = (r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
                  r"resumable")


def _notify_sigterm(trainer: Trainer, connector: Any, signum: int, _: Any) -> None:
    """Lightning's SIGTERM handler without its broadcast of rank 0's flag: a collective run inside a signal handler,
    at whatever point each rank is, which met the pipeline's own messages or, on a rank stalled by a peer, nothing
    (it held rank 0 in the handler, so that the watchdog's end of the job never reached it). The step's own
    collective carries every rank's flag (:meth:`PipelineSteps._fold_sigterm_check`)."""
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").info(
        f"[rank: {trainer.global_rank}] Received SIGTERM: {signum}")
    if not connector.received_sigterm:
        launcher = trainer.strategy.launcher
        if launcher is not None:
            launcher.kill(signum)
    connector.received_sigterm = True


class PipelineSteps:
    """The step hooks (a mixin of the strategy)."""

    def _fold_sigterm_check(self, trainer: Trainer) -> None:
        """Lightning broadcasts rank 0's "received SIGTERM" before every training step, a collective of its own; here
        every rank's flag rides in the collective each step already makes (:mod:`lightning_pipe.strategy.results`),
        and the check before the next step reads it: one collective per step fewer, and a SIGTERM that reaches any
        rank while a step runs stops every rank after that step (the signalled rank by Lightning's own check at the
        end of the step, the others here). On gloo, where a rank other than the last sends its flag as the step
        starts, one that reaches such a rank mid-step is held for the next step's messages: every rank stops after
        that one. One that arrives after a rank's result has come, before the step's end, stops only the signalled
        rank, as under DDP; the others then end with its error (:mod:`lightning_pipe.strategy.failures`)."""
        runner = self.runner
        held = [False]

        def hold() -> None:
            # On gloo a rank other than the last sends its flag when a step starts; one that rose later travels with
            # the next step, and Lightning's own check must not stop this rank alone at the end of this one.
            held[0] = True
            connector = getattr(trainer, "_signal_connector", None)
            if connector is not None and hasattr(connector, "received_sigterm"):
                connector.received_sigterm = False

        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and callable(getattr(connector, "_sigterm_notifier_fn", None)):
            # (before Lightning registers its handlers, which read the instance's attribute)
            connector._sigterm_notifier_fn = functools.partial(_notify_sigterm, trainer, connector)
        runner.flag = lambda: held[0] or bool(getattr(trainer, "received_sigterm", False))
        runner.hold_flag = hold
        runner.flagged = False
        epoch_loop = trainer.fit_loop.epoch_loop
        if callable(getattr(type(epoch_loop), "_broadcast_sigterm_tensor", None)):  # Lightning 2.x's private check
            epoch_loop._broadcast_sigterm_tensor = self._sigterm_after_last_step

    def _sigterm_after_last_step(self) -> None:
        if self._runner is not None and self._runner.flagged:
            with contextlib.suppress(Exception):
                torch.distributed.barrier()  # as Lightning: no rank leaves while another is still in a collective
            raise SIGTERMException()

    # -- steps --------------------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Forward and backward of every micro-batch; the gradients wait in ``self._gradients`` for ``backward``."""
        trainer = self.lightning_module.trainer
        self._steps_in_batch = self.__dict__.get("_steps_in_batch", 0) + 1
        if self._steps_in_batch > 1:  # a LightningModule.optimizer_step of its own calling the closure again
            raise ValueError(_second_closure_run("The module's optimizer_step", "call optimizer_closure() once in it"))
        seed = self._position.step_seed(trainer)
        self.runner.pipeline.step_name = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self._async is not None:  # the optimizer steps inside; in-flight gradients stay out of zero_grad's reach
            with self.precision_plugin.train_step_context(), self._in_a_step(), \
                    self._async.carried(self.lightning_module.parameters()):
                output = self.runner.train(args, kwargs, optimizer_step=self._async.optimizer_step, seed=seed)
        else:
            with self.precision_plugin.train_step_context(), self._in_a_step():
                with self._gradients.held_aside(self.lightning_module.parameters(), self._grads_needed_later(trainer)):
                    loss_scale = scaled(1.0 / trainer.accumulate_grad_batches,
                                        getattr(self.precision_plugin, "scaler", None))
                    output = self.runner.train(args, kwargs, loss_scale=loss_scale, seed=seed)
        self._position.step_done(trainer)
        return output

    @contextlib.contextmanager
    def _in_a_step(self) -> Iterator[None]:
        """Inside, the step's own code may run (a collective there is refused: :meth:`_no_collective_in_a_step`, and
        one of ``torch.distributed`` over every process that the user's or a library's code calls: found by review,
        lightly's DINO loss syncing its center hung until the wait timeout)."""
        self._stepping = True
        try:
            with collectives_refused(_step_collective):
                yield
        finally:
            self._stepping = False

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        self._no_collective_in_a_step("barrier()")
        super().barrier(*args, **kwargs)  # type: ignore[misc]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self._no_collective_in_a_step("broadcast(...)")
        return super().broadcast(obj, src)  # type: ignore[misc]

    def _no_collective_in_a_step(self, what: str, advice: str | None = None) -> None:
        """A collective the step's own code calls cannot be matched: each stage runs that code at its own time (the
        code before the model on the first stage, the rest on the last, once per micro-batch), so the others never
        come to it. Raised at once (the rank waited ``wait_timeout``, then blamed an endless loop; a checkpoint's
        gather waited for ever)."""
        if self.__dict__.get("_stepping"):
            raise RuntimeError(f"strategy.{what} called in a step: under a pipeline each stage runs the step's code "
                               f"at its own time (the code before the model on the first stage, the rest on the last "
                               f"stage, once per micro-batch), so no other rank comes to this collective. " + (
                                   advice[0].upper() + advice[1:] if advice else
                                   "Call it in a hook every rank runs (on_train_batch_start, on_validation_epoch_end);"
                                   " every rank of a pipeline already has the same batch and the same random numbers "
                                   "in the step"))

    def _grads_needed_later(self, trainer: Trainer) -> bool:
        """Whether the gradients from before this step live on after it: they do while accumulating, or if the module
        zeroes them its own way; otherwise Lightning's ``zero_grad`` drops them right after ``training_step`` (only
        ``on_before_zero_grad`` could still read them), so the step frees them as it starts."""
        first_of_accumulation = trainer.fit_loop.epoch_loop.batch_idx % trainer.accumulate_grad_batches == 0
        own_zero_grad = is_overridden("optimizer_zero_grad", self.lightning_module, LightningModule)
        # Skipping backward (StochasticWeightAveraging's batch-norm epoch) skips zero_grad too: the gradients stay.
        skipping = getattr(trainer.fit_loop, "_skip_backward", False)
        return not first_of_accumulation or own_zero_grad or skipping

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: LightningModule | Module | None = None, **kwargs: Any) -> Any:
        """Synchronous schedules: as Lightning. Asynchronous ones: run the closure, inside which the pipeline takes
        its own optimizer steps (see :mod:`lightning_pipe.strategy.asynchronous`)."""
        if self._async is None:
            try:
                with world_collectives_refused(optimizer):
                    result = super().optimizer_step(optimizer, _only_once(closure, optimizer), model, **kwargs)
            except RuntimeError as error:
                _note_optimizer_collective(error, optimizer)
                raise
            self._compare_group_values(optimizer)
            return result
        model = model or self.lightning_module
        assert isinstance(model, LightningModule)
        return self._async.run_closure(optimizer, closure, model, **kwargs)

    def _compare_group_values(self, optimizer: Optimizer) -> None:
        """After each optimizer's steps 1, 2, 3, then 4, 8, 16, ... (up to 1024), compare the numbers in its
        parameter groups over the pipeline's ranks: an optimizer that computes one from all its parameters together
        (Prodigy's step size, which may move only after a warm-up or a GradScaler's skipped steps) has another on each
        rank, which is said once (:func:`~.optimizers.differing_values_warning`). Every rank steps alike here
        (automatic optimization)."""
        checked = self.__dict__.setdefault("_group_values_checked", {})
        key = id(getattr(optimizer, "_optimizer", optimizer))
        module = self.lightning_module
        if checked.get("said") or self.runner.pipeline.num_ranks < 2 or module is None \
                or not module.automatic_optimization:
            return
        steps = checked[key] = checked.get(key, 0) + 1
        if steps > 3 and (steps & (steps - 1) or steps > 1024):
            return
        message = differing_values_warning(self._pipeline_texts(_COMPARING_GROUPS)(group_values([optimizer])))
        if message is not None:
            checked["said"] = True
            rank_zero_warn(message)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any) -> Tensor:
        """The pipeline ran backward in ``training_step``; hand its gradients over now that zero_grad is done."""
        module = self.lightning_module
        assert module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self._gradients.release(self.runner.tied)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._evaluate("validation_step", args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._evaluate("test_step", args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._evaluate("predict_step", args, kwargs)

    def _evaluate(self, step: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        trainer = self.lightning_module.trainer
        with self._in_a_step():
            output = self.runner.evaluate(step, args, kwargs, seed=self._position.step_seed(trainer))
        self._position.step_done(trainer)
        return output

    @override
    def on_train_start(self) -> None:
        self._check_materialized()
        trainer = self._trainer()
        loaders = getattr(trainer.fit_loop._combined_loader, "flattened", None) if trainer is not None else None
        if loaders and self._position.resumes_within_epoch(trainer) \
                and all(hasattr(d, "_pipeline_order") for d in loaders):
            # The strategy's loaders continue the epoch at the checkpoint's batch, in its order (:mod:`.data_order`):
            # Lightning's warning that a plain DataLoader does not (it starts a new order) is not theirs.
            warnings.filterwarnings("ignore", message=_NOT_RESUMABLE, category=PossibleUserWarning)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._steps_in_batch = 0
        if batch_idx == 0:  # a training epoch's first batch: every rank is here, between steps
            trainer = self._trainer()
            self._make_hook_calls(_STARTING_AN_EPOCH if trainer is not None and trainer.current_epoch > 0
                                  else _SHARING_HOOK_CALLS)

    @override
    def on_train_end(self) -> None:
        self._make_hook_calls(_ENDING_THE_FIT)

    @override
    def on_validation_end(self) -> None:
        self._make_hook_calls(_ENDING_EVALUATION["validation"])

    @override
    def on_test_end(self) -> None:
        self._make_hook_calls(_ENDING_EVALUATION["test"])

    @override
    def on_predict_end(self) -> None:
        self._make_hook_calls(_ENDING_EVALUATION["prediction"])

    def _make_hook_calls(self, what: str = _SHARING_HOOK_CALLS) -> None:
        """What hooks and callbacks logged through the loggers' experiments on ranks that hold other layers than
        rank 0, made on rank 0 (:mod:`lightning_pipe.strategy.hook_experiment`); every rank comes."""
        runner = self._runner
        if runner is None or runner.hook_calls_group is None:
            return
        runner.hook_calls.flush(functools.partial(self._hook_texts, what=what))

    def _hook_texts(self, text: str, what: str) -> list[str]:
        """Every rank's ``text`` over the hooks' own gloo group: watched (a rank whose hook failed before this point
        ends the others with its error, not a closed connection) and explained (a rank that ended: its posted error)."""
        runner = self.runner
        notice = job_failure_notice(runner.pipeline.comm.board, what)
        if what in _MEETINGS:
            notice = left_behind(notice, what, runner.hook_calls_group)
        elif what == _SHARING_HOOK_LOGS:  # (the epoch-end hooks' share: a rank that left the epoch alone waits here)
            notice = left_behind(notice, what, runner.hook_calls_group, why=self._why_left_behind)
        watched = functools.partial(collective, what=what, timeout=runner.pipeline.config.wait_timeout,
                                    notice=notice)
        with explained(what, runner.hook_calls_group):
            return all_gather_text(text, group=runner.hook_calls_group, run=watched)

    def _why_left_behind(self, doing: str) -> str:
        """Why this rank shares the hooks' logs while a peer waits for it in ``doing``: it clipped a list of one
        parameter alone where the peer clips its part of that list by the joint norm, or it left the epoch alone."""
        clip = self._global_norms
        alone = [] if clip is None or not doing.startswith(GLOBAL_NORM) else \
            [name for param in clip.alone for name, held in self.lightning_module.named_parameters() if held is param]
        if not alone:
            return f": this rank left the training epoch alone? {_LEFT_ALONE}"
        return (f": clip_grad_norm_ got a list of one parameter on this rank ({', '.join(alone[:2])}), clipped "
                f"alone as in a loop over parameters, while that rank clips its part of a list by their joint norm. "
                f"To clip a chosen set by its joint norm, pass a generator: clip_grad_norm_((p for p in "
                f"self.parameters() if ...), max_norm)")

    def _pipeline_texts(self, what: str = _SHARING_HOOK_LOGS) -> Callable[[str], list[str]]:
        """A gather of every rank of this rank's pipeline's text, in stage order (:meth:`_hook_texts`); ``what``
        names it where a peer does not come."""
        ranks = torch.distributed.get_process_group_ranks(self.runner.pipeline.group)

        def gather(text: str) -> list[str]:
            texts = self._hook_texts(text, what)
            return [texts[rank] for rank in ranks]

        return gather

    @override
    def on_validation_start(self) -> None:
        trainer = self._trainer()
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._meet_to_validate(trainer)
        self._check_materialized()
        self._position.evaluation_started()

    def _meet_to_validate(self, trainer: Trainer) -> None:
        """Every rank of the job meets as validation starts within a fit, and agrees on the step: a rank that got
        here alone (a stop set on it only, which Lightning follows with validation at once) would otherwise take its
        peers' training activations as validation inputs, and every rank would wait out the wait timeout, told of a
        slow step (found by review). A rank waiting here that a peer waits for inside a step ends the fit with the
        cause (:func:`~lightning_pipe.engine.deadline.left_behind`)."""
        runner = self._runner
        if runner is None or runner.hook_calls_group is None:
            return
        steps = self._hook_texts(str(trainer.global_step), _STARTING_VALIDATION)
        if len(set(steps)) > 1:
            raise PipelineError(f"the ranks started validation at different global steps ({', '.join(steps)}, by "
                                f"rank): {_STARTING_VALIDATION}")

    @override
    def on_test_start(self) -> None:
        self._check_materialized()
        self._position.evaluation_started()

    @override
    def on_predict_start(self) -> None:
        self._check_materialized()
        self._position.evaluation_started()

    def _clip_grad_by_value(self, optimizer: Optimizer, clip_val: int | float) -> None:
        """Lightning's clipping by value, on a rank that has gradients to clip: torch's fails on none (a rank whose
        stages are all frozen, found by review)."""
        clip_grad_value(torch.nn.utils.clip_grad_value_, self.precision_plugin.main_params(optimizer), clip_val)

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: int | float) -> None:
        if self._async is not None:
            raise ValueError(f"schedule={self.schedule!r} steps each stage at a different time, so there is no global "
                             f"gradient norm to clip by; clip by value (gradient_clip_algorithm='value')")
        parameters = self.precision_plugin.main_params(optimizer)
        clip_grad_norm_global(parameters, clip_val, self.runner.counts_in_norm, self.runner.pipeline.group,
                              self.settings.wait_timeout,
                              notices=functools.partial(job_failure_notice, self.runner.pipeline.comm.board))


def _step_collective(name: str, caller: str) -> str:
    return (f"torch.distributed.{name} over every process (the default group) is called in a step's code ({caller}), "
            f"as code made for DDP does once torch.distributed is initialized (lightly's DINO loss syncing its center, "
            f"a loss gathering its embeddings over processes): under a pipeline each stage runs the step's code at its "
            f"own time (the code before the model on the first stage, the rest on the last, once per micro-batch), "
            f"so no other rank comes to this collective, and the processes hold other stages, not copies of the "
            f"model. Compute it without the sync (a library's option to gather over processes turned off), or in a "
            f"hook every rank runs")


def _note_optimizer_collective(error: BaseException, optimizer: Optimizer) -> None:
    """Add a note to ``error`` where the optimizer's own step failed in a collective of torch.distributed (an
    optimizer made for DDP, such as distributed Muon's all_gather of its matrices over every process): a pipeline's
    ranks hold different parameters, so such a collective meets tensors of other shapes, or none."""
    frames = traceback.extract_tb(error.__traceback__)
    if any("lightning/pytorch/loops" in frame.filename.replace("\\", "/") for frame in frames):
        return  # in the closure the optimizer ran: the step's own code (training_step, backward), not the optimizer's
    inside = [index for index, frame in enumerate(frames)
              if "torch/distributed/" in frame.filename.replace("\\", "/")]
    if not inside:
        return
    caller = frames[inside[0] - 1] if inside[0] > 0 else None
    if caller is None or "lightning_pipe" in caller.filename or "/lightning/" in caller.filename:
        return
    error.add_note(f"{type(optimizer).__name__}'s step calls a collective of torch.distributed ({caller.filename}:"
                   f"{caller.lineno}: `{caller.line}`): an optimizer made for data parallelism (DDP), which shares "
                   f"parameters over every process. Under a pipeline the ranks hold different parameters (each its "
                   f"stages'), so its collective meets others' tensors: use its single-process variant (Muon's "
                   f"SingleDeviceMuonWithAuxAdam), or train with it under DDP")


def _only_once(closure: Callable[[], Any], optimizer: Optimizer) -> Callable[[], Any]:
    """``closure`` for one call per optimizer step: a step calling it again (SAM's gradients at perturbed weights, a
    line search) reads all parameters' gradients together between the calls (a norm, a direction), of which each
    rank of a pipeline holds a share: refused on every rank alike, before the pipeline runs again."""
    calls = [0]

    def once() -> Any:
        calls[0] += 1
        if calls[0] > 1:
            raise ValueError(_second_closure_run(f"{type(optimizer).__name__}'s step"))
        return closure()

    return once


def _second_closure_run(who: str, fix: str = "use an optimizer that steps once per closure") -> str:
    """Why a step that runs the training step's closure again for one batch is refused (:func:`_only_once`, and
    ``training_step`` for a module's own ``optimizer_step`` calling it twice)."""
    return (f"{who} runs the training step's closure a second time for one batch, as sharpness-aware minimization "
            f"(SAM: the gradients again at perturbed weights) or a line search does, from quantities over all "
            f"parameters' gradients together (their norm): each rank of a pipeline holds only its stages' share, so "
            f"its perturbation or search would be another than one device's. Under a pipeline, {fix}; or train it "
            f"on one device or under DDP")
