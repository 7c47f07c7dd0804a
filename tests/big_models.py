"""LightningModules for the tests of models bigger than one device: built in configure_model() or on the meta device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

__all__ = ["built_like_the_strategy", "EMA", "KeptPeakRegressor", "LazyRegressor", "LoadedRegressor", "loaded_layers",
           "materialized_like_pipeline", "MeteredRegressor", "NotedRegressor", "Pretrained", "PretrainedLora",
           "Rotation", "RotatedRegressor", "Scale", "skipping_orthogonal_", "ScaledRegressor", "Shift"]


class LazyRegressor(L.LightningModule):
    """An MLP whose layers are built in ``configure_model()`` (on the meta device under PipelineStrategy); Adam and a
    step LR scheduler, and optionally dropout, so that a resume must restore optimizer, scheduler and random state."""

    def __init__(self, num_layers: int = 8, width: int = 16, lr: float = 0.02, dropout: float = 0.0,
                 noise: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layers: nn.Sequential | None = None

    def configure_model(self) -> None:
        if self.layers is not None:
            return
        width, dropout = self.hparams.width, self.hparams.dropout
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout))
                                      for _ in range(self.hparams.num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.layers is not None
        return self.layers(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x) + self.hparams.noise * torch.randn_like(y), y)  # noise: the step code's randomness
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MeteredRegressor(LazyRegressor):
    """LazyRegressor that builds its torchmetrics in ``configure_model()`` beside the layers: a mean squared error
    (states starting at zero) and a running maximum (a state starting at minus infinity), logged per epoch."""

    def configure_model(self) -> None:
        if self.layers is not None:
            return
        import torchmetrics

        super().configure_model()
        self.mse = torchmetrics.MeanSquaredError()
        self.worst = torchmetrics.MaxMetric()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        prediction = self(x)
        self.mse(prediction, y)
        self.worst((prediction - y).abs().amax(dim=1) - 10.0)  # below zero: a state that started at 0 would show
        self.log_dict({"val_mse": self.mse, "val_worst": self.worst})


class Pretrained(L.LightningModule):
    """Fine-tuning as Hugging Face users write it: ``from_pretrained`` in ``configure_model()`` (a GPT-2 saved at
    ``path``)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            from transformers import GPT2LMHeadModel

            self.model = GPT2LMHeadModel.from_pretrained(self.path)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PretrainedLora(Pretrained):
    """LoRA fine-tuning as PEFT users write it: ``from_pretrained`` then ``get_peft_model`` in ``configure_model()`` (a
    Llama saved at ``path``); only the adapters train."""

    def configure_model(self) -> None:
        if self.model is None:
            from peft import LoraConfig, get_peft_model
            from transformers import LlamaForCausalLM

            adapters = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
            self.model = get_peft_model(LlamaForCausalLM.from_pretrained(self.path), adapters)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class Scale(nn.Module):
    """A layer without ``reset_parameters()``: built on the meta device under the strategy, its ``torch.ones`` is
    computed again from the recorded construction (strategy/recorded_init.py)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def skipping_orthogonal_(tensor: torch.Tensor) -> torch.Tensor:
    """A project's own initialization that returns at once for a meta tensor (as torch's ``orthogonal_`` does)."""
    if tensor.is_meta:
        return tensor
    with torch.no_grad():
        return tensor.copy_(torch.linalg.qr(torch.randn(tensor.shape))[0])


class Rotation(nn.Module):
    """A layer initialized by the project's own function, which skips meta tensors, so the recording sees nothing:
    built on the meta device, only a checkpoint can give it values."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, width))
        skipping_orthogonal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class LoadedRegressor(L.LightningModule):
    """Layers built in ``configure_model()`` that load their weights there (``load_state_dict`` from a file saved at
    ``path``), layers without ``reset_parameters()`` among them (a parameter, a buffer)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.layers: nn.Sequential | None = None

    def configure_model(self) -> None:
        if self.layers is None:
            self.layers = loaded_layers()
            self.layers.load_state_dict(torch.load(self.path, mmap=True, weights_only=True))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        assert self.layers is not None
        return F.mse_loss(self.layers(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class KeptPeakRegressor(LoadedRegressor):
    """LoadedRegressor that keeps, beside the layers it builds in ``configure_model()``, the running maximum of its
    outputs in a plain tensor attribute (``peak``); with ``scaled``, also the running minimum in a buffer (``trough``)
    and a learned scale applied in the step (so its forward is captured); with ``guarded=False`` its
    ``configure_model()`` builds the layers again on every call, which Lightning asks it not to."""

    def __init__(self, path: str, scaled: bool = False, guarded: bool = True) -> None:
        super().__init__(path)
        self.scaled, self.guarded = scaled, guarded

    def configure_model(self) -> None:
        if self.guarded and self.layers is not None:
            return
        self.layers = loaded_layers()
        self.layers.load_state_dict(torch.load(self.path, mmap=True, weights_only=True))
        self.peak = torch.tensor(float("-inf"))
        if self.scaled:
            self.register_buffer("trough", torch.tensor(float("inf")))
            self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.layers is not None
        return self.layers(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x) * self.scale if self.scaled else self(x)
        self.peak = torch.maximum(self.peak, out.max().detach())
        if self.scaled:
            self.trough = torch.minimum(self.trough, out.min().detach())
        return F.mse_loss(out, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))


def loaded_layers() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 16), Shift(16), nn.Tanh(), Scale(16), nn.Linear(16, 16))


class Shift(nn.Module):
    """A persistent buffer added to the input, and no ``reset_parameters()``: on meta, only loaded values fill it;
    and a non-persistent one its construction computes (a rope table's frequencies), which no state dict holds."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(width))
        self.register_buffer("frequencies", 1.0 / 10000 ** (torch.arange(width) / width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset + 0.0 * self.frequencies


class ScaledRegressor(LazyRegressor):
    """LazyRegressor with a Scale after every Linear, built in ``__init__``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(num_layers=4, width=width)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), Scale(width), nn.Tanh())
                                      for _ in range(4)])


class RotatedRegressor(LazyRegressor):
    """LazyRegressor with a Rotation after every Linear, built in ``__init__``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(num_layers=4, width=width)
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), Rotation(width), nn.Tanh())
                                      for _ in range(4)])


