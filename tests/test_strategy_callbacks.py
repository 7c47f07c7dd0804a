"""Lightning's callbacks on a cut module, on 2 gloo ranks. Weight averaging against one device:
``StochasticWeightAveraging`` over a network with a batch norm (its extra epoch that recomputes the statistics runs on
every rank, also on the one without a BatchNorm), and ``EMAWeightAveraging`` over a captured model, resumed from a
checkpoint. Both copy the whole module at setup, before the strategy cuts it, and pair the copy's parameters with the
module's by position; without the strategy's re-copy the pairs do not match. ``BatchSizeFinder`` is refused on every
rank before its trial fits; ``ModelPruning`` prunes each rank's layers of an ``nn.Sequential`` as one device does
(by the whole model's magnitudes too; a random global pruning is warned of), and is refused on a captured model."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import run_ranks

SEED = 11
EPOCHS = 3


def _module(kind: str) -> Any:
    import lightning as L

    from tests.citizen_models import Blocks

    class Averaged(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            if kind == "swa":  # an nn.Sequential: the batch norm on the first rank, the head on the second
                self.net = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                                         nn.ReLU(), nn.Linear(16, 4))
            else:  # no nn.Sequential: captured
                self.net = Blocks()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(SEED, verbose=False)
    return Averaged()


def _fit(kind: str, devices: int, strategy: Any, ckpt_path: str | None = None, averaged: bool = True,
         keep_in: str | None = None) -> Any:
    """Fit ``EPOCHS`` epochs; with ``keep_in``, a checkpoint at the end of every epoch is kept there."""
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging

    from tests.citizen_models import class_data

    averaging = (StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1) if kind == "swa"
                 else EMAWeightAveraging(decay=0.5))
    kept = [ModelCheckpoint(keep_in, "{epoch}", save_top_k=-1)] if keep_in else []
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_epochs=EPOCHS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(keep_in),
                        callbacks=([averaging] if averaged else []) + kept)
    model = _module(kind)
    trainer.fit(model, class_data(batches=4), ckpt_path=ckpt_path)
    return model, trainer


def _ranks(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    def strategy(kind: str) -> PipelineStrategy:  # BatchNorm normalizes per micro-batch: one micro-batch is exact
        return PipelineStrategy(num_microbatches=1 if kind == "swa" else 4, wait_timeout=60)

    results: dict[str, Any] = {}
    for kind in ("swa", "ema"):
        model, trainer = _fit(kind, world_size, strategy(kind), keep_in=os.path.join(tmp, kind))
        trainer.save_checkpoint(os.path.join(tmp, f"{kind}.ckpt"))
        results[kind] = {"logged": float(trainer.callback_metrics["train_loss"])}
        # resumed from the end of the second epoch: the averages so far come back with the weights
        _, trainer = _fit(kind, world_size, strategy(kind), ckpt_path=os.path.join(tmp, kind, "epoch=1.ckpt"))
        trainer.save_checkpoint(os.path.join(tmp, f"{kind}-resumed.ckpt"))
    return results


@pytest.mark.timeout(400)
def test_weight_averaging_callbacks_average_every_ranks_share_as_one_device_averages_the_model(tmp_path: Any) -> None:
    results = run_ranks(_ranks, 2, str(tmp_path), timeout=380)
    for kind in ("swa", "ema"):
        model, trainer = _fit(kind, 1, "auto")
        reference = model.state_dict()
        for name in (kind, f"{kind}-resumed"):
            state = torch.load(tmp_path / f"{name}.ckpt", weights_only=False)["state_dict"]
            assert list(state) == list(reference), name
            for key, value in reference.items():
                torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
        assert results[1][kind]["logged"] == pytest.approx(float(trainer.callback_metrics["train_loss"]), rel=1e-5)
        # the file holds the averaging state whole, as one device's does (each rank wrote its share)
        saved = torch.load(tmp_path / kind / "epoch=1.ckpt", weights_only=False)
        if kind == "ema":
            whole = saved["current_model_state"]
        else:
            (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("StochasticWeightAveraging")]
            whole = state["average_model_state"]
        assert sorted(whole) == sorted(reference), kind
        # the averages are what training ends with: without the callback the weights differ
        plain, _ = _fit(kind, 1, "auto", averaged=False)
        assert max((a.float() - b.float()).abs().max() for a, b in zip(plain.state_dict().values(),
                                                                        reference.values())) > 1e-3


def _resumed_from_one_device(rank: int, world_size: int, tmp: str) -> None:
    from lightning_pipe import PipelineStrategy

    for kind in ("swa", "ema"):
        strategy = PipelineStrategy(num_microbatches=1 if kind == "swa" else 4, wait_timeout=60)
        _, trainer = _fit(kind, world_size, strategy, ckpt_path=os.path.join(tmp, kind, "epoch=1.ckpt"))
        trainer.save_checkpoint(os.path.join(tmp, f"{kind}-pipeline.ckpt"))


@pytest.mark.timeout(400)
def test_weight_averaging_resumes_under_the_pipeline_from_a_one_device_checkpoint(tmp_path: Any) -> None:
    """One device writes the averages of the whole model; each rank takes its stage's share of them (and of the
    optimizer's states) and the fit ends with one device's averaged weights."""
    references = {kind: _fit(kind, 1, "auto", keep_in=str(tmp_path / kind))[0].state_dict() for kind in ("swa", "ema")}
    run_ranks(_resumed_from_one_device, 2, str(tmp_path), timeout=380)
    for kind, reference in references.items():
        state = torch.load(tmp_path / f"{kind}-pipeline.ckpt", weights_only=False)["state_dict"]
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=f"{kind} {key}")


def _sharded_ema(rank: int, world_size: int, tmp: str) -> dict[str, torch.Tensor]:
    from lightning_pipe import PipelineStrategy

    def strategy() -> PipelineStrategy:
        return PipelineStrategy(num_microbatches=4, wait_timeout=60, checkpoint_format="sharded")

    _fit("ema", world_size, strategy(), keep_in=os.path.join(tmp, "ema"))
    model, _ = _fit("ema", world_size, strategy(), ckpt_path=os.path.join(tmp, "ema", "epoch=1.ckpt"))
    return {key: value.detach().clone() for key, value in model.state_dict().items() if not value.is_meta}


@pytest.mark.timeout(400)
def test_ema_weight_averaging_resumes_from_a_sharded_checkpoint(tmp_path: Any) -> None:
    """EMAWeightAveraging reads the averaged weights from the checkpoint's state_dict, which a sharded folder's
    restore did not give callbacks: every rank ended with a bare KeyError (found by review). Each rank's callbacks
    now find its share there, and the resumed fit ends with one device's averaged weights."""
    results = run_ranks(_sharded_ema, 2, str(tmp_path), timeout=380)
    reference = _fit("ema", 1, "auto")[0].state_dict()
    assert set().union(*results) == set(reference)
    for state in results:
        for key, value in state.items():
            torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-5, msg=key)


