"""Strategy parts without processes: finding and cutting the sequence, running steps around it, combining logs and
metrics of micro-batches, outputs, global clipping, atomic checkpoint writes, arguments and registered names."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchmetrics import MeanAbsoluteError

import lightning_pipe
from lightning_pipe import PipelineStrategy
from lightning_pipe.strategy.checkpoint import atomic_save, training_state_of_rank
from lightning_pipe.strategy.gradients import HeldGradients, clip_grad_norm_global
from lightning_pipe.strategy.logs import CHECKED_BATCHES, LogRecorder, WholeBatchLogs, combine_logs
from lightning_pipe.strategy.metric_states import MetricTracker
from lightning_pipe.strategy.split import SplitModule, find_sequence
from lightning_pipe.strategy.runner import combine_outputs
from lightning_pipe.strategy.tied import find_ties
from tests.lightning_models import NoSequence, OutsideParameters, Regressor, TiedLM, TupleRegressor, TwoSequences


# -- finding the sequence ---------------------------------------------------------------------------
def test_finds_the_outermost_sequence() -> None:
    assert find_sequence(Regressor())[0] == "layers"  # its blocks are nn.Sequential too, inside it
    assert find_sequence(TupleRegressor())[0] == "net.blocks"
    path, sequence = find_sequence(TwoSequences(), "decoder")
    assert path == "decoder" and isinstance(sequence, nn.Sequential)


@pytest.mark.parametrize("module, layers, message", [
    (NoSequence(), None, "found no nn.Sequential in NoSequence"),
    (TwoSequences(), None, "PipelineStrategy(layers='encoder')"),
    (Regressor(), "model.blocks", "has no submodule 'model.blocks'"),
    (Regressor(), "train_mae", "not an nn.Sequential"),
])
def test_sequence_errors_say_what_to_change(module: nn.Module, layers: str | None, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=r".*" + message.replace("(", r"\(").replace(")", r"\)")):
        find_sequence(module, layers)


def _cut_in_two(module: nn.Module) -> SplitModule:
    split = SplitModule(module)
    children = list(split.sequence.named_children())
    split.install(children[: len(children) // 2])
    return split


def test_cut_module_holds_local_layers_with_full_names() -> None:
    full = Regressor()
    keys = list(full.state_dict())
    split = _cut_in_two(Regressor())
    assert split.state_keys == keys
    local = list(split.module.state_dict())
    assert local and set(local) < set(keys) and "layers.0.0.weight" in local and "layers.7.0.weight" not in local
    assert {n for n, _ in split.module.named_parameters()} == {k for k in local if "layers" in k}
    with pytest.raises(RuntimeError, match="cut into pipeline stages"):
        split.module(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="cannot be scripted or exported .*load_from_checkpoint"):
        split.module.to_torchscript()  # the LightningModule's export (torch.jit.script of every submodule)
    # loading a full state_dict into the cut module takes this rank's share
    with torch.no_grad():
        full.layers[0][0].weight.add_(1.0)
    split.load_state_dict(full.state_dict())
    torch.testing.assert_close(split.module.get_submodule("layers.0.0").weight, full.layers[0][0].weight)
    with pytest.raises(RuntimeError, match="missing keys"):
        split.load_state_dict({k: v for k, v in full.state_dict().items() if k != "layers.0.0.bias"})
    # a key this rank does not hold is missing too: every rank names every missing key, and fails alike
    with pytest.raises(RuntimeError, match=r"missing keys \['layers.7.0.weight'\]"):
        split.load_state_dict({k: v for k, v in full.state_dict().items() if k != "layers.7.0.weight"})


def test_steps_run_around_the_sequence() -> None:
    split = _cut_in_two(TupleRegressor())
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    captured = split.capture_input("training_step", (x, y), (0,), {})
    torch.testing.assert_close(captured, torch.tanh(x * 0.5 + split.module.offset))
    output = torch.randn(4, 16, requires_grad=True)
    recorder = LogRecorder(split.module)  # type: ignore[arg-type]
    with recorder.recording(rows=4):
        loss = split.run_step("training_step", output, (x, y), (0,), {})
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(output, y))
    assert loss.requires_grad
    assert [call["name"] for call, _ in recorder.calls] == ["loss"] and recorder.calls[0][1] == 4


def test_parameters_outside_the_sequence_are_refused() -> None:
    split = _cut_in_two(OutsideParameters())
    assert split.outside_trainable == ["embed.weight", "embed.bias"]
    with pytest.raises(ValueError, match="move them into the nn.Sequential"):
        split.capture_input("training_step", (torch.randn(2, 16), torch.randn(2, 16)), (0,), {})
    with torch.no_grad():  # evaluation needs no gradients: allowed
        split.capture_input("training_step", (torch.randn(2, 16), torch.randn(2, 16)), (0,), {})


def test_a_step_taking_gradients_of_the_input_is_refused_saying_so() -> None:
    module = Regressor()
    split = _cut_in_two(module)
    module.training_step = lambda batch, index: module(batch[0].clone().requires_grad_())  # a gradient penalty's x
    with pytest.raises(ValueError, match=r"makes the input of the nn.Sequential at 'layers' require grad .*"
                                         r"torch.autograd.grad cannot reach the model's input"):
        split.capture_input("training_step", (torch.randn(2, 16), torch.randn(2, 16)), (0,), {})

    def saliency(batch: Any, index: int) -> Any:  # an evaluation step's own enable_grad, ended by the check
        with torch.enable_grad():
            x = batch[0].clone().requires_grad_()
            return torch.autograd.grad(module(x).sum(), x)

    module.validation_step = saliency
    with torch.no_grad(), pytest.raises(ValueError, match="validation_step makes the input of the nn.Sequential"):
        split.capture_input("validation_step", (torch.randn(2, 16), torch.randn(2, 16)), (0,), {})
    module.validation_step = lambda batch, index: module(batch[0].requires_grad_())  # gradients off: none wanted
    with torch.no_grad():
        split.capture_input("validation_step", (torch.randn(2, 16), torch.randn(2, 16)), (0,), {})


def test_a_step_that_never_calls_the_sequence_is_refused() -> None:
    """Also where it calls it on some batches only (validating every other one): the error says how to skip them."""
    module = Regressor()
    split = _cut_in_two(module)
    module.forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="never called the nn.Sequential at 'layers'") as caught, \
            LogRecorder(module).discarding():
        split.capture_input("training_step", (torch.randn(2, 16), torch.randn(2, 16)), (0,), {})
    assert "returns before it on some" in str(caught.value) and "limit_val_batches" in str(caught.value)


# -- logs, metrics, outputs -------------------------------------------------------------------------
def _call(name: str, value: Any, rows: int, **options: Any) -> tuple[dict[str, Any], int]:
    arguments = {"name": name, "value": value, "prog_bar": False, "logger": None, "on_step": None, "on_epoch": None,
                 "reduce_fx": "mean", "enable_graph": False, "sync_dist": True, "sync_dist_group": None,
                 "add_dataloader_idx": True, "batch_size": None, "metric_attribute": None, "rank_zero_only": False}
    arguments.update(options)
    return arguments, rows


def test_logged_values_combine_as_one_batch() -> None:
    calls = [_call("loss", torch.tensor(1.0), 3), _call("loss", torch.tensor(4.0), 1),
             _call("n", 2, 3, reduce_fx="sum"), _call("n", 5, 1, reduce_fx="sum"),
             _call("peak", torch.tensor(7.0), 3, reduce_fx=torch.max),
             _call("peak", torch.tensor(2.0), 1, reduce_fx="max"),
             _call("low", torch.tensor(7.0), 3, reduce_fx=min), _call("low", torch.tensor(2.0), 1, reduce_fx=min),
             _call("given", torch.tensor(2.0), 3, batch_size=1), _call("given", torch.tensor(6.0), 1, batch_size=3)]
    logged = {entry.name: entry for entry in combine_logs(calls, {})}
    assert float(logged["low"].value) == 2  # Python's min, as Lightning takes it
    assert float(logged["loss"].value) == pytest.approx((3 * 1.0 + 4.0) / 4) and logged["loss"].batch_size == 4
    assert float(logged["n"].value) == 7 and logged["n"].value.dtype == torch.float32
    assert float(logged["peak"].value) == 7
    assert float(logged["given"].value) == pytest.approx((2.0 + 3 * 6.0) / 4) and logged["given"].batch_size == 4
    assert "sync_dist" not in logged["loss"].options  # values are alike on every rank: never synced
    # a batch_size every micro-batch gives alike and not as its rows: a constant (self.hparams.batch_size, which one
    # device logs as the step's weight: before, 4 x that in the epoch's mean) or a count alike by chance (tokens
    # without padding, a sum). The first batch's run of the step on the whole batch tells them apart; until then a sum
    whole_logs = WholeBatchLogs()
    for name, whole_size, taken in (("c", 4, 4), ("tokens", 12, 12)):
        def micro() -> list[tuple[dict[str, Any], int]]:
            return [_call(name, torch.tensor(1.0), 3, batch_size=whole_size // 2 if name == "tokens" else 4),
                    _call(name, torch.tensor(4.0), 1, batch_size=whole_size // 2 if name == "tokens" else 4)]

        first = combine_logs(micro(), {}, whole_logs.constants)[0]
        assert first.batch_size == (8 if name == "c" else 12) and first.given == (4 if name == "c" else 6)
        whole = LogRecorder(nn.Linear(1, 1))
        whole.calls = [_call(name, torch.tensor(1.75 if name == "c" else 2.5), 4, batch_size=whole_size)]
        assert whole_logs.settle(name, [first], whole) == set() and first.batch_size == taken
        later = combine_logs(micro(), {}, whole_logs.constants)[0]
        assert later.batch_size == taken
    assert whole_logs.constants == {"c"} and whole_logs.checks == {"c": 1, "tokens": 1}
    assert float(later.value) == pytest.approx(2.5)  # the tokens' values weighed by their counts
    assert float(combine_logs([_call("c", torch.tensor(1.0), 3, batch_size=4), _call("c", torch.tensor(4.0), 1,
                                                                                     batch_size=4)], {},
                              whole_logs.constants)[0].value) == pytest.approx((3 * 1.0 + 4.0) / 4)  # by rows
    with pytest.raises(MisconfigurationException, match="If you need a custom reduction"):  # Lightning's own
        combine_logs([_call("x", 1.0, 1, reduce_fx=lambda v: v)], {})
    # a value that the first batch's micro-batches give alike (a loss over the tokens with labels, before any batch
    # holds padding) and a later checked batch's do not: found there, and taken from the whole batch's run after
    late = WholeBatchLogs()
    for batch, whole_value in enumerate([2.5, 2.5, 3.0, 2.5, 3.0, 3.0]):
        combined = combine_logs([_call("loss", torch.tensor(1.0), 2), _call("loss", torch.tensor(4.0), 2)], {})
        whole = LogRecorder(nn.Linear(1, 1))
        whole.calls = [_call("loss", torch.tensor(whole_value), 4)]
        wanted = late.wanted("loss")
        found = late.settle("loss", combined, whole if wanted else None)
        assert found == ({"loss"} if batch == 2 else set()) and wanted == (batch < CHECKED_BATCHES or batch > 2)
        assert float(combined[0].value) == (whole_value if batch >= 2 else 2.5)
    quiet = WholeBatchLogs()
    for _ in range(CHECKED_BATCHES):  # nothing found in the batches checked: no more runs on the whole batch
        whole = LogRecorder(nn.Linear(1, 1))
        whole.calls = [_call("loss", torch.tensor(2.5), 4)]
        assert quiet.wanted("loss") and quiet.settle("loss", combine_logs(
            [_call("loss", torch.tensor(1.0), 2), _call("loss", torch.tensor(4.0), 2)], {}), whole) == set()
    assert not quiet.wanted("loss")


def test_metric_state_of_a_batch_merges_like_one_device() -> None:
    torch.manual_seed(0)
    preds, target = torch.randn(3, 10), torch.randn(3, 10)
    reference = MeanAbsoluteError()
    reference.update(preds[0], target[0])
    batch_value = reference(preds[1:], target[1:])  # the second batch at once, as forward on one device

    last, other = Regressor(), Regressor()  # the last stage's module and another rank's
    for module in (last, other):
        module.train_mae.update(preds[0], target[0])
    last_tracker, other_tracker = MetricTracker(last), MetricTracker(other)
    last_tracker.start()
    for row in (1, 2):  # the second batch in two micro-batches
        last.train_mae(preds[row], target[row])
    update = last_tracker.batch_update({"train_mae"})
    assert set(update) == {"train_mae"}
    for module, tracker in ((last, last_tracker), (other, other_tracker)):
        tracker.apply(update)
        torch.testing.assert_close(module.train_mae._forward_cache, batch_value)
        torch.testing.assert_close(module.train_mae.compute(), reference.compute())
        assert module.train_mae._update_count == 3
    assert not last.val_mse.sync_on_compute  # every rank holds the whole state: never gathered


def test_a_wrapper_holding_its_inner_metrics_states_merges_the_batch_like_one_device() -> None:
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.wrappers import ClasswiseWrapper

    torch.manual_seed(0)
    preds, target = torch.randn(3, 8, 4).softmax(-1), torch.randint(0, 4, (3, 8))
    reference = ClasswiseWrapper(MulticlassAccuracy(4, average=None))
    for row in range(3):
        reference.update(preds[row], target[row])
    last, other = nn.Module(), nn.Module()  # the last stage's module and another rank's
    for module in (last, other):
        module.classes = MetricCollection({"acc": ClasswiseWrapper(MulticlassAccuracy(4, average=None))})
        module.classes.update(preds[0], target[0])
    last_tracker, other_tracker = MetricTracker(last), MetricTracker(other)
    assert list(last_tracker.metrics) == ["classes.acc.metric"]  # the wrapper's states are its inner metric's
    last_tracker.start()
    for rows in (slice(0, 5), slice(5, 8)):  # the second batch in two micro-batches
        last.classes.update(preds[1, rows], target[1, rows])
    update = last_tracker.batch_update(set(), runs=2)
    for module, tracker in ((last, last_tracker), (other, other_tracker)):
        tracker.apply(update)
        assert module.classes["acc"].metric.update_count == 2  # one per batch, as on one device (not per run)
        module.classes.update(preds[2], target[2])
        computed, want = module.classes.compute(), reference.compute()
        assert computed.keys() == want.keys() and all(torch.allclose(computed[key], want[key]) for key in want)


def test_metrics_kept_outside_the_modules_tree_are_followed_as_one_devices() -> None:
    """Metrics in a plain dict, a list or a plain object's fields (a shortcut for nn.ModuleDict): set aside and merged
    per batch as the module's own are, so a batch of two micro-batches counts once (they took every run's update)."""
    from torchmetrics import MeanMetric

    class Meters:
        def __init__(self) -> None:
            self.loss = MeanMetric()

    values = torch.arange(8, dtype=torch.float32)
    reference = MeanMetric()
    reference.update(values[:2])
    reference.update(values[2:])
    last, other = nn.Module(), nn.Module()  # the last stage's module and another rank's
    for module in (last, other):
        module.by_name, module.listed, module.meters = {"train": MeanMetric()}, [MeanMetric()], Meters()
        module.criterion = nn.Module()  # a loss module keeping its own in a dict
        module.criterion.kept = {"loss": MeanMetric()}
    last_tracker, other_tracker = MetricTracker(last), MetricTracker(other)
    assert sorted(last_tracker.metrics) == ["by_name['train']", "criterion.kept['loss']", "listed[0]", "meters.loss"]
    assert not last.listed[0].sync_on_compute  # each rank computes its own state, equal on every rank

    def followed(module: nn.Module) -> list[Any]:
        return [module.by_name["train"], module.listed[0], module.meters.loss, module.criterion.kept["loss"]]

    for module in (last, other):
        for metric in followed(module):
            metric.update(values[:2])
    last_tracker.start()
    for rows in (slice(2, 5), slice(5, 8)):  # the second batch in two micro-batches, updated per micro-batch
        for metric in followed(last):
            metric.update(values[rows])
    update = last_tracker.batch_update(set(), runs=2)
    for module, tracker in ((last, last_tracker), (other, other_tracker)):
        tracker.apply(update)
        for metric in followed(module):
            assert metric.update_count == 2 and torch.allclose(metric.compute(), reference.compute())


def test_a_callbacks_metrics_sync_over_the_replicas_never_over_the_stages() -> None:
    """A callback's metric, updated in a hook every rank runs on the same batch: torchmetrics' sync over the world
    counted each batch once per stage (a SumMetric of 30 rows gave 60)."""
    from lightning.pytorch.callbacks import Callback
    from torchmetrics import SumMetric

    from lightning_pipe.strategy.metric_states import sync_callback_metrics

    class Counting(Callback):
        def __init__(self) -> None:
            self.rows = SumMetric()
            self.by_split = {"val": [SumMetric()]}

    alone, replicated = Counting(), Counting()
    sync_callback_metrics([alone], None)  # one pipeline: no sync at all
    assert not alone.rows.sync_on_compute and not alone.by_split["val"][0].sync_on_compute
    group = object()  # (the replicas' process group)
    sync_callback_metrics([replicated], group)
    assert replicated.rows.process_group is group and replicated.by_split["val"][0].process_group is group
    assert replicated.rows.sync_on_compute


def test_a_logged_metric_the_step_only_updates_has_no_step_value_as_on_one_device() -> None:
    """Lightning logs a Metric object's step value from its forward cache: update() sets none, so one device logs
    no step value (and the pipeline logged the batch's compute() as one)."""
    preds, target = torch.randn(4, 10), torch.randn(4, 10)
    for called, want in ((lambda metric: metric.update(preds, target), None), (lambda metric: metric(preds, target),
                                                                              MeanAbsoluteError()(preds, target))):
        last, other = Regressor(), Regressor()
        last_tracker, other_tracker = MetricTracker(last), MetricTracker(other)
        last_tracker.start()
        called(last.train_mae)
        update = last_tracker.batch_update({"train_mae"})
        for module, tracker in ((last, last_tracker), (other, other_tracker)):
            tracker.apply(update)
            cache = module.train_mae._forward_cache
            assert (cache is None) if want is None else torch.allclose(cache, want)


def test_a_metric_made_after_the_pipeline_is_followed_on_every_rank() -> None:
    from torchmetrics import MetricTracker as Tracked
    from torchmetrics.classification import MulticlassAccuracy

    torch.manual_seed(0)
    preds, target = torch.randn(8, 4).softmax(-1), torch.randint(0, 4, (8,))
    last, other = nn.Module(), nn.Module()  # the last stage's module and another rank's
    for module in (last, other):
        module.tracker = Tracked(MulticlassAccuracy(4))
    last_tracker, other_tracker = MetricTracker(last), MetricTracker(other)
    for module in (last, other):  # an epoch's start: torchmetrics' tracker copies its metric (after the build)
        module.tracker.increment()
    last_tracker.start()
    for rows in (slice(0, 5), slice(5, 8)):  # a batch in two micro-batches
        last.tracker.update(preds[rows], target[rows])
    update = last_tracker.batch_update(set())
    assert len(update) == 1  # the epoch's copy
    other_tracker.apply(update)
    last_tracker.apply(update)
    want = MulticlassAccuracy(4)(preds, target)
    for module in (last, other):  # rank 0 computed from an untouched copy before (0.0, "compute before update")
        torch.testing.assert_close(module.tracker.compute(), want)
    for module in (last, other):  # made again under its name (a hook's self.acc = ...): the new one is followed
        module.tracker = MulticlassAccuracy(4)
    last_tracker.start()
    last.tracker.update(preds, target)
    update = last_tracker.batch_update(set())
    for module, tracker in ((last, last_tracker), (other, other_tracker)):
        tracker.apply(update)
        torch.testing.assert_close(module.tracker.compute(), want)


def test_outputs_combine_over_microbatches() -> None:
    a, b = torch.arange(6.0).view(3, 2), torch.arange(4.0).view(2, 2)
    combined = combine_outputs([{"p": a, "m": torch.tensor(1.0), "t": (a, "x")}, {"p": b, "m": torch.tensor(2.0),
                                                                                    "t": (b, "x")}], [3, 2])
    torch.testing.assert_close(combined["p"], torch.cat([a, b]))
    assert float(combined["m"]) == pytest.approx(1.4)
    assert combined["t"][1] == "x"
    assert combine_outputs([None, None], [1, 1]) is None
    # one item per row (names from the batch, ids.tolist(), a dict of boxes per image): the batch's list, in order,
    # also for uneven micro-batches (before: taken as columns, transposed, or an IndexError on the last stage)
    names = combine_outputs([{"y": a, "name": ["r0", "r1", "r2"]}, {"y": b, "name": ["r3", "r4"]}], [3, 2])
    assert names["name"] == ["r0", "r1", "r2", "r3", "r4"]
    assert combine_outputs([[0, 1], [2, 3]], [2, 2]) == [0, 1, 2, 3]
    boxes = combine_outputs([[{"boxes": torch.ones(1, 4)}], [{"boxes": torch.zeros(3, 4)}]], [1, 1])
    assert [len(item["boxes"]) for item in boxes] == [1, 3]
    # columns stay columns: a tensor of the rows per entry, or not one item per row
    pairs = combine_outputs([(a, a[:, 0]), (b, b[:, 0])], [3, 2])
    torch.testing.assert_close(pairs[1], torch.cat([a[:, 0], b[:, 0]]))
    assert combine_outputs([["x", "y", "z"], ["x", "y", "z"]], [2, 2]) == ["x", "y", "z"]
    # as many entries as rows, but columns: a tensor of the rows beside a scalar or names, lists of the rows
    l0, l1 = torch.zeros(2, 3), torch.ones(2, 3)
    mixed = combine_outputs([(l0, torch.tensor(1.0)), (l1, torch.tensor(3.0))], [2, 2])
    assert len(mixed) == 2 and mixed[0].shape == (4, 3) and float(mixed[1]) == 2.0
    assert combine_outputs([(l0, ["a", "b"]), (l1, ["c", "d"])], [2, 2])[1] == ["a", "b", "c", "d"]
    # NumPy arrays (predict_step's out.cpu().numpy()) as a tensor's rows, alone as they are (not wrapped in a list)
    import numpy as np

    from lightning_pipe.strategy.step_values import same_output

    arrays = combine_outputs([a.numpy(), b.numpy()], [3, 2])
    assert isinstance(arrays, np.ndarray) and arrays.shape == (5, 2)
    alone = combine_outputs([{"p": a.numpy()}], [3])["p"]
    assert isinstance(alone, np.ndarray) and alone.shape == (3, 2)
    assert same_output({"p": arrays}, {"p": arrays + 1e-9}) and not same_output(arrays, arrays + 1)
    assert combine_outputs([[[0, 1], [1, 1]], [[1, 0], [0, 0]]], [2, 2]) == [[0, 1, 1, 0], [1, 1, 0, 0]]


# -- gradients --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_without_processes_equals_torch(dtype: torch.dtype) -> None:
    """Also of float64 gradients (precision="64-true"; found by review: torch refused to narrow their norms)."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3).to(dtype), nn.Linear(4, 3).to(dtype)
    b.load_state_dict(a.state_dict())
    for module in (a, b):
        module(torch.randn(5, 4, dtype=dtype) * 10).sum().backward()
    b.weight.grad, b.bias.grad = a.weight.grad.clone(), a.bias.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
    total = clip_grad_norm_global(b.parameters(), 0.5)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(b.weight.grad, a.weight.grad)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_of_complex_gradients_equals_torch(norm_type: float) -> None:
    """A Fourier neural operator's complex spectral weights beside real ones (found by review: the norm failed)."""
    torch.manual_seed(0)
    made = [nn.Parameter(torch.randn(3, 2, dtype=torch.cfloat)), nn.Parameter(torch.randn(4))]
    for p in made:
        p.grad = torch.randn_like(p) * 3
    copies = [nn.Parameter(p.detach().clone()) for p in made]
    for p, copy in zip(made, copies):
        copy.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(made, 0.5, norm_type)
    total = clip_grad_norm_global(copies, 0.5, norm_type=norm_type)
    torch.testing.assert_close(total, expected)
    for p, copy in zip(made, copies):
        torch.testing.assert_close(copy.grad, p.grad)


def test_optimizers_reading_all_their_parameters_together_are_named() -> None:
    """AdamS (pytorch-optimizer) divides by a mean of exp_avg_sq over every parameter it holds: each rank's own (found
    by review: 0.099 off one device on weights of 0.01, silent)."""
    from lightning_pipe.strategy.optimizers import whole_set_warning

    AdamS = type("AdamS", (torch.optim.Adam,), {})  # noqa: N806 - the class's name is what is looked for
    layer = nn.Linear(2, 2)
    message = whole_set_warning([AdamS(layer.parameters())])
    assert message is not None and message.startswith("AdamS computes its step from a mean over all the parameters")
    assert whole_set_warning([torch.optim.Adam(layer.parameters())]) is None


class _NormalizedSGD(torch.optim.Optimizer):
    """An optimizer of one's own that steps by the gradients divided by their global norm."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        total = torch.sqrt(sum(grad.pow(2).sum() for grad in grads))
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.sub_(group["lr"] * param.grad / total)


class _MomentumSGD(_NormalizedSGD):
    """One that steps each parameter from its own gradient and state."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                buffer = self.state[param].setdefault("momentum", torch.zeros_like(param))
                param.sub_(group["lr"] * buffer.mul_(0.9).add_(param.grad))


class _ClippingAdamW(torch.optim.AdamW):
    """AdamW that clips by the global norm of its gradients inside ``step`` (big_vision's, fairseq's): torch's AdamW
    keeps a default its constructor does not take, and the step runs the closure first."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        with torch.enable_grad():
            loss = closure()
        torch.nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], 0.1)
        super().step()
        return loss


def test_an_optimizer_of_ones_own_that_couples_its_parameters_is_named() -> None:
    """An optimizer normalizing by the gradients' global norm in its step, with nothing in its groups to compare, was
    each rank's share's (7.8% off one device, silent, found by review): tried on two parameters, named."""
    from lightning_pipe.strategy.optimizers import whole_set_warning

    layer = nn.Linear(2, 2)
    message = whole_set_warning([_NormalizedSGD(layer.parameters())])
    assert message is not None and message.startswith("_NormalizedSGD updates a parameter by the gradients of the")
    assert whole_set_warning([_MomentumSGD(layer.parameters())]) is None
    assert layer.weight.grad is None  # (the trial touched none of the optimizer's own parameters)
    message = whole_set_warning([_ClippingAdamW(layer.parameters(), lr=1e-2)])  # (found by review: not tried)
    assert message is not None and message.startswith("_ClippingAdamW updates a parameter by the gradients of the")


class _Lamb(torch.optim.Adam):
    """LAMB as timm writes it, as far as its settings go: ``max_grad_norm`` (1.0 by default) clips every parameter's
    gradient by their norm over all the groups, in ``step``."""

    def __init__(self, params: Any, max_grad_norm: float | None = 1.0) -> None:
        torch.optim.Optimizer.__init__(self, params, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                                          amsgrad=False, max_grad_norm=max_grad_norm))


def test_an_optimizer_clipping_by_the_norm_over_its_parameters_is_named() -> None:
    """timm's Lamb divides every gradient by their global norm over ``max_grad_norm`` (found by review: 2.9e-3 off one
    device, silent): each rank's own share's norm under a pipeline."""
    from lightning_pipe.strategy.optimizers import whole_set_warning

    layer = nn.Linear(2, 2)
    message = whole_set_warning([_Lamb(layer.parameters())])
    assert message is not None and message.startswith("_Lamb(max_grad_norm=1.0) clips the gradients by their norm")
    assert "gradient_clip_val" in message
    assert whole_set_warning([_Lamb(layer.parameters(), max_grad_norm=None)]) is None
    assert whole_set_warning([_Lamb(layer.parameters(), max_grad_norm=0.0)]) is None


def test_held_gradients_survive_zero_grad_and_accumulate() -> None:
    layer = nn.Linear(2, 2)
    layer.weight.grad = torch.ones(2, 2)  # from an earlier batch of an accumulation
    held = HeldGradients()
    with held.held_aside(layer.parameters()):
        assert layer.weight.grad is None
        layer(torch.ones(1, 2)).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(2, 2))  # the earlier gradient is back
    held.release()
    torch.testing.assert_close(layer.weight.grad, torch.full((2, 2), 2.0))
    with held.held_aside(layer.parameters()):
        layer(torch.ones(1, 2)).sum().backward()
    layer.zero_grad()  # Lightning's zero_grad between training_step and backward
    held.release()
    torch.testing.assert_close(layer.weight.grad, torch.ones(2, 2))


def test_ties_are_found_across_ranks_only() -> None:
    layers = TiedLM().layers
    ties = find_ties(layers, [2, 3], [[0], [1]])
    assert [(t.names, t.ranks, t.adders) for t in ties] == [(["0.embedding.weight", "4.proj.weight"], [0, 1], [0, 1])]
    assert find_ties(layers, [5], [[0]]) == []
    # Stage 0 on ranks 0, 1 and 2 (uneven replication): all hold a copy, rank 0 adds the stage's gradient.
    ties = find_ties(layers, [2, 3], [[0, 1, 2], [3]])
    assert [(t.ranks, t.adders) for t in ties] == [([0, 1, 2, 3], [0, 3])]


def test_a_module_with_buffers_at_places_on_several_ranks_is_found() -> None:
    from lightning_pipe.strategy.tied import split_buffers

    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    layers = nn.Sequential(nn.Linear(4, 4), block, block, block, nn.Linear(4, 1))
    assert split_buffers(layers, [2, 3], [[0], [1]]) == ["1.1 = 2.1 = 3.1"]
    assert split_buffers(layers, [4, 1], [[0], [1]]) == []  # every place on rank 0
    assert split_buffers(layers, [2, 3], [[0], [0]]) == []  # both stages on one rank (a V-shape's)


def test_clip_thresholds_alike_on_every_rank_pass_and_others_are_refused() -> None:
    """The thresholds' sums that ride in the norm's all_reduce: max_norm=inf (clip_grad_norm_ used to measure the norm
    alone) made inf - inf and refused every rank, found by the review of the change; huge or many equal values pass."""
    import math

    from lightning_pipe.strategy.gradients import _refuse_other_thresholds, _spread_terms

    def check(thresholds: list[float]) -> None:
        terms = [_spread_terms(value) for value in thresholds]
        _refuse_other_thresholds(thresholds[0], [sum(term[i] for term in terms) for i in range(3)], False,
                                 len(thresholds))

    for alike in ([1.0, 1.0], [math.inf] * 2, [0.3] * 64, [1e200] * 2, [0.0] * 2, [0.564] * 1000):
        check(alike)
        _refuse_other_thresholds(alike[0], [max(alike), -min(alike)], True, len(alike))  # (an infinity norm's)
    for differing in ([0.296, 0.48], [math.inf, 1.0], [1.0, 1.001]):
        with pytest.raises(ValueError, match="another max_norm on each rank"):
            check(differing)
        with pytest.raises(ValueError, match="another max_norm on each rank"):
            _refuse_other_thresholds(differing[0], [max(differing), -min(differing)], True, 2)


# -- checkpoints ------------------------------------------------------------------------------------
def _failing_write(checkpoint: dict, path: Any) -> None:
    with open(path, "wb") as file:
        file.write(b"half a checkpoint")
    raise OSError("disk full")


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path: Any, monkeypatch: Any) -> None:
    path = tmp_path / "last.ckpt"
    atomic_save(TorchCheckpointIO(), {"step": 1}, path)
    with monkeypatch.context() as patched:  # Lightning's own IO, failing halfway through its write
        patched.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", _failing_write)
        with pytest.raises(OSError, match="disk full"):
            atomic_save(TorchCheckpointIO(), {"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temporary file left behind
    atomic_save(TorchCheckpointIO(), {"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_a_file_checkpoint_replaces_a_sharded_folder_of_the_same_name(tmp_path: Any, monkeypatch: Any) -> None:
    """A run writing files after one that wrote sharded folders into the same place (save_last's last.ckpt): its first
    save failed on a bare IsADirectoryError after training (found by review). The folder goes; a folder that is no
    checkpoint stays, with an error that says so."""
    path = tmp_path / "last.ckpt"
    path.mkdir()
    (path / ".metadata").write_bytes(b"")
    (path / "meta.pt").write_bytes(b"")
    with monkeypatch.context() as patched:  # failing halfway: the folder stays as it was
        patched.setattr("lightning.fabric.plugins.io.torch_io._atomic_save", _failing_write)
        with pytest.raises(OSError, match="disk full"):
            atomic_save(TorchCheckpointIO(), {"step": 1}, path)
    assert sorted(os.listdir(path)) == [".metadata", "meta.pt"] and os.listdir(tmp_path) == ["last.ckpt"]
    atomic_save(TorchCheckpointIO(), {"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2} and os.listdir(tmp_path) == ["last.ckpt"]
    other = tmp_path / "notes.ckpt"
    other.mkdir()
    with pytest.raises(IsADirectoryError, match="which is not a checkpoint"):
        atomic_save(TorchCheckpointIO(), {"step": 3}, other)
    # a link to a sharded folder (save_last="link"): the link is replaced, the folder stays (found by the review of
    # the change: rmtree refused the link after the file was written)
    kept = tmp_path / "epoch=1.ckpt"
    kept.mkdir()
    (kept / ".metadata").write_bytes(b"")
    (kept / "meta.pt").write_bytes(b"")
    link = tmp_path / "linked.ckpt"
    link.symlink_to(kept, target_is_directory=True)
    atomic_save(TorchCheckpointIO(), {"step": 4}, link)
    assert not link.is_symlink() and torch.load(link, weights_only=True) == {"step": 4} and (kept / "meta.pt").exists()


class _KeyedIO(TorchCheckpointIO):
    """A project's own checkpoint IO: it writes under a key of its own, and a sidecar file beside it."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        torch.save(checkpoint, f"{path}.keyed")
        with open(f"{path}.json", "w") as file:
            file.write("{}")


def test_a_checkpoint_io_of_the_projects_own_gets_the_final_path(tmp_path: Any) -> None:
    """It was given a hidden temporary path to rename afterwards: one that wrote elsewhere failed to be renamed
    (FileNotFoundError on '.last.ckpt.tmp-<pid>'), one that wrote a sidecar left it under the temporary name."""
    atomic_save(_KeyedIO(), {"step": 1}, tmp_path / "last.ckpt")
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt.json", "last.ckpt.keyed"]


def test_a_checkpoint_io_writing_in_the_background_gets_the_final_path(tmp_path: Any) -> None:
    """Lightning's AsyncCheckpointIO queues the write: the temporary file was not there to rename (FileNotFoundError
    at the first checkpoint)."""
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    background = AsyncCheckpointIO(TorchCheckpointIO())
    atomic_save(background, {"step": 1}, tmp_path / "last.ckpt")
    background.teardown()  # waits for the write
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_resuming_with_another_layout_is_refused() -> None:
    layout = {"num_ranks": 2, "stage_sizes": [4, 4], "stage_to_rank": [0, 1]}
    checkpoint = {"pipeline": {"layout": layout, "optimizer_states": [["a"], ["b"]], "lr_schedulers": [[], []]}}
    assert training_state_of_rank(checkpoint, 1, layout) == (["b"], [])
    with pytest.raises(ValueError, match="same devices, schedule, partition and replicas"):
        training_state_of_rank(checkpoint, 1, {**layout, "stage_sizes": [3, 5]})
    with pytest.raises(ValueError, match="not written by PipelineStrategy"):
        training_state_of_rank({}, 0, layout)


# -- arguments and names ----------------------------------------------------------------------------
def test_registered_names() -> None:
    assert lightning_pipe.PipelineStrategy is PipelineStrategy
    assert StrategyRegistry["pipedream"]["strategy"] is PipelineStrategy
    assert StrategyRegistry["pipedream"]["init_params"] == {"schedule": "1f1b"}
    assert StrategyRegistry["gpipe"]["init_params"] == {"schedule": "gpipe", "checkpoint_activations": True}
    strategy = StrategyRegistry.get("gpipe")
    assert strategy.schedule == "gpipe" and strategy.checkpoint_activations and strategy.num_microbatches == 4
    # the strategy names as schedules, as users write them after Trainer(strategy="pipedream")
    assert [PipelineStrategy(schedule=name).schedule for name in ("pipedream", "pipedream_async", "pipedream_2bw")] \
        == ["1f1b", "async_1f1b", "2bw"]
    # and the interleaved schedule as Megatron and torch name it
    assert {PipelineStrategy(schedule=name).schedule for name in ("interleaved", "Interleaved1F1B")} \
        == {"interleaved_1f1b"}
    # the engine's names in any case, as papers write them (found by review: "GPipe" and "1F1B" were refused)
    assert [PipelineStrategy(schedule=name).schedule for name in ("GPipe", "1F1B", "ZB_V")] == ["gpipe", "1f1b", "zb_v"]


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "zigzag"}, r"unknown schedule 'zigzag'.*also by the names pipedream \(1f1b\)"),
    ({"num_microbatches": 0}, "num_microbatches must be a positive integer"),
    ({"partition": "balanced"}, "unknown partition 'balanced'"),
    ({"partition": [3, 0]}, "each at least 1"),
    ({"layers": 3}, "attribute path"),
    # a string from a config is no flag: "false" would be true (helper-58 R6-4)
    ({"checkpoint_activations": "false"}, "checkpoint_activations must be True or False, not 'false'"),
    ({"dynamic_shapes": "no"}, "dynamic_shapes must be True or False"),
    ({"allow_autograd_functions": 1}, "allow_autograd_functions must be True or False"),
    ({"schedule": "async_1f1b", "vertical_sync": "false"}, "vertical_sync must be True or False"),
    # a quoted option from a config reached the schedule's sizes: a bare TypeError after launch (found by review)
    ({"schedule": "interleaved", "schedule_options": {"virtual_stages": "2"}},
     r"schedule_options\['virtual_stages'\] must be an integer \(or a list of them\), got '2' \(str\): give it "
     r"unquoted"),
    ({"schedule": "interleaved", "schedule_options": [2]}, "schedule_options must be a dict"),
    ({"schedule": "zb_h1", "schedule_options": {"virtual_stages": 2}}, "schedule 'zb_h1' takes no option"),
])
def test_bad_arguments_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        PipelineStrategy(**kwargs)


