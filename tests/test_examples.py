"""The example models and data that ship in the package: shapes, determinism, baselines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from lightning_pipe.demos import GPT, DigitsClassifier, DigitsDataModule, StdlibTextDataModule
from lightning_pipe.demos.stdlib_text import ByteWindows, stdlib_sources, unigram_entropy


def test_stdlib_text_is_deterministic_and_within_budget() -> None:
    first, second = stdlib_sources(200_000), stdlib_sources(200_000)
    assert first == second and 100_000 < len(first) <= 200_000
    assert b"def " in first and b"import " in first


def test_unigram_entropy_of_known_text() -> None:
    assert unigram_entropy(b"aaaa") == 0.0
    assert math.isclose(unigram_entropy(b"abab"), math.log(2))


def test_byte_windows_shift_targets_by_one() -> None:
    windows = ByteWindows(b"0123456789", block_size=4)
    assert len(windows) == 2
    x, y = windows[1]
    assert bytes(x.tolist()) == b"4567" and bytes(y.tolist()) == b"5678"


def test_stdlib_datamodule_splits_and_has_a_baseline() -> None:
    data = StdlibTextDataModule(block_size=64, batch_size=4, max_bytes=100_000, val_fraction=0.1)
    data.setup("fit")
    assert len(data.train_set) > 8 * len(data.val_set) > 0
    assert 2.0 < data.baseline < 5.0  # source code: far from uniform over 256 bytes (5.55 nats)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64


def test_gpt_is_one_sequential_and_predicts_every_position() -> None:
    model = GPT(block_size=16, width=32, num_layers=2, num_heads=4)
    assert isinstance(model.layers, nn.Sequential) and len(model.layers) == 4
    tokens = torch.randint(0, 256, (3, 16))
    assert model(tokens).shape == (3, 16, 256)
    assert len(model.generate(b"def ", 5)) == 5


def test_gpt_is_causal() -> None:
    model = GPT(block_size=8, width=16, num_layers=1, num_heads=2).eval()
    a, b = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8))
    b[0, :5] = a[0, :5]
    assert torch.allclose(model(a)[0, :5], model(b)[0, :5], atol=1e-6)


def test_gpt_default_size_is_in_range() -> None:
    params = sum(p.numel() for p in GPT().parameters())
    assert 500_000 < params < 2_000_000


def test_digits_datamodule_and_classifier() -> None:
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (the 'examples' extra)")
    data = DigitsDataModule(batch_size=16)
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 1797
    assert math.isclose(data.baseline, math.log(10), rel_tol=0.01)
    x, y = next(iter(data.train_dataloader()))
    model = DigitsClassifier()
    assert isinstance(model.layers, nn.Sequential) and model(x).shape == (16, 10)


def test_split_interleaved_takes_every_nth_chunk() -> None:
    from lightning_pipe.demos.stdlib_text import split_interleaved

    data = bytes(range(10)) * 100  # 1000 bytes, chunks of 10: every 4th chunk validates
    train, val = split_interleaved(data, 0.25, chunk_bytes=10)
    assert len(val) == 250 and len(train) == 750 and sorted(train + val) == sorted(data)
    assert val[:10] == data[30:40]
    small_train, small_val = split_interleaved(bytes(100), 0.25, chunk_bytes=10_000)  # chunks shrink to fit
    assert len(small_val) > 0