class EMA(Callback):
    """Shadow weights (an exponential moving average) of this rank's parameters, kept in the callback's state."""

    def __init__(self, decay: float = 0.5) -> None:
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        for name, param in module.named_parameters():
            value = param.detach().clone()
            self.shadow[name] = value if name not in self.shadow else self.decay * self.shadow[name] + (
                1 - self.decay) * value

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = dict(state["shadow"])


@contextlib.contextmanager
def built_like_the_strategy() -> Iterator[None]:
    """The block PipelineStrategy builds a module in (``configure_model()``, ``Trainer.init_module()``): on the meta
    device, a few things on the CPU, the construction recorded; for the one-device references of meta-built runs."""
    from lightning_pipe.strategy.host_built import built_on_host
    from lightning_pipe.strategy.recorded_init import recording

    with torch.device("meta"), built_on_host(), recording():
        yield


def materialized_like_pipeline(module: nn.Module, seed: int) -> nn.Module:
    """``module`` (layers on the meta device) with the values PipelineStrategy's materialization gives them on any
    layout, here on one device: the reference a pipelined run of a meta-built module is compared with."""
    from lightning_pipe.strategy.materialize import LocalMaterializer
    from lightning_pipe.strategy.split import find_sequence

    _, sequence = find_sequence(module)
    LocalMaterializer(module, sequence, torch.device("cpu"), seed)([sequence])
    return module


class NotedRegressor(LazyRegressor):
    """LazyRegressor whose ``on_save_checkpoint`` adds an entry that differs on every rank, and which records what
    ``on_load_checkpoint`` gave it back."""

    def __init__(self) -> None:
        super().__init__(noise=0.01)
        self.loaded_note: str | None = None
        self.draws: list[tuple[float, float, float]] = []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["stage_note"] = f"written by rank {self.global_rank}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_note = checkpoint.get("stage_note")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        import random

        import numpy

        # user code drawing from the global generators (of this rank: they differ between ranks)
        self.draws.append((torch.rand(1).item(), random.random(), float(numpy.random.rand())))