def test_schedule_options_that_are_not_sizes_are_taken() -> None:
    """gpipe's stage_to_rank is a list, and a schedule registered with **options takes any name (found by review: both
    refused by the check of quoted sizes)."""
    from lightning_pipe.engine.schedules import SCHEDULES, ScheduleKind, gpipe, register_schedule

    strategy = PipelineStrategy(schedule="gpipe", schedule_options={"stage_to_rank": [0, 1]})
    assert strategy.settings.schedule_options["stage_to_rank"] == [0, 1]
    register_schedule(ScheduleKind("gpipe_any", lambda num_stages, num_microbatches, **options: gpipe(
        num_stages, num_microbatches)))
    try:
        assert PipelineStrategy(schedule="gpipe_any", schedule_options={"warmup": 2}).settings.schedule_options == {
            "warmup": 2}
    finally:
        SCHEDULES.pop("gpipe_any")


def test_a_loss_that_is_neither_a_mean_nor_a_sum_over_rows_is_told_apart() -> None:
    from lightning_pipe.strategy.reduction import Probe, verdict

    probe = Probe(torch.zeros(4, 1))
    for loss, rows in ((1.0, 2), (3.0, 2)):
        probe.add(torch.zeros(rows, 1), torch.tensor(loss), rows)
    assert verdict(probe, lambda output, batch, draw: torch.tensor(2.0))[0] == "mean"
    assert verdict(probe, lambda output, batch, draw: torch.tensor(4.0))[0] == "sum"
    rule, why = verdict(probe, lambda output, batch, draw: torch.tensor(2.5))  # a weighted mean: the second weighs more
    assert rule == "neither" and "2.5" in why
    # a step whose loss draws random numbers (diffusion noise) cannot tell: no verdict, and so no warning
    rule, why = verdict(probe, lambda output, batch, draw: torch.tensor(2.5 + draw))
    assert rule is None and "random" in why
    # micro-batches' losses of 0 (a batch-hard triplet loss, each micro-batch one identity: no negative) against a
    # whole batch's that is not: neither (it gave up before, and the model never trained); equal to it: cannot tell
    zeros = Probe(torch.zeros(4, 1))
    for rows in (2, 2):
        zeros.add(torch.zeros(rows, 1), torch.tensor(0.0), rows)
    rule, why = verdict(zeros, lambda output, batch, draw: torch.tensor(0.49))
    assert rule == "neither" and "0.49" in why
    assert verdict(zeros, lambda output, batch, draw: torch.tensor(0.0))[0] is None
    # a micro-batch's loss that is not finite where the whole batch's is (prototypes of classes a micro-batch lacks,
    # every label of a micro-batch ignored: found by review, NaN training without a word): neither
    lacking = Probe(torch.zeros(4, 1))
    for loss, rows in ((1.0, 2), (float("nan"), 2)):
        lacking.add(torch.zeros(rows, 1), torch.tensor(loss), rows)
    rule, why = verdict(lacking, lambda output, batch, draw: torch.tensor(1.02))
    assert rule == "lacking" and "on micro-batch 1 of its 2 it is not finite" in why, why
    assert verdict(lacking, lambda output, batch, draw: torch.tensor(float("nan")))[0] is None
    # a loss in bfloat16 (precision="bf16-true"): the whole batch's is its micro-batches' mean but for rounding (the
    # mean of 1.2578 and 1.2520 against 1.2578: found by review, a false "neither"); a weighted mean still is neither
    coarse = Probe(torch.zeros(4, 1))
    for loss, rows in ((1.2578, 2), (1.2520, 2)):
        coarse.add(torch.zeros(rows, 1, dtype=torch.bfloat16), torch.tensor(loss, dtype=torch.bfloat16), rows)
    assert verdict(coarse, lambda output, batch, draw: torch.tensor(1.2578, dtype=torch.bfloat16))[0] == "mean"
    assert verdict(coarse, lambda output, batch, draw: torch.tensor(1.4, dtype=torch.bfloat16))[0] == "neither"
    # bfloat16 outputs with a float32 loss (bf16-mixed): the float32 loss's tolerance (found by review)
    mixed = Probe(torch.zeros(4, 1))
    for loss, rows in ((2.0, 2), (2.04, 2)):
        mixed.add(torch.zeros(rows, 1, dtype=torch.bfloat16), torch.tensor(loss), rows)
    assert verdict(mixed, lambda output, batch, draw: torch.tensor(2.03))[0] == "neither"
    # a loss divided by its own detached value (found by review: taken for a mean, 4.6e-2 off one device, silent)
    balanced = Probe(torch.zeros(4, 1))
    for rows in (2, 2):
        balanced.add(torch.zeros(rows, 1), torch.tensor(2.0), rows)
    rule, why = verdict(balanced, lambda output, batch, draw: torch.tensor(2.0))
    assert rule == "constant" and "2 on the whole batch and on each of its 2 micro-batches" in why, why
    # a mean over outputs that happen to be alike (a head initialized to zeros: log C on every row, found by review:
    # warned as constant while a warm-up kept the head near zero): on other outputs the parts differ, a mean
    alike = Probe(torch.zeros(4, 1))
    for rows in (2, 2):
        alike.add(torch.zeros(rows, 1), torch.tensor(1.0), rows)
    assert verdict(alike, lambda output, batch, draw: (output + 1).mean())[0] == "mean"

    # a step that fails on the micro-batches' outputs put together (labels torch.arange(len(logits)) over a CLIP
    # model's rows x rows logits: their blocks stack to 4 x 2): cannot tell, where the error used to end the run
    def contrastive(output: torch.Tensor, batch: Any, draw: int) -> torch.Tensor:
        return F.cross_entropy(output, torch.arange(len(output)))

    similarities = Probe(torch.zeros(4, 1))
    for loss in (1.0, 3.0):
        similarities.add(torch.zeros(2, 2), torch.tensor(loss), 2)
    rule, why = verdict(similarities, contrastive)
    assert rule is None and "IndexError" in why and "Target 2 is out of bounds" in why


