"""A checkpoint that cannot be written (a full disk on one rank): every rank raises the real cause, and the previous
checkpoint stays intact and resumes exactly; each rank's on_save_checkpoint extras and global generators' states come
back to it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_ranks

SEED = 11


def _trainer(checkpoint_format: str, **options: Any) -> Any:
    import lightning as L

    from lightning_pipe import PipelineStrategy

    defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False, "num_sanity_val_steps": 0}
    return L.Trainer(strategy=PipelineStrategy(num_microbatches=2, checkpoint_format=checkpoint_format.split("-")[0]),
                     accelerator="cpu", devices=4, **{**defaults, **options})


def _full_disk(calls: list[int], original: Any) -> Any:
    """``original``, failing at its second call as a full disk does."""
    def write(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "patched writer")
        return original(*args, **kwargs)

    return write


def _fit_until_the_disk_is_full(rank: int, world_size: int, tmp: str, checkpoint_format: str) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_pipe  # noqa: F401
    from torch.distributed.checkpoint import FileSystemWriter

    import lightning_pipe.strategy.sharded as sharded
    from tests.big_models import NotedRegressor
    from tests.lightning_models import regression_data

    folder = os.path.join(tmp, checkpoint_format)
    L.seed_everything(SEED)
    checkpointing = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
    trainer = _trainer(checkpoint_format, max_steps=3, callbacks=[checkpointing], enable_checkpointing=True)
    calls = [0]
    original = sharded.write_file
    writer = FileSystemWriter.write_data
    if checkpoint_format == "sharded" and rank == 2:  # rank 2's own file, at the second checkpoint
        sharded.write_file = _full_disk(calls, original)
    elif checkpoint_format == "sharded-tensors" and rank == 2:  # rank 2's tensors, inside DCP's write
        FileSystemWriter.write_data = _full_disk(calls, writer)
    elif checkpoint_format == "full" and rank == 0:  # the one file global rank 0 writes, at the second checkpoint
        trainer.strategy.checkpoint_io.save_checkpoint = _full_disk(calls, trainer.strategy.checkpoint_io.save_checkpoint)
    try:
        trainer.fit(NotedRegressor(), regression_data(3))
        message = "no error"
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
    finally:
        sharded.write_file, FileSystemWriter.write_data = original, writer
    files = sorted(os.listdir(folder))
    L.seed_everything(SEED)
    resumed = NotedRegressor()
    _trainer(checkpoint_format, max_steps=2).fit(resumed, regression_data(3),
                                                 ckpt_path=os.path.join(folder, "epoch=0-step=1.ckpt"))
    L.seed_everything(SEED)
    uninterrupted = NotedRegressor()
    _trainer(checkpoint_format, max_steps=2).fit(uninterrupted, regression_data(3))
    return {"message": message, "files": files, "resumed": resumed.state_dict(), "note": resumed.loaded_note,
            "uninterrupted": uninterrupted.state_dict(), "draws": (resumed.draws, uninterrupted.draws)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("checkpoint_format", ["sharded", "sharded-tensors", "full"])
def test_a_full_disk_fails_every_rank_and_keeps_the_previous_checkpoint(checkpoint_format: str,
                                                                         tmp_path: Path) -> None:
    """A full disk at the second checkpoint: in a rank's own file, in DCP's write of the tensors (its error a
    BaseException: the staging folder stayed, holding most of a checkpoint, found by review), in the one file."""
    results = run_ranks(_fit_until_the_disk_is_full, 4, str(tmp_path), checkpoint_format, timeout=200)
    failed = 2 if checkpoint_format.startswith("sharded") else 0
    for rank, result in enumerate(results):
        assert "No space left on device" in result["message"], result["message"]
        if rank != failed and checkpoint_format != "sharded-tensors":  # (DCP says every rank's failure everywhere)
            assert f"failed on rank(s) [{failed}]" in result["message"], result["message"]
        # the second checkpoint was never published, nothing half-written is left beside the first
        assert result["files"] == ["epoch=0-step=1.ckpt"], result["files"]
        for key, value in result["uninterrupted"].items():
            torch.testing.assert_close(result["resumed"][key], value, rtol=1e-5, atol=1e-5, msg=key)
        assert result["note"] == f"written by rank {rank}", result["note"]  # each rank's extras come back to it
        resumed, uninterrupted = result["draws"]  # the global generators continue as in the uninterrupted run
        assert len(resumed) == 1 and len(uninterrupted) == 2 and resumed[0] == uninterrupted[1], result["draws"]


_KILLED_WRITER = """
import os, sys
from lightning_pipe.strategy.staging import stage
parent = sys.argv[1]
half = stage(parent, "half.ckpt")  # killed while the ranks wrote
open(os.path.join(half, "__0_0.distcp"), "w").write("half")
moved = stage(parent, "moved.ckpt")  # killed between a publish's renames: the older checkpoint moved aside
open(os.path.join(moved, "new"), "w").write("new")
os.replace(os.path.join(parent, "moved.ckpt"), moved + ".previous")
os._exit(9)
"""


def _save_sharded_beside(rank: int, world_size: int, tmp: str) -> list[str]:
    from lightning_pipe import PipelineStrategy
    from tests.helpers import quiet_trainer
    from tests.lightning_models import Regressor, regression_data

    torch.set_num_threads(1)
    trainer = quiet_trainer(world_size, PipelineStrategy(num_microbatches=2, checkpoint_format="sharded"), max_steps=1)
    trainer.fit(Regressor(), regression_data(1))
    trainer.save_checkpoint(os.path.join(tmp, "new.ckpt"))
    return sorted(os.listdir(tmp))


@pytest.mark.timeout(120)
def test_a_sharded_save_clears_what_a_job_killed_while_writing_left(tmp_path: Path) -> None:
    """A job killed while writing a sharded checkpoint (SIGKILL, the out-of-memory killer) left its half-written folder
    in .lightning_pipe-writing/ for good, or (killed between a publish's renames) the older checkpoint there, moved
    aside, with nothing at its path: the next sharded save in that folder clears the first and puts the second back.
    A mark whose lock a live process holds (a job writing beside this one, in this container or another) is left
    alone; a failed publish's drop puts the older checkpoint back too."""
    import fcntl
    import json
    import subprocess
    import sys

    from lightning_pipe.strategy.staging import drop, stage

    (tmp_path / "moved.ckpt").mkdir()
    (tmp_path / "moved.ckpt" / "old").write_text("old")
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], check=False, timeout=60)
    staging = tmp_path / ".lightning_pipe-writing"
    live = staging / "live.ckpt"
    live.mkdir()
    with open(f"{live}.owner", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live writer's
        held.write(json.dumps({"host": "elsewhere", "pid": 1}))
        held.flush()
        assert sorted(os.listdir(staging)) == ["half.ckpt", "half.ckpt.owner", "live.ckpt", "live.ckpt.owner",
                                               "moved.ckpt", "moved.ckpt.owner", "moved.ckpt.previous"]
        for listed in run_ranks(_save_sharded_beside, 2, str(tmp_path), timeout=100):
            assert listed == [".lightning_pipe-writing", "moved.ckpt", "new.ckpt"], listed
        assert sorted(os.listdir(staging)) == ["live.ckpt", "live.ckpt.owner"]
    assert (tmp_path / "moved.ckpt" / "old").read_text() == "old"  # the older checkpoint, back in place
    # a publish that failed between its renames: the drop after it puts the older checkpoint back
    writing = stage(str(tmp_path), "again.ckpt")
    (tmp_path / ".lightning_pipe-writing" / "again.ckpt.previous").mkdir()
    drop(writing)
    assert (tmp_path / "again.ckpt").is_dir() and not os.path.exists(f"{writing}.owner")


def _fit_with_an_io(rank: int, world_size: int, checkpoint_format: str) -> list[str]:
    import warnings

    from lightning.pytorch.plugins import TorchCheckpointIO

    from lightning_pipe import PipelineStrategy
    from tests.helpers import quiet_trainer
    from tests.lightning_models import Regressor, regression_data

    class Uploading(TorchCheckpointIO):  # (an uploader, an encrypting or a versioning IO)
        pass

    trainer = quiet_trainer(world_size, PipelineStrategy(num_microbatches=2, checkpoint_format=checkpoint_format),
                            max_steps=1, plugins=[Uploading()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Regressor(), regression_data(2))
    return [str(w.message) for w in caught if "checkpoint IO" in str(w.message)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("checkpoint_format", ["sharded", "full"])
def test_a_checkpoint_io_of_ones_own_is_said_to_be_unused_by_the_sharded_format(checkpoint_format: str) -> None:
    """The sharded format writes, removes and reads its folders with torch.distributed.checkpoint: a CheckpointIO of
    the user's own was never called, without a word (found by review); the full format writes through it."""
    warned = run_ranks(_fit_with_an_io, 2, checkpoint_format, timeout=100)[0]
    if checkpoint_format == "full":
        assert warned == []
    else:
        assert len(warned) == 1 and "Uploading is not called" in warned[0] and "checkpoint_format='full'" in warned[0]
