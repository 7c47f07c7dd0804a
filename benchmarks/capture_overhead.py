"""Capture overhead: one GPT-like nn.Sequential in the engine, its layers used directly against its captured segments.

Both variants hold the same weights (the demo GPT's ``Sequential(Embed, *Blocks, Head)``, built once and deep-copied)
and run the same pipeline (``--ranks`` ranks, ``--schedule``, ``--microbatches``) on the same batches. The captured
variant cuts the sequence with :class:`lightning_pipe.capture.Splitter` (default cuts: before every block and after
the last, so one segment per layer and the same stages); its first stage's input is ``splitter.flat_inputs``. The
variants alternate step by step on the same ranks, so machine load falls on both alike: each round is one step of
each, timed from a barrier before the step to a barrier after the optimizer step: wall time on rank 0, and the CPU
time of the step's own work summed over the ranks (which other jobs on the machine disturb least). Reported for both:
the median step of each variant, and the median, quartiles and extremes over rounds of captured / direct. Run from
the repository root::

    python -m benchmarks.capture_overhead                               # 2 ranks, 1f1b, d128, 4 blocks, T128
    python -m benchmarks.capture_overhead --steps 60 --schedule 1f1b,zb_h1 --json docs/capture_overhead.json
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin (spinning ones burn the cores other ranks need); libgomp reads this
# when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import markdown_table, run_ranks, write_json  # noqa: E402
from lightning_pipe.engine import launch  # noqa: E402

__all__ = ["Config", "run", "main"]

launch.PRELOAD[:] = [*launch.PRELOAD, "lightning_pipe.capture", "lightning_pipe.demos.gpt"]


@dataclass
class Config:
    """The model, the pipeline and the measurement."""

    ranks: int = 2
    schedule: str = "1f1b"
    """One schedule (the command line takes several, comma-separated: one row each)."""
    microbatches: int = 4
    width: int = 128
    layers: int = 4
    block_size: int = 128
    batch_size: int = 16
    vocab_size: int = 256
    steps: int = 30
    """Timed rounds (one step of each variant per round)."""
    warmup: int = 3
    """Untimed rounds first (allocator warm-up, the first receive of every shape)."""


def _loss(logits: torch.Tensor, microbatch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), microbatch[1].flatten())


def _rank(rank: int, world_size: int, config: Config) -> dict[str, Any]:
    from lightning_pipe.capture import Splitter
    from lightning_pipe.demos.gpt import Block, Embed, Head
    from lightning_pipe.engine.executor import Pipeline

    torch.manual_seed(0)
    direct = nn.Sequential(Embed(config.vocab_size, config.width, config.block_size),
                           *[Block(config.width, 4) for _ in range(config.layers)],
                           Head(config.width, config.vocab_size))
    captured = copy.deepcopy(direct)
    generator = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randint(0, config.vocab_size, (config.batch_size, config.block_size), generator=generator)
                     for _ in range(2)) for _ in range(4)]
    splitter = Splitter(captured)
    start = time.perf_counter()
    segments = splitter.segments((batches[0][0][: config.batch_size // config.microbatches],))
    capture_s = time.perf_counter() - start
    options = dict(loss_fn=_loss, schedule=config.schedule, num_microbatches=config.microbatches)
    pipes = {"direct": Pipeline(direct, **options),
             "captured": Pipeline(segments, input_fn=lambda mb: splitter.flat_inputs((mb[0],)), **options)}
    assert pipes["direct"].stage_sizes == pipes["captured"].stage_sizes, "both variants cut the same stages"
    optimizers = {name: torch.optim.AdamW(pipe.parameters(), lr=1e-4) for name, pipe in pipes.items()}
    wall: dict[str, list[float]] = {name: [] for name in pipes}
    cpu: dict[str, list[float]] = {name: [] for name in pipes}
    for round_index in range(config.warmup + config.steps):
        order = list(pipes) if round_index % 2 == 0 else list(reversed(pipes))  # neither always goes first
        for name in order:
            batch = batches[round_index % len(batches)]
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            pipes[name].train_step(batch)
            optimizers[name].step()
            optimizers[name].zero_grad()
            used_cpu = time.process_time() - start_cpu
            dist.barrier()
            if round_index >= config.warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(used_cpu)
    return {"segments": len(segments), "capture_s": capture_s, "wall": wall, "cpu": cpu}


def _spread(prefix: str, captured: list[float], direct: list[float]) -> dict[str, float]:
    """Medians of both, and the median, quartiles and extremes of the per-round ratio captured / direct."""
    ratios = [c / d for c, d in zip(captured, direct)]
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {f"{prefix}_direct_ms": 1e3 * statistics.median(direct),
            f"{prefix}_captured_ms": 1e3 * statistics.median(captured),
            f"{prefix}_ratio": statistics.median(ratios), f"{prefix}_ratio_q1": quartiles[0],
            f"{prefix}_ratio_q3": quartiles[2], f"{prefix}_ratio_min": min(ratios), f"{prefix}_ratio_max": max(ratios)}


def run(config: Config) -> dict[str, Any]:
    """One comparison on ``config.ranks`` local gloo ranks: step wall time on rank 0, and CPU time summed over the
    ranks (what the machine's other load disturbs least)."""
    results = run_ranks(_rank, config.ranks, config)
    cpu = {name: [sum(steps) for steps in zip(*(r["cpu"][name] for r in results))] for name in ("direct", "captured")}
    wall = results[0]["wall"]
    return {**asdict(config), "segments": results[0]["segments"], "capture_s": results[0]["capture_s"],
            **_spread("wall", wall["captured"], wall["direct"]), **_spread("cpu", cpu["captured"], cpu["direct"])}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--json", default=None, help="write the rows here (e.g. docs/capture_overhead.json)")
    args = vars(parser.parse_args(argv))
    path = args.pop("json")
    rows = [run(Config(**{**args, "schedule": schedule})) for schedule in args["schedule"].split(",")]
    for prefix in ("wall", "cpu"):
        print(markdown_table(rows, ["ranks", "schedule", "width", "layers", "block_size", "segments",
                                    *(f"{prefix}_{key}" for key in ("direct_ms", "captured_ms", "ratio", "ratio_q1",
                                                                    "ratio_q3", "ratio_min", "ratio_max"))]))
    write_json(rows, path)
    return rows


if __name__ == "__main__":
    main()