def test_an_output_the_micro_batches_do_not_make_the_batchs_is_stood_in_for_where_the_loss_does_not_read_it() -> None:
    """A model returning beside its rows a number over them that is no mean or sum (a VQ-VAE's codebook perplexity):
    the whole batch's output could not be made, so a loss summed over the rows went unchecked and trained as a mean
    (gradients 4x too small, silent: found by review). Where the step's loss does not read that number, one
    micro-batch's stands in; where it does, no verdict, and why."""
    from lightning_pipe.strategy.reduction import Probe, verdict

    probe = Probe(torch.zeros(4, 1))
    for rows, (value, stat) in zip((2, 2), ((1.0, 5.0), (3.0, 7.0))):
        probe.add((torch.full((rows, 1), value), torch.tensor(stat)), torch.tensor(value * rows), rows)
    kinds = [0, "other"]
    summed = verdict(probe, lambda output, batch, draw: output[0].sum(), kinds)
    assert summed[0] == "sum", summed
    reading = verdict(probe, lambda output, batch, draw: output[0].sum() + output[1], kinds)
    assert reading[0] is None and "reads an output of the model" in reading[1], reading


def test_counted_micro_batches_weigh_their_losses_by_their_counts() -> None:
    from lightning_pipe.strategy.reduction import Counts

    counts = Counts.of(lambda batch: (batch != -100).sum(), [torch.tensor([1, -100]), torch.tensor([2, 3])])
    assert counts.counts == [1.0, 2.0]
    # the engine weighs a micro-batch of 2 rows out of 4 by 1/2: the scale makes that its count's share, 1/3
    assert counts.scale(0, rows=4, microbatch_rows=2) * 2 / 4 == pytest.approx(1 / 3)
    # a micro-batch that counts nothing weighs nothing (its loss, a mean over nothing, gives no gradients)
    empty = Counts.of(lambda batch: (batch != -100).sum(), [torch.tensor([1]), torch.tensor([-100])])
    assert empty.counts == [1.0, 0.0] and empty.empty(1) and not empty.empty(0)
    with pytest.raises(ValueError, match=r"counted nothing in the whole batch \(its micro-batches: \[0.0, 0.0\]\)"):
        Counts.of(lambda batch: (batch != -100).sum(), [torch.tensor([-100]), torch.tensor([-100])])
    with pytest.raises(ValueError, match=r"a negative number or NaN in micro-batch 1 of 2 \(-1.0\)"):
        Counts.of(lambda batch: batch.sum(), [torch.tensor([1]), torch.tensor([-1])])
    # in evaluation the counts only weigh logged values: a batch with nothing to count weighs them by rows
    assert Counts.of(lambda batch: (batch != -100).sum(), [torch.tensor([-100]), torch.tensor([-100])],
                     training=False) is None
    with pytest.raises(ValueError, match="needs a synchronous schedule"):
        PipelineStrategy(schedule="async_1f1b", loss_reduction=lambda batch: 1)
    with pytest.raises(ValueError, match="or a function of a micro-batch"):
        PipelineStrategy(loss_reduction="tokens")


