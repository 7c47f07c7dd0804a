"""The checkpoint hooks of PipelineStrategy: both formats, each rank's share, and modules built on the meta device.

A mixin of :class:`~lightning_pipe.strategy.pipeline.PipelineStrategy` (which holds the state it reads: the runner,
the run's position, the settings); the formats themselves live in :mod:`.checkpoint` (one full file) and
:mod:`.sharded` (a folder every rank writes into), the materialization in :mod:`.materialize`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Generator
from typing import Any

import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_pipe.engine.deadline import PeerLost, collective, explained, job_failure_notice, left_behind
from lightning_pipe.engine.notices import PipelineError
from lightning_pipe.strategy.checkpoint import (
    PIPELINE_KEY,
    RANDOM_STATES_KEY,
    CallbackMerge,
    atomic_save,
    gather_checkpoint,
    named_optimizer_state,
    own_entries,
    training_state_of_rank,
    with_own_entries,
    written_here,
)
from lightning_pipe.strategy.state_names import (
    OPTIM,
    OWN_STATE,
    OWN_TOP,
    compiled_names,
    optimizer_entries,
    optimizers_parameter_names,
    param_groups_of,
    parameter_names,
    uncompiled_name,
    uncompiled_names,
)
from lightning_pipe.strategy.callbacks import regroup_after_restore
from lightning_pipe.strategy.failures import raise_together
from lightning_pipe.strategy.host_built import built_on_host
from lightning_pipe.strategy.recorded_init import recording
from lightning_pipe.strategy.one_device import local_group_names, one_device_names, sorts_by_name
from lightning_pipe.strategy.parameter_lists import own_lists
from lightning_pipe.strategy.plain import all_gather_text
from lightning_pipe.strategy.model_choice import compiled_paths
from lightning_pipe.strategy.positions import CHECKPOINT_KEY, other_replicas
from lightning_pipe.strategy.randomness import (
    global_random_states,
    set_global_random_states,
)
from lightning_pipe.strategy.references import hparams_for_checkpoint
from lightning_pipe.strategy.runner import PipelineRunner
from lightning_pipe.strategy.share_warning import strategy_reads
from lightning_pipe.strategy.sharded import (
    is_sharded,
    load_named_optimizers,
    load_sharded_optimizers,
    load_sharded_weights,
    read_sharded,
    save_sharded,
)

__all__ = ["PipelineCheckpoints", "RANDOM_STATES_KEY"]

_ON_EXCEPTION_WAIT = 10.0  # seconds a rank saving on its own exception waits for the others
_IN_A_STEP_S = 3.0  # seconds a peer has waited for it inside a step before such a rank gives up on them (three
# heartbeats: a wait that a message already sent ends shows for one at most)
# what a rank is doing while it waits for the others to write a checkpoint, as its heartbeat and errors name it: said
# so for a rank that calls it alone, and for the others, which time out waiting elsewhere (a hook's gather)
_SAVING = ("writing a checkpoint: trainer.save_checkpoint, which every rank calls together (a collective, as under "
           "DDP; called under `if trainer.is_global_zero:` alone, it waits for ranks that never come)")

HPARAMS_KEY = LightningModule.CHECKPOINT_HYPER_PARAMS_KEY


class PipelineCheckpoints:
    """Checkpoint and module-construction hooks of ``PipelineStrategy`` (see ``checkpoint_format`` there)."""

    _materializer: Any
    _sharded_path: str | None
    _whole_orders: list[list[list[str]]] | None
    _no_collective_in_a_step: Callable[..., None]
    _saved_random_states: dict[str, Any] | None

    def _check_materialized(self) -> None:
        """Before the first step of a module built on the meta device: every tensor that no ``reset_parameters()``
        initialized must have been loaded (from a checkpoint) since; else every rank raises, naming them."""
        if self._materializer is None:
            return
        problem, self._materializer = self._materializer.unwritten(), None
        raise_together(ValueError(problem) if problem else None, "materializing the model", None,
                       self._collective_device())

    # -- building on the meta device ----------------------------------------------------------------
    @contextlib.contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``configure_model()`` and ``Trainer.init_module()`` build the module on the meta device: no rank allocates
        it whole; each materializes only its stages when the strategy cuts it (:mod:`lightning_pipe.strategy.
        materialize`); torchmetrics, Hugging Face's ``from_pretrained`` and PEFT's adapters build on the CPU, and
        what a ``load_state_dict`` there copies into the meta tensors goes to the ranks that keep them
        (:mod:`~.host_built`). ``Trainer.init_module(empty_init=False)`` builds it eagerly, on this
        rank's device."""
        if empty_init is False:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context(), built_on_host(), recording():
            yield

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """Checkpoints are loaded after the cut: each rank reads only its own stages' weights and state."""
        return True

    @override
    def on_exception(self, exception: BaseException) -> None:
        _explain_a_missing_share(exception, self.lightning_module)
        if self._runner is not None and self._runner.frozen_copies is not None:
            self._runner.frozen_copies.explain(exception)
        super().on_exception(exception)  # type: ignore[misc]

    # -- checkpoints --------------------------------------------------------------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's weights; an asynchronous pipeline is drained first (the first thing a checkpoint reads)."""
        self._no_collective_in_a_step("save_checkpoint(...) (through trainer.save_checkpoint)",
                                      "save from a callback's on_train_batch_end, every rank's hook, or with "
                                      "ModelCheckpoint(every_n_train_steps=N)")
        if self._async is not None:
            self._async.drain()
        with strategy_reads():  # the checkpoint gathers every rank's share: not the share alone (.share_warning)
            return super().lightning_module_state_dict()

    @override
    @explained("writing a checkpoint")  # a rank lost while saving is named, not gloo's closed connection
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """``checkpoint_format="full"``: gather every stage's share on global rank 0 and write one standard checkpoint
        there (only the first replica's pipeline takes part: replicas hold equal states). ``"sharded"``: every rank
        writes its own share into a folder at ``filepath`` (:mod:`lightning_pipe.strategy.sharded`). Either way the
        file is fsync'd before it is renamed into place, and a failure on any rank is raised on every rank."""
        runner = self.runner
        trainer = self._trainer()
        # Saved from a callback's on_exception (OnExceptionCheckpoint), which Lightning runs before the strategy's:
        # this rank's own error is posted first, so that the others end with it rather than train on while this
        # rank waits for them (they do not come: a rank that knows of a failure takes part in no collective), and
        # this rank waits for them a few seconds only (an error every rank met, or an interrupt, brings them all).
        pending = sys.exc_info()[1]
        interrupted = pending is not None and trainer is not None and trainer.state.status == TrainerStatus.INTERRUPTED
        if interrupted and not isinstance(pending, (PipelineError, KeyboardInterrupt)):
            self.on_exception(pending)
        # The job's failure in a step, which every rank raises, each into its own on_exception: the ranks come to save
        # (the failure posted is theirs, not a reason to stay away); one that does not is waited for a few seconds.
        shared_failure = interrupted and isinstance(pending, PipelineError) and not isinstance(pending, PeerLost)
        timeout = runner.pipeline.config.wait_timeout
        # Collective, as under DDP: a rank that calls it alone (under `if trainer.is_global_zero:`) must not wait for
        # the others for ever. One watched all_reduce first says so after wait_timeout, naming where the others are.
        notice = None if shared_failure else job_failure_notice(runner.pipeline.comm.board, _SAVING)
        if interrupted and not shared_failure and notice is not None:  # this rank's own error (a hook's, a
            # callback's) while the others are inside a step waiting for this rank: they cannot leave it to save
            notice = left_behind(notice, _SAVING, runner.pipeline.group, _IN_A_STEP_S, gave_up=True)
        lost = None
        try:
            collective(torch.distributed.all_reduce, torch.zeros(1, device=self._collective_device()), what=_SAVING,
                       timeout=min(timeout, _ON_EXCEPTION_WAIT) if interrupted else timeout, notice=notice)
        except PeerLost as error:
            if not (error.timed_out and interrupted):
                raise
            lost = error
        if lost is not None:  # this rank's own error goes on (``except YourError`` around fit catches it), told why
            # no checkpoint came of it (found by review: a RuntimeError replaced it, after 10 s)
            assert pending is not None
            pending.add_note(f"(no checkpoint was written on this error: a pipeline's checkpoint needs every rank, "
                             f"and the others did not come to save: {lost})")
            raise pending
        # save_weights_only: the weights and the loops' counters, as one device writes them (nothing to resume from)
        weights_only, had_callbacks = "optimizer_states" not in checkpoint, "callbacks" in checkpoint
        if trainer is not None and self._position.seed is not None:
            checkpoint[CHECKPOINT_KEY] = {**self._position.state_dict(trainer),
                                          "replicas": self.mesh_shape.replicas}  # each one's share of the data
        # this rank's own entry (every rank's is kept): the global generators' states, for user code that draws there
        checkpoint[RANDOM_STATES_KEY] = global_random_states()
        device = self._collective_device()
        # the optimizers' parameters are named in the module they were made for: after trainer.test(best) of a
        # module loaded from a checkpoint, the trainer's module is another (found by review: numbered otherwise)
        optimized, cut_names = self.__dict__.get("_optimized", (self.lightning_module, runner.cut_names))
        if self.checkpoint_format == "sharded":
            save_sharded(checkpoint, filepath, optimized, self.optimizers, runner.layout, runner.split,
                         device)
            return
        error: BaseException | None = None
        if self.mesh_shape.coordinates(self.global_rank)[1] == 0:
            full = gather_checkpoint(checkpoint, runner.split.state_keys, runner.layout, runner.pipeline.group,
                                     optimizers_parameter_names(optimized, self.optimizers, cut_names), device,
                                     runner.split.tied_names, sorts_by_name(self.lightning_module),
                                     (runner.split.parameter_keys, self._own_parameter_names()), self._whole_orders)
            try:
                if self.is_global_zero:
                    assert full is not None
                    split = runner.split
                    if HPARAMS_KEY in full and split.proxy is not None:  # a module kept in hyper-parameters: whole
                        full[HPARAMS_KEY] = hparams_for_checkpoint(full[HPARAMS_KEY], split.proxy, split.skeleton,
                                                                   split.path, full["state_dict"])
                    # a torch.compile'd module's state under one device's names, to load where it is compiled
                    full["state_dict"] = compiled_names(full["state_dict"], compiled_paths(self.lightning_module))
                    if weights_only:
                        for key in (PIPELINE_KEY, CHECKPOINT_KEY, RANDOM_STATES_KEY) + ("callbacks",) * (
                                not had_callbacks):
                            full.pop(key, None)
                    atomic_save(self.checkpoint_io, full, filepath, storage_options=storage_options)
            except Exception as caught:
                error = caught
            del full
        raise_together(error, f"writing the checkpoint {filepath}", None, device)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """As Lightning, or a sharded checkpoint folder (without its weights and optimizer states: the next hooks load
        this rank's share); a fit resumed from it continues from its position in the data and its seed."""
        self._sharded_path = None
        if is_sharded(checkpoint_path):
            self._sharded_path = os.fspath(checkpoint_path)
            checkpoint = read_sharded(checkpoint_path, self.runner.layout, self.lightning_module.state_dict().keys(),
                                      self._own_parameter_names())
        else:
            if weights_only is None:
                weights_only = _weights_only_given_to_the_trainer()
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
            if "state_dict" in checkpoint:  # a compiled module's names (here the compile is undone)
                known = self._runner.split.state_keys if self._runner is not None else \
                    self.lightning_module.state_dict().keys()
                checkpoint["state_dict"] = uncompiled_names(checkpoint["state_dict"], set(known))
            if self._runner is not None:  # this rank's callbacks and extras, where the layout is the same
                rank, layout = self._runner.pipeline.rank, self._runner.layout
                one_device = PIPELINE_KEY not in checkpoint and "state_dict" in checkpoint
                # a pipeline's file of another layout: its callbacks' lists with a tensor per parameter are whole
                whole = checkpoint.get("callbacks") if not one_device and not written_here(checkpoint, rank, layout) \
                    else None
                checkpoint = with_own_entries(checkpoint, rank, layout, self.lightning_module.state_dict().keys())
                if one_device:  # this rank's share
                    merge = CallbackMerge(checkpoint["state_dict"].keys(), self.lightning_module.state_dict().keys())
                    merge.add(own_entries(checkpoint))
                    checkpoint = merge.into(checkpoint)
                if (one_device or whole is not None) and "state_dict" in checkpoint:  # such a list (one device's):
                    split = self._runner.split  # this rank's parameters' tensors of it
                    checkpoint["callbacks"] = own_lists(checkpoint.get("callbacks") or {}, split.parameter_keys,
                                                        self._own_parameter_names(),
                                                        {k: v.shape for k, v in checkpoint["state_dict"].items()},
                                                        split.tied_names, whole)
            if "optimizer_entries" in checkpoint.get(PIPELINE_KEY, {}):  # consolidated: optimizer states by name
                checkpoint.setdefault("optimizer_states", [])
        trainer = self._trainer()
        if CHECKPOINT_KEY in checkpoint and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            position = checkpoint[CHECKPOINT_KEY]
            self._position.load_state_dict(position)
            self._saved_random_states = checkpoint.get(RANDOM_STATES_KEY)
            changed = other_replicas(position, self.mesh_shape.replicas)
            if changed is not None:
                rank_zero_warn(changed)
            if self._runner is not None:  # loaded after setup (restore_checkpoint_after_setup): continue from it now
                self._position.start(trainer)
        return checkpoint

    def _own_parameter_names(self) -> list[str]:
        """This rank's parameters, in its module's ``parameters()`` order."""
        return [name for name, _ in self.lightning_module.named_parameters()]

    def _resume_global_random_states(self) -> None:
        """At the first training batch after a resume (before its hooks run), torch's, NumPy's and Python's global
        generators take the states this rank's had when the checkpoint was written: user code drawing from them (a
        callback, say) continues as in the uninterrupted run. The pipeline's own draws need none of it: they come from
        seeds of the run's position (:mod:`lightning_pipe.strategy.randomness`)."""
        if self._saved_random_states is not None:
            states, self._saved_random_states = self._saved_random_states, None
            set_global_random_states(states)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        runner = self._runner if self._runner is not None and self._runner.module is module else None
        runner = runner or PipelineRunner.of(module)
        if self._sharded_path is not None and "state_dict" not in checkpoint:
            load_sharded_weights(self._sharded_path, module, strict=strict,
                                 state_keys=runner.split.state_keys if runner is not None else None)
            # the callbacks' on_load_checkpoint, next, find this rank's share of the weights there, as a full file
            # gives it (EMAWeightAveraging reads the averaged weights from it: a KeyError, found by review); the
            # module's own tensors, not copies
            checkpoint["state_dict"] = {key: value.detach() for key, value in module.state_dict().items()}
        elif runner is None:
            super().load_model_state_dict(checkpoint, strict=strict)  # before the cut: the whole module
        else:
            runner.split.load_state_dict(checkpoint["state_dict"], strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        runner = self.runner  # replicas share their pipeline rank's states
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None:  # a fine-tuning callback's groups first, as on one device
            regroup_after_restore(trainer, self.lightning_module)
        if self._sharded_path is not None:
            load_sharded_optimizers(self._sharded_path, self.lightning_module, self.optimizers,
                                    checkpoint["optimizer_param_groups"])
            for optimizer in self.optimizers:
                _optimizer_to_device(optimizer, self.root_device)
            return
        if PIPELINE_KEY not in checkpoint:  # one device's (or DDP's): each parameter's state found by its name
            names = one_device_names(checkpoint["optimizer_states"], self._ranks_group_names(),
                                     runner.split.state_keys, runner.split.tied_names,
                                     {key: value.shape for key, value in checkpoint.get("state_dict", {}).items()
                                      if isinstance(value, torch.Tensor)}, sorts_by_name(self.lightning_module),
                                     self._whole_orders)
            entries = {key: value for index, (state, numbered) in enumerate(zip(checkpoint["optimizer_states"], names))
                       for key, value in optimizer_entries(index, state, numbered).items()}
            groups = [[{k: v for k, v in group.items() if k != "param_names"} for group in param_groups_of(state)]
                      for state in checkpoint["optimizer_states"]]
            checkpoint[PIPELINE_KEY] = {"optimizer_entries": entries, "optimizer_param_groups": groups}
        named = named_optimizer_state(checkpoint)
        section = checkpoint.get(PIPELINE_KEY) or {}
        if named is not None and ("optimizer_entries" in section or dict(section["layout"]) != runner.layout):
            entries, groups = named  # another layout wrote it: each parameter's state by its name
            _warn_orphaned_states(entries, checkpoint.get("state_dict"))
            load_named_optimizers(entries, lambda keys: {key: entries[key] for key in keys}, self.lightning_module,
                                  self.optimizers, groups)
            for optimizer in self.optimizers:
                _optimizer_to_device(optimizer, self.root_device)
            return  # the LR schedulers: rank 0's (the same on every rank), at the top level
        optimizer_states, scheduler_states = training_state_of_rank(checkpoint, runner.pipeline.rank, runner.layout)
        for optimizer, state in zip(self.optimizers, optimizer_states):
            optimizer.load_state_dict(state)
            _optimizer_to_device(optimizer, self.root_device)
        checkpoint["lr_schedulers"] = scheduler_states  # Lightning restores the schedulers from here next

    def _ranks_group_names(self) -> list[list[list[list[str]]]]:
        """Collective: every rank's optimizers' groups by one-device parameter names (:func:`local_group_names`)."""
        mine = local_group_names(parameter_names(self.lightning_module), self.optimizers)
        return [json.loads(text) for text in all_gather_text(json.dumps(mine), None, self._collective_device())]


def _warn_orphaned_states(entries: Any, state_dict: Any) -> None:
    """Optimizer states saved under a parameter name the checkpoint's weights no longer have (renamed in
    ``on_load_checkpoint``, which the weights follow and the states, found by name on another layout, do not): the
    parameters under the new names start with fresh optimizer states, where one device, which numbers its states by
    position, keeps them (found by review: 0.14 off one device, silently)."""
    if not isinstance(state_dict, dict):
        return
    known = {*state_dict, *map(uncompiled_name, state_dict)}  # (a compiled module's names either way)
    names = {key[len(OPTIM):].split("/", 1)[1].rsplit("/", 1)[0] for key in entries}
    orphans = sorted(name for name in names - {OWN_STATE, OWN_TOP}
                     if name not in known and uncompiled_name(name) not in known)
    if orphans:
        rank_zero_warn(f"the checkpoint holds optimizer states of {orphans[:5]}{' ...' if len(orphans) > 5 else ''}, "
                       f"which its weights no longer name (renamed in on_load_checkpoint?): a pipeline of another "
                       f"layout finds each parameter's state by its name, so the parameters under their new names "
                       f"start with fresh optimizer states (one device keeps them, by position). Resume on the layout "
                       f"that saved it (its states by position), or rename the checkpoint's weights before the fit "
                       f"that resumes it on another layout (a one-device load and save with the new names)")


def _explain_a_missing_share(exception: BaseException, module: LightningModule | None) -> None:
    """A ``KeyError`` of a key this rank's share of the module lacks, raised in an ``on_save_checkpoint`` hook (one
    that reads another stage's weight from ``checkpoint["state_dict"]``): its message says why (a bare key before)."""
    if not isinstance(exception, KeyError) or len(exception.args) != 1 or not isinstance(exception.args[0], str):
        return
    frames = traceback.extract_tb(exception.__traceback__)
    if module is None or not any(frame.name == "on_save_checkpoint" for frame in frames):
        return
    key = exception.args[0]
    with strategy_reads():
        if key in module.state_dict():
            return
    exception.args = (f"{key!r} is not in checkpoint['state_dict'] on rank {torch.distributed.get_rank()}: while "
                      f"on_save_checkpoint runs under a pipeline it holds this rank's share of the model (its "
                      f"stages' weights), and the shares are merged into the file afterwards (keys dropped or renamed "
                      f"there are kept so). Read other stages' weights from the file once written (torch.load, "
                      f"load_from_checkpoint), or compute such an extra from keys this rank holds",)


def _weights_only_given_to_the_trainer() -> bool | None:
    """The ``weights_only`` the running ``Trainer.fit/validate/test/predict`` call was given. Lightning restores a
    strategy's checkpoint after setup (``restore_checkpoint_after_setup``, which this strategy needs to load each
    rank's share) without passing it on, so ``fit(ckpt_path=..., weights_only=False)`` (a checkpoint whose
    hyper-parameters hold a module) would fail in ``torch.load``; it is read from ``Trainer._run``'s frame."""
    value = _given_to_run("weights_only")
    return value if isinstance(value, bool) else None


def _given_to_run(name: str) -> Any:
    """The argument ``name`` of the running ``Trainer._run`` (None outside one), read from its frame."""
    from lightning.pytorch import Trainer

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_run" and isinstance(frame.f_locals.get("self"), Trainer):
            return frame.f_locals.get(name)
        frame = frame.f_back
    return None


def fit_start_after_restore(trainer: Any, module: LightningModule) -> None:
    """On a resumed fit, the ``on_fit_start`` hooks after the modules and callbacks are restored, as on one device.

    Lightning restores a strategy's checkpoint after setup (``restore_checkpoint_after_setup``, which this strategy
    needs to load each rank's share) and so calls ``on_fit_start`` before the restore: a callback reading its restored
    state there (a curriculum's level), or a module changing a buffer the restore then overwrites, would see the fresh
    ones. Here those hooks are held until Lightning's restore of the modules and callbacks has run, then called."""
    from lightning.pytorch.trainer import call

    connector = trainer._checkpoint_connector
    if trainer.state.fn != TrainerFn.FITTING or _given_to_run("ckpt_path") is None:  # (the connector learns the
        return  # path only as it restores)
    held = [holder for holder in (*trainer.callbacks, module) if "on_fit_start" not in vars(holder)]
    for holder in held:
        vars(holder)["on_fit_start"] = _later
    restore = connector._restore_modules_and_callbacks

    def restored(*args: Any, **kwargs: Any) -> Any:
        try:
            result = restore(*args, **kwargs)
        finally:
            del connector._restore_modules_and_callbacks
            for holder in held:
                vars(holder).pop("on_fit_start", None)
        call._call_callback_hooks(trainer, "on_fit_start")
        call._call_lightning_module_hook(trainer, "on_fit_start")
        return result

    connector._restore_modules_and_callbacks = restored


def _later(*args: Any, **kwargs: Any) -> None:
    """``on_fit_start`` while it is held (:func:`fit_start_after_restore`)."""
