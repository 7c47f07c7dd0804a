"""A LightningCLI project, unchanged but for its command line: ``--trainer.strategy=pipedream`` (the registered name)
and ``--trainer.strategy=lightning_pipe.PipelineStrategy`` with its arguments as ``--trainer.strategy.<name>`` (the
class path form, which jsonargparse checks against the constructor's signature). Each trains 2 CPU ranks, launched
by the strategy as DDP launches its processes, to the weights one device reaches; the saved config names the
strategy's arguments, so the run repeats from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("jsonargparse")

PROJECT = '''
import torch, torch.nn as nn, torch.nn.functional as F
import lightning as L
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset
import lightning_pipe  # registers "pipedream" with Lightning


class Regressor(L.LightningModule):
    def __init__(self, width: int = 16, depth: int = 4, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        blocks = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]
        self.net = nn.Sequential(*blocks, nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int = 8):
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(48, 16, generator=g), torch.randn(48, 1, generator=g))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


if __name__ == "__main__":
    torch.set_num_threads(1)
    LightningCLI(Regressor, Data, seed_everything_default=5)
'''

COMMON = ["fit", "--trainer.accelerator=cpu", "--trainer.max_epochs=2", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(tmp: Path, name: str, *args: str) -> dict[str, torch.Tensor]:
    root = tmp / name
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(tmp / "project.py"), *COMMON, f"--trainer.default_root_dir={root}",
                           *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (checkpoint,) = (root / "checkpoints").glob("*.ckpt")
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.timeout(600)
def test_lightning_cli_project_trains_to_one_device(tmp_path: Path) -> None:
    (tmp_path / "project.py").write_text(PROJECT)
    one = _fit(tmp_path, "one", "--trainer.devices=1")
    named = _fit(tmp_path, "named", "--trainer.devices=2", "--trainer.strategy=pipedream")
    classed = _fit(tmp_path, "classed", "--trainer.devices=2", "--trainer.strategy=lightning_pipe.PipelineStrategy",
                   "--trainer.strategy.num_microbatches=4", "--trainer.strategy.schedule=gpipe")
    assert one.keys() == named.keys() == classed.keys()
    for weights in (named, classed):
        worst = max((weights[k] - one[k]).abs().max().item() for k in one)
        assert worst < 1e-5, worst
    config = (tmp_path / "classed" / "config.yaml").read_text()
    assert "class_path: lightning_pipe.PipelineStrategy" in config
    assert "num_microbatches: 4" in config and "schedule: gpipe" in config