def test_a_models_own_loss_over_unevenly_ignored_labels_is_found() -> None:
    from lightning_pipe.capture import Splitter
    from lightning_pipe.capture.losses import mean_losses
    from lightning_pipe.strategy.loss_warnings import model_loss_warning

    class Classifier(nn.Module):
        def __init__(self, weight: torch.Tensor | None = None) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.register_buffer("weight", weight)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return nn.functional.cross_entropy(x, labels, weight=self.weight)

    x, labels = torch.randn(4, 4), torch.tensor([0, -100, 2, 3])
    splitter = Splitter(Classifier())
    splitter.capture((x, labels), {}, training=True)
    losses = mean_losses(p.graph_module for c in splitter.captures for p in c.programs)
    assert [(loss.op, loss.weighted, loss.ignore_index) for loss in losses] == [("cross_entropy_loss", False, -100)]
    uneven = [[x[:2], labels[:2]], [x[2:], labels[2:]]]  # 1 and 2 labels count
    assert "micro-batches hold [1, 2] of them" in model_loss_warning(losses, uneven)
    assert "[:, 1:]" not in model_loss_warning(losses, uneven)  # a causal LM's shift, for (rows, tokens) labels only
    tokens = [[x[:2], torch.tensor([[0, -100], [-100, -100]])], [x[2:], torch.tensor([[1, 2], [3, -100]])]]
    assert "(batch['labels'][:, 1:] != -100).sum()" in model_loss_warning(losses, tokens)
    even = [[x[:2], torch.tensor([0, 1])], [x[2:], torch.tensor([2, 3])]]
    assert model_loss_warning(losses, even) is None
    weighted = Splitter(Classifier(torch.ones(4)))
    weighted.capture((x, labels), {}, training=True)
    found = mean_losses(p.graph_module for c in weighted.captures for p in c.programs)
    assert "class weights" in model_loss_warning(found, even)

    class Positions(Classifier):  # BERT's question answering: the positions past the sequence ignored, a size
        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return nn.functional.cross_entropy(x, labels.clamp(0, 3), ignore_index=x.size(0))  # symbolic

    symbolic = Splitter(Positions())
    symbolic.capture((x, labels.abs()), {}, training=True)
    found = mean_losses(p.graph_module for c in symbolic.captures for p in c.programs)  # int(a graph node) failed
    assert [loss.ignore_index for loss in found] == [None] and model_loss_warning(found, uneven) is None