def _tuned(rank: int, world_size: int, kind: str) -> tuple[list[str], dict[str, torch.Tensor], list[str]]:
    """Fit with ``kind``'s callback on ``world_size`` ranks (one: one device); the pruning warnings, the weights and
    what the pruning logged (``verbose=2``)."""
    import logging
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import BatchSizeFinder, ModelPruning

    from lightning_pipe import PipelineStrategy
    from tests.citizen_models import class_data

    method = "random_unstructured" if kind == "pruning-random" else "l1_unstructured"
    callback = (BatchSizeFinder(max_trials=2) if kind == "batch-size" else
                ModelPruning(method, amount=0.2, use_global_unstructured=kind != "pruning-layers", verbose=2))
    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    logging.getLogger("lightning.pytorch.callbacks.pruning").addHandler(Keep())
    strategy = PipelineStrategy(num_microbatches=1) if world_size > 1 else "auto"  # a batch norm: exact with one
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_epochs=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[callback])
    model = _module("ema" if kind in ("batch-size", "pruning-captured") else "swa")  # captured, or nn.Sequential
    model.batch_size = 8  # what BatchSizeFinder scales, in the module's own loader
    model.train_dataloader = lambda: class_data(batches=2, batch_size=model.batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return [str(w.message) for w in caught if "ModelPruning" in str(w.message)], model.state_dict(), logged


@pytest.mark.timeout(120)
def test_the_batch_size_finder_is_refused_and_pruning_runs_as_on_one_device_where_it_can() -> None:
    for rank, error in enumerate(run_ranks(_tuned, 2, "batch-size", timeout=100, expect_failure=True)):
        assert error is not None and "BatchSizeFinder (Tuner.scale_batch_size) cannot run" in error, (rank, error)
    (warned, _, _), (quiet, _, _) = run_ranks(_tuned, 2, "pruning-random", timeout=100)
    assert len(warned) == 1 and "use_global_unstructured=False" in warned[0] and quiet == []
    # each layer by its own amount, and the whole model's smallest weights (global, by magnitude; the ranks agree on
    # the magnitude where the model's count reaches the amount): each rank prunes its own layers as one device does
    for kind in ("pruning-layers", "pruning"):
        shares = run_ranks(_tuned, 2, kind, timeout=100)
        merged = {key: value for _, share, _ in shares for key, value in share.items()}
        warned, reference, said = _tuned(0, 1, kind)
        assert warned == [] and all(not w for w, _, _ in shares) and sorted(merged) == sorted(reference)
        # verbose: the whole model's counts, as one device's (found by review: rank 0's share), every layer's line
        # (the pipeline's batch norm defers its running statistics: another class name in the layer's lines)
        assert [line.replace("DeferredBatchNorm", "BatchNorm") for line in shares[0][2]] == said, (shares[0][2], said)
        assert shares[1][2] == [] and len(said) > 2 and ". Pruned: 0/" in said[0], said
        for key, value in reference.items():
            torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-5, msg=f"{kind} {key}")
        pruned = [float((value == 0).float().mean()) for key, value in reference.items() if key.endswith("weight")]
        assert max(pruned) >= 0.19, (kind, pruned)  # it pruned; globally, by the whole model's threshold, the
        if kind == "pruning":                          # layers lost different shares of theirs
            assert max(pruned) - min(pruned) > 0.05, pruned
    # a captured model's graph reads its parameters, not the masks pruning hooks apply: refused on every rank
    for rank, error in enumerate(run_ranks(_tuned, 2, "pruning-captured", timeout=100, expect_failure=True)):
        assert error is not None and "ModelPruning cannot prune a captured model" in error, (rank, error)


