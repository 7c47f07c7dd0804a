"""What a step logs and its torchmetrics see, per micro-batch on the last stage, made one batch's worth on every rank.

Under a pipeline the last stage runs ``training_step`` once per micro-batch, but Lightning must see one batch: its
loggers and progress bar live on global rank 0, and callbacks such as ModelCheckpoint read the logged values on every
rank. So the last stage records each ``self.log`` call instead of logging it, combines the calls of a batch as a
single batch would have produced them (means weighted by micro-batch rows), and every rank logs the same result.
torchmetrics objects are kept equal on every rank by sending the state of the batch and merging it everywhere; their
own cross-process sync is switched off, since every rank already holds the whole state.

A value that is not a mean over rows (a maximum logged with the default ``reduce_fx``, a perplexity ``exp(loss)``, a
count of rows, a standard deviation) does not combine from its micro-batches' values: :class:`WholeBatchLogs` finds
such names on the first batch of each step kind and takes them from a run of the step on the whole batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchmetrics import Metric

from lightning_pipe.strategy.log_sink import lightning_log, logs_to
from lightning_pipe.strategy.positions import looked_at_again

__all__ = ["REDUCTION_NAMES", "LoggedValue", "LogRecorder", "WholeBatchLogs", "combine_logs", "combine_replica_logs",
           "CHECKED_BATCHES", "finite"]

# The first batches of each step kind whose logs, outputs and metric updates are checked against a run of the step on
# the whole batch (a loss over the tokens that have labels looks like a mean over rows until a batch holds padding).
CHECKED_BATCHES = 4
UNSETTLED_CHECKS = 16  # batches more for a name whose micro-batches logged it alike on every batch checked
VARIED = 1e-2  # how far apart (relative) micro-batches' values tell a mean from another statistic (LoggedValue.varied)

_LOG_SIGNATURE = inspect.signature(LightningModule.log)
_REDUCTIONS = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}
REDUCTION_NAMES = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min",
                   sum: "sum", max: "max", min: "min"}  # Python's builtins too, as Lightning takes them


@dataclass
class LoggedValue:
    """One name as logged for a whole batch: a value (or the attribute path of a Metric) and ``self.log`` options."""

    name: str
    value: torch.Tensor | None  # None for a Metric: its batch value travels with the metric's state
    metric: str | None  # attribute path of the logged Metric, else None
    options: dict[str, Any]
    batch_size: int | None
    weight: float | None = None  # what its micro-batches weighed together, where not their rows (loss_reduction counts)
    given: int | None = None  # the batch_size every micro-batch logged alike, not as its rows (a constant, or a count)
    inferred: bool = False
    """No micro-batch gave a batch_size: one device's is Lightning's inference from the whole batch (its first tensor's
    dim 0, 1 for a 0-dim one: a count the collate_fn puts first), which the replay leaves to Lightning."""
    varied: bool = False
    """Its micro-batches logged values at least :data:`VARIED` apart (relative): alike, a maximum is each one's mean
    too, and nearly alike, a smooth function of a mean (``loss.exp()`` of micro-batches' losses near log C, at the
    start of training) is within rounding of the mean of its micro-batches' values: neither tells a mean."""
    by_count: bool = False  # every micro-batch gave a batch_size, not in proportion to its rows (a count of labels)