def test_loss_reduction_may_name_a_function_for_configs() -> None:
    from lightning_pipe.strategy.reduction import check_loss_reduction

    assert check_loss_reduction("torch.numel") is torch.numel
    with pytest.raises(ValueError, match="names no function"):
        check_loss_reduction("torch.no_such_count")
    with pytest.raises(ValueError, match="not a function of a micro-batch"):
        check_loss_reduction("torch.float32")


def test_every_path_into_a_captured_model_leads_to_this_ranks_share_on_every_rank() -> None:
    """Installed with the first or the last segment, the proxy has the same paths (an alias too): each part gives
    this rank's parameters, indexes as its container does and reads plain attributes; what no graph reads stays whole
    (frozen) or refuses to run with the reason (trainable)."""
    import lightning as L

    from lightning_pipe.strategy.captured import CapturedModule

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.linear(x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(4))
            self.head = nn.Linear(4, 3)
            self.first = self.blocks[0]  # an alias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.projection = Net(), nn.Linear(3, 3)
            self.heads = nn.ModuleDict({"a": nn.Linear(3, 3)})  # (a head per task, applied in the step)
            self.criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))
            self.by_name = {"projection": self.projection}  # modules kept by name in a plain dict, list and tuple
            self.listed, self.paired = [self.projection, 1], (self.projection, self.criterion)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    for index in (0, -1):
        module = Module()
        head_weight = module.net.head.weight
        captured = CapturedModule(module, "")
        captured.splitter.capture((torch.randn(2, 4),), {}, training=True)
        captured.install([captured.segments[index]])
        net = module.net
        assert {name for name, _ in net.named_modules(remove_duplicate=False)} >= {"first", "blocks.3", "head"}
        assert len(net.blocks) == 4 and net.head.out_features == 3
        held = sum(p.numel() for p in net.blocks[-2:].parameters()) + sum(p.numel() for p in net.head.parameters())
        assert held == (0 if index == 0 else 3 * 4 + 3)  # one segment per block, and the head's
        assert sum(p.numel() for p in net.first.parameters()) == (4 * 4 + 4 if index == 0 else 0)
        with pytest.raises(AttributeError, match="'weight' of 'net.head' is held by another rank") if index == 0 \
                else contextlib.nullcontext():
            assert net.head.weight is head_weight
        assert torch.equal(module.criterion.weight, torch.tensor([1.0, 2.0, 3.0]))  # unread, frozen: kept whole
        with pytest.raises(RuntimeError, match="'projection' holds trainable parameters that Module.forward does not"
                                               r".*pass PipelineStrategy\(layers='net'\)"):
            module.projection(torch.ones(1, 3))
        with pytest.raises(RuntimeError, match="'heads' holds trainable parameters"):  # not "part of the forward"
            module.heads["a"](torch.ones(1, 3))
        for kept in (module.by_name["projection"], module.listed[0], module.paired[0]):  # (ran on meta, naming none)
            with pytest.raises(RuntimeError, match=r"'projection' holds .*PipelineStrategy\(layers='net'\)"):
                kept(torch.ones(1, 3))
        assert module.listed[1] == 1 and module.paired[1] is module.criterion
        # (with how a step gets a part's output: found by review, a kNN monitor on the backbone's features)
        with pytest.raises(RuntimeError, match="'net.blocks.1' is part of the module's forward.*return features, "
                                               "output"):
            net.blocks[1](torch.ones(1, 4))


def test_a_cut_models_plain_attributes_and_parameter_naming_methods_stay_readable() -> None:
    from lightning_pipe.strategy.model_parts import plain_attribute

    class Vit(nn.Module):  # timm's create_optimizer_v2 asks a model for no_weight_decay() with hasattr
        def __init__(self) -> None:
            super().__init__()
            self.depth = 4
            self.head = nn.Linear(2, 2)

        def no_weight_decay(self) -> set[str]:
            return {"pos_embed", "cls_token"}

        def logits_sum(self) -> torch.Tensor:  # computes with weights other ranks hold
            return self.head.weight.sum()

    model = Vit()
    assert plain_attribute(model, "depth", lambda: "refused") == 4
    assert plain_attribute(model, "no_weight_decay", lambda: "refused")() == {"pos_embed", "cls_token"}
    for name in ("logits_sum", "head"):
        with pytest.raises(AttributeError, match="refused"):
            plain_attribute(model, name, lambda: "refused")


def test_a_cut_sequence_indexes_and_iterates_as_the_whole_one() -> None:
    cut = _cut_in_two(Regressor()).module.layers  # this rank's first half of the sequence's layers
    whole = Regressor().layers
    assert len(cut) == len(whole) and [type(layer).__name__ for layer in cut][-1] == "LayerElsewhere"
    assert cut[0] is cut.get_submodule("0") and cut[-1] is not None
    with pytest.raises(AttributeError, match=r"'layers\[-1\]' is the module '7' of the nn.Sequential at 'layers', "
                                             r"which another pipeline stage holds, so its 'weight' is not on this rank"
                                             r". To log a value of it at an epoch's end .*"
                                             r"self.named_parameters\(\) if name.startswith\('layers\.7\.'\)"
                                             r".*After fit each rank keeps only its stages: to read the whole model, "
                                             r"save it with trainer.save_checkpoint\(path\)"
                                             r".*a head whose weight is tied to the embedding"
                                             r".*next\(self.parameters\(\)\).dtype"):
        cut[-1].weight  # noqa: B018
    head = cut[:2]  # an nn.Sequential of this rank's layers: parameter groups by index work
    assert {id(p) for p in head.parameters()} == {id(p) for p in cut[0].parameters()} | {
        id(p) for p in cut[1].parameters()} and len(list(head.parameters())) > 0
    with pytest.raises(IndexError):
        cut[len(whole)]


