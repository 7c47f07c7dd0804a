"""PipeDream's asynchronous schedules in the executor: batches overlap across calls, the optimizer steps inside the
pipeline, and each forward runs on the weight version its schedule says (the tables: tests/test_async.py).

A mixin of :class:`~.executor.Pipeline` (which holds the stages, the communicator and the step loop it calls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .schedules import Op, Schedule
from .schedules import asynchronous as schedules_async

__all__ = ["AsynchronousSteps"]


class AsynchronousSteps:
    """The asynchronous part of :class:`~.executor.Pipeline`."""

    stages: dict[int, Any]
    comm: Any
    kind: Any
    vertical_sync: bool
    num_microbatches: int
    schedule_name: str
    asynchronous: bool
    _batch_seeds: list[tuple[int, int, int]]

    def _run(self, plan: Schedule, microbatches: list[Any], training: bool, loss_scale: float = 1.0,
             first_id: int = 0, carried_in: str | None = None) -> tuple[list[torch.Tensor], list[Any]]:
        raise NotImplementedError

    def _end_step(self) -> None:
        raise NotImplementedError

    def _setup_async(self, plan: Schedule, checkpoint_activations: bool) -> None:
        if len(self.stages) != 1:
            raise ValueError("asynchronous schedules run one stage per rank")
        # 2BW and vertical sync ask for weights older than the live ones: keep what each step replaces.
        keep_replaced = self.vertical_sync or self.kind.double_buffered
        for stage in self.stages.values():
            stage.stash_weights(keep_replaced)
        self._steady = plan
        self.update_every_microbatch = sum(a.op is Op.OPTIMIZER for a in plan.actions[0]) == plan.num_microbatches
        self._in_flight = False
        self._next_id = 0  # id of the next micro-batch, counted from the first batch
        self._batches_since_drain = 0
        self._version_at_drain = 0
        self.optimizer_step_fn: Callable[[], Any] = _no_optimizer

    def version_for(self, stage_index: int, microbatch_id: int) -> int:
        """Which weight version a forward runs on (the written tables are in tests/test_async.py)."""
        versions = self.stages[stage_index].versions
        if self.kind.double_buffered:
            # Batch b after a drain runs on the weights after the update of batch b - 2: one step stale.
            return self._version_at_drain + max(0, self._batches_since_drain - 1)
        return versions.version  # async_1f1b: the newest weights (stage 0's under vertical sync, sent along)

    def _train_step_async(self, microbatches: list[Any], loss_scale: float,
                          optimizer_step: Callable[[], Any] | None, seed: int) -> torch.Tensor | None:
        if optimizer_step is None:
            raise ValueError(f"schedule {self.schedule_name!r} steps the optimizer inside the pipeline: call "
                             f"train_step(batch, optimizer_step=optimizer.step)")
        self.optimizer_step_fn = optimizer_step
        m = len(microbatches)
        carried_in = None
        if m == self.num_microbatches:
            plan = self._steady if self._in_flight else schedules_async.start(self._steady)
            carried_in = "steady" if self._in_flight else None
            self._in_flight = True
        else:  # a short last batch runs alone, after everything before it has finished
            self.flush(optimizer_step)
            plan = schedules_async.alone(self._steady, m)
        self._batch_seeds = [*self._batch_seeds[-2:], (self._next_id, m, seed)]  # a batch's forwards end a call later
        losses, _ = self._run(plan, microbatches, training=True, loss_scale=loss_scale, first_id=self._next_id,
                              carried_in=carried_in)
        self._end_step()  # statistics of the forwards this call ran, whichever batches they belonged to
        self._next_id += m
        self._batches_since_drain += 1
        if m != self.num_microbatches:
            self._drained()
        return torch.stack(losses).sum() if losses else None

    def flush(self, optimizer_step: Callable[[], Any] | None = None) -> None:
        """Finish every micro-batch still in flight (asynchronous schedules): afterwards every stage has
        applied every update and the weights are one consistent set. A no-op for synchronous schedules."""
        if not self.asynchronous or not self._in_flight:
            return
        if optimizer_step is not None:
            self.optimizer_step_fn = optimizer_step
        self._run(schedules_async.drain(self._steady), [], training=True,
                  first_id=self._next_id - self.num_microbatches, carried_in="drain")
        self._end_step()
        self._drained()

    def _drained(self) -> None:
        self.comm.wait_sends()  # the last gradients sent must arrive before anyone moves on
        self._in_flight = False
        self._batches_since_drain = 0
        self._version_at_drain = next(iter(self.stages.values())).versions.version

    @property
    def weight_versions(self) -> int:
        """Most weight copies this rank has held at once besides the live ones (asynchronous schedules)."""
        return max((s.versions.peak_versions for s in self.stages.values() if s.versions), default=0)


def _no_optimizer() -> None:
    raise RuntimeError("an asynchronous schedule reached an optimizer step without optimizer_step")
