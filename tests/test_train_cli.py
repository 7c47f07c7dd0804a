"""The Hydra command line: every config of every group composes and instantiates; a short run trains and saves."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import DictConfig

GROUPS = ("strategy", "model", "data", "trainer", "callbacks", "logger")


def _options(group: str) -> list[str]:
    folder = files("lightning_pipe.configs") / group
    return sorted(entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    # output_dir is ${hydra:runtime.output_dir} in a real run; compose() has no run folder, so give it one
    with initialize_config_module(config_module="lightning_pipe.configs", version_base="1.3"):
        return compose(config_name="train", overrides=[f"output_dir={tmp_path}", *overrides])


def test_every_group_has_the_options_the_docs_name() -> None:
    assert {"pipedream", "gpipe"} <= set(_options("strategy"))
    assert {"gpt", "digits"} <= set(_options("model"))
    assert {"stdlib_text", "digits"} <= set(_options("data"))
    assert {"cpu", "gpu", "cpu_sim"} <= set(_options("trainer"))


def test_default_config_is_the_2_stage_gpt_on_cpu(tmp_path: Path) -> None:
    cfg = _compose(tmp_path)
    assert cfg.strategy._target_ == "lightning_pipe.PipelineStrategy" and cfg.strategy.schedule == "1f1b"
    assert cfg.model._target_.endswith(".GPT") and cfg.model.block_size == cfg.data.block_size
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2


def test_command_line_overrides_reach_the_config(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "strategy=gpipe", "strategy.num_microbatches=8", "trainer.devices=4",
                   "strategy.partition=[2,4]")
    assert (cfg.strategy.schedule, cfg.strategy.num_microbatches, cfg.trainer.devices) == ("gpipe", 8, 4)
    strategy = instantiate(cfg.strategy)
    assert type(strategy).__name__ == "PipelineStrategy"
    uneven = instantiate(_compose(tmp_path, "strategy.replicas=[3,1]", "strategy.partition=[1,5]").strategy)
    assert (uneven.settings.replicas, uneven.partition) == ((3, 1), [1, 5])
    assert instantiate(_compose(tmp_path, "strategy.num_stages=2").strategy).settings.num_stages == 2


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_instantiates(tmp_path: Path, group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "model" and option == "digits":
        overrides.append("data=digits")
    if group == "trainer" and option == "gpu" and not torch.cuda.is_available():
        overrides += ["trainer.accelerator=cpu", "trainer.devices=2"]  # the rest of gpu.yaml is still checked
    cfg = _compose(tmp_path, *overrides)
    node = cfg[group]
    if group == "trainer":
        made = instantiate(node, strategy=instantiate(cfg.strategy), logger=False)
        assert made.max_steps == node.max_steps
    elif group == "callbacks":
        made = [instantiate(callback) for callback in node.values()]
    else:
        made = instantiate(node)
    assert made is not None


def test_digits_experiment_pairs_model_and_data(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=digits")
    assert cfg.model._target_.endswith("DigitsClassifier") and cfg.data._target_.endswith("DigitsDataModule")


TINY = ["trainer.devices=2", "trainer.max_steps=3", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", "model.width=32", "model.num_layers=2", "model.warmup_steps=1",
        "data.block_size=32", "data.batch_size=8", "data.max_bytes=100000"]


def _run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    done = subprocess.run([sys.executable, "-m", "lightning_pipe.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.timeout(300)
def test_two_rank_run_trains_and_writes_one_checkpoint(tmp_path: Path) -> None:
    """``python -m lightning_pipe.train`` from the shell: Lightning re-runs the command for rank 1, and both
    ranks must write into rank 0's run folder."""
    done = _run_cli(tmp_path, *TINY)
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1, f"ranks wrote to several run folders: {runs}"
    run = runs[0]
    assert (run / "train_ddp_process_1.log").exists(), "rank 1 did not run in rank 0's folder"
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.exists() and f"checkpoint: {checkpoint}" in done.stdout
    assert "tokens/s" in done.stdout

    from lightning_pipe.demos.gpt import GPT

    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    expected = GPT(block_size=32, width=32, num_layers=2).state_dict()
    assert set(saved["state_dict"]) == set(expected), "the checkpoint must hold every stage's weights"
    assert saved["global_step"] == 3
    assert "trained to step 3 in" in done.stdout and "1 pipeline replica," in done.stdout, done.stdout
    # resumed to step 5: the report counts this run's steps apart (it said "trained 5 steps": found by review)
    again = _run_cli(tmp_path, *[o for o in TINY if "max_steps" not in o], "trainer.max_steps=5",
                     f"ckpt_path={checkpoint}")
    assert "trained to step 5 (2 in this run) in" in again.stdout, again.stdout[-3000:]


@pytest.mark.timeout(300)
def test_multirun_launches_each_jobs_ranks_in_its_own_folder(tmp_path: Path) -> None:
    """``-m strategy=pipedream,gpipe``: each job's rank 1 must run that job only, in that job's folder."""
    done = _run_cli(tmp_path, "-m", "strategy=pipedream,gpipe", *TINY)
    (sweep,) = (tmp_path / "outputs" / "train").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "train_ddp_process_1.log").exists()
        assert (sweep / job / "checkpoints" / "last.ckpt").exists()
    assert done.stdout.count("trained to step 3 in") == 2