def test_a_fine_tuning_callbacks_groups_merge_into_one_devices_with_a_tied_parameter_once() -> None:
    """``BaseFinetuning`` saves its groups by parameter name, each rank its own: the full file's copy has them merged
    group by group, in the model's order, a tied parameter by its one-device name once (the last rank names the
    tied embedding by the head's name: one device's resume failed on 'head.weight'); another layout's rank keeps
    the names it holds. Other callback lists pass through as the first rank's."""
    from lightning_pipe.strategy.checkpoint import CallbackMerge

    keys = ["emb.weight", "body.weight", "body.bias", "head.weight"]
    tied = {"emb.weight": "emb.weight", "head.weight": "emb.weight"}

    def own(names: list[str]) -> dict[str, Any]:
        groups = [{"lr": 0.1, "params": names}, {"lr": 0.01, "params": []}]
        return {"callbacks": {"BackboneFinetuning": {"internal_optimizer_metadata": {0: groups}, "other": [1, 2]}}}

    full = CallbackMerge(keys, keys, tied)
    for names in (["emb.weight", "body.weight", "body.bias"], ["head.weight"]):
        full.add(own(names))
    state = full.into({})["callbacks"]["BackboneFinetuning"]
    assert state["internal_optimizer_metadata"][0] == [{"lr": 0.1, "params": ["emb.weight", "body.weight", "body.bias"]},
                                                       {"lr": 0.01, "params": []}]
    assert state["other"] == [1, 2]
    last = CallbackMerge(keys, ["body.bias", "head.weight"])
    for names in (["emb.weight", "body.weight"], ["body.bias", "head.weight"]):
        last.add(own(names))
    groups = last.into({})["callbacks"]["BackboneFinetuning"]["internal_optimizer_metadata"][0]
    assert [group["params"] for group in groups] == [["body.bias", "head.weight"], []]


def test_a_frozen_copy_of_the_model_beside_it_is_said_once_it_changes() -> None:
    """An EMA target stays whole on every rank while each holds its share of the model: pairing their parameters
    goes wrong, so a frozen copy whose weights change in the first steps is said (once); one that stays as it is (a
    teacher the step only calls) is not, nor a trainable twin (a second tower) or another shape."""
    import copy
    import types
    import warnings

    from lightning_pipe.strategy.cut_warnings import FrozenCopies
    from lightning_pipe.strategy.model_choice import frozen_copies

    module = Regressor()
    module.target = copy.deepcopy(module.layers).requires_grad_(False)
    module.tower = copy.deepcopy(module.layers)  # trainable
    module.other = nn.Sequential(nn.Linear(16, 8)).requires_grad_(False)
    assert frozen_copies(module, "layers", module.layers) == {"target": "layers"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        copies = FrozenCopies(module, "layers", module.layers, types.SimpleNamespace(is_last_rank=True))
        for _ in range(2):  # unchanged: nothing said
            copies.before_step()
            copies.after_step()
        assert caught == []
        copies.before_step()
        with torch.no_grad():
            next(module.target.parameters()).mul_(0.5)  # an EMA update in the step
        copies.after_step()
        copies.before_step()
        copies.after_step()
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "target has the structure of the model at 'layers' and is a frozen copy of it whose " \
        "weights have changed since training began (seen after training step 3)" in said[0] and \
        "zip(self.target.parameters(), self.layers.parameters())" in said[0], said

    # a target network copied every N steps: checked at every one of the first steps, then at powers of two
    module.target = copy.deepcopy(module.layers).requires_grad_(False)
    late = FrozenCopies(module, "layers", module.layers, types.SimpleNamespace(is_last_rank=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 17):
            late.before_step()
            if step == 10:
                with torch.no_grad():
                    next(module.target.parameters()).add_(1.0)
            late.after_step()
            assert bool(caught) == (step == 16), step
    assert "(seen after training step 16)" in str(caught[0].message)

    teacher = FrozenCopies(module, "layers", module.layers, types.SimpleNamespace(is_last_rank=True))
    error = RuntimeError("The size of tensor a (8) must match the size of tensor b (16) at non-singleton dimension 1")
    teacher.explain(error)
    assert "where this comes from pairing the parameters of target with the model's" in str(error)
    del module.target
    assert frozen_copies(module, "layers", module.layers) == {}


def test_an_averaged_copy_of_the_model_is_warned_of_and_never_taken_for_the_model() -> None:
    """torch's AveragedModel (an EMA updated with update_parameters) copies the model with its parameters still
    requiring grad: it is warned of as a frozen copy is, and the model choice passes over it."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    import types

    import lightning as L

    from lightning_pipe.strategy.cut_warnings import FrozenCopies
    from lightning_pipe.strategy.model_choice import choose_model, frozen_copies

    class Averaging(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    module = Averaging()
    assert frozen_copies(module, "net", module.net) == {"ema": "net"}
    assert choose_model(module, None, None)[1] == "net"
    with pytest.warns(UserWarning, match="ema has the structure of the model at 'net' and is an averaged copy of it"):
        FrozenCopies(module, "net", module.net, types.SimpleNamespace(is_last_rank=True))  # said at once


class ModelEmaV2(nn.Module):
    """timm's EMA of a model, as timm writes it: a deep copy in eval mode, not frozen, updated from the model's
    state_dict values in order."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        super().__init__()
        import copy

        self.module, self.decay = copy.deepcopy(model).eval(), decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for mine, theirs in zip(self.module.state_dict().values(), model.state_dict().values()):
            mine.copy_(self.decay * mine + (1 - self.decay) * theirs)


def test_timms_ema_of_the_model_is_warned_of_and_an_unfrozen_copy_refused_naming_it() -> None:
    """timm's ModelEmaV2 (not frozen) was taken for a second model: the choice refused with no word of a copy, and
    with layers='model' its EMA paired the wrong parameters silently (0.145 off; found by review). It is an averaged
    copy as torch's AveragedModel is: passed over, said at once. A deep copy of one's own, not frozen, is refused
    with a word on it."""
    import copy
    import types

    import lightning as L

    from lightning_pipe.strategy.cut_warnings import FrozenCopies
    from lightning_pipe.strategy.model_choice import choose_model, frozen_copies

    class Net(nn.Module):  # (not an nn.Sequential: two of those are a chain the step may call in turn)
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.inner(x)))

    class Averaging(L.LightningModule):
        def __init__(self, timm: bool) -> None:
            super().__init__()
            self.model = Net()
            self.model_ema = ModelEmaV2(self.model) if timm else copy.deepcopy(self.model)

    module = Averaging(timm=True)
    assert frozen_copies(module, "model", module.model) == {"model_ema": "model"}
    assert choose_model(module, None, None)[1] == "model"
    with pytest.warns(UserWarning, match="model_ema has the structure of the model at 'model' and is an averaged"):
        FrozenCopies(module, "model", module.model, types.SimpleNamespace(is_last_rank=True))
    with pytest.raises(ValueError, match=r"model_ema has the structure of model: if it is a copy no optimizer trains "
                                         r"\(an EMA"):
        choose_model(Averaging(timm=False), None, None)


def test_the_skeleton_of_a_model_with_the_hook_based_weight_norm_is_made() -> None:
    """The deprecated torch.nn.utils.weight_norm keeps ``weight`` as a plain tensor computed from weight_g and
    weight_v, which deepcopy refuses (HiFi-GAN's, TCN's, fairseq's code): the skeleton holds it on meta too."""
    import warnings

    from lightning_pipe.strategy.references import meta_skeleton

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of it
        layers = nn.Sequential(nn.utils.weight_norm(nn.Conv1d(2, 4, 3)), nn.ReLU())
    layers(torch.randn(1, 2, 5))  # its hook made weight from weight_g, weight_v
    skeleton = meta_skeleton(layers)
    assert skeleton[0].weight_v.is_meta and skeleton[0].weight.is_meta
    assert not layers[0].weight_v.is_meta


def test_a_nan_in_the_first_batches_checks_is_no_telling_not_an_error() -> None:
    """A diverged step (or a NaN validation loss in the sanity check) on the batches the strategy checks: the checks
    say they cannot tell, and nothing raises (torch.allclose refused a NaN tolerance before)."""
    from lightning_pipe.strategy.logs import _close
    from lightning_pipe.strategy.metric_states import _same
    from lightning_pipe.strategy.reduction import Probe, verdict
    from lightning_pipe.strategy.step_values import same_output

    nan = torch.tensor(float("nan"))
    assert same_output({"loss": torch.stack([nan, torch.tensor(1.0)])}, {"loss": torch.tensor([2.0, 1.0])})
    assert _close(torch.tensor(1.0, dtype=torch.float64), nan.double())  # a whole batch's NaN: no telling
    assert _same(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0]))
    assert not _same(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 2.0]))
    probe = Probe(torch.ones(4, 2))
    for rows, loss in ((2, nan), (2, torch.tensor(1.0))):
        probe.add(torch.ones(rows, 2), loss, rows)
    assert verdict(probe, lambda output, batch, draw: nan)[0] is None


def test_a_mid_epoch_checkpoint_resumed_by_other_replicas_is_warned_of() -> None:
    """Each replica reads its own share of an epoch: going on from a mid-epoch batch with other shares trains some rows
    twice (helper-58 R6-7); an epoch's end, or the same replicas, is silent."""
    from lightning_pipe.strategy.positions import other_replicas

    position = {"seed": 1, "epoch": 0, "consumed": 3, "finished": False, "replicas": 2}
    assert "written part way through epoch 0 by 2 data-parallel replica(s), and this fit has 1" in other_replicas(
        position, 1)
    assert other_replicas(position, 2) is None
    assert other_replicas({**position, "finished": True}, 1) is None
    assert other_replicas({**position, "consumed": 0}, 1) is None
    assert other_replicas({k: v for k, v in position.items() if k != "replicas"}, 1) is None  # an older file


def test_parameter_groups_that_differ_between_ranks_are_warned_of() -> None:
    """Groups built per layer from named_parameters() (layer-wise learning-rate decay): each rank makes its own
    layers' groups, so a per-group scheduler list, LearningRateMonitor and the checkpoint do not match one device."""
    from lightning_pipe.strategy.optimizers import differing_groups_warning, group_settings

    layers = [nn.Linear(2, 2) for _ in range(4)]

    def layer_decay(held: list[nn.Module], first: int) -> Any:
        return torch.optim.AdamW([{"params": list(layer.parameters()), "lr": 0.1 * 0.5 ** (first + index),
                                   "name": f"layer{first + index}"} for index, layer in enumerate(held)])

    per_rank = [group_settings([layer_decay(layers[:2], 0)]), group_settings([layer_decay(layers[2:], 2)])]
    message = differing_groups_warning(per_rank)
    assert message is not None and "rank 0: AdamW: [lr=0.1, name='layer0'" in message
    assert "rank 1: AdamW: [lr=0.025, name='layer2'" in message and "an empty list is fine" in message
    alike = [group_settings([torch.optim.SGD([{"params": [layer.weight], "weight_decay": 0.1},
                                              {"params": [layer.bias], "weight_decay": 0.0}], lr=0.1)])
             for layer in layers[:2]]
    assert differing_groups_warning(alike) is None  # decay and no-decay groups on every rank


