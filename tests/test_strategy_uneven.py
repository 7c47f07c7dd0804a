"""Uneven replication under a Trainer (PipeDream's "3-1"): 4 gloo ranks, stage 0 on three of them taking the
micro-batches in turn and stage 1 on the fourth, train, clip, log, validate, checkpoint and resume exactly as one
device does; the cut can be planned for those replicas; layouts that cannot run are refused before launching."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_pipe import PipelineStrategy
from tests.helpers import run_ranks
from tests.lightning_models import MetricsLog, Regressor, token_data
from tests.test_strategy_replicas import _fit, _fit_tied, _trainer
from tests.test_strategy_trainer import _assert_logs_equal, _full_state

LAYOUT = [3, 1]


def _strategy(**options: Any) -> PipelineStrategy:
    return PipelineStrategy(replicas=LAYOUT, **{"partition": [6, 2], **options})


def _uneven(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_pipe  # noqa: F401

    log = MetricsLog()
    model, trainer = _fit(_strategy(), world_size, 1, 2, [log])
    trainer.save_checkpoint(os.path.join(tmp, "final.ckpt"))
    checkpointing = ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_on_train_epoch_end=True)
    _fit(_strategy(), world_size, 1, 1, [checkpointing], enable_checkpointing=True)
    resumed, _ = _fit(_strategy(), world_size, 1, 2, [], ckpt_path=checkpointing.best_model_path)
    planned, planned_trainer = _fit(_strategy(partition="profile", profile_cache=False), world_size, 1, 1, [])
    tied = _fit_tied(PipelineStrategy(replicas=LAYOUT, partition=[3, 2]), world_size, token_data(6, batch_size=4))
    return {"state": model.state_dict(), "resumed": resumed.state_dict(), "planned": planned.state_dict(),
            "cut": planned_trainer.strategy.cut_plan.partition, "tied": tied, "train": log.train,
            "progress": log.progress, "validation": log.validation}


@pytest.mark.timeout(200)
def test_three_one_equals_one_device(tmp_path: Path) -> None:
    """Weights (Adam, an LR scheduler, clipping by the global norm, which counts each stage once), every logged value,
    the checkpoint loaded in a plain program, a resume, a planned cut and a head tied to the embedding."""
    results = run_ranks(_uneven, 4, str(tmp_path), timeout=190)
    log = MetricsLog()
    expected, _ = _fit("auto", 1, 1, 2, [log])
    planned_expected, _ = _fit("auto", 1, 1, 1, [])
    stage0, stage1 = results[0], results[3]
    for what in ("state", "resumed"):
        got = _full_state([stage0[what], stage1[what]])
        for key, value in expected.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"{what} {key}")
    got = _full_state([stage0["planned"], stage1["planned"]])
    for key, value in planned_expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"planned {key}")
    assert all(r["cut"] == stage0["cut"] for r in results) and sum(stage0["cut"]) == 8
    for replica in (1, 2):  # the replicas of stage 0 hold what its first rank holds, after every kind of run
        for what in ("state", "resumed", "planned", "tied"):
            for key, value in stage0[what].items():
                torch.testing.assert_close(results[replica][what][key], value, rtol=0, atol=0, msg=f"{what} {key}")
    tied_expected = _fit_tied("auto", 1, token_data(6, batch_size=4))
    got = _full_state([stage0["tied"], stage1["tied"]])
    for key, value in tied_expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"tied {key}")
    for rank, result in enumerate(results):
        for what in ("train", "progress", "validation"):
            _assert_logs_equal(result[what], getattr(log, what), f"rank {rank} {what}")
    loaded = Regressor.load_from_checkpoint(tmp_path / "final.ckpt", map_location="cpu")
    checkpoint = torch.load(tmp_path / "final.ckpt", weights_only=False)
    assert checkpoint["pipeline"]["layout"]["replicas"] == LAYOUT
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=1e-5, msg=key)


def _planned_replicas(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import lightning_pipe  # noqa: F401
    from tests.lightning_models import FrontHeavy, regression_data

    model = FrontHeavy()
    trainer = _trainer(PipelineStrategy(partition="profile", replicas="auto", profile_cache=False), world_size,
                       max_steps=3, default_root_dir=root)
    trainer.fit(model, regression_data(3, batch_size=16))
    pipeline = trainer.strategy.runner.pipeline
    return {"state": model.state_dict(), "plan": trainer.strategy.cut_plan, "replicas": pipeline.replicas,
            "sizes": list(pipeline.stage_sizes)}


@pytest.mark.timeout(120)
def test_the_planner_chooses_the_replicas(tmp_path: Path) -> None:
    """``replicas="auto"``: rank 0 profiles the first batch, the planner puts the one slow layer on three devices and
    the rest on the fourth, every rank builds that layout, and training equals one device's."""
    from tests.lightning_models import FrontHeavy, regression_data

    results = run_ranks(_planned_replicas, 4, str(tmp_path), timeout=110)
    plan = results[0]["plan"]
    assert plan.replicas == [3, 1], plan.report
    assert plan.partition[0] >= 1 and sum(plan.partition) == 6
    assert all(r["replicas"] == [3, 1] and r["sizes"] == plan.partition for r in results)
    expected = FrontHeavy()
    _trainer("auto", 1, max_steps=3).fit(expected, regression_data(3, batch_size=16))
    got = _full_state([results[0]["state"], results[3]["state"]])
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("options, message", [
    ({"replicas": "auto"}, "replicas='auto' lets the planner choose each stage's replicas together with the cut"),
    ({"replicas": "auto", "partition": "profile", "schedule": "zb_h1"}, "replicas='auto' may replicate stages"),
    ({"replicas": "three"}, "replicas must be a positive integer"),
])
def test_bad_replica_arguments(options: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        PipelineStrategy(**options)


@pytest.mark.parametrize("options, devices, message", [
    ({"replicas": [3, 1]}, 3, "replicas=[3, 1] places 4 ranks, but devices * num_nodes = 3"),
    ({"replicas": [1, 3]}, 4, "the last stage must have one rank"),
    ({"replicas": [3, 1], "num_stages": 3}, 4, "num_stages=3 but replicas=[3, 1] lists 2 stages"),
    ({"replicas": [3, 1], "schedule": "zb_h1"}, 4, "uneven replication (replicas=[3, 1]) runs schedule '1f1b'"),
    ({"replicas": [3, 1], "schedule": "async_1f1b"}, 4, "uneven replication (replicas=[3, 1]) runs schedule '1f1b'"),
    ({"replicas": [3, 1], "schedule": "auto"}, 4, "uneven replication (replicas=[3, 1]) runs schedule '1f1b'"),
])
def test_uneven_layouts_that_cannot_run_fail_before_launching(options: dict[str, Any], devices: int,
                                                              message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _trainer(PipelineStrategy(**options), devices)
