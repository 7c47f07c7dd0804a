"""Planned cuts under the Trainer on 2 CPU ranks: ``partition="profile"`` and ``schedule="auto"`` plan on rank 0 from a
profile of the first batch, every rank cuts alike, training equals one device's, and a memory cap that nothing fits
fails on every rank."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_ranks

STRATEGIES: dict[str, dict[str, Any]] = {
    "profile": {"partition": "profile", "num_microbatches": 4},
    "auto": {"schedule": "auto", "num_microbatches": 4},
}


def _trainer(strategy: Any, devices: int, root: str, **options: Any) -> Any:
    import lightning as L

    from lightning_pipe import PipelineStrategy

    if isinstance(strategy, dict):
        strategy = PipelineStrategy(**strategy)
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=root, **options)


def _fit(strategy: Any, devices: int, root: str) -> dict[str, Any]:
    from tests.lightning_models import UnevenRegressor, regression_data

    model = UnevenRegressor()
    trainer = _trainer(strategy, devices, root, max_steps=3)
    trainer.fit(model, regression_data(3, batch_size=16))
    result: dict[str, Any] = {"state": model.state_dict()}
    if devices > 1:
        runner = trainer.strategy.runner
        result.update(partition=[int(n) for n in runner.pipeline.stage_sizes],
                      schedule=runner.config.schedule, num_microbatches=runner.config.num_microbatches,
                      plan=trainer.strategy.cut_plan)
    return result


def _plan_on_ranks(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import lightning_pipe  # noqa: F401 - registers the strategy names
    from tests.lightning_models import UnevenRegressor, regression_data

    results: dict[str, Any] = {name: _fit(strategy, world_size, root) for name, strategy in STRATEGIES.items()}
    errors = []
    for strategy in ({"partition": "profile", "memory_cap": 1000}, {"schedule": "auto", "memory_cap": 1000}):
        try:
            _trainer(strategy, world_size, root, max_steps=1).fit(UnevenRegressor(), regression_data(1, batch_size=16))
        except Exception as error:  # noqa: BLE001 - the test reads the message
            errors.append(f"{type(error).__name__}: {error}")
        else:
            errors.append("no error")
    results["errors"] = errors
    return results


@pytest.mark.timeout(180)
def test_planned_cuts_agree_on_every_rank_and_train_as_one_device(tmp_path: Path) -> None:
    root = str(tmp_path)
    results = run_ranks(_plan_on_ranks, 2, root, timeout=160)
    reference = _fit("auto", 1, str(tmp_path / "reference"))["state"]
    assert any(name.startswith("profile-") for name in os.listdir(tmp_path / ".lightning_pipe_profiles"))

    for name in STRATEGIES:
        first, second = results[0][name], results[1][name]
        assert (first["partition"], first["schedule"], first["num_microbatches"]) == (
            second["partition"], second["schedule"], second["num_microbatches"]), name
        assert first["plan"] == second["plan"] and first["plan"].partition == first["partition"], name
        got: dict[str, torch.Tensor] = {**first["state"], **second["state"]}
        assert got.keys() == reference.keys(), name
        for key, value in reference.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"{name} {key}")

    profiled = results[0]["profile"]
    assert profiled["schedule"] == "1f1b" and profiled["num_microbatches"] == 4
    assert profiled["partition"] == [7, 1], "the heavy last layer should get a stage to itself (uniform: [4, 4])"
    auto = results[0]["auto"]
    assert auto["schedule"] in ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v")
    assert 1 <= auto["num_microbatches"] <= 16

    for rank, result in enumerate(results):  # rank 0 raises the planner's error, the others a ValueError with its text
        profile_error, auto_error = result["errors"]
        assert profile_error.startswith("MemoryCapError" if rank == 0 else "ValueError"), profile_error
        assert "Raise memory_cap to at least" in profile_error, f"rank {rank}: {profile_error}"
        assert auto_error.startswith("ValueError") and "Raise memory_cap" in auto_error, f"rank {rank}: {auto_error}"


def test_planning_arguments_are_checked_where_they_enter() -> None:
    from lightning_pipe import PipelineStrategy

    cases = [
        ({"partition": "fastest"}, "'profile', 'time', 'memory'"),
        ({"partition": "memory"}, "partition='memory' needs memory_cap="),
        ({"memory_cap": 1e9}, "memory_cap applies to planned cuts"),
        ({"partition": "profile", "memory_cap": -1}, "memory_cap must be a number of bytes"),
        ({"schedule": "auto", "partition": [3, 5]}, "schedule='auto' chooses the partition"),
        ({"schedule": "auto", "schedule_options": {"virtual_stages": 2}}, "takes no schedule_options"),
        ({"schedule": "fastest"}, "or 'auto' to let the planner choose"),
        ({"partition": "profile", "profile_cache": 3}, "profile_cache must be a folder path"),
        # found by review: refused on every rank after the profile, in the planner's words (method='time')
        ({"schedule": "zb_v", "partition": "profile"}, "runs 2 stages per rank: use partition='time' with it"),
        ({"schedule": "interleaved_1f1b", "partition": "memory", "memory_cap": 1e9,
          "schedule_options": {"virtual_stages": 3}}, "runs 3 stages per rank: use partition='time' with it"),
    ]
    for arguments, message in cases:
        with pytest.raises((ValueError, TypeError)) as caught:
            PipelineStrategy(**arguments)
        assert message in str(caught.value), (arguments, str(caught.value))
    assert PipelineStrategy(schedule="auto", memory_cap=2e8).memory_cap == 2e8
    assert PipelineStrategy(partition="time").plans_cut and not PipelineStrategy().plans_cut
    assert PipelineStrategy(schedule="zb_v", partition="time").plans_cut