def test_forward_hooks_of_the_users_on_a_pipelined_sequence_are_warned_of() -> None:
    """A hook storing a layer's output for the step runs on the rank holding the layer, never reaching the step's code
    on the last stage (before: the step read a stale value silently); torch's own hooks (spectral_norm's) are not."""
    import warnings
    from types import SimpleNamespace

    from lightning_pipe.strategy.cut_warnings import warn_of_layer_hooks

    kept: dict[str, torch.Tensor] = {}
    layers = nn.Sequential(nn.Linear(2, 2), torch.nn.utils.spectral_norm(nn.Linear(2, 2)), nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_of_layer_hooks(layers, "layers", SimpleNamespace(rank=0))
        layers[2].register_forward_hook(lambda module, args, output: kept.update(feat=output))
        warn_of_layer_hooks(layers, "layers", SimpleNamespace(rank=0))
    assert len(caught) == 1 and str(caught[0].message).startswith("layers.2 of the pipelined nn.Sequential carry")


def _soft_clip(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return 3 * torch.tanh(output / 3)


_seen: list[torch.Tensor] = []


def _keep(output: torch.Tensor) -> None:
    _seen.append(output)


def _clip_and_keep(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    _keep(output)  # stores through a function of the user's
    return output.clamp(-1, 1)


def test_forward_hooks_that_only_transform_are_not_warned_of() -> None:
    """A pre-hook returning a rescaled input and a forward hook returning a soft-clipped output store nothing and run
    on the rank holding their layer as on one device (found by review: warned of as if they stored features); a hook
    that also stores, itself or through a function of the user's, is still warned of."""
    import warnings
    from types import SimpleNamespace

    from lightning_pipe.strategy.cut_warnings import warn_of_layer_hooks

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2), nn.Linear(2, 2))
            self.scale = 0.5
            self.layers[0].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
            self.layers[1].register_forward_hook(self.rescale)
            self.layers[2].register_forward_hook(_soft_clip)

        def rescale(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return output * self.scale

    model = Scaled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_of_layer_hooks(model.layers, "layers", SimpleNamespace(rank=0))
        assert not caught, [str(w.message) for w in caught]
        model.layers[3].register_forward_hook(_clip_and_keep)
        model.layers[1].register_forward_hook(lambda module, args, output: setattr(model, "feat", output))
        warn_of_layer_hooks(model.layers, "layers", SimpleNamespace(rank=0))
    assert len(caught) == 1 and str(caught[0].message).startswith("layers.1, layers.3 of the pipelined"), caught
    # stores through a method of its own, a deque, object.__setattr__ or operator.setitem (found by review: passed)
    import collections
    import operator

    from lightning_pipe.strategy.cut_warnings import only_transforms

    queue: collections.deque = collections.deque()
    kept: dict[str, Any] = {}

    class Holder:
        def keep(self, output: torch.Tensor) -> None:
            self.feat = output

        def hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            self.keep(output)
            return output * 2

    storing = [Holder().hook, lambda m, a, o: (queue.appendleft(o), o)[1],
               lambda m, a, o: (object.__setattr__(m, "feat", o), o)[1],
               lambda m, a, o: (operator.setitem(kept, "feat", o), o)[1]]
    assert not any(only_transforms(hook) for hook in storing)
    assert all(only_transforms(hook) for hook in (lambda m, a, o: torch.log(o.abs() + 1),
                                                  lambda m, a, o: torch.nn.functional.layer_norm(o, o.shape[-1:])))


def test_hooks_of_the_users_on_the_pipelined_sequence_itself_are_refused() -> None:
    """The pipeline never runs the sequence's own forward: a pre-hook standardizing its input and a forward hook
    dividing its output by a temperature ran on no rank (found by review: 0.56 off one device, silently)."""
    from lightning_pipe.strategy.cut_warnings import refuse_sequence_hooks

    layers = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))
    layers[0].register_forward_pre_hook(lambda module, args: (args[0] * 2,))  # on a layer: runs, not refused
    refuse_sequence_hooks(layers, "model")
    layers.register_forward_pre_hook(lambda module, args: ((args[0] - 0.5) * 3.0,))
    layers.register_forward_hook(lambda module, args, output: output / 0.2)
    with pytest.raises(ValueError, match=r"the pipelined nn.Sequential at 'model' carries hooks of yours on itself "
                                         r"\(forward_pre_hook, forward_hook\).*never its own forward"):
        refuse_sequence_hooks(layers, "model")


