"""The last stage's results for every rank (a mixin of :class:`~.runner.PipelineRunner`): the step's result made
and combined over the data-parallel replicas on the last stage, an error raised there sent in its place, and, on every
rank, the one collective that shares it and compares the ranks' batches, then the logs, metric states, the step's
changes to the module and its logger calls made as the last stage made them."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from lightning_pipe.strategy.logs import combine_replica_logs
from lightning_pipe.strategy.reduction import Counts
from lightning_pipe.strategy.results import StepResult, decode_result, encode_result, gather_results
from lightning_pipe.engine.notices import type_name, typed_error
from lightning_pipe.engine.tree import tree_map_tensors
from lightning_pipe.strategy.step_effects import Snapshot
from lightning_pipe.strategy.step_values import combine_outputs, different_batches

__all__ = ["SharedResults", "DifferentBatches"]

_ERROR_FRAMES = 6  # of a last-stage error's traceback, shown on every rank


class DifferentBatches(RuntimeError):
    """The ranks of a pipeline read different batches in the same step."""


class SharedResults:
    """The runner's part that makes the last stage's result and shares it with every rank (see the module)."""

    split: Any
    module: Any
    tied: Any
    recorder: Any
    metrics: Any
    channel: Any
    pipeline: Any
    effects: Any
    logger_calls: Any
    replica_group: Any
    collective_device: torch.device
    flag: Callable[[], bool]
    hold_flag: Callable[[], None]
    flagged: bool

    def _result(self, loss: torch.Tensor | None, outputs: list[Any], sizes: list[int],
                check_outside: bool, counts: Counts | None = None) -> StepResult:
        if check_outside and (names := [name for name in self.split.outside_parameters_with_grad()
                                        if name not in self.tied.step_names]):
            return StepResult(error=self.split.outside_error(names))
        if check_outside and (names := self._thawed_outside()):
            return StepResult(error=f"training_step gave gradients to {', '.join(names[:5])}, outside the pipelined "
                                    f"model and frozen when the pipeline was built (requires_grad=False then), so no "
                                    f"rank keeps them equal and they would train on the last stage's rank alone: set "
                                    f"requires_grad before trainer.fit (the step's parameters train on every rank), "
                                    f"or keep them frozen")
        logs = self.recorder.combine()
        metrics = self.metrics.batch_update({entry.metric for entry in logs if entry.metric is not None},
                                            runs=len(sizes))
        output = combine_outputs(outputs, sizes, None if counts is None else [float(c) for c in counts.counts])
        return StepResult(None if loss is None else loss.detach().cpu(), output, logs, metrics, rows=sum(sizes))

    def _thawed_outside(self) -> list[str]:
        """Parameters with a gradient that are neither this rank's stages' nor the step's (:meth:`TiedParameters.
        add_step_parameters`): frozen when the pipeline was built, unfrozen by the code since."""
        held = {id(p) for p in self.pipeline.parameters()}
        return [name for name, p in self.module.named_parameters()
                if p.grad is not None and id(p) not in held and name not in self.tied.step_names]

    def _across_replicas(self, result: StepResult, step: str) -> StepResult:
        """On the last stage's ranks: the whole batch's loss, logs and metric states from every replica's share
        (each replica keeps its own outputs, as under DDP)."""
        if self.replica_group is None:
            return result
        shares = gather_results(self._encoded(result, step), self.replica_group, self.collective_device,
                                self.pipeline.config.wait_timeout)
        failed = [share for share in shares if share.error is not None]
        if failed:
            return StepResult(error=failed[0].error, error_kind=failed[0].error_kind)
        rows = sum(part.rows for part in shares)
        # each replica's loss weighs by the rows that weighed something in it (micro-batches counting nothing left out)
        weights = [part.rows if part.weighed_rows is None else part.weighed_rows for part in shares]
        weighed = sum(weights) if any(part.weighed_rows is not None for part in shares) else None
        loss = None
        if result.loss is not None:
            weighted = sum(part.loss.double() * weight for part, weight in zip(shares, weights)
                           if part.loss is not None)
            loss = (weighted / max(sum(weights), 1)).to(result.loss.dtype)
        logs = combine_replica_logs([part.logs for part in shares])
        metrics = self.metrics.merge([part.metrics for part in shares])
        return StepResult(loss, result.output, logs, metrics, rows=rows, grad_scale=shares[0].grad_scale,
                          effects=result.effects, logger_calls=result.logger_calls,
                          validate=shares[0].validate,  # (the first replica's clock decides for every replica)
                          weighed_rows=weighed, batch_writes=result.batch_writes,  # (each replica's batch its own)
                          returns_batch=result.returns_batch)

    def _guard(self, step: str, make: Callable[[], StepResult], replicas: bool = False) -> tuple[str, list]:
        """The last stage's result of ``make()`` (combined over the replicas), encoded for the other ranks; an error
        raised while making or encoding it travels in its place, so that every rank learns of it."""
        try:
            result = make()
        except Exception as error:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            result = self._failed(error)
        if replicas:
            result = self._across_replicas(result, step)
        return self._encoded(result, step)

    def _encoded(self, result: StepResult, step: str) -> tuple[str, list]:
        try:
            return encode_result(result, step)
        except Exception as error:  # noqa: BLE001 - as in _guard
            return encode_result(self._failed(error), step)

    @staticmethod
    def _failed(error: BaseException) -> StepResult:
        """The result that carries ``error`` to every rank: with where it was raised, the innermost frames of its
        traceback outside installed packages (the step's code rather than torch's), and its type, which every rank
        raises it as where it knows it (``except ValueError`` around ``fit`` catches a step's ValueError)."""
        frames = traceback.extract_tb(error.__traceback__)
        own = [frame for frame in frames if "site-packages" not in frame.filename]  # the user's code and ours
        frames = (own or frames)[-_ERROR_FRAMES:]
        where = "".join(traceback.format_list(frames))
        text = (f"{type(error).__name__} on the last stage's rank {dist.get_rank()}: {error}\n"
                f"raised there at (innermost last):\n{where.rstrip()}")
        return StepResult(error=text, error_kind=type_name(type(error)))

    @contextmanager
    def _result_posted(self, fingerprint: int | torch.Tensor) -> Iterator[None]:
        """The step's result messages posted before its pipeline runs (:meth:`ResultChannel.post`), and abandoned if
        it fails before sharing them."""
        self.channel.post(fingerprint, self.flag())
        try:
            yield
        except BaseException:
            self.channel.abandon()
            raise

    def _share(self, encoded: tuple[str, list] | None, fingerprint: int | torch.Tensor, step: str,
               start: Snapshot) -> StepResult:
        """Send the last stage's result to every rank and compare the ranks' batches (one collective); bring metrics
        and logs up to date, and raise the last stage's error, or a difference between the batches, on every rank."""
        (structure, tensors), fingerprints, self.flagged = self.channel.share(encoded, fingerprint, self.flag())
        if self.channel.sent_flag is False and not self.flagged and self.flag():
            self.hold_flag()  # it rose during the step: every rank learns of it in the next step's messages
        self.channel.sent_flag = None
        shared = decode_result(structure, tensors)
        if fingerprints is not None:
            self.metrics.apply({})
            raise DifferentBatches(different_batches(step, fingerprints, self.pipeline.group,
                                                     first=not self.__dict__.get("_shared_before"),
                                                     streamed=_streams(self.module)))
        self._shared_before = True
        if shared.error is not None:
            self.metrics.apply({})
            raise typed_error(shared.error, shared.error_kind, self.channel.source)
        self.metrics.apply(shared.metrics)
        if not self.pipeline.is_last_rank:  # its part of the step undone, the last stage's changes made
            self.effects.restore(start)
            device = self.pipeline.device  # or the CPU, where the last stage kept a value there
            self.effects.apply(shared.effects, lambda value, on_cpu: value if on_cpu else tree_map_tensors(
                lambda tensor: tensor.to(device), value))
        if shared.logger_calls and dist.get_rank() == 0:  # where the loggers write
            self.logger_calls.make(shared.logger_calls)
        self.recorder.replay(shared.logs, self.pipeline.device)
        return shared


def _streams(module: Any) -> bool:
    """Whether one of the loaders of ``module``'s Trainer reads an IterableDataset (a stream)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return False
    loaders: list[Any] = []
    for name in ("train_dataloader", "val_dataloaders", "test_dataloaders", "predict_dataloaders"):
        try:
            found = getattr(trainer, name)
        except Exception:  # (Lightning's properties may fail outside their stage)
            continue
        loaders += list(found.values()) if isinstance(found, dict) else list(found) \
            if isinstance(found, (list, tuple)) else [found]
    flat = [inner for loader in loaders for inner in (getattr(loader, "flattened", None) or [loader])]
    return any(isinstance(getattr(loader, "dataset", None), torch.utils.data.IterableDataset) for loader in flat)