def _tied_lm() -> Any:
    import lightning as L
    import transformers

    class TiedLM(L.LightningModule):  # GPT-2: the LM head shares the embedding's weight, on another rank
        def __init__(self) -> None:
            super().__init__()
            config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16)
            self.model = transformers.GPT2LMHeadModel(config)
            self.model.transformer.wpe.requires_grad_(False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids).logits

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    return TiedLM()


_EXAMPLES = (torch.zeros(4, 12), torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 12))  # each summarized model's
# example_input_array


def _aliased() -> Any:
    """A classifier whose head has a second name (``self.tied = self.head``): one device lists it once, by the first."""
    import lightning as L

    class Aliased(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.enc = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                                           torch.nn.ReLU())
            self.head = torch.nn.Linear(16, 4)
            self.tied = self.head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Aliased()


def _summarized(rank: int, world_size: int) -> list[tuple[Any, ...]]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, ThroughputMonitor

    from lightning_pipe import PipelineStrategy

    counts = []
    for model, callback, example in zip((_module("swa"), _tied_lm(), _aliased()),
                                        (ModelSummary(max_depth=2), RichModelSummary(max_depth=2), ModelSummary(max_depth=2)),
                                        _EXAMPLES):
        model.example_input_array = example
        data = torch.utils.data.DataLoader(torch.randint(0, 64, (8, 8)), batch_size=4) \
            if not hasattr(model, "net") and not hasattr(model, "enc") else \
            __import__("tests.citizen_models").citizen_models.class_data(batches=1)
        monitor = ThroughputMonitor(batch_size_fn=len)
        trainer = L.Trainer(strategy=PipelineStrategy(num_microbatches=2), accelerator="cpu", devices=world_size,
                            max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                            callbacks=[callback, monitor])
        trainer.fit(model, data)
        # the job's rates count one pipeline, not each of its stages (Lightning scaled them by world_size)
        assert [meter.world_size for meter in monitor._throughputs.values()] == [1], monitor._throughputs
        summary = callback._summary(trainer, model)  # what on_fit_start printed on rank 0 (a collective)
        table = dict(summary._get_summary_data())
        assert len(table[" "]) == len(table["Name"]) == len(summary.param_nums)  # every rank's rows, numbered
        counts.append((summary.total_parameters, summary.trainable_parameters, summary.param_nums,
                       summary.total_flops, table))
    return counts


