"""Models bigger than one device: peak RSS per rank while setting up, training, saving and resuming, and the time to
save and load, for a model of 8 equal Linear layers built in ``configure_model()`` (on the meta device: each rank
materializes only its stages), trained with Adam, checkpointed ``sharded`` or ``full``.

Every configuration runs in fresh processes, twice: a fit of 2 steps then ``trainer.save_checkpoint``, and a fit
resumed from that checkpoint for 1 more step. Each rank reads its RSS before building anything (``baseline``: torch
and Lightning imported) and the peak RSS (VmHWM, reset between phases; glibc told to return freed blocks) of each
phase above it: ``setup`` (until ``on_train_start``: the cut, materialization, optimizers), ``training`` (2 steps,
Adam's state created at the first), ``saving``, ``resuming`` (setup and loading the checkpoint) and
``resumed_training`` (the step after). ``bound_mb`` is the issue's bound: (parameters + gradients + Adam's two states)
/ p + 15%. Run from the repository root::

    python -m benchmarks.bigger --size-mb 100 --ranks 1 2 4 --formats sharded full --json docs/bigger_100mb.json
    python -m benchmarks.bigger --size-mb 1024 --ranks 4 2 1 --formats sharded --json docs/bigger_1gb_sharded.json
    python -m benchmarks.bigger --size-mb 1024 --ranks 4 --eager        # built whole on every rank, then cut
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import markdown_table, reset_peak_rss, return_freed_memory, run_ranks, status_kib, write_json

__all__ = ["main", "run", "width_for"]

LAYERS = 8
PHASES = ("setup", "training", "saving", "resuming", "resumed_training")


def width_for(size_mb: float) -> int:
    """The width of 8 Linear(width, width) layers (with bias) worth ``size_mb`` MiB of fp32 parameters."""
    return int(math.sqrt(size_mb * 2**20 / 4 / LAYERS))


class _Phases:
    """Peak RSS above the baseline, phase by phase."""

    def __init__(self) -> None:
        return_freed_memory()
        self.baseline = status_kib("VmRSS")
        self.peaks: dict[str, float] = {}
        reset_peak_rss()

    def end(self, phase: str) -> None:
        self.peaks[phase] = round((status_kib("VmHWM") - self.baseline) / 1024, 1)
        reset_peak_rss()


def _model_class() -> Any:
    import lightning as L

    class Big(L.LightningModule):
        def __init__(self, width: int, eager: bool = False) -> None:
            super().__init__()
            self.width = width
            self.layers: nn.Sequential | None = None
            if eager:  # as small projects do: the whole model on every rank, then cut
                self.configure_model()

        def configure_model(self) -> None:
            if self.layers is None:
                self.layers = nn.Sequential(*[nn.Linear(self.width, self.width) for _ in range(LAYERS)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            assert self.layers is not None
            return self.layers(x).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-4, fused=True)  # no per-parameter temporaries

    return Big


def _fit(rank: int, world_size: int, width: int, checkpoint_format: str, path: str, resume: bool,
         eager: bool = False) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_pipe  # noqa: F401 - registers the strategy
    from lightning_pipe import PipelineStrategy

    phases = _Phases()
    times: dict[str, float] = {}

    class Recorder(L.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            phases.end("resuming" if resume else "setup")

        def on_train_end(self, trainer: Any, module: Any) -> None:
            phases.end("resumed_training" if resume else "training")

    L.seed_everything(0)
    trainer = L.Trainer(strategy=PipelineStrategy(num_microbatches=2, checkpoint_format=checkpoint_format),
                        accelerator="cpu", devices=world_size, max_steps=3 if resume else 2, callbacks=[Recorder()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    connector = trainer._checkpoint_connector
    for name in ("_restore_modules_and_callbacks", "restore_training_state"):  # time the loading only
        original = getattr(connector, name)

        def timed(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                times["load_s"] = times.get("load_s", 0.0) + time.perf_counter() - start

        setattr(connector, name, timed)
    data = DataLoader(TensorDataset(torch.randn(24, width)), batch_size=8)
    trainer.fit(_model_class()(width, eager), data, ckpt_path=path if resume else None)
    if not resume:
        start = time.perf_counter()
        trainer.save_checkpoint(path)
        times["save_s"] = time.perf_counter() - start
        phases.end("saving")
    return {"rank": rank, "baseline_mb": round(phases.baseline / 1024, 1), **phases.peaks,
            **{key: round(value, 2) for key, value in times.items()}}


def run(size_mb: float, ranks: int, checkpoint_format: str, folder: str, eager: bool = False) -> list[dict[str, Any]]:
    """One configuration: every rank's row."""
    width = width_for(size_mb)
    path = os.path.join(folder, f"{checkpoint_format}-{ranks}.ckpt")
    written = run_ranks(_fit, ranks, width, checkpoint_format, path, False, eager, timeout=1800)
    resumed = run_ranks(_fit, ranks, width, checkpoint_format, path, True, eager, timeout=1800)
    shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    model_mb = LAYERS * (width * width + width) * 4 / 2**20
    bound = 4 * model_mb / ranks * 1.15  # parameters, gradients, Adam's exp_avg and exp_avg_sq
    rows = []
    for first, second in zip(written, resumed):
        row = {"format": checkpoint_format, "build": "eager" if eager else "meta", "model_mb": round(model_mb),
               "ranks": ranks, **first}
        row.update({key: second[key] for key in ("resuming", "resumed_training", "load_s")})
        row["bound_mb"] = round(bound, 1)
        row["within_bound"] = all(row[phase] <= bound for phase in PHASES)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="fp32 parameter MiB of the 8 layers")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--formats", nargs="+", default=["sharded"], choices=["sharded", "full"])
    parser.add_argument("--eager", action="store_true", help="build the model in __init__ (whole on every rank)")
    parser.add_argument("--folder", default=None, help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    arguments = parser.parse_args(argv)
    folder = arguments.folder or tempfile.mkdtemp(prefix="lightning_pipe_bigger_")
    rows = []
    for checkpoint_format in arguments.formats:
        for ranks in arguments.ranks:
            rows += run(arguments.size_mb, ranks, checkpoint_format, folder, arguments.eager)
            print(markdown_table(rows[-ranks:], ["format", "model_mb", "ranks", "rank", "baseline_mb", *PHASES,
                                                 "bound_mb", "save_s", "load_s"]), flush=True)
    write_json(rows, arguments.json)
    return rows


if __name__ == "__main__":
    main()
