"""Random numbers in the step code: a small diffusion-style denoiser trained on one device and through the pipeline.

The step draws the noise before the model and computes the loss against it after (``noise = torch.randn_like(x)``;
``loss = mse(model(x + noise), noise)``); the model has dropout in its first layers. Under a pipeline the first stage
runs the step up to the model and the last stage runs it again around the loss: if they drew different noise, the
last stage would train against noise the first stage never added, and the model would learn nothing (loss ~1, the
noise's variance). Run from the repository root::

    python -m benchmarks.random_step_code                       # one device, then 2 ranks under 1f1b
    python -m benchmarks.random_step_code --schedule gpipe --steps 400 --json denoiser.json

Prints the mean training loss of the last ``--tail`` steps of each run.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from benchmarks.common import write_json

__all__ = ["main"]


def _make(width: int, hidden: int, seed: int) -> tuple[Any, Any]:
    import lightning as L
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class Denoiser(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.layers = nn.Sequential(nn.Linear(width, hidden), nn.Dropout(0.1), nn.GELU(),
                                        nn.Linear(hidden, hidden), nn.Dropout(0.1), nn.GELU(),
                                        nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, width))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x = batch[0]
            noise = torch.randn_like(x)
            loss = F.mse_loss(self.layers(x + noise), noise)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=2e-3)

    generator = torch.Generator().manual_seed(seed + 1)
    basis = torch.randn(2, width, generator=generator)  # clean data on a plane: most of the noise is recognisable
    x = torch.randn(4096, 2, generator=generator) @ basis
    return Denoiser(), DataLoader(TensorDataset(x), batch_size=64, shuffle=True)


def _fit(strategy: Any, devices: int, steps: int, width: int, hidden: int, seed: int) -> list[float]:
    import lightning as L

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            self.values.append(float(trainer.callback_metrics["loss"]))

    L.seed_everything(seed, verbose=False)
    model, data = _make(width, hidden, seed)
    losses = Losses()
    L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=steps, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[losses]).fit(model, data)
    return losses.values


def _pipelined(rank: int, world_size: int, schedule: str, microbatches: int, steps: int, width: int, hidden: int,
               seed: int) -> list[float]:
    from lightning_pipe import PipelineStrategy

    return _fit(PipelineStrategy(schedule=schedule, num_microbatches=microbatches), world_size, steps, width,
                hidden, seed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lightning_pipe.engine.launch import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", "-m", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tail", type=int, default=50, help="steps at the end whose losses are averaged")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    one = _fit("auto", 1, args.steps, args.width, args.hidden, args.seed)
    pipe = run_ranks(_pipelined, args.ranks, args.schedule, args.microbatches, args.steps, args.width, args.hidden,
                     args.seed, timeout=1800)[0]
    result = {"config": vars(args), "one_device": statistics.fmean(one[-args.tail:]),
              "pipeline": statistics.fmean(pipe[-args.tail:]), "one_device_losses": one, "pipeline_losses": pipe}
    print(f"denoiser, {args.steps} steps, mean loss of the last {args.tail}: one device {result['one_device']:.3f}, "
          f"{args.ranks} ranks {args.schedule} {result['pipeline']:.3f}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
