"""LightningModules written the way public projects write them, for the strategy's "good citizen" tests: a network
passed in and kept in hyper-parameters (the lightning-hydra-template), second references to the layers, and a step
that returns a loss summed over rows (Lightning's bug-report template)."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["ReadmeAutoEncoder", "SwitchingAutoEncoder", "PeekingAutoEncoder", "NoGradAutoEncoder", "DenseNet", "TemplateModule", "Aliased", "SummedLoss", "CountingBackbone", "FrozenBackbone", "Blocks", "CapturedBackbone", "class_data",
           "row_data", "FineTuned", "PaddedLM", "padded_tokens", "CLASS_WEIGHTS", "Detector", "detection_data"]


class ReadmeAutoEncoder(L.LightningModule):
    """Lightning's README autoencoder: the step calls the encoder and the decoder itself; forward gives the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        x = x.view(x.size(0), -1)
        z = self.encoder(x)
        x_hat = self.decoder(z)
        loss = F.mse_loss(x_hat, x)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        self.log("val_loss", F.mse_loss(self.decoder(self.encoder(x)), x))

    def test_step(self, batch: Any, batch_idx: int) -> None:  # through forward: the encoder alone
        x, _ = batch
        self.log("z_norm", self(x).norm(dim=1).mean())

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # the embeddings
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class SwitchingAutoEncoder(ReadmeAutoEncoder):
    """Its test step embeds the first batch, and reconstructs the later ones."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        z = self(x)
        self.log("z_norm", (self.decoder(z) if batch_idx else z).norm(dim=1).mean())


class PeekingAutoEncoder(ReadmeAutoEncoder):
    """Uses the code between the encoder and the decoder: not a chain the pipeline can run."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        z = self.encoder(x)
        return F.mse_loss(self.decoder(z), x) + z.pow(2).mean()


class OneOptimizerGAN(L.LightningModule):
    """A GAN trained by one optimizer over both nets (their losses added): the discriminator is called on the real
    batch and on the generator's samples, so the two make no chain."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 12))
        self.disc = nn.Sequential(nn.Linear(12, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        fake = self.gen(x[:, :4])
        return F.softplus(-self.disc(x)).mean() + F.softplus(self.disc(fake)).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class NoGradAutoEncoder(ReadmeAutoEncoder):
    """Runs the encoder under torch.no_grad() (a frozen feature extractor, as linear probing writes it)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        with torch.no_grad():
            z = self.encoder(x)
        return F.mse_loss(self.decoder(z), x)


class UnfrozenTeacher(ReadmeAutoEncoder):
    """Distillation from a teacher left trainable (put in eval, used under torch.no_grad(), left out of the optimizer):
    the chain takes it for the first link. Called after the student here (the links out of their order)."""

    teacher_first = False

    def __init__(self) -> None:
        super().__init__()
        del self.encoder, self.decoder
        self.teacher = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
        self.student = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        if self.teacher_first:
            with torch.no_grad():
                target = self.teacher(x)
            student = self.student(x)
        else:
            student = self.student(x)
            with torch.no_grad():
                target = self.teacher(x)
        return F.kl_div(F.log_softmax(student, -1), F.log_softmax(target, -1), reduction="batchmean",
                        log_target=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.student(batch[0]).pow(2).mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.student.parameters(), lr=1e-2)


class UnfrozenTeacherFirst(UnfrozenTeacher):
    """The same, called before the student (its output, of another shape than the student's input, went to it)."""

    teacher_first = True


class DenseNet(nn.Module):
    """The template's SimpleDenseNet: an nn.Sequential inside a plain module that flattens its input."""

    def __init__(self, width: int = 12, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flatten(1))


