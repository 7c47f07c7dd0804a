"""Sharded checkpoints (checkpoint_format="sharded"): written by every rank, resumed exactly on another layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_ranks

SEED = 7
# name: (PipelineStrategy arguments, devices, batch size per replica); every layout trains on batches of 8 rows
LAYOUTS: dict[str, tuple[dict[str, Any], int, int]] = {
    "4": ({}, 4, 8),
    "2": ({}, 2, 8),
    "2-front": ({"partition": [2, 6]}, 2, 8),
    "2x2": ({"num_stages": 2}, 4, 4),
    "3-1": ({"replicas": [3, 1]}, 4, 8),
}
# NOISE: the step code draws random numbers for each micro-batch; a replica's micro-batches hold other rows than a
# single pipeline's, so runs that pass through 2x2 draw none (and the 2x2 run equals the single pipeline's).


def _trainer(layout: str, checkpoint_format: str = "sharded", **options: Any) -> Any:
    import lightning as L

    from lightning_pipe import PipelineStrategy

    arguments, devices, _ = LAYOUTS[layout]
    strategy = PipelineStrategy(num_microbatches=4, checkpoint_format=checkpoint_format, **arguments)
    defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False, "num_sanity_val_steps": 0, "max_epochs": 2,
                "use_distributed_sampler": False}  # the replicas' samplers: see _loader
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, **{**defaults, **options})


def _loader(layout: str, trainer: Any) -> Any:
    """16 rows, 2 steps an epoch on every layout, in order: a replica reads every other row of each 8 (as a
    ``DistributedSampler`` without shuffling does), so that the replicas' batches together are a single pipeline's."""
    from torch.utils.data import DataLoader, DistributedSampler

    from tests.lightning_models import regression_data

    batch_size = LAYOUTS[layout][2]
    dataset = regression_data(2, batch_size=8).dataset
    if batch_size == 8:
        return DataLoader(dataset, batch_size=8)
    strategy = trainer.strategy
    replica = strategy.mesh_shape.coordinates(trainer.global_rank)[1]
    sampler = DistributedSampler(dataset, num_replicas=8 // batch_size, rank=replica, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def _fit(layout: str, epochs: int, noise: float, ckpt_path: str | None = None,
         checkpoints: str | None = None, checkpoint_format: str = "sharded") -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.big_models import EMA, LazyRegressor

    L.seed_everything(SEED)
    ema = EMA()
    callbacks: list[Any] = [ema]
    if checkpoints is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=2, monitor="train_loss"))
    trainer = _trainer(layout, checkpoint_format, max_epochs=epochs, callbacks=callbacks, enable_checkpointing=checkpoints is not None)
    model = LazyRegressor(noise=noise)  # built in configure_model(), on the meta device; noise: the step code's RNG
    trainer.fit(model, _loader(layout, trainer), ckpt_path=ckpt_path)
    first_replica = trainer.strategy.mesh_shape.coordinates(trainer.global_rank)[1] == 0
    return {"state": model.state_dict() if first_replica else {}, "ema": ema.shadow if first_replica else {},
            "local": sorted(name for name, _ in model.named_parameters()), "step": trainer.global_step}


def _run(rank: int, world_size: int, tmp: str, jobs: list[tuple[str, ...]]) -> dict[str, Any]:
    import lightning_pipe  # noqa: F401

    results: dict[str, Any] = {}
    for job in jobs:
        if job[0] == "full":  # the same, with checkpoint_format="full", on the same layout
            layout, folder = job[1], os.path.join(tmp, f"full-{job[1]}")
            _fit(layout, 1, 0.01, checkpoints=folder, checkpoint_format="full")
            results[f"files full-{layout}"] = sorted(os.listdir(folder))
            results[f"uninterrupted {layout} from full-{layout}"] = _fit(layout, 2, 0.01, checkpoint_format="full")
            results[f"resumed {layout} from full-{layout}"] = _fit(layout, 2, 0.01, ckpt_path="last", checkpoints=folder,
                                                                   checkpoint_format="full")
            other = job[2]  # and on another layout: named optimizer states, the callbacks merged
            results[f"uninterrupted {other} from full-{layout}"] = _fit(other, 2, 0.01, checkpoint_format="full")
            results[f"resumed {other} from full-{layout}"] = _fit(other, 2, 0.01, ckpt_path=os.path.join(folder, "last.ckpt"),
                                                                  checkpoint_format="full")
        elif job[0] == "write":  # one epoch, with a sharded checkpoint at its end
            layout = job[1]
            noise = 0.0 if layout in ("2x2", "3-1") else 0.01  # see NOISE
            results[f"write {layout}"] = _fit(layout, 1, noise, checkpoints=os.path.join(tmp, layout))
            results[f"files {layout}"] = sorted(os.listdir(os.path.join(tmp, layout)))
        else:  # on layout `reader`: two epochs, and one epoch more from the checkpoint `writer` wrote
            reader, writer = job[1], job[2]
            noise = 0.0 if {reader, writer} & {"2x2", "3-1"} else 0.01
            results[f"uninterrupted {reader} from {writer}"] = _fit(reader, 2, noise)
            resumed = _fit(reader, 2, noise, ckpt_path="last", checkpoints=os.path.join(tmp, writer))
            results[f"resumed {reader} from {writer}"] = resumed
    return results


def _gathered(results: list[dict[str, Any]], key: str, part: str) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    for result in results:
        full.update(result[key][part])
    return full


@pytest.mark.timeout(420)
def test_sharded_checkpoints_resume_exactly_on_other_layouts(tmp_path: Path) -> None:
    """4 stages -> 2, 2 -> 4, 2x2 -> 4x1, 2 (uniform) -> 2 (partition [2, 6]), [3, 1] -> 2x2: the weights, Adam, the LR
    scheduler, the loops and the EMA callback's shadow weights come back, and the steps after resuming equal the
    uninterrupted run's on the new layout (1e-5). ModelCheckpoint(save_last=True, save_top_k=2), fit(ckpt_path='last'),
    also with checkpoint_format='full' (on the same layout)."""
    tmp = str(tmp_path)
    writers = run_ranks(_run, 4, tmp, [("write", "4"), ("write", "2x2"), ("write", "3-1")], timeout=200)
    readers2 = run_ranks(_run, 2, tmp, [("write", "2"), ("read", "2", "4"), ("read", "2-front", "2"), ("full", "2", "2-front")],
                         timeout=240)
    readers4 = run_ranks(_run, 4, tmp, [("read", "4", "2"), ("read", "4", "2x2"), ("read", "2x2", "3-1")], timeout=300)
    for layout in ("4", "2x2", "3-1"):
        files = writers[0][f"files {layout}"]
        assert "last.ckpt" in files and "epoch=0-step=2.ckpt" in files, files
        folder = tmp_path / layout / "last.ckpt"
        assert sorted(os.listdir(folder))[:3] == [".metadata", "README.txt", "__0_0.distcp"]
        # whoever finds a folder where a file was expected reads what it is and how to make it one file
        assert "python -m lightning_pipe.checkpoint consolidate" in (folder / "README.txt").read_text()
    checked = 0
    for results in (readers2, readers4):
        for key in results[0]:
            if not key.startswith("resumed"):
                continue
            expected = _gathered(results, key.replace("resumed", "uninterrupted"), "state")
            got = _gathered(results, key, "state")
            assert got.keys() == expected.keys() and len(got) == 16, key
            for name, value in expected.items():
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=f"{key}: {name}")
            for result in results:  # every rank's EMA holds its own parameters' shadows, as in the uninterrupted run
                resumed, uninterrupted = result[key], result[key.replace("resumed", "uninterrupted")]
                assert resumed["step"] == 4
                assert sorted(resumed["ema"]) == sorted(uninterrupted["ema"])
                if resumed["ema"]:
                    assert sorted(resumed["ema"]) == resumed["local"]
                for name, value in uninterrupted["ema"].items():
                    torch.testing.assert_close(resumed["ema"][name], value, rtol=1e-5, atol=1e-5, msg=name)
            checked += 1
    assert checked == 7
    assert readers2[0]["files full-2"] == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert os.path.isfile(tmp_path / "full-2" / "last.ckpt")
    first_epoch = _gathered(writers, "write 4", "state")
    final = _gathered(readers4, "uninterrupted 4 from 2x2", "state")
    assert any((first_epoch[name] - value).abs().max() > 1e-3 for name, value in final.items())
