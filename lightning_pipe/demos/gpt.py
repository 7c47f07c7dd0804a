"""A small character-level GPT whose layers are one ``nn.Sequential``, the shape a pipeline strategy cuts."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Embed", "Block", "Head", "GPT"]


class Embed(nn.Module):
    """Token ids (batch, time) -> token + position embeddings (batch, time, width)."""

    def __init__(self, vocab_size: int, width: int, block_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(block_size, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.dropout(self.token(tokens) + self.position(positions))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each with a residual connection."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width ({width}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, time, width))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    """Final norm and projection to next-token logits (batch, time, vocab)."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class GPT(L.LightningModule):
    """Next-token prediction over bytes: ``layers = Sequential(Embed, *Blocks, Head)``.

    Batches are ``(tokens, targets)``, both (batch, time) int64, targets shifted by one. The learning rate
    warms up linearly for ``warmup_steps`` and then follows a cosine down to ``lr / 10`` at the trainer's
    ``max_steps`` (``lr_schedule="cosine"``), or stays at ``lr`` (``"constant"``).
    """

    def __init__(self, vocab_size: int = 256, block_size: int = 128, width: int = 128, num_layers: int = 4,
                 num_heads: int = 4, dropout: float = 0.0, lr: float = 3e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 20, lr_schedule: str = "cosine") -> None:
        super().__init__()
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.save_hyperparameters()
        self.layers = nn.Sequential(
            Embed(vocab_size, width, block_size, dropout),
            *[Block(width, num_heads, dropout) for _ in range(num_layers)],
            Head(width, vocab_size),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, targets = batch
        return F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def generate(self, prompt: bytes, num_bytes: int, temperature: float = 0.8, seed: int = 0) -> bytes:
        """Continue ``prompt`` by ``num_bytes`` sampled bytes (on one device, with the whole model)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens = torch.tensor(list(prompt) or [10], device=self.device)[None]
        for _ in range(num_bytes):
            logits = self(tokens[:, -self.hparams.block_size:])[:, -1] / temperature
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            tokens = torch.cat([tokens, next_token], dim=1)
        return bytes(tokens[0, len(prompt):].tolist())

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.dim() >= 2]  # matrices and embeddings; not norms or biases
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=self.hparams.lr, betas=(0.9, 0.95))
        if self.hparams.lr_schedule == "constant":
            return optimizer
        warmup, total = self.hparams.warmup_steps, max(1, self.trainer.max_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.trainer.max_steps <= 0:  # no known end: stay at the peak
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