class TemplateModule(L.LightningModule):
    """The lightning-hydra-template's module: ``net`` comes in, ``save_hyperparameters(logger=False)`` keeps it."""

    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Aliased(L.LightningModule):
    """Layers reached by three paths: ``self.layers`` (found first), ``self.model`` and ``self.head``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = DenseNet().model
        self.model = self.layers
        self.head = self.layers[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SummedLoss(L.LightningModule):
    """Lightning's bug-report BoringModel, with layers: the loss is ``self(batch).sum()``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self(batch).sum()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CountingBackbone(nn.Linear):
    """A frozen feature extractor that counts the calls and rows it computes."""

    def __init__(self) -> None:
        super().__init__(12, 12)
        self.requires_grad_(False)
        # counted in a dict changed in place: a module that binds new values to its attributes at each call (RevIN's
        # statistics) is never deferred, and the count is no such state
        self.counts = {"calls": 0, "rows": 0}

    @property
    def calls(self) -> int:
        return self.counts["calls"]

    @property
    def rows(self) -> int:
        return self.counts["rows"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counts["calls"] += 1
        self.counts["rows"] += x.shape[0]
        return torch.tanh(super().forward(x))


class FrozenBackbone(L.LightningModule):
    """A frozen backbone called in the step before the trained layers; ``distill`` also uses its features after."""

    def __init__(self, distill: bool = False) -> None:
        super().__init__()
        self.distill = distill
        self.backbone = CountingBackbone()
        self.layers = DenseNet().model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            features = self.backbone(x)
        loss = F.cross_entropy(self.layers(features), y)
        if self.distill:
            loss = loss + features.pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Blocks(nn.Module):
    """Residual blocks in a ModuleList that forward loops over: no nn.Sequential (the captured path)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(12, 12) for _ in range(4))
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


class ProbeBackbone(nn.Module):
    """Four residual blocks in a ModuleList: a pretrained backbone, in this test untrained."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(12, 12) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return x


class LinearProbe(L.LightningModule):
    """A backbone frozen in ``__init__`` under a trained head, both run by the module's ``forward`` (linear probing;
    with Lightning's ``BackboneFinetuning`` the backbone trains from a later epoch, with a group of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ProbeBackbone()
        self.head = nn.Linear(12, 4)
        self.backbone.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=0.01)


class CapturedBackbone(L.LightningModule):
    """A frozen backbone called in the step before a model that is captured."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = CountingBackbone()
        self.model = Blocks()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            features = self.backbone(x)
        loss = F.cross_entropy(self.model(features), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


CLASS_WEIGHTS = (1.0, 3.0, 0.5, 1.0)


class FineTuned(L.LightningModule):
    """Fine-tuning as projects write it: the module's own forward runs a backbone and a head kept in two attributes;
    ``configure_optimizers`` gives each its own learning rate by attribute; the loss is a class-weighted cross entropy
    kept as a child module (a buffer, no parameters), which the step calls after the model."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Blocks()
        self.head = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
        self.criterion = nn.CrossEntropyLoss(weight=torch.tensor(CLASS_WEIGHTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([{"params": self.backbone.parameters(), "lr": 0.02},
                                {"params": self.head.parameters()}], lr=0.2, momentum=0.9)


class PaddedLM(L.LightningModule):
    """A Hugging Face causal LM fine-tuned on padded rows: the labels are -100 on the padding, and the model's own
    loss is a mean over the other labels."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=24, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, mask = batch
        loss = self.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        self.log("train_loss", loss)
        self.log("train_ppl", loss.exp())  # not a mean over rows: the whole batch's, from the model's own loss
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        ids, mask = batch
        loss = self.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        self.log("val_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def padded_tokens(batches: int = 3, batch_size: int = 8, length: int = 9, seed: int = 5) -> DataLoader:
    """Token rows of random lengths (at least 3), padded with 0 and masked."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 24, (batches * batch_size, length), generator=generator)
    lengths = torch.randint(3, length + 1, (batches * batch_size,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return DataLoader(TensorDataset(ids * mask, mask), batch_size=batch_size)


def class_data(batches: int = 3, batch_size: int = 8, seed: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * batch_size, 12, generator=generator)
    y = torch.randint(0, 4, (batches * batch_size,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def row_data(batches: int = 3, batch_size: int = 8, seed: int = 4) -> DataLoader:
    x = torch.randn(batches * batch_size, 12, generator=torch.Generator().manual_seed(seed))
    return DataLoader(x, batch_size=batch_size)  # batches are tensors, as the BoringModel's RandomDataset gives


class VAE(nn.Module):
    """A variational autoencoder used through its methods, as diffusers' ``AutoencoderKL`` is: ``encode`` gives the
    posterior's mean and log-variance, ``decode`` the reconstruction; its ``forward`` is never called."""

    def __init__(self, width: int = 12, hidden: int = 16, code: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.moments = nn.Linear(hidden, 2 * code)
        self.decoder = nn.Sequential(nn.Linear(code, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, width))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_variance = self.moments(self.encoder(x)).chunk(2, dim=-1)
        return mean, log_variance.clamp(-10, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])


class VariationalAutoEncoder(L.LightningModule):
    """The step calls ``self(x)``, whose forward uses the VAE's ``encode`` and ``decode``; ``calls='methods'``: the
    step calls them itself, so there is no forward to pipeline (refused, saying so)."""

    def __init__(self, calls: str = "forward") -> None:
        super().__init__()
        self.vae, self.calls = VAE(), calls

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_variance = self.vae.encode(x)
        return self.vae.decode(mean), mean, log_variance  # the posterior's mode: no draw, so one device's numbers

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        if self.calls == "methods":
            mean, log_variance = self.vae.encode(x)
            reconstruction = self.vae.decode(mean)
        else:
            reconstruction, mean, log_variance = self(x)
        kl = -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp()).sum(-1).mean()
        loss = F.mse_loss(reconstruction, x) + 0.1 * kl
        self.log("train_loss", loss)
        self.log("lr", self.optimizers().param_groups[0]["lr"])  # no optimizer yet when the strategy looks at the step
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Detector(L.LightningModule):
    """A detection-style project: stacked images, and per-image targets (a different number of boxes each) that a
    custom ``collate_fn`` leaves as a list of dicts; the step matches predictions to targets image by image."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = [F.smooth_l1_loss(out[:4].expand_as(target["boxes"]), target["boxes"])
                  + F.cross_entropy(out[4:].expand(len(target["labels"]), 2), target["labels"])
                  for out, target in zip(self.net(images), targets)]
        loss = torch.stack(losses).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Boxes(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(index)
        count = 1 + index % 3
        return torch.randn(3, 16, 16, generator=generator), {
            "boxes": torch.rand(count, 4, generator=generator),
            "labels": torch.randint(0, 2, (count,), generator=generator)}


def detection_data(batch_size: int = 8) -> DataLoader:
    def collate(items: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, list[Any]]:
        return torch.stack([image for image, _ in items]), [target for _, target in items]

    return DataLoader(_Boxes(), batch_size=batch_size, collate_fn=collate)


class BornAgain(L.LightningModule):
    """A born-again network: the student distils a frozen teacher of its own structure (the previous generation),
    which the step only calls: it pairs nothing with the student, so nothing is said of it."""

    def __init__(self, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, classes))
        self.teacher = nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, classes)).requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.student(x)
        with torch.no_grad():
            soft = F.log_softmax(self.teacher(x), -1)
        return F.cross_entropy(logits, y) + F.kl_div(F.log_softmax(logits, -1), soft, reduction="batchmean",
                                                      log_target=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.student.parameters(), lr=0.1)


class MeanTeacher(BornAgain):
    """A mean teacher: the teacher is an EMA of the student, updated after each batch by pairing their parameters,
    which under a pipeline pairs the teacher's first layers with each rank's share (``equal``: every layer of one
    shape, so the pairing is silent; else a shape error)."""

    def __init__(self, equal: bool = True) -> None:
        super().__init__(*((12, 12) if equal else (16, 4)))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            for teacher, student in zip(self.teacher.parameters(), self.student.parameters()):
                teacher.lerp_(student, 0.1)


class ModelEmaV2(nn.Module):
    """timm's ``ModelEmaV2`` as it works: a deep copy of the model as ``.module``, updated by pairing the two
    state dicts' values."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        super().__init__()
        self.module, self.decay = copy.deepcopy(model).requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            ema.copy_(ema * self.decay + (1.0 - self.decay) * value)


class AveragedStudent(BornAgain):
    """A student with timm's EMA made in ``__init__`` and updated in ``on_train_batch_end``, timm's places: under a
    pipeline it pairs the average's first layers with each rank's share (layers of other shapes: a shape error)."""

    def __init__(self, equal: bool = True) -> None:
        super().__init__(16, 4)
        del self.teacher
        self.ema = ModelEmaV2(self.student)
        self.broken = not equal  # a shape error of the step's own, the average never updated

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.student(x)
        return F.cross_entropy(logits + torch.zeros(3) if self.broken else logits, y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.broken:
            self.ema.update(self.student)


class MomentumBYOL(L.LightningModule):
    """BYOL as lightly writes it: momentum copies of the backbone and of the projection head (deep copies, frozen),
    updated with ``torch._foreach`` ops pairing their parameters with the model's (lightly's ``update_momentum``), in
    the step before the model (``where="step"``, lightly's example; ``"backbone"``: the backbone's copy alone) or in a
    hook every rank runs (``"hook"``); ``"zip_hook"``: the backbone's copy by a loop pairing the parameters, in
    ``on_before_zero_grad``."""

    def __init__(self, where: str = "step") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.where = where
        self.backbone = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.projection_head = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
        self.prediction_head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.backbone_momentum = copy.deepcopy(self.backbone).requires_grad_(False)
        self.projection_head_momentum = copy.deepcopy(self.projection_head).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    def _update_momentum(self) -> None:
        with torch.no_grad():
            pairs = [(self.backbone, self.backbone_momentum), (self.projection_head, self.projection_head_momentum)]
            if self.where == "zip_hook":  # by hand, where Lightning's docs put an EMA's update
                for model, ema in pairs[:1]:
                    for p, q in zip(model.parameters(), ema.parameters()):
                        q.mul_(0.99).add_(p.detach(), alpha=0.01)
                return
            for model, ema in pairs[:1] if self.where == "backbone" else pairs:
                targets = list(ema.parameters())
                torch._foreach_mul_(targets, 0.99)
                torch._foreach_add_(targets, list(model.parameters()), alpha=0.01)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.where == "hook":
            self._update_momentum()

    def on_before_zero_grad(self, optimizer: Any) -> None:
        if self.where == "zip_hook":
            self._update_momentum()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.where not in ("hook", "zip_hook"):
            self._update_momentum()
        x, _ = batch
        p0, p1 = self(x), self(x.flip(1))
        z0, z1 = self.forward_momentum(x), self.forward_momentum(x.flip(1))
        return -0.5 * (F.cosine_similarity(p0, z1).mean() + F.cosine_similarity(p1, z0).mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class CenteredLoss(nn.Module):
    """DINO's centering: targets centered by a running mean of the batch's targets kept in a buffer, updated after the
    loss."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(1, width))

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = (out - (target - self.center)).pow(2).mean()
        with torch.no_grad():
            self.center.mul_(0.9).add_(target.mean(0, keepdim=True), alpha=0.1)
        return loss


class Centered(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12))
        self.criterion = CenteredLoss(12)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        return self.criterion(self.net(x), x.flip(1) * 2 + 1)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)
