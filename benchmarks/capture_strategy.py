"""Captured path against the nn.Sequential path under the strategy: the same LightningModule, ``Trainer.fit``, per step.

The demo GPT (``lightning_pipe.demos.gpt``: ``self.layers = Sequential(Embed, *Blocks, Head)``) trains under
``PipelineStrategy`` twice on the same ranks: once on the nn.Sequential path (its layers are the stages' layers, no
tracing), once captured (``layers="layers"`` with ``split_points`` before every block and after the last: the
strategy captures the sequence with :mod:`lightning_pipe.capture` and pipelines its 6 segments, one per layer, so the
stages hold the same layers). Both modules start from the same weights and read the same batches. The variants
alternate fit by fit (``--rounds`` rounds of ``--steps`` steps each, the first step of every fit untimed); a callback
times each step from a barrier before it to a barrier after its optimizer step: wall time on rank 0, and the CPU time
of the step summed over the ranks (what other jobs on the machine disturb least). Reported: each variant's median
step, and the median, quartiles and extremes over rounds of captured / sequential (each round's medians). Run from
the repository root::

    python -m benchmarks.capture_strategy                            # 2 ranks, 1f1b, d128, 4 blocks, T128
    python -m benchmarks.capture_strategy --rounds 12 --json docs/capture_strategy.json
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin (spinning ones burn the cores other ranks need); libgomp reads this
# when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import markdown_table, run_ranks, write_json  # noqa: E402
from lightning_pipe.engine import launch  # noqa: E402

__all__ = ["Config", "run", "main"]

launch.PRELOAD[:] = [*launch.PRELOAD, "lightning.pytorch", "lightning_pipe.strategy.pipeline", "lightning_pipe.capture",
                     "lightning_pipe.demos.gpt"]
VARIANTS = ("sequential", "captured")


@dataclass
class Config:
    """The model, the pipeline and the measurement."""

    ranks: int = 2
    schedule: str = "1f1b"
    microbatches: int = 4
    width: int = 128
    layers: int = 4
    block_size: int = 128
    batch_size: int = 16
    rounds: int = 8
    """Fits of each variant, alternating."""
    steps: int = 6
    """Steps per fit; the first of each fit is not timed."""


def _rank(rank: int, world_size: int, config: Config) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_pipe import PipelineStrategy
    from lightning_pipe.demos.gpt import GPT

    cuts = [*(str(i) for i in range(1, config.layers + 1)), (str(config.layers), "end")]
    options = {"sequential": {}, "captured": {"layers": "layers", "split_points": cuts}}
    models = {}
    for name in VARIANTS:
        torch.manual_seed(0)
        models[name] = GPT(width=config.width, num_layers=config.layers, block_size=config.block_size,
                           lr_schedule="constant")
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (4, config.batch_size, config.block_size + 1), generator=generator)
    data = DataLoader([(t[:, :-1], t[:, 1:]) for t in tokens], batch_size=None)

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self._start = (0.0, 0.0)

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            dist.barrier()
            self._start = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            used_cpu = time.process_time() - self._start[1]
            dist.barrier()
            if batch_idx > 0:
                self.wall.append(time.perf_counter() - self._start[0])
                self.cpu.append(used_cpu)

    wall: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[list[float]]] = {name: [] for name in VARIANTS}
    setup_s: dict[str, float] = {}
    for round_index in range(config.rounds):
        for name in VARIANTS if round_index % 2 == 0 else reversed(VARIANTS):  # neither always goes first
            timer = Timer()
            strategy = PipelineStrategy(schedule=config.schedule, num_microbatches=config.microbatches,
                                        **options[name])
            trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_steps=config.steps,
                                logger=False, enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False, callbacks=[timer])
            start = time.perf_counter()
            trainer.fit(models[name], data)
            if round_index == 0:  # the first fit cuts the module (the captured one captures it)
                setup_s[name] = time.perf_counter() - start - sum(timer.wall)
            wall[name].append(timer.wall)
            cpu[name].append(timer.cpu)
    return {"wall": wall, "cpu": cpu, "setup_s": setup_s}


def _spread(prefix: str, captured: list[list[float]], sequential: list[list[float]]) -> dict[str, float]:
    """Medians of every step of both, and the median, quartiles and extremes of each round's ratio of medians."""
    ratios = [statistics.median(c) / statistics.median(s) for c, s in zip(captured, sequential)]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {f"{prefix}_sequential_ms": 1e3 * statistics.median([t for r in sequential for t in r]),
            f"{prefix}_captured_ms": 1e3 * statistics.median([t for r in captured for t in r]),
            f"{prefix}_ratio": statistics.median(ratios), f"{prefix}_ratio_q1": quartiles[0],
            f"{prefix}_ratio_q3": quartiles[2], f"{prefix}_ratio_min": min(ratios), f"{prefix}_ratio_max": max(ratios)}


def run(config: Config) -> dict[str, Any]:
    """One comparison on ``config.ranks`` local gloo ranks."""
    results = run_ranks(_rank, config.ranks, config)
    cpu = {name: [[sum(steps) for steps in zip(*(r["cpu"][name][i] for r in results))]
                  for i in range(config.rounds)] for name in VARIANTS}
    wall = results[0]["wall"]
    setup = results[0]["setup_s"]
    return {**asdict(config), "setup_sequential_s": setup["sequential"], "setup_captured_s": setup["captured"],
            **_spread("wall", wall["captured"], wall["sequential"]),
            **_spread("cpu", cpu["captured"], cpu["sequential"])}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--json", default=None, help="write the rows here (e.g. docs/capture_strategy.json)")
    args = vars(parser.parse_args(argv))
    path = args.pop("json")
    rows = [run(Config(**{**args, "schedule": schedule})) for schedule in args["schedule"].split(",")]
    for prefix in ("wall", "cpu"):
        print(markdown_table(rows, ["ranks", "schedule", "width", "layers", "block_size", "setup_sequential_s",
                                    "setup_captured_s",
                                    *(f"{prefix}_{key}" for key in ("sequential_ms", "captured_ms", "ratio",
                                                                    "ratio_q1", "ratio_q3", "ratio_min",
                                                                    "ratio_max"))]))
    write_json(rows, path)
    return rows


if __name__ == "__main__":
    main()
