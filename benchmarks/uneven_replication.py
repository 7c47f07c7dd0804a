"""Uneven replication on 4 ranks: PipeDream's "3-1" against even layouts, on a model whose first layer is slow and
parameter-light while the rest is fast and parameter-heavy (PipeDream's case: convolutions, then fully connected
layers).

Every configuration trains the same LightningModule through ``Trainer.fit`` on the same global batch of ``B`` rows.
Its 6 layers sleep in proportion to the rows they process (:class:`~benchmarks.common.SleepLayer`): layer 0 takes
``--heavy`` ms per row forward (twice that backward), each of layers 1-5 a fifteenth of that, so layer 0 is 3/4 of
the work and no cut can split it. Layers 1-5 hold the ``--grad-mb`` of gradient that must be all-reduced wherever
they are replicated (see :mod:`benchmarks.pipeline_data_parallel` for the ballast).

- ``3-1``: ``PipelineStrategy(replicas=[3, 1], partition=[1, 5])``: layer 0 on 3 ranks taking the micro-batches in
  turn, layers 1-5 on the fourth. Balanced, and only layer 0's tiny gradient is all-reduced.
- ``2x2``: ``PipelineStrategy(num_stages=2, partition=[1, 5])``: two replicas of a 2-stage pipeline; layer 0 is
  the bottleneck of each, and layers 1-5 are all-reduced over 2 ranks.
- ``4x1``: ``PipelineStrategy(num_stages=4, partition=[1, 2, 2, 1])``: one pipeline, no all-reduce, layer 0 alone
  is 3/4 of the work.
- ``1x4``: Lightning's ``DDPStrategy``: no bubble, the whole model all-reduced over 4 ranks.

``ideal_ms`` is the compute per rank with perfect balance and nothing else: ``B * 4 * heavy / 4`` ms (per row,
``3 * heavy`` for layer 0's forward and backward and ``heavy`` for the tail's). Run from the repository root::

    python -m benchmarks.uneven_replication                   # tail gradients of 0, 128 and 384 MB
    python -m benchmarks.uneven_replication --grad-mb 0 --steps 4 --json uneven.json
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import SleepCosts, markdown_table, run_ranks, write_json
from benchmarks.pipeline_data_parallel import Block, timed_fit

__all__ = ["CONFIGS", "run", "main"]

RANKS, TAIL = 4, 5
# name: (PipelineStrategy arguments, or None for DDP; data-parallel replicas that split the batch)
CONFIGS: dict[str, tuple[dict[str, Any] | None, int]] = {
    "3-1": ({"replicas": [3, 1], "partition": [1, 5]}, 1),
    "2x2": ({"num_stages": 2, "partition": [1, 5]}, 2),
    "4x1": ({"num_stages": 4, "partition": [1, 2, 2, 1]}, 1),
    "1x4": (None, 4),
}


class FrontHeavy(L.LightningModule):
    def __init__(self, heavy: SleepCosts, light: SleepCosts, tail_floats: int, microbatches: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(Block(heavy, 1, microbatches),
                                    *[Block(light, tail_floats, microbatches) for _ in range(TAIL)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layers(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _train(rank: int, world_size: int, name: str, args: argparse.Namespace, grad_mb: float) -> float | None:
    import lightning_pipe  # noqa: F401 - registers the strategy names
    from lightning_pipe import PipelineStrategy

    torch.set_num_threads(1)
    options, data_replicas = CONFIGS[name]
    microbatches = args.microbatches if options is not None else 1
    rows = args.batch_size // data_replicas // microbatches  # rows per layer call
    heavy = SleepCosts.of(rows * args.heavy / 1e3, rows * 2 * args.heavy / 1e3)
    light = SleepCosts.of(rows * args.heavy / 15 / 1e3, rows * 2 * args.heavy / 15 / 1e3)
    model = FrontHeavy(heavy, light, int(grad_mb * 2**20 / 4 / TAIL), microbatches)
    strategy: Any = "ddp" if options is None else PipelineStrategy(num_microbatches=microbatches, **options)
    return timed_fit(rank, world_size, model, strategy, args, data_replicas)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    ideal = args.batch_size * 4 * args.heavy / RANKS  # ms
    for grad_mb in args.grad_mb:
        group = []
        for name in CONFIGS:
            step = run_ranks(_train, RANKS, name, args, grad_mb, timeout=600)[0]
            group.append({"grad_mb": grad_mb, "config": name, "step_ms": 1e3 * step, "ideal_ms": ideal,
                          "ratio": 1e3 * step / ideal})
        best = min(group, key=lambda r: r["step_ms"])
        for row in group:
            row["vs_3-1"] = row["step_ms"] / group[0]["step_ms"]
            row["fastest"] = "yes" if row is best else ""
        rows += group
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grad-mb", type=float, nargs="+", default=[0.0, 128.0, 384.0],
                        help="megabytes of gradient of layers 1-5 together")
    parser.add_argument("--batch-size", type=int, default=48, help="global batch (rows), all replicas together")
    parser.add_argument("--microbatches", type=int, default=6, help="micro-batches per pipeline (replica)")
    parser.add_argument("--heavy", type=float, default=1.5, help="forward ms per row of layer 0 (backward: twice)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args)
    print(markdown_table(rows, ["grad_mb", "config", "step_ms", "ideal_ms", "ratio", "vs_3-1", "fastest"]))
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
