"""Trainer with PipeDream's asynchronous schedules (pipedream_async, pipedream_2bw, vertical sync) on 2 gloo ranks
equals the bare engine run on the same model, data and optimizer; counters, logged loss, drains before validation,
checkpoints and the end of epochs; resuming; and the combinations the strategy refuses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import StrategyRegistry

import lightning_pipe  # noqa: F401 - registers the strategy names
from lightning_pipe import PipelineStrategy
from tests.helpers import run_ranks
from tests.lightning_models import Regressor

# name: (strategy, Regressor options, schedule and vertical_sync of the engine run it must equal)
CASES: dict[str, tuple[Any, dict[str, Any], dict[str, Any]]] = {
    "async": ("pipedream_async", {"optimizer": "adam", "scheduler": True}, {"schedule": "async_1f1b"}),
    "2bw": ("pipedream_2bw", {"optimizer": "adam", "scheduler": True}, {"schedule": "2bw"}),
    "vertical": ({"schedule": "async_1f1b", "vertical_sync": True}, {}, {"schedule": "async_1f1b",
                                                                         "vertical_sync": True}),
}
EPOCHS, BATCHES, MICROBATCHES = 2, 6, 4
CHECKPOINT_EVERY, VALIDATE_EVERY = 4, 3  # global steps 4, 8, 12 and epoch batches 3, 6: drains at 3 4 6 8 9 12


def _data() -> tuple[Any, Any]:
    from tests.lightning_models import regression_data

    return regression_data(BATCHES, batch_size=8), regression_data(1, batch_size=8, seed=3)


def _fit(case: str, world_size: int, tmp: str) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    strategy, options, _ = CASES[case]
    if isinstance(strategy, dict):
        strategy = PipelineStrategy(**strategy)

    class Watch(L.Callback):
        def __init__(self) -> None:
            self.steps, self.losses, self.logged, self.optimizer_steps, self.validation = [], [], [], [], []
            self.count = 0

        def on_before_optimizer_step(self, *args: Any) -> None:
            self.count += 1

        def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, *args: Any) -> None:
            self.steps.append(trainer.global_step)
            self.losses.append(float(outputs["loss"]))
            self.logged.append(float(trainer.logged_metrics["train_loss_step"]))
            self.optimizer_steps.append(self.count)

        def on_validation_end(self, trainer: L.Trainer, module: Any) -> None:
            self.validation.append(float(trainer.callback_metrics["val_loss"]))

    watch = Watch()
    checkpoints = ModelCheckpoint(dirpath=os.path.join(tmp, case), filename="{step}", save_top_k=-1,
                                  every_n_train_steps=CHECKPOINT_EVERY)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_epochs=EPOCHS, logger=False,
                        callbacks=[watch, checkpoints], val_check_interval=VALIDATE_EVERY, limit_val_batches=1,
                        num_sanity_val_steps=0, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False)
    model = Regressor(**options)
    trainer.fit(model, *_data())
    return {"state": model.state_dict(), "steps": watch.steps, "losses": watch.losses, "logged": watch.logged,
            "optimizer_steps": watch.optimizer_steps, "total_steps": watch.count, "validation": watch.validation}


def _engine(case: str) -> dict[str, Any]:
    """The same training with the bare engine: train_step(optimizer_step=opt.step), flush where the Trainer drains."""
    import torch.distributed as dist

    from lightning_pipe.engine.executor import Pipeline

    _, options, engine_options = CASES[case]
    model = Regressor(**options)
    pipe = Pipeline(model.layers, num_microbatches=MICROBATCHES, loss_fn=lambda out, mb: F.mse_loss(out, mb[1]),
                    **engine_options)
    if options.get("optimizer") == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(pipe.parameters(), lr=model.hparams.lr)
    else:
        optimizer = torch.optim.SGD(pipe.parameters(), lr=model.hparams.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7) if options.get("scheduler") else None
    train, validation = _data()
    losses, validation_losses, checkpoints, step = [], [], {}, 0
    for _ in range(EPOCHS):
        for index, batch in enumerate(train):
            loss = pipe.train_step(batch, optimizer_step=optimizer.step)
            step += 1
            if scheduler is not None:
                scheduler.step()
            validating = (index + 1) % VALIDATE_EVERY == 0
            if step % CHECKPOINT_EVERY == 0 or validating or index == BATCHES - 1:
                pipe.flush()
            if step % CHECKPOINT_EVERY == 0:
                checkpoints[step] = {k: v.clone() for k, v in pipe.state_dict().items()}
            if validating:
                validation_losses.append(pipe.eval_step(next(iter(validation)))[0])
            losses.append(loss)
    box = [(losses, validation_losses)]
    last = dist.get_global_rank(pipe.group, pipe.stage_to_rank[-1])
    dist.broadcast_object_list(box, src=last)
    losses, validation_losses = box[0]
    return {"state": pipe.state_dict(), "losses": [float(x) for x in losses], "checkpoints": checkpoints,
            "validation": [float(x) for x in validation_losses]}


def _compare_on_ranks(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    results = {}
    for case in CASES:
        fitted = _fit(case, world_size, tmp)
        results[case] = {"fit": fitted, "engine": _engine(case)}
        if rank == 0:
            results[case]["files"] = {name: torch.load(os.path.join(tmp, case, name), weights_only=False)
                                      for name in sorted(os.listdir(os.path.join(tmp, case)))}
    return results


def _unprefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("layers."): v for k, v in state.items() if k.startswith("layers.")}


@pytest.mark.timeout(120)
def test_trainer_equals_the_engine_run_alone(tmp_path: Path) -> None:
    """Final weights, every checkpoint, every validation loss and the logged loss of each step equal the bare engine's
    with flushes at the Trainer's drains (validation, checkpoint, end of epoch); one Lightning step is one batch."""
    results = run_ranks(_compare_on_ranks, 2, str(tmp_path), timeout=110)
    steps = EPOCHS * BATCHES
    for case in CASES:
        for rank, result in enumerate(results):
            fit, engine = result[case]["fit"], result[case]["engine"]
            got = _unprefixed(fit["state"])
            assert got.keys() == engine["state"].keys() and got, (case, rank)
            for key, value in engine["state"].items():
                torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=f"{case} rank {rank} {key}")
            assert fit["steps"] == list(range(1, steps + 1)), case  # global_step: one per batch
            assert fit["losses"] == pytest.approx(engine["losses"], rel=1e-6), case  # batch k's loss at step k
            assert fit["logged"] == pytest.approx(engine["losses"], rel=1e-6), case
            assert fit["validation"] == pytest.approx(engine["validation"], rel=1e-6), case  # on drained weights
            assert len(fit["validation"]) == steps // VALIDATE_EVERY
            # real optimizer steps: one per micro-batch (async_1f1b) or per batch (2bw); after the first batch the
            # first stage still owes the steps of the micro-batch(es) in flight
            per_batch = 1 if case == "2bw" else MICROBATCHES
            assert fit["total_steps"] == steps * per_batch, case
            owed = 0 if rank == 1 else 1
            assert fit["optimizer_steps"][0] == per_batch - owed, (case, rank)
        files = results[0][case]["files"]
        assert sorted(files) == [f"step={s}.ckpt" for s in (12, 4, 8)], case
        for step in (4, 8, 12):
            saved = files[f"step={step}.ckpt"]
            assert saved["global_step"] == step
            expected = {**results[0][case]["engine"]["checkpoints"][step],
                        **results[1][case]["engine"]["checkpoints"][step]}
            got = _unprefixed(saved["state_dict"])
            assert got.keys() == expected.keys(), case
            for key, value in expected.items():
                torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=f"{case} step {step} {key}")


