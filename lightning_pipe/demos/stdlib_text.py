"""Text that ships with every Python: the standard library's own ``.py`` sources, as byte-level windows."""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["stdlib_sources", "split_interleaved", "unigram_entropy", "ByteWindows", "StdlibTextDataModule"]

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def stdlib_sources(max_bytes: int, root: str | Path | None = None) -> bytes:
    """Up to ``max_bytes`` of the standard library's ``.py`` files, in an order fixed by their paths.

    Files are ordered by a hash of their relative path (so the pick spans the whole library, not just the
    modules whose names start with ``a``), test suites and installed packages are skipped, and whole files
    are taken until the budget is reached. The same Python version always gives the same bytes.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: is this Python's standard library directory?")
    files.sort(key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())
    chunks, size = [], 0
    for path in files:
        data = path.read_bytes()
        if size + len(data) > max_bytes and chunks:
            continue  # skip files that overflow the budget; smaller ones later may still fit
        chunks.append(data)
        size += len(data)
        if size >= max_bytes * 0.99:
            break
    return b"\n".join(chunks)


def split_interleaved(data: bytes, val_fraction: float, chunk_bytes: int = 16384) -> tuple[bytes, bytes]:
    """(train, val): every ``round(1 / val_fraction)``-th chunk of ``chunk_bytes`` validates, the rest trains.

    Interleaving keeps validation representative: one contiguous tail would be a handful of files, and the
    standard library's last few can be generated tables (``html/entities.py``) unlike the code before them.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction ({val_fraction}) must be between 0 and 1")
    every = max(2, round(1.0 / val_fraction))
    chunk_bytes = max(1, min(chunk_bytes, len(data) // (4 * every)))  # small texts: still >= 4 val chunks
    chunks = [data[i:i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    val = [c for i, c in enumerate(chunks) if i % every == every - 1]
    train = [c for i, c in enumerate(chunks) if i % every != every - 1]
    return b"".join(train), b"".join(val)


def unigram_entropy(data: bytes) -> float:
    """Entropy in nats of the byte frequencies of ``data``: the loss of a model that ignores context."""
    counts = Counter(data)
    total = len(data)
    return -sum(c / total * math.log(c / total) for c in counts.values())


class ByteWindows(Dataset):
    """Non-overlapping windows of ``block_size`` bytes, each with its targets shifted by one byte."""

    def __init__(self, data: bytes, block_size: int) -> None:
        if len(data) < block_size + 1:
            raise ValueError(f"text of {len(data)} bytes is shorter than one window ({block_size + 1} bytes)")
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        chunk = self.data[start:start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class StdlibTextDataModule(L.LightningDataModule):
    """Byte-level language modelling on Python's standard-library sources (vocabulary: 256 byte values).

    ``val_fraction`` of the text (every n-th 16 KiB chunk) validates, the rest trains. ``baseline`` is the unigram
    entropy of the training text in nats: a model must get under it to have learned anything from context.
    """

    vocab_size = 256

    def __init__(self, block_size: int = 128, batch_size: int = 32, max_bytes: int = 2_000_000,
                 val_fraction: float = 0.05, num_workers: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction ({val_fraction}) must be between 0 and 1, e.g. 0.05")
        self.save_hyperparameters()
        self.train_set: ByteWindows | None = None
        self.val_set: ByteWindows | None = None
        self.baseline: float | None = None
        self.baseline_name = "unigram entropy of the training text"

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = split_interleaved(stdlib_sources(self.hparams.max_bytes), self.hparams.val_fraction)
        self.train_set = ByteWindows(train, self.hparams.block_size)
        self.val_set = ByteWindows(val, self.hparams.block_size)
        self.baseline = unigram_entropy(train)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)
