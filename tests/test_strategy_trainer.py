"""Trainer end to end on CPU: PipelineStrategy on 2 and 4 gloo ranks trains, logs, validates, predicts and checkpoints
exactly as one device does (the reference runs in the test process with a plain Trainer)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_ranks

# torchrun sets these (with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE): Lightning then sees an elastic launch
TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "pipeline-test", "GROUP_RANK": "0"}

# name: (model, strategy on 2 ranks, strategy on 4 ranks, Trainer options)
CASES: dict[str, tuple[str, Any, Any, dict[str, Any]]] = {
    "regressor": ("regressor", "pipedream", "gpipe",
                  {"max_steps": 3, "accumulate_grad_batches": 2, "gradient_clip_val": 0.3}),
    "tuple": ("tuple", "gpipe", "pipedream",
              {"max_steps": 3, "gradient_clip_val": 0.02, "gradient_clip_algorithm": "value"}),
    "tied": ("tied", {"schedule": "1f1b", "num_microbatches": 3, "partition": [3, 2]}, {"partition": "parameters"},
             {"max_steps": 3, "gradient_clip_val": 0.5}),
    "virtual": ("sgd", {"schedule": "interleaved_1f1b", "schedule_options": {"virtual_stages": 2}},
                {"schedule": "zb_v", "num_microbatches": 8}, {"max_steps": 2}),
}


def _model(name: str) -> Any:
    from tests.lightning_models import Regressor, TiedLM, TupleRegressor

    return {"regressor": lambda: Regressor(optimizer="adam", scheduler=True), "sgd": Regressor,
            "tuple": TupleRegressor, "tied": TiedLM}[name]()


def _data(name: str, batches: int = 6) -> Any:
    from tests.lightning_models import regression_data, token_data

    return token_data(batches) if name == "tied" else regression_data(batches, batch_size=10)  # micro-batches 3,3,2,2


def _trainer(strategy: Any, devices: int, **options: Any) -> Any:
    import lightning as L

    from lightning_pipe import PipelineStrategy

    if isinstance(strategy, dict):
        strategy = PipelineStrategy(**strategy)
    defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False, "num_sanity_val_steps": 0}
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, **{**defaults, **options})


def _train(case: str, world_size: int, tmp: str) -> dict[str, Any]:
    """Fit one case (on ``world_size`` ranks, or on one device when it is 1) and return what the test compares."""
    from lightning.pytorch.loggers import CSVLogger

    from tests.lightning_models import MetricsLog, regression_data

    model_name, two, four, options = CASES[case]
    strategy = {1: "auto", 2: two, 4: four}[world_size]
    model, log = _model(model_name), MetricsLog()
    result: dict[str, Any] = {}
    if case == "regressor":  # the full tour: validation, loggers, validate, predict, save_checkpoint
        logger = CSVLogger(os.path.join(tmp, f"csv{world_size}"), name="", version="")
        trainer = _trainer(strategy, world_size, callbacks=[log], logger=logger, limit_val_batches=2,
                           val_check_interval=2, num_sanity_val_steps=1, **options)
        trainer.fit(model, _data(model_name), regression_data(2, batch_size=6, seed=3))
        result["validate"] = trainer.validate(model, regression_data(2, seed=4), verbose=False)
        result["test"] = trainer.test(model, regression_data(2, batch_size=5, seed=6), verbose=False)
        result["predict"] = trainer.predict(model, regression_data(1, batch_size=7, seed=5))
        trainer.save_checkpoint(os.path.join(tmp, f"final{world_size}.ckpt"))
        trainer.save_checkpoint(os.path.join(tmp, f"weights{world_size}.ckpt"), weights_only=True)
        result["csv"] = logger.log_dir
    else:
        trainer = _trainer(strategy, world_size, callbacks=[log], **options)
        trainer.fit(model, _data(model_name))
    environment = type(getattr(trainer.strategy, "cluster_environment", None)).__name__
    result.update(state=model.state_dict(), train=log.train, progress=log.progress, validation=log.validation,
                  environment=environment, threads=torch.get_num_threads())
    return result


def _train_on_ranks(rank: int, world_size: int, cases: list[str], tmp: str) -> dict[str, Any]:
    import lightning_pipe  # noqa: F401 - registers the strategy names

    return {case: _train(case, world_size, tmp) for case in cases}


def _full_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    for state in states:
        full.update(state)
    return full


def _assert_logs_equal(got: list[dict[str, float]], expected: list[dict[str, float]], what: str) -> None:
    assert len(got) == len(expected), what
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.keys() == b.keys(), f"{what} step {step}"
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), f"{what} step {step} {key}"


def _read_csv(directory: str) -> list[dict[str, str]]:
    with open(os.path.join(directory, "metrics.csv")) as file:
        return list(csv.DictReader(file))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size, env", [(2, {}), (4, TORCHRUN_ENV)], ids=["2-ranks", "4-ranks-torchrun"])
def test_training_equals_one_device(world_size: int, env: dict[str, str], tmp_path: Path) -> None:
    """Weights, logged values (loggers, progress bar, validation), validate/predict results and the saved checkpoint
    of a pipelined fit equal one device's, with accumulation, an LR scheduler, clipping by norm and by value,
    tuples between stages, code before the sequence, a head tied to the embedding, and two stages per rank."""
    import lightning as L

    from tests.lightning_models import Regressor

    results = run_ranks(_train_on_ranks, world_size, list(CASES), str(tmp_path), timeout=200, env=env)
    references = {case: _train(case, 1, str(tmp_path / "reference")) for case in CASES}
    for case, expected in references.items():
        got = _full_state([r[case]["state"] for r in results])
        assert got.keys() == expected["state"].keys(), case
        for key, value in expected["state"].items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"{case} {key}")
        for rank, result in enumerate(results):  # every rank logs the numbers of one device
            for what in ("train", "progress", "validation"):
                _assert_logs_equal(result[case][what], expected[what], f"{case} rank {rank} {what}")
        assert results[0][case]["environment"] == ("TorchElasticEnvironment" if env else "LightningEnvironment")
        assert results[0][case]["threads"] == max(1, len(os.sched_getaffinity(0)) // world_size)

    regressor, expected = results[0]["regressor"], references["regressor"]
    rows, expected_rows = _read_csv(regressor["csv"]), _read_csv(expected["csv"])
    assert len(rows) == len(expected_rows) and rows[0].keys() == expected_rows[0].keys()
    for row, expected_row in zip(rows, expected_rows):
        for key, value in expected_row.items():
            assert (row[key] == value) if value in ("", None) else float(row[key]) == pytest.approx(float(value), 1e-5)
    for rank, result in enumerate(results):
        predicted = result["regressor"]["predict"]
        for run in ("validate", "test"):
            got = result["regressor"][run]
            assert got[0].keys() == expected[run][0].keys()
            for key, value in expected[run][0].items():
                assert got[0][key] == pytest.approx(value, rel=1e-5), f"rank {rank} {run} {key}"
        assert len(predicted) == len(expected["predict"]) == 1 and predicted[0].shape == (7, 16)
        torch.testing.assert_close(predicted[0], expected["predict"][0], rtol=0, atol=1e-5)

    # one standard checkpoint with the whole model, loadable in a plain program
    path = tmp_path / f"final{world_size}.ckpt"
    loaded = Regressor.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(loaded, L.LightningModule) and loaded.hparams.optimizer == "adam"
    checkpoint = torch.load(path, weights_only=False)
    assert list(checkpoint["state_dict"]) == list(Regressor().state_dict())
    assert len(checkpoint["pipeline"]["optimizer_states"]) == world_size
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected["state"][key], rtol=0, atol=1e-5, msg=key)
    # a weights-only file holds what one device's does: no pipeline sections, positions or callbacks
    weights = torch.load(tmp_path / f"weights{world_size}.ckpt", weights_only=False)
    one = torch.load(tmp_path / "reference" / "weights1.ckpt", weights_only=False)
    assert sorted(weights) == sorted(one) and list(weights["state_dict"]) == list(one["state_dict"])


def _resume(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    import lightning_pipe  # noqa: F401
    from tests.lightning_models import Regressor, regression_data

    class Curriculum(L.Callback):  # reads its restored state in on_fit_start
        def __init__(self) -> None:
            self.level, self.started_at = 0, -1

        def on_fit_start(self, trainer: L.Trainer, module: Any) -> None:
            self.started_at = self.level

        def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
            self.level += 1

        def state_dict(self) -> dict[str, int]:
            return {"level": self.level}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.level = state["level"]

    class Scaled(Regressor):  # changes a buffer in on_fit_start: on a resume, the restored one
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.register_buffer("scale", torch.ones(()))

        def on_fit_start(self) -> None:
            self.scale *= 2

    def fit(epochs: int, callbacks: list, ckpt_path: str | None = None) -> tuple[Any, Any]:
        model = Scaled(optimizer="adam", scheduler=True)
        trainer = _trainer("pipedream", world_size, max_epochs=epochs, callbacks=callbacks,
                           enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
        trainer.fit(model, regression_data(2), ckpt_path=ckpt_path)
        return model, trainer

    uninterrupted, _ = fit(2, [])
    checkpointing = ModelCheckpoint(dirpath=tmp, filename="{epoch}-{step}")
    first_half, first_trainer = fit(1, [checkpointing, Curriculum()])
    curriculum = Curriculum()
    resumed, resumed_trainer = fit(2, [curriculum], ckpt_path=checkpointing.best_model_path)
    resumed_state = {k: v.clone() for k, v in resumed.state_dict().items() if k != "scale"}
    resumed_start = {"curriculum": curriculum.started_at, "scale": float(resumed.scale)}
    # validating a cut module: from a checkpoint, and with a new Trainer that takes the cut over
    data = regression_data(1, seed=7)
    validated = [first_trainer.validate(first_half, data, verbose=False),
                 resumed_trainer.validate(resumed, data, ckpt_path=checkpointing.best_model_path, verbose=False),
                 _trainer("pipedream", world_size).validate(resumed, data, verbose=False)]
    try:
        _trainer({"num_microbatches": 2}, world_size).validate(resumed, data, verbose=False)
        refused = "no error"
    except ValueError as error:
        refused = str(error)

    class Batches(L.Callback):  # a shuffling DataLoader must give every stage the same batch
        sums: list[float] = []

        def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
            self.sums.append(float(batch[0].sum()))

    shuffled = DataLoader(regression_data(4).dataset, batch_size=4, shuffle=True)
    _trainer("pipedream", world_size, max_epochs=2, callbacks=[Batches()]).fit(Regressor(), shuffled)
    return {"uninterrupted": uninterrupted.state_dict(), "first_half": first_half.state_dict(),
            "resumed": resumed_state, "path": checkpointing.best_model_path, "files": sorted(os.listdir(tmp)),
            "batches": Batches.sums, "validated": validated, "refused": refused, "resumed_start": resumed_start}


@pytest.mark.timeout(150)
def test_resume_equals_uninterrupted_training(tmp_path: Path) -> None:
    """fit 2 epochs == fit 1 epoch, ModelCheckpoint, fit(ckpt_path) to 2 epochs: weights, Adam and scheduler state.
    Also: validating a cut module from a checkpoint or with a new Trainer; a shuffling DataLoader gives both
    ranks the same batches."""
    from tests.lightning_models import Regressor

    results = run_ranks(_resume, 2, str(tmp_path), timeout=120)
    assert results[0]["files"] == ["epoch=0-step=2.ckpt"]  # one file, no temporary left over
    assert len(results[0]["batches"]) == 16 and results[0]["batches"] == results[1]["batches"]
    assert results[0]["batches"][:8] != results[0]["batches"][8:]  # reshuffled each epoch, alike on both ranks
    for result in results:
        for key, value in result["uninterrupted"].items():
            if key != "scale":
                torch.testing.assert_close(result["resumed"][key], value, rtol=0, atol=1e-6, msg=key)
        # on_fit_start after the restore of the modules and callbacks, as on one device: the callback's restored
        # level (1 after the first epoch), the module's restored buffer doubled again (2 after the first fit)
        assert result["resumed_start"] == {"curriculum": 1, "scale": 4.0}, result["resumed_start"]
        assert any((result["uninterrupted"][k] - v).abs().max() > 1e-4 for k, v in result["first_half"].items())
    for result in results:
        first, *others = result["validated"]
        assert all(other == first for other in others), result["validated"]
        assert "was cut by an earlier Trainer" in result["refused"]
    loaded = Regressor.load_from_checkpoint(results[0]["path"], strict=False)  # (the test's subclass has a buffer)
    first_half = _full_state([r["first_half"] for r in results])
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, first_half[key], rtol=0, atol=0, msg=key)


def _failures(rank: int, world_size: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    import lightning_pipe  # noqa: F401
    from tests.lightning_models import (IteratorStep, NoSequence, OutsideHead, OutsideParameters, Regressor,
                                        SharpnessAwareHook, TiedLM, TwoSequences, regression_data, token_data)

    attempts = [  # errors found while setting up come first: they leave nothing in flight between the ranks
        (NoSequence, "pipedream", regression_data),
        (TwoSequences, "pipedream", regression_data),
        (lambda: Regressor(num_layers=1), "pipedream", regression_data),
        (Regressor, {"partition": [5, 4]}, regression_data),
        (lambda: TiedLM(optimizer="mismatch"), "pipedream", token_data),
        (lambda: Regressor(optimizer="lbfgs"), "pipedream", regression_data),
        (lambda: Regressor(optimizer="zero"), "pipedream", regression_data),
        (lambda: Regressor(optimizer="sam"), "pipedream", regression_data),
        (SharpnessAwareHook, "pipedream", regression_data),
        (lambda: Regressor(optimizer="two"), "pipedream", regression_data),
        (IteratorStep, "pipedream", regression_data),
        # naming the nn.Sequential keeps the no-tracing path: a head after it trains as the step's parameters (every
        # rank holds it), parameters before it cannot train
        (OutsideHead, {"layers": "layers", "schedule": "gpipe"}, regression_data),
        (OutsideParameters, {"layers": "layers"}, regression_data),  # found on the first stage inside a step
    ]
    messages, head = [], {}
    for make_model, strategy, data in attempts:
        try:
            model = make_model()
            _trainer(strategy, world_size, max_steps=1).fit(model, data(1))
            if isinstance(model, OutsideHead):
                head = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        except Exception as error:  # noqa: BLE001 - the test reads the message
            messages.append(f"{type(error).__name__}: {error}")
        else:
            messages.append("no error")
    return messages, head


@pytest.mark.timeout(150)
def test_bad_configurations_fail_clearly_on_every_rank() -> None:
    expected = [
        "no error",  # no nn.Sequential: the module's forward is captured (tests/test_strategy_capture.py)
        "no error",  # two of them: the same
        "cannot cut 1 layer into 2 stages",
        "make the counts add up to 8",
        "give the tied parameter the same optimizer and settings on every rank",
        "torch.optim.LBFGS computes its search direction",
        "ZeroRedundancyOptimizer shards an optimizer's state",
        "SharpnessAware's step runs the training step's closure a second time",
        "The module's optimizer_step runs the training step's closure a second time",
        "Under PipelineStrategy manual optimization is not supported either",
        "IteratorStep.training_step takes dataloader_iter",
        "no error",  # a head after the sequence: trains (below)
        "move them into the nn.Sequential (e.g. make the embedding its first layer)",
    ]
    from tests.lightning_models import OutsideHead, regression_data

    reference = OutsideHead()
    _trainer("auto", 1, max_steps=1).fit(reference, regression_data(1))
    for rank, (messages, head) in enumerate(run_ranks(_failures, 2, timeout=120)):
        for message, text in zip(messages, expected):
            assert text in message, f"rank {rank}: expected {text!r} in {message!r}"
        assert len(messages) == len(expected)
        for name in ("head.weight", "head.bias"):  # every rank holds the head, trained as on one device
            torch.testing.assert_close(head[name], reference.state_dict()[name], rtol=1e-5, atol=1e-6)


def _callbacks(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    import lightning_pipe  # noqa: F401
    from tests.lightning_models import Regressor, regression_data

    # min_delta so large that only the first validation improves: patience 0 stops the fit after the second epoch
    stopping = EarlyStopping(monitor="val_mse", patience=0, min_delta=1e9, mode="min")
    checkpoint = ModelCheckpoint(dirpath=os.path.join(tmp, "ckpt"), monitor="val_mse")
    trainer = L.Trainer(strategy="pipedream", accelerator="cpu", devices=world_size, max_epochs=10,
                        callbacks=[stopping, LearningRateMonitor(), checkpoint], logger=CSVLogger(tmp),
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Regressor(scheduler=True), regression_data(4, batch_size=8), regression_data(2, batch_size=8, seed=5))
    return {"epoch": trainer.current_epoch, "steps": trainer.global_step, "stopped": stopping.stopped_epoch,
            "metrics": sorted(trainer.callback_metrics), "best": checkpoint.best_model_path != "",
            "sync_advice": [str(w.message) for w in caught if "sync_dist=True" in str(w.message)]}


@pytest.mark.timeout(120)
def test_early_stopping_learning_rate_monitor_and_checkpoints_on_every_rank(tmp_path: Path) -> None:
    """A project's usual callbacks see the same metrics on every rank: EarlyStopping stops every rank at the same
    epoch (no rank left waiting), LearningRateMonitor logs, ModelCheckpoint keeps its best; Lightning's advice to sync
    epoch-level logs (every rank logs the same values here) is not shown."""
    results = run_ranks(_callbacks, 2, str(tmp_path), timeout=100)
    for result in results:
        assert (result["epoch"], result["steps"], result["stopped"], result["best"]) == (2, 8, 1, True), result
        assert {"lr-SGD", "val_mse", "train_loss_epoch"} <= set(result["metrics"]), result["metrics"]
        assert result["sync_advice"] == []
    assert results[0]["metrics"] == results[1]["metrics"]


def _fit_with_sync_batchnorm(rank: int, world_size: int) -> list[str]:
    import warnings

    import lightning as L

    from lightning_pipe import PipelineStrategy
    from tests.lightning_models import Regressor, regression_data

    trainer = L.Trainer(strategy=PipelineStrategy(), accelerator="cpu", devices=world_size, sync_batchnorm=True,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Regressor(), regression_data(1, batch_size=8))
    return [str(w.message) for w in caught if "sync_batchnorm" in str(w.message)]


@pytest.mark.timeout(120)
def test_sync_batchnorm_is_said_to_have_no_effect() -> None:
    first, last = run_ranks(_fit_with_sync_batchnorm, 2, timeout=100)
    assert len(first) == 1 and "has no effect under PipelineStrategy" in first[0] and last == []  # rank 0 says it


def _fit_combined(rank: int, world_size: int, mode: str) -> dict[str, torch.Tensor]:
    """Two loaders of other lengths given as the user's own ``CombinedLoader`` in ``mode``; the step reads both."""
    from lightning.pytorch.utilities import CombinedLoader

    from tests.helpers import quiet_trainer
    from tests.lightning_models import Regressor, regression_data

    class TwoLoaders(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (xa, ya), (xb, yb) = batch["a"], batch["b"]
            out_a, out_b = self(xa), self(xb)
            loss = F.mse_loss(out_a, ya) + 0.5 * F.mse_loss(out_b, yb)
            self.log("train_loss", loss)
            return loss

    import torch.nn.functional as F

    torch.manual_seed(0)
    model = TwoLoaders()
    loaders = CombinedLoader({"a": regression_data(3, batch_size=8), "b": regression_data(2, batch_size=8, seed=2)},
                             mode)
    from lightning_pipe import PipelineStrategy

    # the module's forward captured (its first batch is drawn before the fit to capture it)
    trainer = quiet_trainer(world_size, PipelineStrategy(layers="") if world_size > 1 else "auto", max_epochs=1)
    trainer.fit(model, loaders)
    return {"steps": torch.tensor(trainer.global_step), "loss": trainer.callback_metrics["train_loss"],
            **{name: value.detach().clone() for name, value in model.state_dict().items()}}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["max_size_cycle", "min_size"])
