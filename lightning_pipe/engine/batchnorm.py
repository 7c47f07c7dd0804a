"""Deferred batch norm (GPipe's answer, after torchgpipe): running statistics of the whole batch, committed once per step.

A plain ``nn.BatchNorm`` in a pipeline goes wrong twice. Each micro-batch's forward updates the running statistics with
that micro-batch's statistics (``m`` updates per step, each of a fraction of the batch); and a re-materialized forward
(``checkpoint_activations``) runs again in training mode during backward and updates them once more
(``num_batches_tracked`` counts two per micro-batch). Here, inside a stage, a converted module:

- normalizes each micro-batch with that micro-batch's statistics, as GPipe does (the one difference from one device
  that remains, and only for ``num_microbatches > 1``: the README's "what is exact");
- records, in the stage's first forward of each micro-batch only, the micro-batch's rows and per-channel mean and
  variance (one ``var_mean``), and never touches the running statistics (with several calls of the model per
  micro-batch, :mod:`.calls`, each call's apart);
- on :meth:`DeferredStatistics.commit` (the executor calls it once at the end of each step) combines the recorded
  micro-batches into the batch's mean and unbiased variance (in float64, Chan's parallel formula) and updates
  ``running_mean``, ``running_var`` and ``num_batches_tracked`` exactly as one device's training forward of the whole
  batch would (``momentum``, or the cumulative average when it is ``None``); a step calling the model several times
  commits each call's batch in call order, as one device's calls update them. Stage replicas that each ran some
  micro-batches add up their sums first, so they commit the same values.

A recomputation runs while the stage's backward is active, when nothing is recorded. In eval mode the module uses its
running statistics as always, and a forward-only step records nothing. Outside any stage's forward or backward (the
module called directly) it is a plain batch norm.

Modules are converted in place by changing their class to a subclass of their own (``DeferredBatchNorm2d`` is an
``nn.BatchNorm2d``): ``isinstance`` checks keep working, and parameters, buffers and ``state_dict`` keys do not change,
so checkpoints load into the plain model. Only ``nn.BatchNorm1d``/``2d``/``3d`` that track running statistics are
converted; without running statistics a batch norm has nothing to defer. A subclass (timm's ``BatchNormAct2d``, users'
own) keeps its class and its forward: a captured graph calls no forward, and where the capture has rewritten its ops
to ask the module (it marks it ``_defers_in_graph``, :mod:`lightning_pipe.capture.batchnorm`), the stage defers it
too. Elsewhere (an ``nn.Sequential`` stage) its forward updates the running statistics once per micro-batch, and the
stage warns.

An ``nn.SyncBatchNorm`` (a DDP project's ``convert_sync_batchnorm``) would reduce its statistics over its process
group, all of the job's ranks by default, most of which hold other stages: on CPU torch refuses its input, on GPU it
would wait for ranks that never call it. In a pipeline it normalizes as a plain batch norm does
(:class:`LocalSyncBatchNorm`, still an ``nn.SyncBatchNorm``) and is deferred like the others, so its running
statistics are the whole batch's, as on one device (where torch's runs as a plain batch norm too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DeferredBatchNorm1d", "DeferredBatchNorm2d", "DeferredBatchNorm3d", "DeferredStatistics",
           "LocalSyncBatchNorm", "DeferredSyncBatchNorm", "convert_batchnorm", "restore_batchnorm",
           "local_sync_batch_norms", "PLAIN_BATCH_NORMS"]


FEW_VALUES = 16  # fewer values per channel than this in a micro-batch make a batch norm's statistics noisy


class DeferredStatistics:
    """The converted batch norms of one stage, what they recorded this step, and whether a stage pass is running."""

    def __init__(self, norms: list[nn.modules.batchnorm._BatchNorm], names: list[str] | None = None) -> None:
        self.norms = norms
        self.names = names if names is not None else [type(norm).__name__ for norm in norms]
        self._few_said = False  # whether the first commit looked for norms that see few values per micro-batch
        self.active = False  # inside a forward or backward of the stage: never update running statistics directly
        self.recording = False  # inside a training forward (not a recomputation): record the micro-batch's sums
        self.current = 0  # which of the step's calls of the model the forward runs (:mod:`.calls`)
        self.microbatch: Any = 0  # the micro-batch the forward runs
        self._runs = 0  # forwards run without a micro-batch's number: each counts as another micro-batch
        for norm in norms:
            norm._deferred = self
            norm._used = False  # whether a forward of the stage ran it (recorded it) yet
            # per micro-batch, call and use since the last commit: (call, use, micro-batch, rows, mean, biased
            # variance); a norm the model runs at several places (a block repeated) has a use for each, in order
            norm._recorded = []

    @contextmanager
    def running(self, record: bool, microbatch: int | None = None) -> Iterator[None]:
        """The stage's forward (``record=True`` when it trains, of ``microbatch``: by default another one than any
        before) or backward runs inside this."""
        outer = self.active, self.recording, self.microbatch
        if microbatch is None:
            self._runs += 1
        self.active, self.recording = True, record
        self.microbatch = microbatch if microbatch is not None else ("run", self._runs)
        try:
            yield
        finally:
            self.active, self.recording, self.microbatch = outer

    @property
    def pending(self) -> bool:
        """Whether some micro-batch has been recorded since the last commit."""
        return any(norm._recorded for norm in self.norms)

    def call(self, index: int) -> None:
        """The forwards from now on run the step's ``index``-th call of the model (:func:`.calls.each_call`)."""
        self.current = index

    @torch.no_grad()
    def record(self, norm: nn.Module, input: torch.Tensor) -> None:
        """Record the micro-batch ``input`` of ``norm``: its rows, and its per-channel mean and biased variance."""
        x = input.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        norm._used = True
        use = sum(1 for entry in norm._recorded if entry[0] == self.current and entry[2] == self.microbatch)
        norm._recorded.append((self.current, use, self.microbatch, x.numel() // x.shape[1], mean, var))

    def commit(self, group: dist.ProcessGroup | None = None) -> None:
        """Update the running statistics with the batch's statistics recorded since the last commit (each call of
        the model's, in call order, and in it each use of a norm the model runs at several places, in order).

        ``group``: replicas of this stage that ran the other micro-batches of the step (each must call this, even one
        that ran none); their sums are added up first."""
        if not self._few_said and self.pending:
            self._few_said = True
            self._warn_of_few_values()
        calls = 1 + max((entry[0] for norm in self.norms for entry in norm._recorded), default=0)
        uses = 1 + max((entry[1] for norm in self.norms for entry in norm._recorded), default=0)
        if group is not None:  # a replica that ran no micro-batch has seen no call
            count = torch.tensor([calls, uses], device=self.norms[0].running_mean.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
            calls, uses = (int(n) for n in count)
        for call in range(calls):
            for use in range(uses):
                batches = [_batch_statistics(norm, call, use) for norm in self.norms]
                if group is not None:
                    batches = self._sum_over(group, batches)
                for norm, batch in zip(self.norms, batches):
                    if batch is not None:
                        _commit(norm, *batch)
        for norm in self.norms:
            norm._recorded = []

    def _warn_of_few_values(self) -> None:
        """Say which norms normalized some micro-batch by fewer than ``FEW_VALUES`` values per channel where one
        device, normalizing the batch, sees more: statistics of so few values are noisy (two values give every
        channel +-1), so training may diverge where one device's does not (LeViT's late ``BatchNorm1d``)."""
        few = []
        for norm, name in zip(self.norms, self.names):
            counts: dict[tuple, list[int]] = {}  # (call, use) -> each micro-batch's values per channel
            for call, use, _, values, _, _ in norm._recorded:
                counts.setdefault((call, use), []).append(values)
            for values in counts.values():
                if len(values) > 1 and min(values) < FEW_VALUES:
                    few.append(f"'{name}' ({min(values)} of the batch's {sum(values)})")
                    break
        if few:
            warnings.warn(f"batch norm(s) {', '.join(few[:4])}{' and more' if len(few) > 4 else ''} normalize "
                          f"some micro-batch by fewer than {FEW_VALUES} values per channel: statistics of so few "
                          f"values are noisy, and training may diverge where one device's, normalizing the whole "
                          f"batch, does not. Use fewer micro-batches (num_microbatches), bigger batches, or a norm "
                          f"that does not depend on the batch (GroupNorm, LayerNorm)", stacklevel=3)

    def discard(self) -> None:
        """Forget what was recorded (a failed step)."""
        for norm in self.norms:
            norm._recorded = []

    def _sum_over(self, group: dist.ProcessGroup, batches: list) -> list:
        """Every replica's (rows, mean, variance) of each batch norm, from the sums of rows, values and squares."""
        sizes = [2 * norm.num_features + 1 for norm in self.norms]
        flat = torch.zeros(sum(sizes), dtype=torch.float64, device=self.norms[0].running_mean.device)
        for batch, piece in zip(batches, torch.split(flat, sizes)):
            if batch is not None:
                rows, mean, var = batch
                piece.copy_(torch.cat([rows.reshape(1), rows * mean, rows * (var + mean * mean)]))
        dist.all_reduce(flat, group=group)
        combined = []
        for norm, piece in zip(self.norms, torch.split(flat, sizes)):
            rows, sums, squares = piece[0], piece[1 : 1 + norm.num_features], piece[1 + norm.num_features :]
            mean = sums / rows
            combined.append((rows, mean, (squares / rows - mean * mean).clamp_(min=0)) if rows > 0 else None)
        return combined


class _DeferredBatchNorm(nn.modules.batchnorm._BatchNorm):
    """The forward shared by the deferred batch norms (a mixin over the plain class; see the module docstring)."""

    _deferred: DeferredStatistics | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        deferred = self._deferred
        if deferred is None or not deferred.active or not self.training or not self.track_running_stats:
            return super().forward(input)
        self._check_input_dim(input)
        if deferred.recording:
            deferred.record(self, input)
        # Normalize with the micro-batch's statistics; no running statistics given, so none are updated.
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)


@torch.no_grad()
def _batch_statistics(norm: nn.Module, call: int = 0,
                      use: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Rows, mean and (biased) variance per channel of everything ``norm`` recorded for the model's ``call``-th call
    (its ``use``-th place in it) since the last commit, in float64."""
    recorded = [entry[3:] for entry in norm._recorded if entry[0] == call and entry[1] == use]
    if not recorded:
        return None
    means = torch.stack([mean for _, mean, _ in recorded]).double()
    variances = torch.stack([var for _, _, var in recorded]).double()
    counts = torch.tensor([rows for rows, _, _ in recorded], dtype=torch.float64, device=means.device)
    rows = counts.sum()
    mean = (counts[:, None] * means).sum(0) / rows
    var = (counts[:, None] * (variances + (means - mean) ** 2)).sum(0) / rows
    return rows, mean, var


@torch.no_grad()
def _commit(norm: nn.Module, rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    unbiased = var * (rows / (rows - 1)) if rows > 1 else var
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    for buffer, value in ((norm.running_mean, mean), (norm.running_var, unbiased)):
        buffer.copy_(factor * value + (1.0 - factor) * buffer.double())


class DeferredBatchNorm1d(_DeferredBatchNorm, nn.BatchNorm1d):
    """An ``nn.BatchNorm1d`` whose running statistics a pipeline stage updates once per step."""


class DeferredBatchNorm2d(_DeferredBatchNorm, nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` whose running statistics a pipeline stage updates once per step."""


class DeferredBatchNorm3d(_DeferredBatchNorm, nn.BatchNorm3d):
    """An ``nn.BatchNorm3d`` whose running statistics a pipeline stage updates once per step."""


class LocalSyncBatchNorm(nn.SyncBatchNorm):
    """An ``nn.SyncBatchNorm`` that normalizes by its own input's statistics, as ``nn.BatchNorm`` does, never reducing
    over its process group (whose ranks, in a pipeline, hold other stages); see the module docstring."""

    forward = nn.modules.batchnorm._BatchNorm.forward


class DeferredSyncBatchNorm(_DeferredBatchNorm, LocalSyncBatchNorm):
    """An ``nn.SyncBatchNorm`` whose running statistics a pipeline stage updates once per step."""


_DEFERRED = {nn.BatchNorm1d: DeferredBatchNorm1d, nn.BatchNorm2d: DeferredBatchNorm2d,
             nn.BatchNorm3d: DeferredBatchNorm3d, LocalSyncBatchNorm: DeferredSyncBatchNorm}
_PLAIN = {deferred: plain for plain, deferred in _DEFERRED.items()}
_DEFERRED[nn.SyncBatchNorm] = DeferredSyncBatchNorm
PLAIN_BATCH_NORMS = frozenset(_DEFERRED)  # what convert_batchnorm defers (restore_batchnorm gives them back)
_PLAIN[DeferredSyncBatchNorm] = _PLAIN[LocalSyncBatchNorm] = nn.SyncBatchNorm  # (reduces over its group again)


def local_sync_batch_norms(module: nn.Module) -> int:
    """Make every ``nn.SyncBatchNorm`` in ``module`` a :class:`LocalSyncBatchNorm`, in place; returns how many."""
    found = [child for child in module.modules() if type(child) is nn.SyncBatchNorm]
    for child in found:
        child.__class__ = LocalSyncBatchNorm
    return len(found)


def convert_batchnorm(module: nn.Module) -> DeferredStatistics | None:
    """Make every plain batch norm with running statistics in ``module`` deferred, in place; ``None`` if there is none.

    A module converted before (by an earlier pipeline) is taken over by the new one."""
    norms, names = [], []
    left: set[str] = set()
    for name, child in _named_modules(module):
        # (one whose tracking is off for now, frozen by Lightning's BaseFinetuning, may be switched on later)
        if not isinstance(child, nn.modules.batchnorm._BatchNorm) or child.running_mean is None:
            continue
        if type(child) in _DEFERRED:
            child.__class__ = _DEFERRED[type(child)]
        if isinstance(child, _DeferredBatchNorm) or child.__dict__.get("_defers_in_graph", False):
            norms.append(child)
            names.append(name or type(child).__name__)
        else:
            left.add(type(child).__name__)
    if left:
        warnings.warn(f"batch norms of class(es) {', '.join(sorted(left))} (subclasses of torch's, called by their "
                      f"own forward) update their running statistics once per micro-batch, not once per step as "
                      f"the model's other batch norms do; capture the model (any model but an nn.Sequential) for "
                      f"them to be deferred too, or use nn.BatchNorm", stacklevel=2)
    return DeferredStatistics(norms, names) if norms else None


def _named_modules(module: nn.Module, prefix: str = "",
                   seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """``module.named_modules()`` (each module once), but below a module that keeps its modules under the model's
    names (a captured segment's ``keeps_model_names``) named as the model names them (``head.1``, not ``2.head.1``)."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    yield prefix, module
    for name, child in module.named_children():
        child_prefix = name if getattr(module, "keeps_model_names", False) or not prefix else f"{prefix}.{name}"
        yield from _named_modules(child, child_prefix, seen)


def restore_batchnorm(module: nn.Module) -> None:
    """Turn the deferred batch norms in ``module`` back into plain ones (e.g. to train it again on one device), and a
    pipeline's :class:`LocalSyncBatchNorm` back into an ``nn.SyncBatchNorm`` (to train it with DDP)."""
    for child in module.modules():
        if type(child) in _PLAIN:
            child.__class__ = _PLAIN[type(child)]
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.__dict__.pop("_deferred", None)
            child.__dict__.pop("_recorded", None)
            child.__dict__.pop("_used", None)