def test_backward_hooks_of_the_users_on_a_pipelined_sequence_are_warned_of() -> None:
    """A full backward hook keeping a gradient norm for on_after_backward's log runs per micro-batch on the rank
    holding its layer, and the step's changes to the module are undone there (found by review: the logged norms were
    missing, silently)."""
    import warnings
    from types import SimpleNamespace

    from lightning_pipe.strategy.cut_warnings import warn_of_layer_hooks

    norms: dict[str, torch.Tensor] = {}
    layers = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))
    layers[0].register_full_backward_hook(lambda module, grad_in, grad_out: norms.update(n0=grad_out[0].norm()))
    layers[2].register_full_backward_pre_hook(lambda module, grad_out: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_of_layer_hooks(layers, "layers", SimpleNamespace(rank=0))
        warn_of_layer_hooks(layers, "layers", SimpleNamespace(rank=1))
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert str(caught[0].message).startswith("layers.0, layers.2 of the pipelined nn.Sequential carry backward hooks")


def test_a_renormalizing_embedding_tied_across_ranks_is_refused() -> None:
    """Embedding(max_norm=...) renormalizes its weight in its forward on the rank holding it only: a tied head's copy
    on another rank drifted away silently (loss 9.9 where one device's is 3.7, found by review). Untied, it is exact."""
    from types import SimpleNamespace

    from lightning_pipe.strategy.tied import find_ties, refuse_renormalized_ties

    for max_norm in (None, 1.0):
        layers = nn.Sequential(nn.Embedding(10, 4, max_norm=max_norm), nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
        layers[2].weight = layers[0].weight
        ties = find_ties(layers, [2, 1], [[0], [1]])
        assert [tie.names for tie in ties] == [["0.weight", "2.weight"]]
        tied = SimpleNamespace(ties=ties, params=dict(layers.named_parameters(remove_duplicate=False)))
        if max_norm is None:
            refuse_renormalized_ties(tied, layers)
        else:
            with pytest.raises(ValueError, match=r"embedding '0' \(max_norm=1.0\) renormalizes its weight .* tied to "
                                                 r"layers on other ranks \(0.weight, 2.weight\)"):
                refuse_renormalized_ties(tied, layers)
        untied = SimpleNamespace(ties=find_ties(layers, [3], [[0]]), params=tied.params)  # one stage: no tie
        refuse_renormalized_ties(untied, layers)


def test_an_embedding_scaling_gradients_by_frequency_in_a_pipelined_sequence_is_warned_of() -> None:
    """scale_grad_by_freq divides each token's gradient by its count in the micro-batch under a pipeline (4.1e-3 off
    one device's, silent before; found by review)."""
    import warnings
    from types import SimpleNamespace

    from lightning_pipe.strategy.cut_warnings import warn_of_frequency_scaling

    layers = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_of_frequency_scaling(layers, "layers", SimpleNamespace(rank=0, num_microbatches=2))
        layers[0].scale_grad_by_freq = True
        warn_of_frequency_scaling(layers, "layers", SimpleNamespace(rank=0, num_microbatches=1))
        warn_of_frequency_scaling(layers, "layers", SimpleNamespace(rank=0, num_microbatches=2))
    assert len(caught) == 1 and str(caught[0].message).startswith("layers.0 scale each token's gradient"), caught


def test_a_copy_of_the_cut_module_read_while_the_trainer_runs_is_not_said_to_be_a_share() -> None:
    """StochasticWeightAveraging's averaged copy of the module (no Trainer of its own) serialized into a checkpoint
    during fit, which the strategy merges whole: not warned of (before: at every checkpoint); after fit it is, but for
    a trainer.save_checkpoint (found by review). The user's own read during the run (a callback saving "the best
    weights") is."""
    import warnings
    from types import SimpleNamespace

    from lightning_pipe.strategy.share_warning import watch_state_dict

    def status(value: str) -> Any:
        return SimpleNamespace(state=SimpleNamespace(status=SimpleNamespace(value=value)))

    lightnings: dict[str, Any] = {}  # a reader in Lightning's code, as the callback's state_dict() is
    exec("def read(module):\n    return module.state_dict()",
         {"__name__": "lightning.pytorch.callbacks.stochastic_weight_avg"}, lightnings)
    module, copy, mine = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    module._trainer, copy._trainer, mine._trainer = status("running"), None, status("running")
    for watched in (module, copy, mine):
        watch_state_dict(watched, [f"part{i}.weight" for i in range(6)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightnings["read"](copy)
        assert not caught
        mine.state_dict()
        assert len(caught) == 1 and "during the Trainer's run" in str(caught[0].message)
        module._trainer = mine._trainer = status("finished")
        connectors: dict[str, Any] = {}  # trainer.save_checkpoint after fit: the callback's state goes in the file,
        exec("def dump_checkpoint(read, module):\n    return read(module)",  # which the strategy merges whole
             {"__name__": "lightning.pytorch.trainer.connectors.checkpoint_connector"}, connectors)
        connectors["dump_checkpoint"](lightnings["read"], copy)
        assert len(caught) == 1, caught
        copy.state_dict()
    assert len(caught) == 2 and "outside the Trainer's run holds only this rank's share" in str(caught[1].message)


def test_gradient_hooks_of_the_users_on_the_parameters_are_warned_of_with_the_fix() -> None:
    """Each micro-batch's backward runs them on its share of the gradient: a clamp per share, silently (found by
    review: 0.32 off one device); not warned with one micro-batch."""
    import warnings
    from types import SimpleNamespace

    from lightning_pipe.strategy.cut_warnings import warn_of_gradient_hooks

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].weight.register_hook(lambda grad: grad.clamp(-1, 1))
    model[1].bias.register_post_accumulate_grad_hook(lambda param: None)
    with pytest.warns(UserWarning, match=r"0\.weight, 1\.bias carry gradient hooks of yours .* 4 times a step, on a "
                                         r"micro-batch's share .*on_before_optimizer_step"):
        warn_of_gradient_hooks(model, SimpleNamespace(num_microbatches=4, modules=lambda: [model]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_of_gradient_hooks(model, SimpleNamespace(num_microbatches=1, modules=lambda: [model]))


def test_split_points_name_the_model_either_way() -> None:
    """A module whose forward calls its model (self.model): split points named in the model ('l3') or in the module
    ('model.l3') each failed in one of the two captures, whose errors advised the other spelling (found by review)."""
    from lightning_pipe.strategy.cutting import _points_for

    module = nn.Module()
    module.model = nn.Module()
    module.model.l3, module.model.head = nn.Linear(2, 2), nn.Linear(2, 2)
    for points in (["l3"], ["model.l3"], ("l3",)):
        assert _points_for(module, "model", "model", points) == ["l3"]
        assert _points_for(module, "", "model", points) == ["model.l3"]
    assert _points_for(module, "model", "model", [("model.head", "end")]) == [("head", "end")]
    assert _points_for(module, "", "model", {"head": "begin"}) == {"model.head": "begin"}
    assert _points_for(module, "model", "model", ["nowhere"]) == ["nowhere"]  # its own error names it


def test_pickling_a_share_is_said_but_not_where_a_worker_a_copy_or_a_checkpoint_pickles_it() -> None:
    """A DataLoader worker started with spawn pickles the module (its collate_fn a method of it), a deepcopy copies
    it, a checkpoint's hyper-parameters hold it, Lightning probes the hyper-parameters: none writes the share to a
    file of the user's (found by review)."""
    import warnings

    from lightning_pipe.strategy.share_warning import said_pickled

    callers: dict[str, Any] = {}
    for module in ("multiprocessing.reduction", "copy"):
        exec("def run(said, part):\n    return said(part)", {"__name__": module}, callers)
        callers[module] = callers.pop("run")
    exec("def save_checkpoint(said, part):\n    return said(part)", {"__name__": "lightning_pipe.strategy.x"}, callers)
    # Lightning's probe of the hyper-parameters at each Trainer run after the first (the hydra template's net)
    exec("def is_picklable(said, part):\n    return said(part)", {"__name__": "lightning.pytorch.utilities.parsing"},
         callers)
    part = nn.Linear(2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callers["multiprocessing.reduction"](said_pickled, part)
        callers["copy"](said_pickled, part)
        callers["save_checkpoint"](said_pickled, part)
        callers["is_picklable"](said_pickled, part)
        assert not caught
        said_pickled(part)
        said_pickled(part)
    assert len(caught) == 1 and "writes only this rank's share" in str(caught[0].message)


def test_an_index_relative_to_its_micro_batch_reads_as_the_whole_batchs() -> None:
    """A batch of graphs' node-to-graph ids, numbered from 0 in each micro-batch, are the whole batch's but for a
    number added; a micro-batch of one value is no evidence of that (a per-row draw would hide behind it)."""
    from lightning_pipe.strategy.step_inputs import rebased

    whole = [torch.tensor([0, 0, 1, 2, 2, 3])]
    parts = [[torch.tensor([0, 0, 1])], [torch.tensor([0, 0, 1])]]
    assert torch.equal(torch.cat([part[0] for part in rebased(parts, whole)]), whole[0])
    single = rebased([[torch.tensor([3])], [torch.tensor([4])]], [torch.tensor([0, 9])])
    assert [part[0].tolist() for part in single] == [[3], [4]]
    other = rebased([[torch.tensor([0, 1])], [torch.tensor([1, 0])]], [torch.tensor([0, 1, 2, 3])])
    assert [part[0].tolist() for part in other] == [[0, 1], [1, 0]]  # not an offset: left as it was


def test_too_few_pieces_for_the_stages_says_what_can_be_cut() -> None:
    """A model of several layers cut into fewer pieces than stages is told where split points may cut (its children);
    one of a single layer, that it cannot be pipelined (found by review: Lightning's BoringModel got split points)."""
    from types import SimpleNamespace

    from lightning_pipe.strategy.runner import _too_few_pieces

    error = ValueError("cannot cut 2 layers into 3 stages: every stage needs at least one layer; use at most 2 ranks")
    two = SimpleNamespace(path="net", model=nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)))
    message = _too_few_pieces(error, two, 2)
    assert "found 2 pieces in the model at 'net'" in message and "its children: '0', '1', '2'" in message, message
    one = SimpleNamespace(path="", model=nn.Linear(2, 2))
    message = _too_few_pieces(ValueError("cannot cut 1 layer into 2 stages: every stage needs ...; use"), one, 1)
    assert message.startswith("cannot cut 1 layer into 2 stages: the model (Linear) is a single layer"), message


def test_a_value_finite_on_the_whole_batch_but_not_over_its_micro_batches_is_taken_from_the_whole_batch() -> None:
    """A validation loss over prototypes of the batch's classes (a micro-batch lacks some: NaN) was logged as NaN, the
    NaN read as "no telling" (found by review); a value not finite on the whole batch still is no telling."""
    from lightning_pipe.strategy.logs import _close
    from lightning_pipe.strategy.step_values import same_output

    nan, finite = torch.tensor(float("nan")), torch.tensor(0.95)
    assert not _close(nan, finite)  # the micro-batches' NaN against the whole batch's 0.95: they differ
    assert _close(finite, nan) and _close(nan, nan)  # a whole batch's NaN (a diverged step): no telling
    assert not same_output({"loss": finite}, {"loss": nan})  # (the whole batch's output first)
    assert same_output({"loss": nan}, {"loss": finite}) and same_output({"loss": finite}, {"loss": finite + 1e-9})


def test_optimizer_states_the_weights_no_longer_name_are_said_to_start_afresh() -> None:
    """A key renamed in on_load_checkpoint (a migration: ``proj`` -> ``lm``): the weights follow it, the states a
    pipeline of another layout finds by name did not, and the renamed parameter started with fresh Adam moments (0.14
    off one device, silently, found by review). Said now, naming the state; a compiled module's names are no orphans."""
    import warnings

    from lightning_pipe.strategy.checkpointing import _warn_orphaned_states

    entries = {f"optim/0/{name}/{entry}": None for name in ("body.weight", "proj.weight", ":state")
               for entry in ("exp_avg", "step")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _warn_orphaned_states(entries, {"body.weight": 0, "lm.weight": 0})
        _warn_orphaned_states(entries, {"body._orig_mod.weight": 0, "proj.weight": 0})
    assert len(caught) == 1 and "optimizer states of ['proj.weight']" in str(caught[0].message), caught


def test_frozen_layers_the_model_runs_are_no_copies_of_it() -> None:
    """Frozen first blocks of a stack were taken for frozen copies of a trainable block (found by review: a pairing
    note on every shape error, a false warning when a callback unfreezes them); a frozen copy beside the model, which
    its forward never runs (lightly's backbone_momentum), still is one."""
    import copy as copying

    from lightning_pipe.strategy.model_choice import frozen_copies

    def block() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))

    module = nn.Module()
    module.model = nn.Sequential(block(), block(), block(), block())
    for layer in list(module.model)[:2]:
        layer.requires_grad_(False)
    assert frozen_copies(module, "model", module.model) == {}
    module.backbone, module.head = block(), block()
    module.backbone_momentum = copying.deepcopy(module.backbone).requires_grad_(False)
    module.tower = block().requires_grad_(False)  # run by the forward: among the segments' parameters
    running = {id(p) for part in (module.model, module.backbone, module.head, module.tower)
               for p in part.parameters()}
    assert frozen_copies(module, "", module, running) == {"backbone_momentum": "backbone"}


def test_a_strategy_deep_copies_and_pickles_as_lightnings_own_do() -> None:
    """neuralforecast and darts keep their Trainer's arguments in the model's hyper-parameters (deep-copied): a
    PipelineStrategy there failed with a bare "cannot pickle 'mappingproxy' object" (found by review)."""
    import copy
    import pickle

    import lightning as L

    from lightning_pipe import PipelineStrategy

    strategy = PipelineStrategy(schedule="interleaved_1f1b", schedule_options={"virtual_stages": 2},
                                split_points={"model.h.2": "begin"})
    for made in (copy.deepcopy(strategy), pickle.loads(pickle.dumps(strategy))):
        assert dict(made.settings.schedule_options) == {"virtual_stages": 2}
        assert dict(made.settings.split_points) == {"model.h.2": "begin"}
        with pytest.raises(TypeError):
            made.settings.schedule_options["virtual_stages"] = 3  # type: ignore[index]

    class KeepsTrainerArguments(L.LightningModule):
        def __init__(self, **trainer_kwargs: Any) -> None:
            super().__init__()
            self.save_hyperparameters()

    assert isinstance(KeepsTrainerArguments(strategy=strategy).hparams["strategy"], PipelineStrategy)


def test_a_loss_near_its_micro_batches_mean_by_chance_is_told_by_its_gradient() -> None:
    """A loss coupling the rows whose value is near its micro-batches' mean (smp's DiceLoss over the batch's pixels on
    balanced labels: 4e-5 apart, under the check's tolerance) was taken for a mean and trained 0.47% off in its
    gradients without a word (found by review). Its gradient through the model's output is not the micro-batches'
    weighted by rows: told "neither". Here a term of value 0 that couples the rows (the batch's spread of the logits,
    less itself detached); cross entropy alone stays a mean."""
    import torch.nn.functional as F

    from lightning_pipe.strategy.reduction import Probe, verdict
    from lightning_pipe.strategy.step_values import output_gradients

    def coupled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        spread = logits.std(0).sum()
        return F.cross_entropy(logits, labels) + (spread - spread.detach())

    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(12, 3, generator=generator), torch.randint(0, 3, (12,), generator=generator)
    for loss, rule in ((coupled, "neither"), (F.cross_entropy, "mean")):
        probe = Probe((torch.zeros(12, 1), labels))
        for part, part_labels in zip(logits.split(4), labels.split(4)):
            probe.add(part, loss(part, part_labels), 4)

        def run(output: Any, batch: Any, draw: int) -> torch.Tensor:
            return loss(output, batch[1])

        def gradients(output: Any, batch: Any) -> list[torch.Tensor]:
            return output_gradients(lambda given: loss(given, batch[1]), output)

        found, why = verdict(probe, run, None, gradients)
        assert found == rule, (loss, found, why)
        assert rule == "mean" or "its gradient through the model's output is not theirs" in why
        assert verdict(probe, run)[0] == "mean"  # (by its value alone: a mean)


def test_a_micro_batch_counting_nothing_gives_gradients_of_0_also_through_outputs_not_finite() -> None:
    """Masked logits hold -inf: 0 times them is NaN, and so were the gradients of a micro-batch counting nothing
    (found by review)."""
    from lightning_pipe.strategy.reduction import nothing_counted

    logits = torch.tensor([[1.0, float("-inf")], [0.5, 2.0]], requires_grad=True)
    loss = nothing_counted({"logits": logits}, torch.tensor(float("nan")), told=False)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(logits.grad, torch.zeros(2, 2))


def test_lightnings_own_averaging_callbacks_are_no_copies_made_before_the_cut() -> None:
    """EMAWeightAveraging keeps a whole copy of the module it is given each rank's share of: not said as a copy made
    before the cut (found by review)."""
    from lightning.pytorch.callbacks import WeightAveraging
    from torch.optim.swa_utils import AveragedModel

    from lightning_pipe.strategy.model_choice import callback_copies

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

    class Own:
        def __init__(self) -> None:
            self.ema = AveragedModel(model)

    lightnings = WeightAveraging()
    lightnings._average_model = AveragedModel(model)
    assert callback_copies([lightnings, Own()], model) == ["Own.ema"]


def test_lists_of_one_tensor_per_parameter_made_before_the_cut_are_found_also_of_the_trainable_ones_and_in_dicts(
) -> None:
    """Lists pairing by position with ``parameters()`` made from the whole model: also over its trainable parameters
    only (an EMA of what the optimizer steps), and held in a dict (found by review: neither was said)."""
    from lightning_pipe.strategy.model_choice import parameter_lists

    class Averaged:
        def __init__(self, tensors: list[torch.Tensor]) -> None:
            self.shadow_params = tensors

    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    module = nn.Module()
    module.model = model
    every = [p.detach().clone() for p in model.parameters()]
    trainable = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    module.ema = Averaged(every)
    module.states = {"shadow": trainable, "step": 3}
    module.other = [torch.zeros(7), torch.zeros(7)]  # (of no parameters' shapes)
    assert parameter_lists(module, model, []) == ["self.ema.shadow_params", "self.states['shadow']"]


def test_parameters_computing_the_models_input_are_named_not_a_head_run_after_it() -> None:
    """The refusal of a model input computed with trainable parameters outside the model named every such parameter,
    a classifier the step runs after the model too, and told to freeze them (found by review: timm's MobileNet with
    its blocks pipelined); the input's graph says which compute it."""
    from lightning_pipe.strategy.step_values import input_needs_grad

    module = nn.Module()
    module.stem, module.blocks, module.head = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2)
    outside = ["stem.weight", "stem.bias", "head.weight", "head.bias"]
    message = input_needs_grad("training_step", "the nn.Sequential at 'blocks'", outside, "freeze them",
                               ((module.stem(torch.randn(3, 4)),), {}), module)
    assert "(stem.weight, stem.bias)" in message and "head" not in message, message
