"""Where a run is (epoch, batch of the epoch, evaluation step), the seeds derived from it, and what a checkpoint keeps.

Everything random that every rank of a pipeline must draw alike is derived from one base seed, agreed by all ranks
when the strategy starts (``PL_GLOBAL_SEED`` after ``seed_everything``, else a fresh seed from global rank 0) and
from a position in the run, never from how much randomness other code consumed:

- a training step: ``(epoch, index of the batch in the epoch)``, counted here, so a resumed fit continues the count;
- a validation/test/predict step: ``(stage, global_step, epoch, index of the step in this evaluation)``;
- a dataloader's order: ``(epoch)`` for training, ``(stage, global_step, epoch)`` for evaluation
  (:mod:`.data_order`).

A checkpoint keeps the base seed, the epoch, the batches of it trained on (and whether the epoch had ended), and the
epoch-start states of generators the user gave the training dataloader: a fit resumed from it draws the seeds and the
batches of the uninterrupted run.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import RunningStage, TrainerFn

from lightning_pipe.strategy.data_order import DataStart, SharedOrder
from lightning_pipe.strategy.randomness import Stream, derive_seed, fresh_seed

__all__ = ["RunPosition", "CHECKPOINT_KEY", "other_replicas", "looked_at_again"]

CHECKPOINT_KEY = "pipeline_position"

_STREAMS = {RunningStage.TRAINING: Stream.TRAIN, RunningStage.VALIDATING: Stream.VALIDATE,
            RunningStage.SANITY_CHECKING: Stream.SANITY_CHECK, RunningStage.TESTING: Stream.TEST,
            RunningStage.PREDICTING: Stream.PREDICT}



def looked_at_again(count: int, first: int) -> bool:
    """Whether the ``count``-th step of a kind (from 1), past the ``first`` that a check looks at, is one it looks at
    again: the ``first``-th doubled, and doubled again (the 32nd, 64th, ... for 16), so that what a step starts to do
    late in a run (a deque filled after a warm-up, padding that only later batches hold) is found at little cost."""
    return count >= first and count & (count - 1) == 0

class RunPosition:
    """The strategy's position in a run, the seeds derived from it, and its part of a checkpoint."""

    def __init__(self) -> None:
        self.seed: int | None = None  # agreed by every rank in agree_seed()
        self.epoch = 0
        self.consumed = 0  # batches of self.epoch trained on
        self.evaluation_index = 0
        self.train_orders: list[SharedOrder] = []  # the training dataloader's, for checkpoints
        self._loaded: dict[str, Any] | None = None  # from a checkpoint being resumed, until the run starts
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) of the resumed epoch
        self._resumed: set[int] = set()  # the training orders that have begun the resumed epoch
        self._again: set[int] = set()  # orders that began a finished epoch again (Lightning's restart), not resumed yet
        self._loader_states: list[dict[str, Any]] = []
        # Lightning's epoch number less the data's, fixed at a run's first training step: 1 in a fit that max_steps
        # resumed part way through an epoch (it goes on with that epoch's batches, which Lightning numbers as the
        # next), else 0; the seeds and orders of the run's steps and epochs take the data's number
        self._shift: int | None = None
        self._saved_shift = 0  # the checkpoint's being resumed: its Lightning epoch is its data's epoch + this

    # -- the base seed --------------------------------------------------------------------------------
    def agree_seed(self, device: torch.device) -> None:
        """Collective: every rank takes ``PL_GLOBAL_SEED``, or global rank 0's fresh seed (nothing is drawn from
        any generator, so nothing else changes)."""
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            self.seed = int(seed)
            return
        value = torch.tensor([fresh_seed()], dtype=torch.int64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(value, src=0)
        self.seed = int(value.item())

    @property
    def base(self) -> int:
        if self.seed is None:
            raise RuntimeError("the strategy's seed is agreed when it sets up its processes; run it through a Trainer")
        return self.seed

    # -- a run --------------------------------------------------------------------------------------
    def start(self, trainer: Trainer) -> None:
        """At the start of a run: continue from a checkpoint just loaded for this fit, else from its beginning."""
        loaded, self._loaded = self._loaded, None
        self.train_orders = []
        self._resume, self._loader_states, self._resumed, self._again = None, [], set(), set()
        self._shift, self._saved_shift = None, 0
        if trainer.state.fn != TrainerFn.FITTING:
            return
        self.epoch, self.consumed = 0, 0
        if loaded is None:
            return
        self.seed = int(loaded["seed"])
        self._saved_shift = int(loaded.get("shift", 0))  # (a checkpoint of a fit that was itself shifted: review)
        epoch, consumed = int(loaded["epoch"]), int(loaded["consumed"])
        if loaded["finished"]:
            epoch, consumed = epoch + 1, 0
        self.epoch, self.consumed = epoch, consumed
        self._resume = (epoch, consumed)
        self._loader_states = list(loaded.get("loaders", []))

    def resumes_within_epoch(self, trainer: Trainer) -> bool:
        """Whether this fit continues an epoch part way (a mid-epoch checkpoint): its loaders skip what was trained."""
        self._settle(trainer)
        return self._resume is not None and self._resume[1] > 0

    def _settle(self, trainer: Trainer) -> None:
        """Once Lightning's loops are restored: where they count the checkpoint's epoch as completed though its batches
        were not all trained (``max_steps`` ended it: Lightning counts such an epoch done, and a fit resumed from its
        checkpoint begins the next one afresh), this fit begins that next epoch too, as one device does (found by
        review: the rest of the stopped epoch was trained as the next one, 7 steps fewer than one device's). Asked
        as the training loader's first iteration begins too, before Lightning's ``on_run_start`` counts the epoch."""
        if self._resume is not None and _restored_epoch(trainer) > self._resume[0] + self._saved_shift:
            self._resume = None

    def step_seed(self, trainer: Trainer) -> int:
        """The seed of the step about to run (every rank alike); :meth:`step_done` moves past it."""
        stage = trainer.state.stage
        if stage == RunningStage.TRAINING:
            if self._shift is None:  # (a resume within an epoch that Lightning numbers as the next: found by review)
                self._shift = max(0, trainer.current_epoch - self.epoch) if self._resume is not None \
                    else self._saved_shift  # (a resume whose epoch Lightning counted done keeps the checkpoint's)
            if self._epoch(trainer) != self.epoch:
                self.epoch, self.consumed = self._epoch(trainer), 0
            return derive_seed(self.base, Stream.TRAIN, self.epoch, self.consumed)
        stream = _STREAMS.get(stage, 0)
        return derive_seed(self.base, stream, trainer.global_step, self._epoch(trainer), self.evaluation_index)

    def _epoch(self, trainer: Trainer) -> int:
        """The epoch of the data: Lightning's less :attr:`_shift`."""
        return trainer.current_epoch - (self._saved_shift if self._shift is None else self._shift)

    def step_done(self, trainer: Trainer) -> None:
        if trainer.state.stage == RunningStage.TRAINING:
            self.consumed += 1
        else:
            self.evaluation_index += 1

    def evaluation_started(self) -> None:
        self.evaluation_index = 0

    # -- dataloaders --------------------------------------------------------------------------------
    def data_start(self, trainer: Trainer, training: bool, order: SharedOrder) -> DataStart:
        """Where an iteration of a dataloader starts (asked as it begins): the first training iteration after a
        resume continues the checkpoint's epoch."""
        if training:
            epoch, skip, loading = self._epoch(trainer), 0, None
            self._settle(trainer)
            if self._resume is not None and id(order) not in self._resumed:
                index = next((i for i, o in enumerate(self.train_orders) if o is order), None)
                if trainer.current_epoch < self._resume[0] + self._saved_shift:
                    # a checkpoint written after the epoch's last batch (by its validation): Lightning enters that
                    # epoch again and starts its loader once more, running none of its batches; the generators'
                    # states of the checkpoint are put back again for the next epoch's iteration
                    self._again.add(id(order))
                    return DataStart(derive_seed(self.base, Stream.DATA_ORDER, epoch), epoch, 0, True)
                self._resumed.add(id(order))
                if id(order) in self._again and index is not None and index < len(self._loader_states):
                    order.load_state_dict(self._loader_states[index])
                epoch, skip = self._resume
                if skip and order.stream and trainer.global_rank == 0:  # (found by review: nothing said)
                    warnings.warn(f"this fit resumes in the middle of an epoch ({skip} batches in), and its training "
                                  f"data is an IterableDataset whose DataLoader keeps no position (no state_dict and "
                                  f"load_state_dict): the stream starts again from its first batch, as it does on "
                                  f"one device, so the run goes on with other batches than an uninterrupted one. Load "
                                  f"it with a DataLoader that keeps its position (torchdata's StatefulDataLoader, "
                                  f"whose state Lightning restores), or save checkpoints at the ends of epochs",
                                  stacklevel=2)
                if skip and index is not None and index < len(self._loader_states):
                    loading = self._loader_states[index].get("loading")
            return DataStart(derive_seed(self.base, Stream.DATA_ORDER, epoch), epoch, skip, True, loading)
        stream = _STREAMS.get(trainer.state.stage, 0)
        return DataStart(derive_seed(self.base, Stream.DATA_ORDER, stream, trainer.global_step, self._epoch(trainer)),
                         self._epoch(trainer))

    def adopt_train_order(self, order: SharedOrder) -> None:
        """A training dataloader's order: its generators' states go into checkpoints (and come back on resume)."""
        index = len(self.train_orders)
        self.train_orders.append(order)
        if index < len(self._loader_states):
            order.load_state_dict(self._loader_states[index])

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self, trainer: Trainer) -> dict[str, Any]:
        batches = trainer.num_training_batches
        finished = self.consumed >= batches if isinstance(batches, int) else False
        return {"seed": self.base, "epoch": self.epoch, "consumed": self.consumed, "finished": finished,
                "loaders": [order.state_dict(finished) for order in self.train_orders],
                "shift": self._saved_shift if self._shift is None else self._shift}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep ``state`` (from a checkpoint being resumed) until :meth:`start`."""
        self._loaded = dict(state)


def other_replicas(position: dict[str, Any], replicas: int) -> str | None:
    """What to say where a checkpoint's ``position`` (:meth:`RunPosition.state_dict`, with the replicas that wrote it)
    is resumed part way through an epoch by another number of data-parallel ``replicas``; None where nothing is."""
    written = position.get("replicas")
    if written is None or written == replicas or not position.get("consumed") or position.get("finished"):
        return None
    return (f"this checkpoint was written part way through epoch {position.get('epoch')} by {written} data-parallel "
            f"replica(s), and this fit has {replicas}: each replica reads its own share of an epoch's data, so the "
            f"shares change, and going on from batch {position.get('consumed')} trains some rows of this epoch twice "
            f"and others not at all. Resume with the same replicas, or from a checkpoint written at an epoch's end")


def _restored_epoch(trainer: Trainer) -> int:
    """The epoch a resumed fit runs first, where Lightning begins it afresh: the epochs whose batches its restored
    loop counts as processed, which its ``on_run_start`` makes the current epoch (a checkpoint written in an
    epoch-end hook, ``ModelCheckpoint(save_last=True)``'s, counts the epoch processed, not yet completed; and that is
    not counted yet when the loader's first iteration begins). A fit bounded by ``max_steps`` alone (iteration-based)
    continues the restored epoch's batch count instead, as the checkpoint's epoch does here (-1: never later)."""
    loop = trainer.fit_loop
    iteration_based = getattr(loop, "_iteration_based_training", None)
    progress = getattr(getattr(loop, "epoch_progress", None), "current", None)
    if not callable(iteration_based) or iteration_based() or not isinstance(getattr(progress, "processed", None), int):
        return -1
    return max(trainer.current_epoch, progress.processed)
