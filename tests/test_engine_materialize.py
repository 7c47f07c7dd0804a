"""The engine without Lightning: layers built on the meta device get storage for this rank's stages only, through
``Pipeline(materialize=...)``; without it a meta tensor is a clear error."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

from lightning_pipe.engine.executor import Pipeline
from tests.helpers import run_ranks
from tests.models import make_batch, mse_loss

pytestmark = pytest.mark.timeout(120)


def _layers() -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])


def _meta_pipeline(rank: int, world_size: int, materialize: bool) -> dict[str, Any]:
    with torch.device("meta"):
        layers = _layers()
    given: list[list[str]] = []

    def give_storage(stages: list[nn.Module]) -> None:
        for stage in stages:
            given.append([name for name, _ in stage.named_parameters()])
            stage.to_empty(device="cpu")
            for index, layer in enumerate(stage.children()):
                torch.manual_seed(1000 + index + 2 * rank)  # as the eager reference draws them below
                layer.reset_parameters()

    pipe = Pipeline(layers, loss_fn=mse_loss, schedule="1f1b", num_microbatches=2,
                    materialize=give_storage if materialize else None)
    loss = pipe.train_step(make_batch(8))
    untouched = [layer for layer in layers if all(p.is_meta for p in layer.parameters())]
    return {"loss": None if loss is None else float(loss), "given": given, "meta_left": len(untouched)}


def test_meta_layers_get_storage_on_their_rank_only() -> None:
    results = run_ranks(_meta_pipeline, 2, True, timeout=90)
    reference = _layers()
    for index, layer in enumerate(reference):
        torch.manual_seed(1000 + index % 2 + 2 * (index // 2))
        layer.reset_parameters()
    x, y = make_batch(8)
    expected = torch.nn.functional.mse_loss(reference(x), y)  # two micro-batches of 4 rows: the mean of their means
    assert results[1]["loss"] == pytest.approx(float(expected), rel=1e-6)
    for rank, result in enumerate(results):
        first, second = 2 * rank, 2 * rank + 1  # its two layers, nothing else
        assert result["given"] == [[f"{first}.weight", f"{first}.bias", f"{second}.weight", f"{second}.bias"]]
        assert result["meta_left"] == 2  # the other rank's layers were never given storage here


def _refused(rank: int, world_size: int) -> None:
    _meta_pipeline(rank, world_size, False)


def test_meta_layers_without_materialize_are_refused() -> None:
    errors = run_ranks(_refused, 2, timeout=60, expect_failure=True)
    for rank, text in enumerate(errors):
        assert f"have tensors on the meta device ({2 * rank}.weight, {2 * rank}.bias" in text, text
        assert "materialize=" in text, text