@pytest.mark.timeout(200)
def test_model_summaries_count_the_whole_model_on_every_rank() -> None:
    from lightning.pytorch.utilities.model_summary import ModelSummary

    results = run_ranks(_summarized, 2, timeout=180)
    # (a layer with a second name was listed twice: by its first, with no parameters, and by its second; a tied
    # head's row counted 0 where one device's counts its weight; both found by review)
    for index, (model, depth, example) in enumerate(((_module("swa"), 2, _EXAMPLES[0]),
                                                     (_tied_lm(), 2, _EXAMPLES[1]), (_aliased(), 2, _EXAMPLES[2]))):
        model.example_input_array = example
        one = ModelSummary(model, max_depth=depth)
        want = (one.total_parameters, one.trainable_parameters, one.param_nums, one.total_flops,
                dict(one._get_summary_data()))
        assert want[0] > want[1] if index == 1 else want[0] == want[1]  # the frozen position embedding counts apart
        assert want[3] > 0 and "Out sizes" in want[4]  # FLOPs and sizes of the example input, by the whole model
        assert results[0][index] == results[1][index] == want, (index, results, want)


def test_a_throughput_monitor_counts_the_pipelines_and_each_devices_share_of_the_flops() -> None:
    from lightning.fabric.utilities.throughput import Throughput
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.trainer.states import RunningStage

    from lightning_pipe.strategy.callbacks import count_throughput_per_pipeline

    monitor = ThroughputMonitor(batch_size_fn=len, window_size=2)
    # what its setup made on each of 4 ranks (2 stages x 2 replicas): world_size=trainer.world_size
    monitor._throughputs = {RunningStage.TRAINING: Throughput(available_flops=100.0, world_size=4, window_size=2)}
    for _ in range(2):  # once more changes nothing
        count_throughput_per_pipeline([monitor], pipelines=2, devices=4)
    meter = monitor._throughputs[RunningStage.TRAINING]
    for second in (1, 2):  # each device takes its pipeline's 8 rows per second; the model's 1000 FLOPs per batch
        meter.update(time=second, batches=second, samples=8 * second, flops=1000)
    metrics = meter.compute()
    assert metrics["device/samples_per_sec"] == 8 and metrics["samples_per_sec"] == 16  # 2 pipelines, not 4 ranks
    assert metrics["flops_per_sec"] == 2000 and metrics["device/flops_per_sec"] == 500  # each device's quarter
    assert metrics["device/mfu"] == 5.0


class _Shadows:
    """A hand-written EMA callback: a list of one shadow per parameter, in ``parameters()`` order, saved as it is."""

    def __new__(cls) -> Any:
        from lightning.pytorch.callbacks import Callback

        class Shadows(Callback):
            def __init__(self) -> None:
                self.shadow: list[torch.Tensor] | None = None

            def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
                params = [p.detach() for p in pl_module.parameters()]
                if self.shadow is None:
                    self.shadow = [p.clone() for p in params]
                    return
                for shadow, param in zip(self.shadow, params):
                    shadow.mul_(0.5).add_(param, alpha=0.5)

            def state_dict(self) -> dict[str, Any]:
                return {"shadow": self.shadow}

            def load_state_dict(self, state_dict: dict[str, Any]) -> None:
                self.shadow = [tensor.clone() for tensor in state_dict["shadow"]]

        return Shadows()


def _shadowed(devices: int, folder: str, ckpt_path: str | None = None, **options: Any) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_pipe import PipelineStrategy
    from tests.citizen_models import class_data

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(SEED, verbose=False)
    strategy = PipelineStrategy(num_microbatches=2, wait_timeout=60, **options) if devices > 1 else "auto"
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_epochs=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[_Shadows(), ModelCheckpoint(folder, "{epoch}", save_top_k=-1)])
    trainer.fit(Net(), class_data(batches=3), ckpt_path=ckpt_path)


def _shadowed_ranks(rank: int, world_size: int, tmp: str) -> None:
    _shadowed(world_size, os.path.join(tmp, "pipeline"), partition=[3, 2])
    _shadowed(world_size, os.path.join(tmp, "from-one"), ckpt_path=os.path.join(tmp, "one", "epoch=0.ckpt"))
    _shadowed(world_size, os.path.join(tmp, "sharded"), partition=[3, 2], checkpoint_format="sharded")
    for saved in ("pipeline", "sharded"):  # resumed by another layout
        _shadowed(world_size, os.path.join(tmp, f"{saved}-other-layout"), partition=[1, 4],
                  ckpt_path=os.path.join(tmp, saved, "epoch=0.ckpt"))