def test_the_users_combined_loader_trains_as_on_one_device(mode: str) -> None:
    """A ``CombinedLoader`` given to ``fit`` is the loop's, in its own mode (found by review: the strategy wrapped it
    once more, and the step was given the inner loader's ``(batch, index, loader)`` tuple as the batch)."""
    expected = _fit_combined(0, 1, mode)
    assert int(expected["steps"]) == (3 if mode == "max_size_cycle" else 2)
    first, last = run_ranks(_fit_combined, 2, mode, timeout=120)
    assert int(first["steps"]) == int(expected["steps"])
    for name, value in expected.items():
        held = [result[name] for result in (first, last) if name in result]
        torch.testing.assert_close(held[-1], value, rtol=1e-5, atol=1e-6, msg=name)


def _fit_complex(rank: int, world_size: int) -> dict[str, Any]:
    """A Fourier neural operator's blocks (complex spectral weights beside real ones), clipped by the global norm."""
    import warnings

    import lightning as L
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers import quiet_trainer

    class Spectral(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4, 3, dtype=torch.cfloat) / 16)
            self.mix = nn.Conv1d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            spectrum = torch.fft.rfft(x)[..., :3]
            mixed = torch.einsum("bix,iox->box", spectrum, self.weight)
            return F.gelu(torch.fft.irfft(mixed, n=x.shape[-1]) + self.mix(x))

    class Operator(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Conv1d(2, 4, 1), *[Spectral() for _ in range(3)], nn.Conv1d(4, 1, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self.layers(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), 1e-2)

    torch.manual_seed(0)
    model = Operator()
    x = torch.randn(24, 2, 12, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x, torch.sin(x.sum(1, keepdim=True))), batch_size=8)
    trainer = quiet_trainer(world_size, "pipedream" if world_size > 1 else "auto", max_steps=3, gradient_clip_val=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    return {"state": {name: value.detach().clone() for name, value in model.state_dict().items()},
            "warnings": [str(w.message) for w in caught if "complex" in str(w.message).lower()]}


@pytest.mark.timeout(150)
def test_complex_parameters_clipped_by_the_global_norm_train_as_on_one_device() -> None:
    """Found by review: the global norm failed on complex gradients ("dtype should be complex"), and the watch of the
    parameters' writes summed complex values as real (torch's "discards the imaginary part" warning)."""
    expected = _fit_complex(0, 1)
    results = run_ranks(_fit_complex, 2, timeout=120)
    for result in results:
        assert result["warnings"] == []
        for name, value in result["state"].items():
            torch.testing.assert_close(value, expected["state"][name], rtol=1e-5, atol=1e-6, msg=name)
    assert sum(len(result["state"]) for result in results) == len(expected["state"])


def _fit_float64_clipped(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    from tests.helpers import quiet_trainer
    from tests.lightning_models import Regressor, regression_data

    torch.manual_seed(0)
    model = Regressor()
    trainer = quiet_trainer(world_size, "pipedream" if world_size > 1 else "auto", max_steps=3, precision="64-true",
                            gradient_clip_val=0.05)
    trainer.fit(model, regression_data())
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


@pytest.mark.timeout(150)
def test_float64_gradients_clipped_by_the_global_norm_train_as_on_one_device() -> None:
    """precision="64-true" with gradient_clip_val (found by review: torch refused to narrow float64 gradients' norms
    to float32, on every rank)."""
    expected = _fit_float64_clipped(0, 1)
    results = run_ranks(_fit_float64_clipped, 2, timeout=120)
    for state in results:
        for name, value in state.items():
            assert value.dtype == torch.float64
            torch.testing.assert_close(value, expected[name], rtol=1e-9, atol=1e-11, msg=name)
    assert sum(len(state) for state in results) == len(expected)


def _fit_self_normalized(rank: int, world_size: int, kind: str) -> list[str]:
    """Task losses balanced by their own detached values: l / l.detach() is 1 on any rows; or a classifier whose head
    starts at zero (its first loss is log C on any rows, its next ones are not)."""
    import warnings

    import torch.nn.functional as F

    from tests.helpers import quiet_trainer
    from tests.lightning_models import Regressor, regression_data

    class Balanced(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            out = self(x)
            if kind == "zero_head":
                return F.cross_entropy(out, y.argmax(-1))
            first, second = F.mse_loss(out[:, :8], y[:, :8]), F.l1_loss(out[:, 8:], y[:, 8:])
            return first / first.detach() + second / second.detach()

        def configure_optimizers(self) -> Any:  # (a warm-up keeps a head initialized to zeros near zero)
            return torch.optim.SGD(self.parameters(), lr=1e-7) if kind == "zero_head" else super().configure_optimizers()

    module = Balanced()
    if kind == "zero_head":
        torch.nn.init.zeros_(module.layers[-1][0].weight)
        torch.nn.init.zeros_(module.layers[-1][0].bias)
    trainer = quiet_trainer(world_size, "pipedream", max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, regression_data(3))
    return [str(w.message) for w in caught if "same value on every part of the batch" in str(w.message)]


@pytest.mark.timeout(150)
def test_a_loss_divided_by_its_own_detached_value_is_said_to_differ() -> None:
    """Found by review: its value (2 on any rows) passed the loss check as a mean, and it trained 4.6e-2 off one
    device unwarned."""
    said = [text for texts in run_ranks(_fit_self_normalized, 2, "balanced", timeout=120) for text in texts]
    assert len(said) == 1 and "l / l.detach()" in said[0] and "num_microbatches=1" in said[0], said
    # a head initialized to zeros: the same loss everywhere at the first batch (found by review: warned), and at the
    # next ones while a warm-up keeps it near zero (found by review: warned, telling to give up the pipeline)
    assert run_ranks(_fit_self_normalized, 2, "zero_head", timeout=120) == [[], []]


def _one_process(rank: int, world_size: int, batch_size: int = 8) -> list[str]:
    import warnings

    import lightning_pipe  # noqa: F401
    from tests.lightning_models import Regressor, regression_data

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer("pipedream", 1, max_steps=1).fit(Regressor(), regression_data(1, batch_size=batch_size))
    return [str(warning.message) for warning in caught]


@pytest.mark.timeout(120)
def test_a_pipeline_of_one_process_says_nothing_is_pipelined() -> None:
    """devices=1 (or devices left out on CPU, 'auto': 1) trained as a one-stage pipeline without a word (found by
    review: a newcomer who forgot devices=2 believed the model pipelined)."""
    messages = run_ranks(_one_process, 1, timeout=100)[0]
    assert any(message.startswith("PipelineStrategy on one process: the whole model is one stage")
               for message in messages), messages
    assert not any("micro-batches of one row" in message for message in messages), messages


@pytest.mark.timeout(120)
def test_a_batch_of_fewer_rows_than_microbatches_is_said_to_run_one_row_each() -> None:
    """num_microbatches=4 (the default) on batches of 3 rows ran 3 micro-batches of one row without a word (found by
    review: the setting lowered silently)."""
    messages = run_ranks(_one_process, 1, 3, timeout=100)[0]
    said = [message for message in messages if "micro-batches of one row" in message]
    assert len(said) == 1 and "num_microbatches=4, but the first training batch has 3 rows" in said[0], messages


def _empty_at_set_up(rank: int, world_size: int) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    import lightning_pipe  # noqa: F401
    from tests.lightning_models import NoSequence

    class Rollouts(NoSequence):  # fills its dataset's list in a hook, as an RL loop gathers rollouts
        def __init__(self) -> None:
            super().__init__()
            self.memory: list[Any] = []

        def on_train_epoch_start(self) -> None:
            self.memory.extend((torch.randn(16), torch.randn(16)) for _ in range(8))

        def train_dataloader(self) -> Any:
            return DataLoader(self.memory, batch_size=4)

    trainer = L.Trainer(strategy="pipedream", accelerator="cpu", devices=1, max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Rollouts())


@pytest.mark.timeout(120)
def test_a_loader_filled_by_a_hook_is_said_to_be_read_before_the_hooks() -> None:
    """Data made in on_train_epoch_start (an RL loop's rollouts) was said to be "empty: give the Trainer data, or make
    the model one nn.Sequential", neither of which helps (found by review): the first batch is read at set-up."""
    error = run_ranks(_empty_at_set_up, 1, timeout=100, expect_failure=True)[0]
    assert error is not None and "train_dataloader is empty" in error, error
    assert "read at set-up, before any hook of the run" in error and "on_train_epoch_start" in error, error


def _saved_after_testing_a_loaded_module(rank: int, world_size: int, tmp: str) -> None:
    from tests.lightning_models import Regressor, regression_data

    torch.manual_seed(0)
    trainer = _trainer("pipedream" if world_size > 1 else "auto", world_size, max_steps=2)
    trainer.fit(Regressor(num_layers=4), regression_data())
    trainer.save_checkpoint(os.path.join(tmp, "fit.ckpt"))
    best = Regressor.load_from_checkpoint(os.path.join(tmp, "fit.ckpt"))
    trainer.test(best, regression_data())
    trainer.save_checkpoint(os.path.join(tmp, "after_test.ckpt"))


@pytest.mark.timeout(180)
def test_a_checkpoint_saved_after_testing_a_loaded_module_numbers_the_fits_optimizer_as_one_device(
        tmp_path: Path) -> None:
    """After trainer.test(best) of a module loaded from a checkpoint, the trainer's module is another than the fit's
    optimizer was made for: its states were numbered by this rank's share, and one device could not resume the file
    (found by review: 'a parameter group that doesn't match the size')."""
    from tests.lightning_models import Regressor, regression_data

    run_ranks(_saved_after_testing_a_loaded_module, 2, str(tmp_path), timeout=150)
    saved = torch.load(tmp_path / "after_test.ckpt", weights_only=False)
    parameters = len(list(Regressor(num_layers=4).parameters()))
    assert [group["params"] for group in saved["optimizer_states"][0]["param_groups"]] == [list(range(parameters))]
    _trainer("auto", 1, max_steps=3).fit(Regressor(num_layers=4), regression_data(),
                                         ckpt_path=str(tmp_path / "after_test.ckpt"))  # one device resumes it