class ManualRegressor(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class OwnBackward(Regressor):
    """Overrides the backward, which no pipeline calls."""

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        (loss * 2).backward(*args, **kwargs)


class NormClipping(Regressor):
    """Clips by norm from its own hook, which an asynchronous pipeline cannot do."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")


def _resume_and_refuse(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint

    from tests.lightning_models import TiedLM, regression_data, token_data

    def trainer(strategy: str, **options: Any) -> L.Trainer:
        defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "enable_checkpointing": False, "num_sanity_val_steps": 0}
        return L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, **{**defaults, **options})

    def fit(epochs: int, callbacks: list, ckpt_path: str | None = None, strategy: Any = "pipedream_2bw") -> Regressor:
        model = Regressor(optimizer="adam", scheduler=True)
        trainer(strategy, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=bool(callbacks)).fit(
            model, regression_data(5), ckpt_path=ckpt_path)
        return model

    uninterrupted = fit(2, [])
    checkpointing = ModelCheckpoint(dirpath=tmp, filename="{epoch}")
    fit(1, [checkpointing])
    resumed = fit(2, [], ckpt_path=checkpointing.best_model_path)
    from lightning_pipe import PipelineStrategy  # the same with a sharded checkpoint (written after the drain too)

    sharded = lambda: PipelineStrategy(schedule="2bw", checkpoint_format="sharded")  # noqa: E731
    sharded_checkpointing = ModelCheckpoint(dirpath=os.path.join(tmp, "sharded"), filename="{epoch}")
    fit(1, [sharded_checkpointing], strategy=sharded())
    resumed_sharded = fit(2, [], ckpt_path=sharded_checkpointing.best_model_path, strategy=sharded())

    attempts = [
        (Regressor, "pipedream_async", regression_data, {"accumulate_grad_batches": 2}),
        # one that accumulates from the second epoch (its counts set at each epoch's start)
        (Regressor, "pipedream_2bw", regression_data, {"callbacks": [GradientAccumulationScheduler({0: 1, 1: 2})]}),
        (Regressor, "pipedream_2bw", regression_data, {"gradient_clip_val": 0.5}),
        (TiedLM, "pipedream_async", token_data, {}),
        (ManualRegressor, "pipedream_2bw", regression_data, {}),
        (NormClipping, "pipedream_async", regression_data, {}),  # found at the first optimizer step
        (OwnBackward, "pipedream", regression_data, {}),
    ]
    messages = []
    for make_model, strategy, data, options in attempts:
        try:
            trainer(strategy, max_steps=2, **options).fit(make_model(), data(2))
            messages.append("no error")
        except Exception as error:  # noqa: BLE001 - the test reads the message
            messages.append(f"{type(error).__name__}: {error}")
    return {"uninterrupted": uninterrupted.state_dict(), "resumed": resumed.state_dict(), "messages": messages,
            "resumed_sharded": resumed_sharded.state_dict()}


@pytest.mark.timeout(150)
def test_resume_at_an_epoch_end_and_refused_combinations(tmp_path: Path) -> None:
    """A 2BW fit resumed from its end-of-epoch checkpoint equals the uninterrupted fit (the checkpoint holds the
    drained weights and each rank's optimizer state), with either checkpoint format; refused combinations fail on every
    rank with a fix."""
    expected = ["remove accumulate_grad_batches=2", "remove the GradientAccumulationScheduler (accumulating 2",
                "use gradient_clip_algorithm='value'", "untie them",
                "pipelines once written for automatic optimization", "clip by value (gradient_clip_algorithm='value')",
                "overrides LightningModule.backward, which PipelineStrategy never calls"]
    for rank, result in enumerate(run_ranks(_resume_and_refuse, 2, str(tmp_path), timeout=140)):
        for key, value in result["uninterrupted"].items():
            torch.testing.assert_close(result["resumed"][key], value, rtol=0, atol=1e-6, msg=f"rank {rank} {key}")
            torch.testing.assert_close(result["resumed_sharded"][key], value, rtol=0, atol=1e-6,
                                       msg=f"sharded: rank {rank} {key}")
        assert len(result["messages"]) == len(expected)
        for message, text in zip(result["messages"], expected):
            assert text in message, f"rank {rank}: expected {text!r} in {message!r}"


def test_names_and_arguments() -> None:
    for name, schedule in (("pipedream_async", "async_1f1b"), ("pipedream_2bw", "2bw")):
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, PipelineStrategy) and strategy.schedule == schedule
        assert not strategy.vertical_sync
    assert PipelineStrategy(schedule="async_1f1b", vertical_sync=True).vertical_sync
    with pytest.raises(ValueError, match="vertical_sync=True applies to schedule='async_1f1b'"):
        PipelineStrategy(schedule="2bw", vertical_sync=True)
    with pytest.raises(ValueError, match="runs one stage per rank and takes no schedule_options"):
        PipelineStrategy(schedule="async_1f1b", schedule_options={"virtual_stages": 2})