@pytest.mark.timeout(300)
def test_a_callbacks_list_of_one_tensor_per_parameter_is_one_devices_in_a_checkpoint(tmp_path: Any) -> None:
    """The pipeline's file holds the whole list in one device's order (rank 0's half before), so one device resumes
    from it to its own shadows; a one-device file gives each rank its parameters' part of the list (the whole list,
    paired with a share, before)."""
    def shadows(path: Any) -> list[torch.Tensor]:
        callbacks = torch.load(path, weights_only=False)["callbacks"]
        (state,) = [value for key, value in callbacks.items() if "Shadows" in key]
        return state["shadow"]

    def assert_same(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want], what
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)

    _shadowed(1, str(tmp_path / "one"))
    run_ranks(_shadowed_ranks, 2, str(tmp_path), timeout=280)
    assert_same(shadows(tmp_path / "pipeline" / "epoch=0.ckpt"), shadows(tmp_path / "one" / "epoch=0.ckpt"), "saved")
    assert_same(shadows(tmp_path / "from-one" / "epoch=1.ckpt"), shadows(tmp_path / "one" / "epoch=1.ckpt"),
                "the pipeline resumed from one device's file")
    _shadowed(1, str(tmp_path / "one-from-pipeline"), ckpt_path=str(tmp_path / "pipeline" / "epoch=0.ckpt"))
    assert_same(shadows(tmp_path / "one-from-pipeline" / "epoch=1.ckpt"), shadows(tmp_path / "one" / "epoch=1.ckpt"),
                "one device resumed from the pipeline's file")
    for saved in ("pipeline", "sharded"):  # a pipeline of another layout: from the whole list (rank 0's share before)
        assert_same(shadows(tmp_path / f"{saved}-other-layout" / "epoch=1.ckpt"),
                    shadows(tmp_path / "one" / "epoch=1.ckpt"), f"another layout resumed from the {saved} checkpoint")
    from lightning_pipe.checkpoint import consolidate

    consolidate(tmp_path / "sharded" / "epoch=0.ckpt", tmp_path / "consolidated.ckpt")  # rank 0's share before
    assert_same(shadows(tmp_path / "consolidated.ckpt"), shadows(tmp_path / "one" / "epoch=0.ckpt"), "consolidated")


def test_the_summary_run_before_the_cut_leaves_the_module_as_it_found_it() -> None:
    """The whole model's FLOPs come from a run on fake tensors: where the forward cannot run on them (a value read as
    a number), nothing of the run stays: not eval mode, the summary's hooks, fake tensors stored, flags set."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelSummary

    from lightning_pipe.strategy.callbacks import summarize_before_cut

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.dropout, self.initialized = nn.Linear(4, 4), nn.Dropout(0.5), False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.initialized, self.cache = True, torch.arange(len(x))  # a first-call flag, a cache
            self.register_buffer("made", torch.zeros(2))
            if self.read and int(x.sum().item() > 0):  # a number fakes do not have
                x = x + 1
            return self.dropout(self.linear(x))

    class Module(L.LightningModule):
        def __init__(self, read: bool) -> None:
            super().__init__()
            self.net, self.example_input_array = Net(), torch.ones(2, 4)
            self.net.read = read

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    for read, flops in ((True, 0), (False, 64)):
        module, callback = Module(read), ModelSummary()
        summarize_before_cut([callback], module)
        assert callback._pipeline_whole_model[1] == flops
        net = module.net
        assert all(child.training for child in module.modules()) and not net.initialized
        assert not hasattr(net, "cache") and "made" not in net._buffers and not net.linear._forward_hooks


def test_a_logger_drawing_the_models_graph_is_said_to_draw_none() -> None:
    """TensorBoardLogger(log_graph=True) logged no graph, and Lightning's warning blamed an unset example_input_array
    that the module set (found by review)."""
    import types
    import warnings

    from lightning_pipe.strategy.callbacks import check_callbacks

    with pytest.warns(UserWarning, match=r"log_graph=True\) draws the model's graph .* no graph is logged"):
        check_callbacks([], [types.SimpleNamespace(_log_graph=True)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_callbacks([], [types.SimpleNamespace(_log_graph=False)])
        # fast_dev_run's DummyLogger answers every name (found by review: warned of a TensorBoardLogger never given)
        from lightning.pytorch.loggers.logger import DummyLogger

        check_callbacks([], [DummyLogger()])


def _fit_finetuned(module: Any, devices: int, strategy: Any) -> Any:
    """Fit ``module`` with ``BackboneFinetuning`` thawing its backbone at epoch 1, 3 epochs; the Trainer."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    from tests.helpers import quiet_trainer

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=generator)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    callback = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1, verbose=False)
    trainer = quiet_trainer(devices, strategy, max_epochs=3, callbacks=[callback])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer


def _finetuned(devices: int, strategy: Any) -> dict[str, Any]:
    import lightning as L

    torch.set_num_threads(1)

    class Finetuned(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
                                        nn.Tanh(), nn.Linear(16, 3))
            self.backbone = self.layers[:4]
            self.rates: list[list[float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return F.cross_entropy(self.layers(batch[0]), batch[1])

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.rates.append([group["lr"] for group in self.trainer.optimizers[0].param_groups])

        def configure_optimizers(self) -> Any:  # (the backbone's parameters in the optimizer from the start)
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

    module = Finetuned()
    _fit_finetuned(module, devices, strategy)
    return {"rates": module.rates, "weights": {key: value.clone() for key, value in module.layers.state_dict().items()}}


def _finetuned_ranks(rank: int, world_size: int) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    return _finetuned(world_size, PipelineStrategy(num_microbatches=2, wait_timeout=60))


@pytest.mark.filterwarnings("ignore:The provided params to be frozen already exist")
@pytest.mark.timeout(200)
def test_a_backbone_already_in_the_optimizer_gets_no_group_on_any_rank_when_unfrozen() -> None:
    """``BackboneFinetuning`` unfreezing a backbone whose parameters the optimizer holds from the start adds no group on
    one device, so its later learning rates go to the only group: so on every rank (found by review: the rank without
    the backbone added an empty group, and its head kept its learning rate, 0.06 off)."""
    reference = _finetuned(1, "auto")
    assert reference["rates"][-1] == [pytest.approx(0.004)]  # (one group, its rate set by the callback)
    for result in run_ranks(_finetuned_ranks, 2, timeout=150):
        assert result["rates"] == reference["rates"]
        for key, value in result["weights"].items():  # (each rank's own layers)
            torch.testing.assert_close(value, reference["weights"][key], rtol=1e-5, atol=1e-5, msg=key)


class _Body(nn.Module):
    """A backbone of residual blocks, cut across the stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.classifier = _Body(), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def _aliased_backbone(devices: int, strategy: Any, path: str) -> dict[str, Any]:
    """``BackboneFinetuning`` of a captured model's submodule named a second time on the module (``self.backbone =
    self.model.bert``, as Lightning's callback wants it), saved at the end."""
    import lightning as L

    torch.set_num_threads(1)

    class Aliased(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = _Classifier()
            self.backbone = self.model.body
            self.rates: list[list[float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.rates.append([group["lr"] for group in self.trainer.optimizers[0].param_groups])

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=0.01)

    module = Aliased()
    _fit_finetuned(module, devices, strategy).save_checkpoint(path)
    loaded = type(module).load_from_checkpoint(path, map_location="cpu") if devices == 1 else None
    return {"rates": module.rates, "loaded": loaded is not None}


def _aliased_ranks(rank: int, world_size: int, path: str) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    return _aliased_backbone(world_size, PipelineStrategy(num_microbatches=2, wait_timeout=60), path)


@pytest.mark.timeout(200)
def test_a_second_name_of_a_captured_models_part_is_thawed_trained_and_saved_as_on_one_device(tmp_path: Any) -> None:
    """``self.backbone = self.model.bert`` named a stand-in holding nothing: ``BackboneFinetuning`` never thawed the
    backbone, the head took its learning rate, and the checkpoint lacked the ``backbone.`` keys one device's has, so
    ``load_from_checkpoint`` failed (found by review: a Hugging Face BERT). Each rank's share now, as through the
    model."""
    reference = _aliased_backbone(1, "auto", str(tmp_path / "one.ckpt"))
    assert len(reference["rates"][-1]) == 2 and reference["loaded"]  # (the backbone's group added at epoch 1)
    for result in run_ranks(_aliased_ranks, 2, str(tmp_path / "pipe.ckpt"), timeout=150):
        assert result["rates"] == reference["rates"]
    one = torch.load(tmp_path / "one.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    pipe = torch.load(tmp_path / "pipe.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert list(pipe) == list(one) and any(key.startswith("backbone.") for key in one)
    for key, value in one.items():
        torch.testing.assert_close(pipe[key], value, rtol=1e-5, atol=1e-6, msg=key)
