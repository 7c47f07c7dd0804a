"""Train a pipeline with the engine alone, from a plain script: no Lightning, no Trainer.

A character-level next-token model (embedding, 6 MLP blocks, head) learns Python's own standard-library
source code, cut into one stage per process. Run it on CPU with two ranks:

    .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 examples/engine_only.py

Every rank builds the same model from the same seed and calls the same methods with the same batches;
each keeps and trains only its own stage. The loss is printed by the rank that holds the last stage.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sysconfig
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lightning_pipe.engine.executor import Pipeline

CONTEXT = 32


def stdlib_text(max_chars: int = 400_000) -> str:
    """Text that ships with Python: its standard library's sources, in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(chunks)[:max_chars]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h))


class Embed(nn.Module):
    """Embeds the last CONTEXT characters and flattens them into one vector per position."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, 16)
        self.project = nn.Linear(16 * CONTEXT, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.tokens(x).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    text = stdlib_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text])
    counts = torch.bincount(ids, minlength=len(vocab)).float()
    unigram = -(counts / counts.sum() * (counts / counts.sum()).clamp_min(1e-12).log()).sum().item()

    torch.manual_seed(0)  # same weights on every rank
    width = 256
    model = nn.Sequential(Embed(len(vocab), width), *[Block(width) for _ in range(6)],
                          nn.Sequential(nn.LayerNorm(width), nn.Linear(width, len(vocab))))
    pipe = Pipeline(model, schedule=args.schedule, num_microbatches=args.microbatches,
                    loss_fn=lambda logits, mb: F.cross_entropy(logits, mb[1]))
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=2e-3)

    generator = torch.Generator().manual_seed(1)  # same batches on every rank
    start, tokens = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(ids) - CONTEXT - 1, (args.batch_size,), generator=generator)
        x = torch.stack([ids[o : o + CONTEXT] for o in offsets])
        y = ids[offsets + CONTEXT]
        loss = pipe.train_step((x, y))
        optimizer.step()
        optimizer.zero_grad()
        tokens += args.batch_size
        if pipe.is_last_rank and (step % 50 == 0 or step == 1):
            print(f"step {step:4d}  loss {loss.item():.3f} nats  (unigram baseline {unigram:.3f})"
                  f"  {tokens / (time.perf_counter() - start):,.0f} tokens/s", flush=True)
    if pipe.is_last_rank:
        print(f"done: final loss {loss.item():.3f} vs unigram {unigram:.3f} "
              f"({math.exp(unigram - loss.item()):.1f}x lower perplexity)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
