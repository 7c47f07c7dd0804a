"""A plain script with Trainer(strategy="pipedream", devices=2) launches its second rank itself, as DDP does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = '''
import os, sys
import torch
import lightning as L
import lightning_pipe
from tests.lightning_models import Regressor, regression_data

model = Regressor()
trainer = L.Trainer(strategy="pipedream", accelerator="cpu", devices=2, max_steps=2, logger=False,
                    enable_checkpointing=False)  # with the progress bar and the model summary
trainer.fit(model, regression_data(2, batch_size=10))
torch.save({"state": model.state_dict(), "omp": os.environ.get("OMP_WAIT_POLICY"),
            "threads": torch.get_num_threads(), "world_size": trainer.world_size},
           os.path.join(sys.argv[1], f"rank{trainer.global_rank}.pt"))
if trainer.global_rank == 1:  # ends after rank 0 reached its exit, which holds the job's store
    import time
    time.sleep(3)
'''


@pytest.mark.timeout(240)
def test_a_script_launches_its_ranks(tmp_path: Path) -> None:
    import lightning as L

    from tests.lightning_models import Regressor, regression_data

    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, timeout=200,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 waits for the others' heartbeats to end before the store ends with it: no write to a gone store, whose
    # failure torch prints with its C++ stack (found by review, after runs that succeeded)
    assert "sendBytes failed" not in done.stderr and "Broken pipe" not in done.stderr, done.stderr[-3000:]

    reference = Regressor()
    L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(reference, regression_data(2, batch_size=10))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    full = {**ranks[0]["state"], **ranks[1]["state"]}
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=0, atol=1e-5, msg=key)
    assert ranks[1]["omp"] == "passive"  # set for the launched rank before its torch started
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["threads"] for r in ranks] == [max(1, len(os.sched_getaffinity(0)) // 2)] * 2


@pytest.mark.timeout(120)
def test_a_run_from_python_c_says_it_needs_a_script(tmp_path: Path) -> None:
    """``python -c`` cannot be run again for the second rank (Lightning's launcher ran ``python <cwd>/-c``, and the
    job was killed after ~20 s: found by review): refused before any process starts, saying what to run."""
    code = ("import lightning as L, lightning_pipe\n"
            "from tests.lightning_models import Regressor, regression_data\n"
            "L.Trainer(strategy='pipedream', accelerator='cpu', devices=2, max_steps=1, logger=False)"
            ".fit(Regressor(), regression_data(1))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, timeout=100, capture_output=True,
                          text=True)
    assert done.returncode != 0
    assert "PipelineStrategy starts each other rank by running your script again" in done.stderr, done.stderr[-3000:]
    assert "python train.py" in done.stderr and "can't open file" not in done.stderr, done.stderr[-3000:]


def test_a_script_whose_path_moved_with_the_working_directory_is_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hydra's job.chdir=True runs the app in another folder, where ``sys.argv[0]`` ("train.py") no longer resolves:
    Lightning's launcher finds the script again, so only ``-c``, ``-`` and an interactive session are refused (found
    by review: the first form of the check refused such apps)."""
    import __main__

    from lightning_pipe.strategy.processes import _refuse_without_a_script

    monkeypatch.setattr(__main__, "__spec__", None, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py", "trainer.devices=2"])
    _refuse_without_a_script()  # (no such file here: not refused)
    for command in ("-c", "-"):
        monkeypatch.setattr(sys, "argv", [command])
        with pytest.raises(RuntimeError, match=f"was started from '{command}', which it cannot run again"):
            _refuse_without_a_script()


FAILING = '''
import os, sys, time
import lightning as L
import lightning_pipe
from lightning_pipe import PipelineStrategy
from tests.lightning_models import Regressor, regression_data


class RankOneFails(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1 and trainer.global_rank == 1:
            raise ValueError("rank 1's own failure")
        if batch_idx == 1 and trainer.global_rank == 0:
            time.sleep(9)  # busy in its own code past the launcher's 5-s look at the ranks it started


trainer = L.Trainer(strategy=PipelineStrategy(wait_timeout=60), accelerator="cpu", devices=2, max_steps=4,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, callbacks=[RankOneFails()])
try:
    trainer.fit(Regressor(), regression_data(4, batch_size=10))
except Exception as error:
    with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.txt"), "w") as file:
        file.write(f"{type(error).__name__}: {error}")
    raise
'''


@pytest.mark.timeout(240)
def test_rank_0_busy_when_a_rank_it_started_fails_ends_with_that_error_not_killed(tmp_path: Path) -> None:
    """Lightning's launcher kills every rank (rank 0 too, SIGKILL) within 5 s of a rank it started ending with an
    error: rank 0, busy then, exited with 137 and no error, no ``except`` around ``fit`` (found by review). It now
    has the time its own waits take to give up, and ends with the failed rank's error."""
    script = tmp_path / "train.py"
    script.write_text(FAILING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, timeout=200,
                          capture_output=True, text=True)
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    said = (tmp_path / "rank0.txt").read_text()
    assert said.startswith("PipelineError: rank 1 failed") and "rank 1's own failure" in said, said
    assert "rank 1's own failure" in (tmp_path / "rank1.txt").read_text()