class LogRecorder:
    """Records ``self.log`` calls of a LightningModule while a micro-batch's step runs, and logs their combination."""

    def __init__(self, module: LightningModule, constants: set[str] | None = None) -> None:
        self.module = module
        self.calls: list[tuple[dict[str, Any], int]] = []  # (bound log arguments, micro-batch rows)
        self.constants = constants if constants is not None else set()  # names whose batch_size is a constant

    @contextmanager
    def recording(self, rows: int, weight: float | None = None) -> Iterator[None]:
        """Record the module's ``self.log`` calls made inside, for a micro-batch of ``rows`` rows whose means weigh
        ``weight`` (default: its rows; what a ``loss_reduction`` function counted in it)."""

        def log(*args: Any, **kwargs: Any) -> None:
            bound = _LOG_SIGNATURE.bind(self.module, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop("self")
            arguments["weight"] = weight
            self.calls.append((arguments, rows))

        with self._patched(log):
            yield

    def add_up(self, loss: Any) -> None:
        """Micro-batches' logs of ``loss`` itself add up to the batch's (a loss summed over rows), whatever their
        ``reduce_fx`` says of combining batches."""
        for arguments, _ in self.calls:
            if arguments["value"] is loss:
                arguments["add_up"] = True

    def weigh_nothing(self, start: int) -> None:
        """The values not finite among the calls recorded from index ``start`` on (a micro-batch's whose loss is a
        mean over nothing, NaN) weigh nothing: left out of the batch's values, as one device's mean over the batch
        leaves out its rows; its finite values (a mean over its rows) weigh as they do (found by review)."""
        for arguments, _ in self.calls[start:]:
            if not finite(arguments["value"]):
                arguments["weight"] = 0.0

    @contextmanager
    def discarding(self, into: list[tuple[str, Any]] | None = None) -> Iterator[None]:
        """Drop ``self.log`` calls made inside (the first stage's partial run of a step); ``into``: their names and
        values are put there instead."""

        def log(*args: Any, **kwargs: Any) -> None:
            if into is not None:
                bound = _LOG_SIGNATURE.bind(self.module, *args, **kwargs)
                into.append((bound.arguments["name"], bound.arguments["value"]))

        with self._patched(log):
            yield

    @contextmanager
    def _patched(self, log: Any) -> Iterator[None]:
        with logs_to(self.module, log):  # (after the module's own log, if it has one)
            yield

    def combine(self) -> list[LoggedValue]:
        """The recorded calls as one batch's logs; clears the record."""
        metrics = any(isinstance(arguments["value"], Metric) for arguments, _ in self.calls)
        names = {id(m): name for name, m in self.module.named_modules() if isinstance(m, Metric)} if metrics else {}
        logged = combine_logs(self.calls, names, self.constants)
        self.calls = []
        return logged

    def replay(self, logged: list[LoggedValue], device: torch.device) -> None:
        """Log ``logged`` through Lightning's ``LightningModule.log`` (on every rank, with the same values; a module's
        own ``log`` ran when they were recorded)."""
        for entry in logged:
            options = dict(entry.options)
            if entry.metric is not None:
                metric = self.module.get_submodule(entry.metric)
                options["metric_attribute"] = entry.metric
                lightning_log(self.module, entry.name, metric, **options)
            else:
                assert entry.value is not None
                lightning_log(self.module, entry.name, entry.value.to(device), batch_size=None if entry.inferred
                              else entry.batch_size, **options)


def combine_logs(calls: list[tuple[dict[str, Any], int]], metric_names: dict[int, str],
                 constants: set[str] | frozenset[str] = frozenset()) -> list[LoggedValue]:
    """Combine per-micro-batch ``self.log`` calls into one per name, as one call for the whole batch would be.

    ``reduce_fx`` says how: "mean" weights each micro-batch's value by its batch size (its rows, or the
    ``batch_size`` it logged; or the weight it was recorded with), "sum" adds, "max"/"min" take the extreme. The batch
    size logged is the sum, but for a name of ``constants`` whose ``batch_size`` every micro-batch gave alike and not
    as its rows (``self.hparams.batch_size``, which :class:`WholeBatchLogs` tells from a count alike by chance): the
    batch's, as one device logs it, its values then weighted by rows.
    """
    by_name: dict[str, list[tuple[dict[str, Any], int]]] = {}
    for arguments, rows in calls:
        by_name.setdefault(arguments["name"], []).append((arguments, rows))
    logged = []
    for name, group in by_name.items():
        first = group[0][0]
        # every rank holds the same value, so a cross-rank sync would only mix in ranks that computed nothing
        options = {key: value for key, value in first.items()
                   if key not in ("name", "value", "batch_size", "sync_dist", "sync_dist_group", "metric_attribute",
                                  "add_up", "weight")}
        if isinstance(first["value"], Metric):
            metric = metric_names.get(id(first["value"]))
            if metric is None:
                raise ValueError(f"self.log({name!r}, metric) logs a Metric that is not an attribute of the "
                                 f"LightningModule; assign it in __init__ (self.metric = ...) so every rank holds it")
            logged.append(LoggedValue(name, None, metric, options, None))
            continue
        given_sizes = [None if args["batch_size"] is None else int(args["batch_size"]) for args, _ in group]
        sizes = [rows if size is None else size for size, (_, rows) in zip(given_sizes, group)]
        alike = (len(group) > 1 and None not in given_sizes and len(set(given_sizes)) == 1
                 and any(size != rows for size, (_, rows) in zip(given_sizes, group)))
        constant = alike and name in constants
        values = torch.stack([torch.as_tensor(args["value"]).detach().to("cpu", torch.float64) for args, _ in group])
        reduce = "sum" if first.get("add_up") else _reduction(first["reduce_fx"], name)
        counted = all(args.get("weight") is not None and args["batch_size"] is None for args, _ in group)
        empty = [args.get("weight") == 0 for args, _ in group]  # micro-batches that counted nothing (NaN means)
        empty = empty if not all(empty) else [False] * len(group)  # (nothing anywhere: NaN, as on one device)
        unknown = [nothing and not bool(torch.isfinite(value).all()) for nothing, value in zip(empty, values)]
        if any(unknown) and reduce != "mean":  # (a maximum over a mean over nothing: the others')
            values = values[torch.tensor([not nothing for nothing in unknown])]
        if reduce == "mean":
            weights = torch.tensor([0.0 if nothing else args["weight"] if counted else rows if constant else size
                                    for (args, rows), size, nothing in zip(group, sizes, empty)],
                                   dtype=torch.float64)
            weights = (weights / weights.sum()).view(-1, *([1] * (values.dim() - 1)))
            value = torch.where(weights > 0, values * weights, 0).sum(0)  # a micro-batch that counted nothing: its
            # value (a mean over nothing, NaN) is left out
        elif reduce == "sum":
            value = values.sum(0)
        else:
            value = values.amax(0) if reduce == "max" else values.amin(0)
        given = first["value"]
        floating = isinstance(given, torch.Tensor) and given.is_floating_point()
        dtype = given.dtype if floating else torch.get_default_dtype()  # as Lightning stores logged numbers
        logged.append(LoggedValue(name, value.to(dtype), None, options, sizes[0] if constant else int(sum(sizes)),
                                  float(sum(args["weight"] for args, _ in group)) if counted else None,
                                  sizes[0] if alike else None, all(size is None for size in given_sizes),
                                  _apart(values),
                                  None not in given_sizes and any(size * group[0][1] != sizes[0] * rows
                                                                  for size, (_, rows) in zip(sizes, group))))
    return logged


def _apart(values: torch.Tensor) -> bool:
    """Whether micro-batches' ``values`` (stacked along dim 0) lie :data:`VARIED` apart or more, relative to their
    size (see :attr:`LoggedValue.varied`)."""
    finite = values[torch.isfinite(values).all(dim=tuple(range(1, values.dim())))] if values.dim() > 1 \
        else values[torch.isfinite(values)]
    if len(finite) < 2:
        return False
    spread = (finite.amax(0) - finite.amin(0)).abs().max()
    return bool(spread > VARIED * max(float(finite.abs().max()), 1e-12))


class WholeBatchLogs:
    """The logged names that a step's micro-batches do not combine into, per step kind, and their whole-batch values.

    On the first batches of each step kind (:data:`CHECKED_BATCHES`, with more than one micro-batch) and again at its
    8th, 16th, 32nd, ... batch (a mean over the tokens that have labels looks like a mean over rows until a batch holds
    padding: a length-sorted set's later batches), on every batch of an evaluation step's first epoch, and at the first
    batch that logs a name the step had not logged before (``if batch_idx % 100 == 0: self.log(...)``), the last stage
    runs the step once more, without gradients, on the whole batch's model output (its micro-batches' put back
    together) and compares what it
    logs with the micro-batches' combination; the names that differ (a maximum under the default ``reduce_fx``, a
    perplexity ``exp(loss)``, ``len(x)``; or whose ``batch_size`` the combination reads otherwise than one device
    gives it: a count that happened to be alike in every micro-batch) are taken from such a run at every batch after,
    with their batch sizes. A step that draws random numbers gives no reliable comparison (the run draws another
    sample): its micro-batches' combination stands."""

    def __init__(self) -> None:
        self.names: dict[str, set[str]] = {}  # step -> the names taken from the whole batch (checked steps only)
        self.checks: dict[str, int] = {}  # step -> its batches checked so far
        self.constants: set[str] = set()  # names whose batch_size the whole batch's run showed to be a constant
        self.seen: dict[str, set[str]] = {}  # step -> every name its batches logged so far (checked or not)
        # step -> the names checked so far only on batches whose micro-batches logged them alike (a maximum of
        # length-bucketed batches): checked again until a batch's micro-batches differ, for UNSETTLED_CHECKS more,
        # and after those on the batch after one whose micro-batches differ (:meth:`watch`)
        self.unsettled: dict[str, set[str]] = {}
        self.settled: dict[str, set[str]] = {}  # step -> names checked on a batch whose micro-batches differed
        self.extra: dict[str, int] = {}  # step -> batches checked for its unsettled names
        self.batches: dict[str, int] = {}  # step -> its batches so far (checked or not)
        self.random: set[str] = set()  # steps whose whole-batch run draws random numbers: no telling
        self.reach: dict[str, int] = {}  # evaluation step -> the highest batch_idx checked

    def wanted(self, step: str, names: Iterable[str] = (), index: int | None = None) -> bool:
        """Whether ``step``'s batch (``index``: its ``batch_idx``) needs a whole-batch run for its logs (a check due,
        names to take, names still unsettled, or among ``names``, logged by this batch so far, one the step had not
        logged before)."""
        return self._due(step, index) or bool(self.names.get(step)) or self._unsettled(step) or self.new(step, names)

    def _due(self, step: str, index: int | None) -> bool:
        """Whether ``step``'s batch (``index``: its ``batch_idx``) is one whose every name is checked: its first few,
        then its 8th, 16th, 32nd, ...; and an evaluation step's batch at an index none of its checked batches had (its
        first epoch, whole: its logs are what a ModelCheckpoint or EarlyStopping decides on, and an evaluation set
        is read in the same order each time)."""
        if step in self.random:
            return False
        if step != "training_step" and index is not None and index > self.reach.get(step, -1):
            return True
        return self.checks.get(step, 0) < CHECKED_BATCHES or looked_at_again(
            self.batches.get(step, 0) + 1, 2 * CHECKED_BATCHES)

    def _unsettled(self, step: str) -> bool:
        return bool(self.unsettled.get(step)) and self.extra.get(step, 0) < UNSETTLED_CHECKS

    def watch(self, step: str, logs: list[LoggedValue]) -> None:
        """After a batch of ``step`` not checked: a name left unsettled when its checks ran out (its micro-batches
        logged it alike on every batch checked: a perplexity while a zero-initialized head gives every row log C)
        whose micro-batches' values now differ is checked once more, on the next batch."""
        self.batches[step] = self.batches.get(step, 0) + 1
        late = self.unsettled.get(step)
        if late and not self._unsettled(step) and any(entry.varied and entry.name in late for entry in logs):
            self.extra[step] = UNSETTLED_CHECKS - 1

    def new(self, step: str, names: Iterable[str]) -> bool:
        """Whether ``names`` hold one that ``step`` had not logged before."""
        return not self.seen.get(step, set()).issuperset(names)

    def settle(self, step: str, logs: list[LoggedValue], whole: LogRecorder | None,
               index: int | None = None) -> set[str]:
        """``logs`` (the micro-batches' combination) with the values of the whole batch's run (``whole``'s record;
        ``None`` where there was none, or it drew random numbers) where the micro-batches' do not give them; returns
        the names found this time (empty after the first check). ``index``: the batch's ``batch_idx``."""
        names = self.names.setdefault(step, set())
        seen = self.seen.setdefault(step, set())
        new = {entry.name for entry in logs} - seen
        seen.update(new)
        checking = self._due(step, index)
        self.batches[step] = self.batches.get(step, 0) + 1
        if checking and index is not None:
            self.reach[step] = max(self.reach.get(step, -1), index)
        if whole is None:  # no telling (a step that draws random numbers): its micro-batches' combination stands
            self.checks[step] = max(self.checks.get(step, 0), CHECKED_BATCHES)
            self.extra[step] = UNSETTLED_CHECKS
            self.random.add(step)
            return set()
        wholes = {entry.name: entry for entry in combine_logs(
            [call for call in whole.calls if not isinstance(call[0]["value"], Metric)], {}) if entry.value is not None}
        found: set[str] = set()
        unsettled, settled = self.unsettled.setdefault(step, set()), self.settled.setdefault(step, set())
        again = not checking and self._unsettled(step)
        if checking or new or again:
            self.checks[step] = self.checks.get(step, 0) + checking
            self.extra[step] = self.extra.get(step, 0) + again
            for entry in logs:
                taken = wholes.get(entry.name)
                if entry.value is None or taken is None or entry.name in names or not (
                        checking or entry.name in new or (again and entry.name in unsettled)):
                    continue
                if entry.varied:
                    settled.add(entry.name)
                    unsettled.discard(entry.name)
                elif entry.name not in settled:
                    unsettled.add(entry.name)
                if entry.batch_size != taken.batch_size and entry.given == taken.batch_size:
                    self.constants.add(entry.name)  # a constant (read as a sum this once): combined as one after
                    entry.value, entry.batch_size = taken.value.to(entry.value.dtype), taken.batch_size
                elif not _close(entry.value, taken.value) or entry.batch_size != taken.batch_size:
                    found.add(entry.name)
            names |= found
        for entry in logs:
            if entry.name in self.names[step] and entry.name in wholes:
                taken = wholes[entry.name]
                entry.value = taken.value.to(entry.value.dtype if entry.value is not None else None)
                entry.batch_size = taken.batch_size
        return found


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` (the micro-batches' combination) equals ``b`` (the whole batch's) but for rounding, or cannot be
    compared (``b`` not finite); a value finite on the whole batch that is not over its micro-batches (prototypes of
    classes a micro-batch lacks: found by review, logged as NaN) is not. Rounding: two units of the logged dtype's
    last place (a bfloat16 loss's is 0.8%), and for float32 what summing a large batch in another order moves (2e-6);
    a perplexity's gap over micro-batches of similar losses is larger (6e-5 measured on a padded GPT-2 batch). Beside
    that, 1e-6 whole: a mean whose rows' terms cancel (a distillation KL, sum p log p - p log q, 0.03 from terms of
    order 1) is rounded as its terms are (4e-7 measured), not as its value."""
    tolerance = max(2 * torch.finfo(a.dtype).eps, 2e-6) if a.is_floating_point() else 2e-6
    if a.shape == b.shape and not torch.isfinite(b).all():
        return True  # a NaN or an infinity on the whole batch (a diverged step): no telling, the micro-batches' stands
    if a.shape == b.shape and not torch.isfinite(a).all():
        return False  # finite on the whole batch, not over its micro-batches: a value over what one can lack
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tolerance, atol=1e-6)


def combine_replica_logs(replicas: list[list[LoggedValue]]) -> list[LoggedValue]:
    """One batch's logs from the logs of each data-parallel replica's share of it (each already combined over its
    micro-batches): values as :func:`combine_logs` combines micro-batches; a Metric's entry is kept once (its
    state is merged by :meth:`MetricTracker.merge`)."""
    calls: list[tuple[dict[str, Any], int]] = []
    metrics: dict[str, LoggedValue] = {}
    for logged in replicas:
        for entry in logged:
            if entry.metric is not None:
                metrics.setdefault(entry.name, entry)
                continue
            assert entry.value is not None and entry.batch_size is not None
            calls.append(({**entry.options, "name": entry.name, "value": entry.value, "batch_size": None,
                           "weight": entry.weight}, entry.batch_size))
    combined = {entry.name: entry for entry in combine_logs(calls, {})}
    for entry in combined.values():  # a replica's batch is its share: the replicas' rows together are the batch's
        entry.inferred = False
    combined.update(metrics)
    order = list(dict.fromkeys(entry.name for logged in replicas for entry in logged))  # first seen, first logged
    return [combined[name] for name in order]


def _reduction(reduce_fx: Any, name: str) -> str:
    if isinstance(reduce_fx, str) and reduce_fx.lower() in _REDUCTIONS:
        return _REDUCTIONS[reduce_fx.lower()]
    if reduce_fx in REDUCTION_NAMES:
        return REDUCTION_NAMES[reduce_fx]
    # Lightning's own refusal, its type and fix (one device's; found by review: a ValueError of the pipeline's)
    raise MisconfigurationException(f"self.log({name!r}, reduce_fx={reduce_fx!r}): Only `self.log(..., reduce_fx="
                                    f"{{min,max,mean,sum}})` are supported. If you need a custom reduction, please "
                                    f"log a `torchmetrics.Metric` instance instead.")


def finite(value: Any) -> bool:
    """Whether a logged value (a tensor or a number; anything else, a Metric, counts) is finite."""
    return not isinstance(value, (torch.Tensor, float)) or bool(torch.isfinite(torch.as_tensor(value)).all())
