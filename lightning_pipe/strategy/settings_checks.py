"""The Trainer's and the module's settings a pipeline cannot follow, checked at set-up on every rank alike, before
any rank waits for another: refused with what to do instead (manual optimization, an overridden ``backward``, a
step fetching its own batches, a gradient scaler under an asynchronous schedule), or warned of where the run goes on
otherwise than the setting says (one process, ``sync_batchnorm``, a checkpoint IO plugin the sharded format skips)."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

__all__ = ["check_settings"]


def check_settings(trainer: Trainer, module: LightningModule, *, one_process: bool, sync_batchnorm: bool,
                   foreign_io: bool, io_name: str, scaled_asynchronous: str | None) -> None:
    """Refuse or warn of what ``trainer``'s run of ``module`` asks that a pipeline does otherwise: ``one_process``
    (the world is one rank), ``sync_batchnorm`` (Trainer's flag), ``foreign_io`` (sharded checkpoints with a
    checkpoint IO plugin ``io_name`` that torch.distributed.checkpoint bypasses), ``scaled_asynchronous`` (the name of
    an asynchronous schedule run with a gradient scaler, else None)."""
    fitting = trainer.state.fn == TrainerFn.FITTING
    _refuse_iterator_steps(module, trainer.state.fn)
    if fitting and one_process:
        rank_zero_warn("PipelineStrategy on one process: the whole model is one stage and nothing is pipelined "
                       "(the micro-batches run one after another). Pass devices=2 or more (one stage per device; "
                       "on CPU: Trainer(accelerator='cpu', devices=2), whose devices='auto' is 1), or drop the "
                       "strategy to train on one device")
    if fitting and sync_batchnorm:
        rank_zero_warn("Trainer(sync_batchnorm=True) has no effect under PipelineStrategy: its batch norms "
                       "normalize each micro-batch by its own statistics and update their running statistics "
                       "once per step from the whole batch's (see the README on BatchNorm); drop the flag, or use "
                       "GroupNorm or LayerNorm for results independent of the micro-batches")
    if fitting and foreign_io:
        rank_zero_warn(f"checkpoint_format='sharded' writes, removes and reads checkpoint folders with "
                       f"torch.distributed.checkpoint, not through Trainer's checkpoint IO: {io_name} is not called "
                       f"for them (what it does, an upload, encryption, a retention policy, is not done). Use "
                       f"checkpoint_format='full' (one file, written through it), or do that work on the folders in a "
                       f"callback after the saves (ModelCheckpoint's last_model_path and best_model_path name them)")
    if fitting and not module.automatic_optimization:
        raise ValueError("PipelineStrategy runs forward and backward of every micro-batch itself and so supports "
                         "automatic optimization only (self.automatic_optimization = True, one backward of the "
                         "step's loss per batch); a step that calls manual_backward and steps optimizers itself "
                         "(a GAN's alternating generator and discriminator updates) cannot be cut into a pipeline: "
                         "train it with strategy='ddp' or 'fsdp'. A step with one optimizer that only steps it "
                         "by hand (gradient accumulation, clipping or a learning-rate schedule written out) "
                         "pipelines once written for automatic optimization: return the loss from training_step "
                         "and use Trainer(accumulate_grad_batches=..., gradient_clip_val=...) and "
                         "configure_optimizers' lr_scheduler")
    if fitting and is_overridden("backward", module, LightningModule):
        raise ValueError(f"{type(module).__name__} overrides LightningModule.backward, which PipelineStrategy "
                         f"never calls: each stage runs its micro-batches' backward itself. Move what it does "
                         f"around the backward to on_before_backward or on_after_backward (called as on one "
                         f"device), or to loss_reduction / the loss the step returns")
    if scaled_asynchronous is not None:
        raise ValueError(f"schedule={scaled_asynchronous!r} steps each stage at its own time, so its stages cannot "
                         f"agree on skipping a step as a gradient scaler (precision='16-mixed') must; use "
                         f"precision='bf16-mixed' or '32-true', or a synchronous schedule ('1f1b', 'gpipe')")


_STEPS = {TrainerFn.FITTING: ("training_step", "validation_step"), TrainerFn.VALIDATING: ("validation_step",),
          TrainerFn.TESTING: ("test_step",), TrainerFn.PREDICTING: ("predict_step",)}


def _refuse_iterator_steps(module: LightningModule, fn: TrainerFn | None) -> None:
    """A step taking ``dataloader_iter`` (Lightning's iterator-style step, fetching its own batches) cannot be
    pipelined: refused on every rank at setup, saying so (the iterator reached the batch splitter, which said the
    batch held no tensors)."""
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    for name in _STEPS.get(fn, ()) if fn is not None else ():
        if is_overridden(name, module, LightningModule) and is_param_in_hook_signature(
                getattr(module, name), "dataloader_iter", explicit=True):
            raise ValueError(f"{type(module).__name__}.{name} takes dataloader_iter (Lightning's iterator-style "
                             f"step, which fetches its own batches): a pipeline splits each batch into micro-batches "
                             f"and runs the step on each of them, so it must be given the batch. Write "
                             f"{name}(self, batch, batch_idx) and let the DataLoader give the batch")
