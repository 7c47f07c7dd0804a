"""LightningModules and data for the strategy tests: unchanged single-device code that PipelineStrategy must train."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from tests.models import mlp, tuple_model

__all__ = ["Regressor", "UnevenRegressor", "FrontHeavy", "TupleRegressor", "TiedLM", "NoSequence", "TwoSequences",
           "OutsideParameters", "OutsideHead", "Denoiser", "MaskedLM", "ActivationStages", "regression_data",
           "token_data", "MetricsLog", "IteratorStep"]


class Regressor(L.LightningModule):
    """An MLP in an nn.Sequential, called through forward; logs a loss and torchmetrics in train and validation."""

    def __init__(self, num_layers: int = 8, width: int = 16, lr: float = 0.05, optimizer: str = "sgd",
                 scheduler: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers = mlp(num_layers=num_layers, width=width, seed=0)
        self.example_input_array = torch.zeros(2, width)  # ModelSummary runs it on one device
        self.train_mae = MeanAbsoluteError()
        self.val_mse = MeanSquaredError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = F.mse_loss(out, y)
        self.train_mae(out, y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_mae", self.train_mae, on_step=True, on_epoch=True)
        self.log("train_max", out.max(), reduce_fx="max")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.val_mse.update(out, y)
        self.log("val_loss", F.mse_loss(out, y), prog_bar=True, sync_dist=True)
        self.log("val_mse", self.val_mse)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        error = (self(x) - y).abs()
        self.log("test_mae", error.mean())
        return {"per_row": error.mean(1), "mean": error.mean()}

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        elif self.hparams.optimizer == "lbfgs":
            optimizer = torch.optim.LBFGS(self.parameters(), lr=self.hparams.lr)
        elif self.hparams.optimizer == "sam":
            optimizer = SharpnessAware(self.parameters(), lr=self.hparams.lr)
        elif self.hparams.optimizer == "zero":  # a DDP recipe (found by review: a segmentation fault on a rank)
            from torch.distributed.optim import ZeroRedundancyOptimizer

            optimizer = ZeroRedundancyOptimizer(self.parameters(), optimizer_class=torch.optim.AdamW,
                                                lr=self.hparams.lr)
        elif self.hparams.optimizer == "two":  # one per half of the layers: Lightning asks for manual optimization
            params = list(self.parameters())
            return [torch.optim.SGD(params[:2], lr=self.hparams.lr), torch.optim.SGD(params[2:], lr=self.hparams.lr)]
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class IteratorStep(Regressor):
    """Lightning's iterator-style step: it fetches its own batch from ``dataloader_iter``."""

    def training_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        batch, _, _ = next(dataloader_iter)
        return F.mse_loss(self(batch[0]), batch[1])


class SharpnessAware(torch.optim.SGD):
    """SAM as a user writes it for automatic optimization: the closure's gradients, an ascent to the weights' worst
    neighbour scaled by the norm of every parameter's gradient, the closure again there, back, and SGD's step."""

    def __init__(self, params: Any, lr: float, rho: float = 0.05) -> None:
        super().__init__(params, lr=lr)
        self.rho = rho

    def step(self, closure: Any = None) -> Any:
        with torch.enable_grad():
            loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
            ascents = [p.grad * (self.rho / (norm + 1e-12)) for p in params]
            for p, ascent in zip(params, ascents):
                p.add_(ascent)
        self.zero_grad()
        with torch.enable_grad():
            closure()
        with torch.no_grad():
            for p, ascent in zip(params, ascents):
                p.sub_(ascent)
        super().step()
        return loss


class SharpnessAwareHook(Regressor):
    """SAM written in the module's ``optimizer_step``, the common Lightning form: the closure, an ascent, the closure
    again, back, and the step (the closure runs twice without the optimizer's ``step`` running it: found by review,
    7.5e-3 off one device, silently)."""

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        optimizer_closure()
        params = [p for p in self.parameters() if p.grad is not None]
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
            ascents = [p.grad * (0.05 / (norm + 1e-12)) for p in params]
            for p, ascent in zip(params, ascents):
                p.add_(ascent)
        optimizer.zero_grad()
        optimizer_closure()
        with torch.no_grad():
            for p, ascent in zip(params, ascents):
                p.sub_(ascent)
        optimizer.step()


