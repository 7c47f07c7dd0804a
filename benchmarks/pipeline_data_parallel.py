"""Pipeline x data parallel on 4 ranks: 2 stages x 2 replicas against a 4-stage pipeline and plain DDP, one model.

Every configuration trains the same LightningModule through ``Trainer.fit`` on the same global batch: 8 layers that
sleep in proportion to the rows they process (``t_f`` and ``t_b`` ms per row and layer, through
:class:`~benchmarks.common.SleepLayer`, so the timeline does not depend on the 2 cores), each also holding a
"ballast" parameter of ``--grad-mb`` / 8 MB whose gradient is real (zeros) and must be all-reduced. The ballast gets
its gradient in the backward of a step's last micro-batch only: a real weight gradient's cost per micro-batch is
part of the sleeping compute, and filling and adding a weight-sized tensor per micro-batch would otherwise dominate
on this machine's memory bandwidth. (So the replicated pipeline starts the ballast's all-reduce once its rank's last
backward is done, overlapping the other stages' work; DDP overlaps it with the backward itself.)

- ``4x1``: ``PipelineStrategy(num_stages=4)``, one pipeline, no gradient all-reduce, bubble ``(p - 1) / m``;
- ``2x2``: ``PipelineStrategy(num_stages=2)``, two replicas of a 2-stage pipeline: half the bubble, each rank
  all-reduces half the model over 2 ranks (bucketed, started as the last backward completes each bucket);
- ``1x4``: Lightning's ``DDPStrategy``, no bubble, every rank all-reduces the whole model over 4 ranks.

Ideal time (no messages, no all-reduce) per step: ``B * L * (t_f + t_b) / 4 * (m + p - 1) / m`` for ``p`` stages
of a pipeline with ``m`` micro-batches (``p = 1`` for DDP). Run from the repository root::

    python -m benchmarks.pipeline_data_parallel                         # gradients of 0, 256, 384 and 512 MB
    python -m benchmarks.pipeline_data_parallel --grad-mb 0 64 --microbatches 4 --steps 6 --json pdp.json

On this 2-core machine gloo's all-reduce is CPU work (loopback TCP) that competes with every other rank, while the
layers' compute is sleep that does not: gradients cost relatively more here than over a real network.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import SleepCosts, SleepLayer, markdown_table, run_ranks, write_json

__all__ = ["CONFIGS", "run", "main"]

RANKS, LAYERS, WIDTH = 4, 8, 16
CONFIGS = {"4x1": 4, "2x2": 2, "1x4": 1}  # name: stages per pipeline (1: Lightning's DDP)


class _Ballast(torch.autograd.Function):
    """Identity on ``x``; every ``block.every``-th backward gives ``weight`` a zero gradient of its full size."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, block: Block) -> torch.Tensor:
        ctx.shape, ctx.block = weight.shape, block
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        block = ctx.block
        block.backwards += 1
        last = block.backwards % block.every == 0
        return grad, (grad.new_zeros(ctx.shape) if last else None), None


class Block(nn.Module):
    def __init__(self, costs: SleepCosts, ballast_floats: int, every: int) -> None:
        super().__init__()
        self.sleep = SleepLayer(costs, WIDTH)
        self.ballast = nn.Parameter(torch.zeros(max(1, ballast_floats)))
        self.every, self.backwards = every, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Ballast.apply(self.sleep(x), self.ballast, self)


class SleepModel(L.LightningModule):
    def __init__(self, costs: SleepCosts, ballast_floats: int, microbatches: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[Block(costs, ballast_floats, microbatches) for _ in range(LAYERS)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layers(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _Clock(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times = warmup, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        trainer.strategy.barrier("clock")
        self.times.append(time.perf_counter())


def _train(rank: int, world_size: int, name: str, args: argparse.Namespace, grad_mb: float) -> float | None:
    import lightning_pipe  # noqa: F401 - registers the strategy names
    from lightning_pipe import PipelineStrategy

    torch.set_num_threads(1)
    stages = CONFIGS[name]
    replicas = world_size // stages
    microbatches = args.microbatches if stages > 1 else 1
    rows_per_call = args.batch_size // replicas // microbatches
    costs = SleepCosts.of(rows_per_call * args.t_f / 1e3, rows_per_call * args.t_b / 1e3)
    model = SleepModel(costs, int(grad_mb * 2**20 / 4 / LAYERS), microbatches)
    strategy: Any = "ddp" if stages == 1 else PipelineStrategy(num_stages=stages, num_microbatches=microbatches)
    return timed_fit(rank, world_size, model, strategy, args, replicas)


def timed_fit(rank: int, world_size: int, model: L.LightningModule, strategy: Any, args: argparse.Namespace,
              data_replicas: int) -> float | None:
    """Fit ``model`` on ``args.warmup + args.steps`` random batches of ``args.batch_size`` rows in all, which
    ``data_replicas`` replicas split (their sampler); rank 0 returns the seconds per step after the warm-up."""
    steps = args.warmup + args.steps
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * args.batch_size, WIDTH, generator=generator),
                         torch.randn(steps * args.batch_size, WIDTH, generator=generator))
    loader = DataLoader(data, batch_size=args.batch_size // data_replicas)
    clock = _Clock(args.warmup)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world_size, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock])
    trainer.fit(model, loader)
    times = clock.times
    return (times[-1] - times[args.warmup - 1]) / args.steps if rank == 0 else None


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for grad_mb in args.grad_mb:
        for name, stages in CONFIGS.items():
            step = run_ranks(_train, RANKS, name, args, grad_mb, timeout=600)[0]
            m = args.microbatches if stages > 1 else 1
            ideal = args.batch_size * LAYERS * (args.t_f + args.t_b) / 1e3 / RANKS * (m + stages - 1) / m
            rows.append({"grad_mb": grad_mb, "config": name, "stages": stages, "replicas": RANKS // stages,
                         "microbatches": m, "step_ms": 1e3 * step, "ideal_ms": 1e3 * ideal, "ratio": step / ideal})
        best = min((r for r in rows if r["grad_mb"] == grad_mb), key=lambda r: r["step_ms"])
        for row in rows:
            if row["grad_mb"] == grad_mb:
                row["fastest"] = "yes" if row is best else ""
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grad-mb", type=float, nargs="+", default=[0.0, 256.0, 384.0, 512.0],
                        help="megabytes of gradient of the whole model (spread over its layers)")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch (rows), all replicas together")
    parser.add_argument("--microbatches", type=int, default=2, help="micro-batches per pipeline replica")
    parser.add_argument("--t-f", type=float, default=2.0, help="forward ms per row and layer")
    parser.add_argument("--t-b", type=float, default=4.0, help="backward ms per row and layer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args)
    print(markdown_table(rows, ["grad_mb", "config", "stages", "replicas", "microbatches", "step_ms", "ideal_ms",
                                "ratio", "fastest"]))
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
