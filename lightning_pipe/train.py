"""Command line: train a model with a pipeline strategy, configured by Hydra (the top-level ``configs/``).

    python -m lightning_pipe.train                        # byte-level GPT on stdlib text, 2-stage 1F1B, CPU
    python -m lightning_pipe.train strategy=gpipe strategy.num_microbatches=8 trainer.devices=4
    python -m lightning_pipe.train experiment=digits      # the digits classifier
    python -m lightning_pipe.train -m strategy=pipedream,gpipe   # a sweep: one folder per job
    python -m lightning_pipe.train --cfg job              # print the composed config

Lightning launches ranks 1.. by re-running this command with ``hydra.run.dir`` set to rank 0's run folder,
so every rank writes into one folder (``outputs/train/<date>_<time>``; checkpoints under ``checkpoints/``).
The configs are found as ``pkg://lightning_pipe.configs`` (see pyproject.toml), so this works from a wheel too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, read_write
from typing_extensions import override

__all__ = ["main", "train"]


class _Throughput(L.Callback):
    """Measures training speed on rank 0: from the end of the first step (compilation, warm-up) to the
    end of the last, without the time spent in validation."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.paused = 0.0
        self.validation_started: float | None = None
        self.steps = self.samples = self.tokens = 0
        self.first_step = 0  # the global step the fit started from (a resumed run's is its checkpoint's)

    @override
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.first_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
            return
        self.end = now
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        self.steps += 1
        self.samples += int(inputs.shape[0])
        if not torch.is_floating_point(inputs) and inputs.dim() >= 2:  # token ids
            self.tokens += inputs.numel()

    @override
    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.validation_started = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.validation_started is not None and self.start is not None:
            self.paused += time.perf_counter() - self.validation_started
        self.validation_started = None

    def summary(self, replicas: int, pipelined: bool) -> str:
        if self.start is None or self.end is None or self.steps == 0:
            return "too few steps to measure throughput"
        seconds = self.end - self.start - self.paused
        rate = f"{replicas * self.tokens / seconds:,.0f} tokens/s, " if self.tokens else ""
        copies = f"{replicas} {'pipeline' if pipelined else 'data-parallel'} replica{'s' if replicas != 1 else ''}"
        return (f"{rate}{replicas * self.samples / seconds:,.1f} samples/s, {seconds / self.steps * 1e3:.0f} ms/batch "
                f"(over {self.steps} batches after the first, {copies}, validation excluded)")


def _replicas(trainer: L.Trainer) -> int:
    """How many copies of the model train side by side (data-parallel degree); each sees its own batches."""
    try:
        return int(trainer.strategy.distributed_sampler_kwargs.get("num_replicas", 1))
    except (AttributeError, NotImplementedError, TypeError):
        return 1


def train(cfg: DictConfig) -> dict[str, float]:
    """Instantiate data, model, strategy and trainer from ``cfg``, fit, and report on rank 0."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)  # also exported to the ranks Lightning launches
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    strategy = instantiate(cfg.strategy)
    throughput = _Throughput()
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=[*callbacks, throughput],
                                     logger=logger)

    datamodule.setup("fit")  # idempotent; here so the baseline to beat is known before training starts
    if getattr(datamodule, "baseline", None) is not None:
        rank_zero_info(f"baseline to get under: {datamodule.baseline_name}: {datamodule.baseline:.4f} nats")
    checkpoint = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    with _one_job_per_launch():
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        elapsed = time.perf_counter() - started
        # ModelCheckpoint writes last.ckpt every n steps but not again at the end once it has written it, so
        # the final weights are saved here (every rank takes part: the strategy gathers the stages).
        trainer.save_checkpoint(checkpoint, weights_only=False)  # with optimizer state: resumable via ckpt_path

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
    if trainer.is_global_zero:
        _report(trainer, datamodule, metrics, throughput, elapsed, checkpoint, cfg.output_dir)
    return metrics


@contextlib.contextmanager
def _one_job_per_launch() -> Iterator[None]:
    """Under ``--multirun``, let Lightning launch this job's other ranks, and only this job's.

    Lightning starts ranks 1.. by re-running ``sys.argv`` with ``hydra.run.dir`` set to the run folder. In a
    sweep that would re-run the whole sweep in the wrong folder, so for the launch ``sys.argv`` becomes this job's
    own overrides and the run folder this job's folder. Afterwards the process group and the variables the
    launcher exported (``LOCAL_RANK`` among them, which would tell the next job's launcher that someone else
    starts the processes) are removed, so the next job of the sweep launches its own ranks.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, environ = sys.argv, dict(os.environ)
    sys.argv = [argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if name not in environ:
                os.environ.pop(name, None)


def _report(trainer: L.Trainer, datamodule: Any, metrics: dict[str, float], throughput: _Throughput,
            elapsed: float, checkpoint: Path, output_dir: str) -> None:
    pipelined = type(trainer.strategy).__module__.startswith("lightning_pipe")
    resumed = f" ({trainer.global_step - throughput.first_step} in this run)" if throughput.first_step else ""
    lines = [f"trained to step {trainer.global_step}{resumed} in {elapsed:.1f} s (fit, with set-up and validation)",
             f"throughput: {throughput.summary(_replicas(trainer), pipelined)}"]
    for name in sorted(metrics):
        lines.append(f"{name}: {metrics[name]:.4f}")
    baseline = getattr(datamodule, "baseline", None)
    if baseline is not None:
        lines.append(f"baseline ({getattr(datamodule, 'baseline_name', 'baseline')}): {baseline:.4f} nats")
    lines.append(f"checkpoint: {checkpoint} (step {trainer.global_step}, "
                 f"{'every stage' if pipelined else 'the whole model'}'s weights)")
    lines.append(f"run folder: {output_dir}")
    print("\n".join(lines), flush=True)


@hydra.main(config_path="pkg://lightning_pipe.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