class Wide(nn.Module):
    """One heavy layer: up to ``hidden`` features and back, hundreds of times the work of a ``width`` Linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


class UnevenRegressor(L.LightningModule):
    """Seven small Linear layers and a heavy last one: a profile should give the heavy layer a stage to itself. The
    step counts its calls before the model and scales the input by them (the planner's run of the step up to the
    layers left the count one ahead on the rank that planned)."""

    def __init__(self, width: int = 16, hidden: int = 32768, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(7)],
                                    Wide(width, hidden))
        self.calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.calls += 1
        loss = F.mse_loss(self.layers(x * (1 + 0.5 * self.calls)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class SlowLinear(nn.Module):
    """A Linear + Tanh whose forward also sleeps: slow compute that no cut can split, with few parameters."""

    def __init__(self, width: int, seconds: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.tanh(self.linear(x))


class FrontHeavy(UnevenRegressor):
    """A first layer that takes 15 ms per call and five that take almost nothing: on 4 devices the planner's best
    layout gives the first stage 3 replicas and the rest one device (PipeDream's "3-1")."""

    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__(width=width, hidden=1, lr=lr)
        torch.manual_seed(0)
        self.layers = nn.Sequential(SlowLinear(width, 0.015),
                                    *[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(5)])


class TupleRegressor(L.LightningModule):
    """Stages pass tuples; training_step prepares the input before the sequence and calls the sequence itself."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Module()
        self.net.blocks = tuple_model(width=16, seed=0)
        self.register_buffer("offset", torch.linspace(-1, 1, 16))  # a buffer outside the sequence

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = torch.tanh(x * 0.5 + self.offset)  # code before the sequence: runs where the batch enters
        loss = F.mse_loss(self.net.blocks(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Embed(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.linear(h))


class Head(nn.Module):
    def __init__(self, embed: Embed) -> None:
        super().__init__()
        vocab, width = embed.embedding.weight.shape
        self.proj = nn.Linear(width, vocab, bias=False)
        self.proj.weight = embed.embedding.weight  # tied to the token embedding

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


class TiedLM(L.LightningModule):
    """A tiny language model whose output head shares its weight with the token embedding (first and last stage)."""

    def __init__(self, vocab: int = 11, width: int = 8, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        embed = Embed(vocab, width)
        self.layers = nn.Sequential(embed, Block(width), Block(width), Block(width), Head(embed))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        logits = self.layers(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "mismatch":  # a different learning rate on each stage: the tie cannot hold
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr * (1 + self.global_rank))
        if self.hparams.optimizer == "by_name":  # no decay for the embedding, chosen by its name on one device
            named = dict(self.named_parameters())
            embedding = [p for n, p in named.items() if "embedding" in n]
            return torch.optim.AdamW([{"params": embedding, "weight_decay": 0.0},
                                      {"params": [p for n, p in named.items() if "embedding" not in n]}])
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class _Base(L.LightningModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoSequence(_Base):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class TwoSequences(_Base):
    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder = mlp(2), mlp(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class OutsideParameters(_Base):
    """A trainable layer before the sequence: the pipeline cannot train it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.layers = mlp(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.embed(x))


class OutsideHead(_Base):
    """A trainable layer after the sequence: the step's parameters under the pipeline, held by every rank."""

    def __init__(self, num_layers: int = 4) -> None:
        super().__init__()
        self.layers = mlp(num_layers)
        self.head = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


class Denoiser(L.LightningModule):
    """A diffusion-style step: random noise levels and noise drawn before the layers, the loss against that noise, and
    functional dropout on the prediction after them (random numbers on both sides of the sequence)."""

    def __init__(self, width: int = 16, num_layers: int = 4, lr: float = 0.1, dropout: float = 0.0,
                 output_dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers = mlp(num_layers=num_layers, width=width, seed=0, dropout=dropout)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        level = torch.rand(x.shape[0], 1)
        noise = torch.randn_like(x)
        predicted = self.layers(x * (1 - level) + noise * level)
        predicted = F.dropout(predicted, self.hparams.output_dropout, training=self.training)
        loss = F.mse_loss(predicted, noise)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        noise = torch.randn_like(x)
        self.log("val_loss", F.mse_loss(self.layers(x + noise), noise))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class MaskedLM(L.LightningModule):
    """An MLM-style step: a random mask (and random replacement tokens) drawn before the layers, the loss on the masked
    positions, and a random subset of the positions kept for the loss after them."""

    def __init__(self, vocab: int = 11, width: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.layers = nn.Sequential(Embed(vocab + 1, width), Block(width), Block(width), nn.Linear(width, vocab))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens = batch[0]
        masked = torch.rand(tokens.shape) < 0.3
        replaced = torch.where(torch.rand(tokens.shape) < 0.8, self.hparams.vocab,
                               torch.randint(0, self.hparams.vocab, tokens.shape))
        logits = self.layers(torch.where(masked, replaced, tokens))
        kept = masked & (torch.rand(tokens.shape) < 0.9)
        losses = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
        loss = (losses * kept.flatten()).sum() / kept.sum().clamp(min=1)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ActivationStages(L.LightningModule):
    """Layers of which some own no parameter: with ``partition=[2, 2]`` one stage trains nothing (the last one with
    ``last_untrainable``, else the first), and a configure_optimizers that keeps only trainable parameters."""

    def __init__(self, last_untrainable: bool = True, width: int = 16, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        trained = [nn.Linear(width, width), nn.Tanh()]
        free = [nn.Tanh(), nn.Identity()]
        self.layers = nn.Sequential(*(trained + free if last_untrainable else free + trained))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layers(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def regression_data(batches: int = 4, batch_size: int = 8, width: int = 16, seed: int = 1) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, width, generator=generator)
    y = torch.randn(batches * batch_size, width, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def token_data(batches: int = 4, batch_size: int = 6, length: int = 5, vocab: int = 11, seed: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batches * batch_size, length), generator=generator)
    return DataLoader(TensorDataset(tokens, tokens.roll(-1, dims=1)), batch_size=batch_size, shuffle=False)


class MetricsLog(Callback):
    """Records what the Trainer logged after every training batch and at the end of every validation."""

    def __init__(self) -> None:
        self.train: list[dict[str, float]] = []
        self.progress: list[dict[str, float]] = []
        self.validation: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.train.append({k: float(v) for k, v in trainer.logged_metrics.items()})
        self.progress.append({k: float(v) for k, v in trainer.progress_bar_metrics.items()})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validation.append({k: float(v) for k, v in trainer.callback_metrics.items()})
