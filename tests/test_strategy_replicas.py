"""Pipeline x data parallel: 4 gloo ranks as 2 stages x 2 replicas train, clip, log, validate and checkpoint exactly as
one device does with the replicas' batches together; a two-"node" torchrun launch on loopback; layouts refused."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_pipe import PipelineStrategy
from tests.helpers import run_ranks, run_torchrun_nodes
from tests.lightning_models import MetricsLog, Regressor, regression_data
from tests.test_strategy_trainer import _assert_logs_equal, _full_state

REPLICAS = 2
# One device reads batches of 16 rows; each replica reads every other row of them (DistributedSampler), 8 at a time.
TRAIN, VALIDATION = (3, 16), (2, 6)


def one_device_loader(batches: int, rows: int, data: Any = regression_data) -> Any:
    """What one device reads when the replicas' batches are put together: Lightning always shuffles the training
    data it hands to replicas (``DistributedSampler(shuffle=True)``, reseeded each epoch, its seed
    ``PL_GLOBAL_SEED`` or 0), so the one device draws the same permutation and reads it ``rows`` at a time."""
    from torch.utils.data import DataLoader, DistributedSampler

    dataset = data(batches, batch_size=rows).dataset
    seed = int(os.getenv("PL_GLOBAL_SEED", "0"))  # Lightning's rule; ranks inherit this process's environment
    return DataLoader(dataset, batch_size=rows, sampler=DistributedSampler(dataset, num_replicas=1, rank=0, seed=seed))


@pytest.mark.parametrize("global_seed", [None, "77"])
def test_one_device_reads_the_rows_lightning_deals_the_replicas(global_seed: str | None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference's order is the replicas' together whatever ``PL_GLOBAL_SEED`` is: Lightning seeds the sampler it
    injects from it, and ranks inherit it (left set by a test's ``seed_everything``, the two-node test once read
    another shuffle than its reference and failed by ~1e-4)."""
    from lightning.pytorch.trainer.connectors import data_connector

    if global_seed is None:
        monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    else:
        monkeypatch.setenv("PL_GLOBAL_SEED", global_seed)
    (batches, rows), loader = TRAIN, regression_data(TRAIN[0] * REPLICAS, batch_size=TRAIN[1] // REPLICAS)
    # each replica's order, from the function with which fit gives it its sampler
    dealt = [list(data_connector._get_distributed_sampler(loader, shuffle=True, overfit_batches=0,
                                                          num_replicas=REPLICAS, rank=r)) for r in range(REPLICAS)]
    assert list(one_device_loader(batches, rows).sampler) == [i for row in zip(*dealt) for i in row]


def _fit_tied(strategy: Any, devices: int, loader: Any) -> dict[str, torch.Tensor]:
    """A head tied to the embedding across the stages of each replica, clipped by the global norm."""
    from tests.lightning_models import TiedLM

    model = TiedLM()
    _trainer(strategy, devices, max_epochs=1, gradient_clip_val=0.5).fit(model, loader)
    return model.state_dict()


def _fit_counted(strategy: Any, devices: int, loader: Any) -> tuple[dict[str, torch.Tensor], float]:
    """A class-weighted loss, a mean over the labels' weights, told with ``loss_reduction``: weighted by each
    micro-batch's share of the whole batch's weights, over both replicas; the weights and the last logged loss."""
    from tests.citizen_models import FineTuned

    torch.manual_seed(5)  # not seed_everything: its PL_GLOBAL_SEED would reseed the replicas' shuffle
    model = FineTuned()
    trainer = _trainer(strategy, devices, max_epochs=1)
    trainer.fit(model, loader)
    return model.state_dict(), float(trainer.callback_metrics["train_loss"])


def _class_weights(batch: Any) -> torch.Tensor:
    from tests.citizen_models import CLASS_WEIGHTS

    return torch.tensor(CLASS_WEIGHTS)[batch[1]].sum()


def _trainer(strategy: Any, devices: int, **options: Any) -> L.Trainer:
    defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1}
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, **{**defaults, **options})


