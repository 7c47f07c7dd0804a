"""A small classifier on scikit-learn's 8x8 handwritten digits (the data ships inside scikit-learn)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["DigitsDataModule", "DigitsClassifier"]


class DigitsDataModule(L.LightningDataModule):
    """``sklearn.datasets.load_digits``: 1,797 images of 64 pixels scaled to [0, 1], 10 classes.

    A stratified split with a fixed seed holds out ``val_fraction`` for validation. ``baseline`` is the
    entropy (nats) of the training labels: the loss of a classifier that ignores the pixels.
    """

    num_features = 64
    num_classes = 10

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.baseline: float | None = None
        self.baseline_name = "entropy of the training labels"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("the digits example needs scikit-learn: "
                              "pip install 'lightning_pipe[examples]'") from error
        images, labels = load_digits(return_X_y=True)
        x_train, x_val, y_train, y_val = train_test_split(images / 16.0, labels, test_size=self.hparams.val_fraction,
                                                          random_state=self.hparams.seed, stratify=labels)
        self.train_set = TensorDataset(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train))
        self.val_set = TensorDataset(torch.tensor(x_val, dtype=torch.float32), torch.tensor(y_val))
        frequencies = torch.bincount(torch.tensor(y_train), minlength=self.num_classes).double() / len(y_train)
        self.baseline = float(-(frequencies * frequencies.clamp_min(1e-12).log()).sum())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)


class DigitsClassifier(L.LightningModule):
    """An MLP as ``layers = Sequential(Linear+ReLU blocks..., Linear)``; logs loss and accuracy."""

    def __init__(self, num_features: int = 64, num_classes: int = 10, hidden: int = 128, num_layers: int = 4,
                 lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        widths = [num_features] + [hidden] * (num_layers - 1)
        self.layers = nn.Sequential(
            *[nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-1], widths[1:])],
            nn.Linear(widths[-1], num_classes),
        )
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.val_accuracy(logits, y)
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
