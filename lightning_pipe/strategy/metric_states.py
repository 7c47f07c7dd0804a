"""torchmetrics ``Metric`` objects of a LightningModule, kept one device's and equal on every rank.

Under a pipeline the last stage runs the step once per micro-batch, so a metric the step updates gets one update per
micro-batch. That is one device's state where an update splits over rows (accuracy, a confusion matrix, ``MeanMetric``
of per-row values or of a loss weighted by its rows), not where the step feeds it one value per batch: a
``SumMetric`` or ``MaxMetric`` of the loss, a ``CatMetric`` of it, a ``RunningMean``'s window, a ``MeanMetric`` of the
loss (one weight per update). :class:`MetricTracker` keeps the metrics' state for this: the last stage's state of a
batch travels to every rank (:meth:`~MetricTracker.batch_update`, :meth:`~MetricTracker.apply`), and a run of the step
on the whole batch (the runner's replays) records what one device's update would have left
(:meth:`~MetricTracker.replaying`); metrics whose states differ from the micro-batches' are then taken from that run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric
from torchmetrics.wrappers import Running

from lightning_pipe.strategy.step_effects import LIBRARIES

__all__ = ["MetricTracker", "plain_metrics", "sync_callback_metrics"]

# a metric's states, update count, forward cache, computed value, and the tensors it keeps beside its states
_State = tuple[dict[str, Any], int, Any, Any, dict[str, torch.Tensor]]


_LIBRARIES = LIBRARIES | {"lightning_pipe"}  # objects whose fields hold no user's metric


def plain_metrics(module: Any, known: set[int]) -> list[tuple[str, Metric]]:
    """The metrics ``module`` (or a callback) keeps outside its submodules (``self.metrics = {"train": Accuracy(...)}``,
    a list of them, a plain object's fields), named by their path (``metrics['train']``); those of ids in ``known``
    left out."""
    found: list[tuple[str, Metric]] = []
    seen: set[int] = set()

    def visit(value: Any, path: str, depth: int) -> None:
        if isinstance(value, Metric):
            if id(value) not in known:
                known.add(id(value))
                found.append((path, value))
            return
        if depth > 3 or id(value) in seen or isinstance(value, (nn.Module, torch.Tensor, str, bytes, type)):
            return
        seen.add(id(value))
        if isinstance(value, dict):
            items, step = list(value.items()), "[{!r}]"
        elif isinstance(value, (list, tuple)):
            items, step = list(enumerate(value)), "[{!r}]"
        elif hasattr(value, "__dict__") and type(value).__module__.split(".")[0] not in _LIBRARIES:
            items, step = [(name, item) for name, item in vars(value).items() if not name.startswith("__")], ".{}"
        else:
            return
        for key, item in items:
            visit(item, path + step.format(key), depth + 1)

    for name, value in vars(module).items():
        if name not in ("_modules", "_parameters", "_buffers") and not name.endswith("hooks"):
            visit(value, name, 0)
    return found


def sync_callback_metrics(callbacks: Any, group: Any) -> None:
    """Metrics the user's callbacks keep (updated in hooks every rank runs, on the same batch): each rank's state is
    the whole of it, so they sync over the data-parallel replicas (``group``), or not at all, never over the world,
    which would count each batch once per stage."""
    for callback in callbacks:
        if type(callback).__module__.split(".")[0] in _LIBRARIES:
            continue
        for _, metric in plain_metrics(callback, set()):
            if group is None:
                metric.sync_on_compute = metric.dist_sync_on_step = metric._to_sync = False
            else:
                metric.process_group = group


class MetricTracker:
    """Keeps every torchmetrics ``Metric`` of a LightningModule in the same state on every rank.

    On the last stage, :meth:`start` sets each metric aside and starts it empty, so that after the micro-batches
    it holds exactly the batch's state; :meth:`batch_update` packs that state (and the batch value of the metrics
    that are logged); :meth:`apply`, on every rank, merges the batch's state into the state set aside.
    """

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.metrics: dict[str, Metric] = {}
        self._warned: set[str] = set()
        self.refresh()
        self._saved: dict[str, _State] = {}
        self.replayed: dict[str, _State] | None = None  # the last whole-batch run's states (:meth:`replaying`)
        self._whole: set[str] = set()  # metrics whose state this batch is the whole run's (:meth:`adopt`)

    def refresh(self) -> None:
        """Follow the module's metrics as they are now: one made after the pipeline was built (torchmetrics'
        ``MetricTracker.increment()`` copies its metric at each epoch's start; a metric made in a hook) too."""
        found = [(name, m) for name, m in self.module.named_modules() if issubclass(type(m), Metric)]
        found += plain_metrics(self.module, {id(m) for _, m in found})
        for child_name, child in self.module.named_children():  # a loss module's own (self.criterion.metrics)
            if not issubclass(type(child), Metric):
                found += [(f"{child_name}.{path}", m) for path, m in plain_metrics(child, {id(m) for _, m in found})]
        # a wrapper holding its inner metric's states as its own (ClasswiseWrapper aliases its _defaults and sets
        # them on the inner one) is followed through the inner metric alone: set aside twice, the batch's update
        # was lost
        inner = {id(m._defaults): name for name, m in found}  # the last of a name and its children: the innermost
        metrics = {name: m for name, m in found if inner[id(m._defaults)] == name}
        if metrics.keys() == self.metrics.keys() and all(m is self.metrics[name] for name, m in metrics.items()):
            return
        windows = [name for name, metric in metrics.items() if isinstance(metric, Running) and name not in self._warned]
        if windows:
            self._warned.update(windows)
            rank_zero_warn(f"{', '.join(windows)}: a running window (RunningMean, RunningSum) counts the step's "
                           f"updates, which a pipeline makes once per micro-batch; its values are not one device's. "
                           f"Log the step's value and smooth it in the logger, or pass num_microbatches=1")
        for metric in metrics.values():
            metric.sync_on_compute = False
            metric.dist_sync_on_step = False
            metric._to_sync = False
        self.metrics = metrics

    def start(self) -> None:
        """Set every metric's state aside and start it empty (on the last stage, before the micro-batches)."""
        self.refresh()
        self._saved = {name: self._take(metric) for name, metric in self.metrics.items()}
        self.replayed = None

    @contextmanager
    def untouched(self) -> Iterator[None]:
        """Every metric as it was before, whatever runs inside (a step run again only to look at its loss)."""
        saved = {name: self._take(metric) for name, metric in self.metrics.items()}
        try:
            yield
        finally:
            for name, metric in self.metrics.items():
                self._restore(metric, saved[name])

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """A run of the step on the whole batch: it starts every metric from a copy of its state before the batch (as
        one device's step finds it: ``compute()`` in the step sees the earlier batches) and its states after are kept
        aside as :attr:`replayed` (the micro-batches' states are back afterwards); a run that raises keeps nothing."""
        held = {name: self._take(metric) for name, metric in self.metrics.items()}
        self.replayed = None
        try:
            for name, metric in self.metrics.items():
                if name in self._saved:
                    self._restore(metric, _copied(self._saved[name]))
            yield
            self.replayed = {name: self._take(metric) for name, metric in self.metrics.items()}
        finally:
            for name, metric in self.metrics.items():
                self._restore(metric, held[name])

    def updated(self) -> bool:
        """Whether the step updated any metric in this batch (on the last stage, after its micro-batches)."""
        return any(metric._update_count or self._extras_changed(name) for name, metric in self.metrics.items())

    def _extras_changed(self, name: str) -> bool:
        """Whether the tensors metric ``name`` keeps beside its states changed in this batch (a ``compute()`` of
        MinMaxMetric, a wrapper whose own update count stays 0)."""
        saved = self._saved.get(name)
        return saved is not None and _extras_differ(self.metrics[name], saved[4])

    def differing(self) -> list[str]:
        """The metrics whose state after the micro-batches, merged into the state before the batch, differs from the
        whole batch's run (:attr:`replayed`): updated by only one of them, or to other values (list states compared
        as their tensors put together)."""
        if self.replayed is None:
            return []
        found = []
        for name, metric in self.metrics.items():
            state, count, _, _, replayed_extras = self.replayed[name]
            earlier = self._saved.get(name)
            before = earlier[1] if earlier is not None else 0
            extras_differ = _extras_differ(metric, replayed_extras)
            if metric._update_count == 0 and count == before:
                if extras_differ:
                    found.append(name)
                continue
            if metric._update_count == 0 or count == before or extras_differ or not all(
                    _same(value, state[attr]) for attr, value in self._merged(name).items()):
                found.append(name)
        return found

    def adopt(self, names: list[str]) -> None:
        """The metrics ``names`` take the whole batch's run's state (:attr:`replayed`, which holds the earlier
        batches too): :meth:`batch_update` sends it whole and :meth:`apply` puts it in place of the earlier state."""
        assert self.replayed is not None
        for name in names:
            self._restore(self.metrics[name], self.replayed[name])
            self._whole.add(name)

    def _merged(self, name: str) -> dict[str, Any]:
        """Metric ``name``'s state after the micro-batches merged into a copy of its state before the batch."""
        metric, earlier = self.metrics[name], self._saved.get(name)
        batch = self._take(metric)
        try:
            self._restore(metric, _copied(batch))
            if earlier is not None and earlier[1]:
                with torch.no_grad():
                    metric._reduce_states(_copied(earlier)[0])
            return {attr: getattr(metric, attr) for attr in metric._defaults}
        finally:
            self._restore(metric, batch)

    def batch_update(self, logged_metrics: set[str], runs: int = 1) -> dict[str, dict[str, Any]]:
        """Each updated metric's state for this batch alone (on CPU), with its batch value if it is logged. Its
        update count is one device's: the ``runs`` of the step (one per micro-batch) each counted its calls, where
        they called it alike."""
        update = {}
        for name, metric in self.metrics.items():
            if metric._update_count == 0 and not (name in self._whole or self._extras_changed(name)):
                continue
            if name not in self._whole and runs > 1 and metric._update_count % runs == 0:
                metric._update_count //= runs
            value = None
            # the batch's value, where the step called the metric (forward: update() alone sets none, and Lightning
            # then logs no step value); a whole run's state holds the earlier batches too
            if name in logged_metrics and metric._forward_cache is not None:
                value = metric._forward_cache if name in self._whole else metric.compute()
            update[name] = {"state": {attr: _to(getattr(metric, attr), "cpu") for attr in metric._defaults},
                            "count": metric._update_count, "value": _to(value, "cpu"), "whole": name in self._whole,
                            "extras": _to(_extras(metric), "cpu")}
        self._whole = set()
        return update

    def apply(self, update: dict[str, dict[str, Any]]) -> None:
        """Merge each metric's batch state into its earlier state; the same on every rank."""
        if not self._saved:  # (not the last stage, whose start looked) made since, or made again under its name
            self.refresh()
        for name, metric in self.metrics.items():
            saved = self._saved.pop(name, None)
            if name not in update:
                if saved is not None:  # untouched on the last stage: put the state set aside back as it was
                    self._restore(metric, saved)
                continue
            earlier, count, _, _, _ = saved if saved is not None else self._take(metric)
            for attr, value in update[name]["state"].items():
                setattr(metric, attr, _to(value, metric.device))
            for attr, value in update[name].get("extras", {}).items():  # the last stage's, alike on every rank
                setattr(metric, attr, _to(value, metric.device))
            if update[name].get("whole"):  # the state with the earlier batches' (:meth:`adopt`)
                metric._update_count = update[name]["count"]
            else:
                metric._update_count = count + update[name]["count"]
                with torch.no_grad():
                    metric._reduce_states(earlier)
            metric._forward_cache = _to(update[name]["value"], metric.device)
            metric._computed = None
        self._saved = {}

    def merge(self, updates: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """The batch states of several data-parallel replicas (from :meth:`batch_update`) merged into one, with the
        batch value recomputed over all of them where one was logged; the metrics themselves are left as they were."""
        merged = {}
        for name, metric in self.metrics.items():
            parts = [update[name] for update in updates if name in update]
            if not parts:
                continue
            saved = self._take(metric)
            try:
                for part in parts:
                    earlier = {attr: getattr(metric, attr) for attr in metric._defaults}
                    first = metric._update_count == 0
                    for attr, value in part["state"].items():
                        setattr(metric, attr, _to(value, metric.device))
                    metric._update_count += part["count"]
                    if not first:
                        with torch.no_grad():
                            metric._reduce_states(earlier)
                logged = any(part["value"] is not None for part in parts)
                value = metric.compute() if logged else None
                merged[name] = {"state": {attr: _to(getattr(metric, attr), "cpu") for attr in metric._defaults},
                                "count": metric._update_count, "value": _to(value, "cpu"),
                                "extras": parts[0].get("extras", {})}
            finally:
                self._restore(metric, saved)
        return merged

    @staticmethod
    def _take(metric: Metric) -> _State:
        """The metric's state (the objects themselves, not copies) and counters, and a copy of the tensors it keeps
        beside them (:func:`_extras`); leaves its state empty, those tensors as they are."""
        saved = ({attr: getattr(metric, attr) for attr in metric._defaults}, metric._update_count,
                 metric._forward_cache, metric._computed,
                 {attr: value.clone() for attr, value in _extras(metric).items()})
        for attr, default in metric._defaults.items():
            empty = default.detach().clone().to(metric.device) if isinstance(default, torch.Tensor) else []
            setattr(metric, attr, empty)
        metric._update_count, metric._forward_cache, metric._computed = 0, None, None
        return saved

    @staticmethod
    def _restore(metric: Metric, saved: _State) -> None:
        state, metric._update_count, metric._forward_cache, metric._computed, extras = saved
        for attr, value in {**state, **extras}.items():
            setattr(metric, attr, value)


def _copied(saved: _State) -> _State:
    """A copy of a metric's saved state that updates in place cannot change."""
    state, count, cache, computed, extras = saved
    return ({attr: value.clone() if isinstance(value, torch.Tensor) else list(value) if isinstance(value, list)
             else value for attr, value in state.items()}, count, cache, computed,
            {attr: value.clone() for attr, value in extras.items()})


def _extras(metric: Metric) -> dict[str, torch.Tensor]:
    """The tensors a metric keeps as plain attributes beside its states, which its ``compute()`` may set
    (MinMaxMetric's ``max_val`` and ``min_val``): not merged over micro-batches, so a change that differs from the
    whole batch's makes the metric one whose state comes from a run on the whole batch."""
    return {attr: value for attr, value in vars(metric).items()
            if isinstance(value, torch.Tensor) and not attr.startswith("_") and attr not in metric._defaults}


def _extras_differ(metric: Metric, extras: dict[str, torch.Tensor]) -> bool:
    """Whether the tensors ``metric`` keeps beside its states now differ from ``extras`` (a :data:`_State`'s)."""
    return not all(_same(value, extras.get(attr)) for attr, value in _extras(metric).items())


def _same(value: Any, other: Any) -> bool:
    """Whether two states of a metric agree up to rounding; list states (``CatMetric``'s) as their tensors put
    together (per-row updates split into micro-batches make the same rows)."""
    if isinstance(value, list) or isinstance(other, list):
        if not isinstance(value, list) or not isinstance(other, list):
            return False
        if not value or not other:
            return not value and not other
        if not all(isinstance(item, torch.Tensor) for item in value + other):
            return value == other
        value = torch.cat([item.detach().reshape(-1).cpu() for item in value])
        other = torch.cat([item.detach().reshape(-1).cpu() for item in other])
    if not isinstance(value, torch.Tensor) or not isinstance(other, torch.Tensor):
        return bool(value == other)
    if value.shape != other.shape:
        return False
    value, other = value.detach().cpu(), other.detach().cpu()
    if value.is_floating_point() or value.is_complex():
        finite = other[torch.isfinite(other)] if other.numel() else other
        scale = max(float(finite.abs().max()), 1.0) if finite.numel() else 1.0  # a NaN state: the finite ones' scale
        return torch.allclose(value.to(other.dtype), other, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)
    return torch.equal(value, other)


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