def _loaders(replicas: int) -> tuple[Any, Any]:
    (batches, rows), (val_batches, val_rows) = TRAIN, VALIDATION
    train = one_device_loader(batches, rows) if replicas == 1 else regression_data(batches * replicas,
                                                                                  batch_size=rows // replicas)
    return train, regression_data(val_batches * replicas, batch_size=val_rows // replicas, seed=3)


def _fit(strategy: Any, devices: int, replicas: int, epochs: int, callbacks: list, ckpt_path: str | None = None,
         **options: Any) -> tuple[Regressor, L.Trainer]:
    model = Regressor(optimizer="adam", scheduler=True)
    trainer = _trainer(strategy, devices, max_epochs=epochs, callbacks=callbacks, gradient_clip_val=0.3,
                       limit_val_batches=2, val_check_interval=2, **options)
    trainer.fit(model, *_loaders(replicas), ckpt_path=ckpt_path)
    return model, trainer


def _replicated(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_pipe  # noqa: F401
    from tests.lightning_models import token_data

    log = MetricsLog()
    model, trainer = _fit(PipelineStrategy(num_stages=2), world_size, REPLICAS, 2, [log])
    trainer.save_checkpoint(os.path.join(tmp, "final.ckpt"))
    checkpointing = ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_on_train_epoch_end=True)
    _fit(PipelineStrategy(num_stages=2), world_size, REPLICAS, 1, [checkpointing], enable_checkpointing=True)
    resumed, _ = _fit(PipelineStrategy(replicas=2), world_size, REPLICAS, 2, [],
                      ckpt_path=checkpointing.best_model_path)
    strategy = trainer.strategy
    tied = _fit_tied(PipelineStrategy(num_stages=2), world_size, token_data(6, batch_size=3))
    from tests.citizen_models import class_data

    counted = _fit_counted(PipelineStrategy(num_stages=2, loss_reduction=_class_weights), world_size,
                           class_data(6, batch_size=4))
    return {"state": model.state_dict(), "tied": tied, "counted": counted, "resumed": resumed.state_dict(),
            "train": log.train,
            "progress": log.progress, "validation": log.validation, "path": checkpointing.best_model_path,
            "sampler": strategy.distributed_sampler_kwargs, "pipeline": strategy.runner.pipeline.rank}


@pytest.mark.timeout(200)
def test_two_stages_by_two_replicas_equal_one_device(tmp_path: Path) -> None:
    """Weights (with Adam, an LR scheduler and clipping by the global norm over the mesh), every logged value on
    rank 0 (loss, max, torchmetrics, validation), the written checkpoint, a resume from an epoch's checkpoint, a
    model whose head is tied to its embedding across stages, and a class-weighted loss told with loss_reduction."""
    results = run_ranks(_replicated, 4, str(tmp_path), timeout=190)
    log = MetricsLog()
    expected, _ = _fit("auto", 1, 1, 2, [log])
    assert [r["sampler"] for r in results] == [{"num_replicas": 2, "rank": r % 2} for r in range(4)]
    assert [r["pipeline"] for r in results] == [0, 0, 1, 1]  # rank = pipeline rank * replicas + replica
    for replica in range(REPLICAS):
        got = _full_state([results[replica]["state"], results[REPLICAS + replica]["state"]])
        resumed = _full_state([results[replica]["resumed"], results[REPLICAS + replica]["resumed"]])
        for key, value in expected.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"replica {replica} {key}")
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-5, msg=f"resumed {replica} {key}")
    from tests.lightning_models import token_data

    tied = _fit_tied("auto", 1, one_device_loader(3, 6, token_data))
    for replica in range(REPLICAS):
        got = _full_state([results[replica]["tied"], results[REPLICAS + replica]["tied"]])
        for key, value in tied.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"tied, replica {replica} {key}")
    from tests.citizen_models import class_data

    counted, logged = _fit_counted("auto", 1, one_device_loader(3, 8, class_data))
    for replica in range(REPLICAS):
        got = _full_state([results[replica]["counted"][0], results[REPLICAS + replica]["counted"][0]])
        for key, value in counted.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"counted, replica {replica} {key}")
    for result in results:  # the replicas' logged loss weighs each replica's share by its count
        assert result["counted"][1] == pytest.approx(logged, rel=1e-5)
    for rank, result in enumerate(results):  # every rank logs the whole batch's values; rank 0's reach the loggers
        for what in ("train", "progress", "validation"):
            _assert_logs_equal(result[what], getattr(log, what), f"rank {rank} {what}")
    loaded = Regressor.load_from_checkpoint(tmp_path / "final.ckpt", map_location="cpu")
    checkpoint = torch.load(tmp_path / "final.ckpt", weights_only=False)
    assert len(checkpoint["pipeline"]["optimizer_states"]) == 2  # one per pipeline rank: replicas hold the same
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=1e-5, msg=key)


