"""Tied parameters' gradients, summed over the ranks that hold a copy, as one device's autograd adds them. Sparse
ones (``nn.Embedding(sparse=True)``): dense where one use is dense (a nanoGPT-style head tied to the embedding),
sparse where every use is (two lookups of one table); before, a sparse and a dense gradient met in gloo's sparse and
dense all-reduces that never match, and the run hung. A frozen tied parameter gets none (before, a zero gradient,
which AdamW's weight decay stepped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import run_ranks

VOCAB, WIDTH = 17, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.linear(h))


class Lookup(nn.Module):
    """A second lookup of the tied table at the end: a sparse gradient too."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.table(torch.tensor([1, 4, 9, 4])).t()


def _sequence(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    embedding = nn.Embedding(VOCAB, WIDTH, sparse=kind != "frozen")
    if kind == "frozen":
        embedding.weight.requires_grad_(False)
    if kind in ("head", "frozen"):  # the head's use is dense: one device's sum is dense
        head = nn.Linear(WIDTH, VOCAB, bias=False)
        head.weight = embedding.weight
    else:
        head = Lookup(embedding)
    return nn.Sequential(embedding, Block(), Block(), Block(), head)


def _fit(devices: int, kind: str, path: str) -> dict[str, Any]:
    import lightning as L

    from lightning_pipe import PipelineStrategy

    torch.set_num_threads(1)
    layouts: list[bool] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _sequence(kind)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            ids = batch[0]
            scores = self.model(ids[:, :-1])
            return F.cross_entropy(scores.flatten(0, 1), (ids[:, 1:] % scores.shape[-1]).flatten())

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            layouts.extend(p.grad.is_sparse for p in self.parameters() if p.shape == (VOCAB, WIDTH)
                           and p.grad is not None)

        def configure_optimizers(self) -> Any:
            if kind == "frozen":  # every parameter given: torch skips those without a gradient
                return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)
            return torch.optim.SGD(self.parameters(), lr=0.5)

    ids = torch.randint(0, VOCAB, (24, 6), generator=torch.Generator().manual_seed(1))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8)
    strategy = PipelineStrategy(num_microbatches=4, wait_timeout=30) if devices > 1 else "auto"
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(Module(), data)
    trainer.save_checkpoint(path)
    return {"state": torch.load(path, weights_only=False)["state_dict"], "sparse": layouts}


def _ranks(rank: int, world_size: int, kind: str, tmp: str) -> dict[str, Any]:
    return _fit(world_size, kind, f"{tmp}/pipe.ckpt")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["head", "lookups", "frozen"])
def test_tied_gradients_sum_as_on_one_device(kind: str, tmp_path: Path) -> None:
    results = run_ranks(_ranks, 2, kind, str(tmp_path), timeout=150)
    one = _fit(1, kind, str(tmp_path / "one.ckpt"))
    # one device's layout of the table's summed gradient; none for a frozen table
    assert one["sparse"] == ([] if kind == "frozen" else [kind == "lookups"] * 3)
    if kind == "frozen":
        torch.testing.assert_close(one["state"]["model.0.weight"], _sequence(kind)[0].weight)
    for result in results:
        for key, value in one["state"].items():
            torch.testing.assert_close(result["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert result["sparse"] == one["sparse"]  # both holders of the table step it with one device's layout