SCRIPT = '''
import atexit, os, sys
import torch
import lightning as L
import lightning_pipe
from lightning_pipe import PipelineStrategy
from tests.lightning_models import Regressor, regression_data

def _at_exit():  # registered first, so it runs last: after lightning_pipe's own exit handler
    with open(os.path.join(sys.argv[1], f"exit{os.environ['RANK']}.txt"), "w") as file:
        file.write(str(torch.distributed.is_initialized()))
atexit.register(_at_exit)

model = Regressor()
trainer = L.Trainer(strategy=PipelineStrategy(num_stages=2), accelerator="cpu", devices=2, num_nodes=2, max_steps=3,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, regression_data(6, batch_size=8))
torch.save({"state": model.state_dict(), "world_size": trainer.world_size, "node_rank": trainer.node_rank},
           os.path.join(sys.argv[1], f"rank{trainer.global_rank}.pt"))
'''


@pytest.mark.timeout(300)
def test_two_nodes_launched_by_torchrun_on_loopback(tmp_path: Path) -> None:
    """``torchrun --nnodes 2`` twice (node ranks 0 and 1) on 127.0.0.1: 2 stages x 2 replicas across the "nodes"."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run_torchrun_nodes(script, str(tmp_path))

    reference = Regressor()
    _trainer("auto", 1, max_steps=3).fit(reference, one_device_loader(3, 16))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(4)]
    assert [(r["world_size"], r["node_rank"]) for r in ranks] == [(4, 0), (4, 0), (4, 1), (4, 1)]
    # each process destroyed its process group at exit, while the interpreter was whole (left to finalization,
    # gloo's threads once aborted a finished node: "terminate called without an active exception")
    assert [(tmp_path / f"exit{rank}.txt").read_text() for rank in range(4)] == ["False"] * 4
    for replica in range(2):
        full = _full_state([ranks[replica]["state"], ranks[2 + replica]["state"]])
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(full[key], value, rtol=0, atol=1e-5,
                                       msg=lambda text, r=replica, k=key: f"replica {r} {k}: {text}")


@pytest.mark.parametrize("options, devices, message", [
    ({"num_stages": 3}, 4, "num_stages=3 does not divide the 4 devices"),
    ({"replicas": 3}, 4, "replicas=3 does not divide the 4 devices"),
    ({"num_stages": 2, "replicas": 1}, 4, "num_stages=2 x replicas=1 = 2 ranks, but devices * num_nodes = 4"),
    ({"replicas": [2, 2]}, 8, "num_stages=2 x replicas=2 = 4 ranks, but devices * num_nodes = 8"),
    ({"replicas": [2, 2], "num_stages": 4}, 4, "num_stages=4 but replicas=[2, 2] lists 2 stages"),
])
def test_unsupported_layouts_fail_before_launching(options: dict[str, Any], devices: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _trainer(PipelineStrategy(**options), devices)


def _asynchronous(rank: int, world_size: int, schedule: str) -> dict[str, torch.Tensor]:
    import lightning_pipe  # noqa: F401

    replicas = world_size // 2
    model = Regressor(optimizer="adam")
    loader = one_device_loader(3, 16) if replicas == 1 else regression_data(3 * replicas, batch_size=16 // replicas)
    _trainer(PipelineStrategy(schedule=schedule, num_stages=2), world_size, max_epochs=1).fit(model, loader)
    return model.state_dict()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("schedule", ["async_1f1b", "2bw"])
def test_asynchronous_replicas_equal_one_pipeline_on_their_batches_together(schedule: str) -> None:
    """PipeDream's asynchronous schedules on 2 stages x 2 replicas: the replicas average their gradients at every
    optimizer step inside the pipeline, so they equal one 2-stage pipeline reading both replicas' rows (micro-batch
    ``i`` of a replica is half of micro-batch ``i`` of the whole batch: the sampler deals rows out in turn)."""
    replicated = run_ranks(_asynchronous, 4, schedule, timeout=140)
    alone = run_ranks(_asynchronous, 2, schedule, timeout=140)
    expected = _full_state(alone)
    moved = max((expected[k] - v).abs().max().item() for k, v in Regressor(optimizer="adam").state_dict().items())
    assert moved > 1e-3
    for replica in range(REPLICAS):
        got = _full_state([replicated[replica], replicated[REPLICAS + replica]])
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"{schedule} replica {replica} {key}")


def test_equal_counts_per_stage_are_even_replication() -> None:
    assert PipelineStrategy(replicas=[2, 2]).settings.replicas == (2, 2)  # a list names the stages: 2 stages x 2
    assert PipelineStrategy(replicas=[3, 1]).settings.replicas == (3, 1)  # uneven: tests/test_strategy_uneven.py
