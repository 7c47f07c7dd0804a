"""A multi-task loss whose terms are means over different counts (labels missing on different rows for each task):
no single ``loss_reduction`` count makes the micro-batches' losses the batch's. A given count is checked on the first
batches like "auto"'s probe, and one that does not make the batch's loss is warned of with the way that works: each
term's sum divided by its count over the whole batch (passed with the batch as a 0-dim tensor) and
``loss_reduction='sum'``, which trains as on one device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import run_ranks

ROWS = 8  # micro-batches of 2 rows


def _rows() -> list[dict[str, torch.Tensor]]:
    """Rows with a class label (-1 where missing) and a regression target (NaN where missing), missing apart."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4 * ROWS, 6, generator=generator)
    y = torch.randint(0, 3, (4 * ROWS,), generator=generator)
    r = torch.randn(4 * ROWS, generator=generator)
    y[torch.tensor([0, 3, 5, 9, 11, 17, 20, 23, 26, 28, 30])] = -1
    r[torch.tensor([2, 4, 5, 7, 12, 13, 14, 18, 24, 25, 31])] = float("nan")
    return [{"x": a, "y": b, "r": c} for a, b, c in zip(x, y, r)]


def _collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The rows stacked, with each task's count over the whole batch (0-dim: every micro-batch gets them whole)."""
    batch = torch.utils.data.default_collate(rows)
    return {**batch, "labelled": (batch["y"] != -1).sum(), "targeted": (~batch["r"].isnan()).sum()}


def _labelled(batch: Any) -> torch.Tensor:
    return (batch["y"] != -1).sum()


class MultiTask(nn.Module):
    """The trunk and the two tasks' losses in the model's forward (captured: the step's probe cannot see inside), called
    with a constant argument beside the batch (``return_dict=True``, which the pipeline's inputs leave out)."""

    def __init__(self, summed: bool) -> None:
        super().__init__()
        self.summed = summed
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, batch: dict[str, torch.Tensor], return_dict: bool = True) -> torch.Tensor:
        h = self.trunk(batch["x"])
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return _loss(self.head(h), batch, self.summed)


def _loss(out: torch.Tensor, batch: dict[str, torch.Tensor], summed: bool) -> torch.Tensor:
    targeted = batch["r"] == batch["r"]  # (not NaN)
    squares = (out[:, 3] - batch["r"].nan_to_num()) ** 2 * targeted
    if summed:  # each term's sum over its count in the whole batch
        cls = F.cross_entropy(out[:, :3], batch["y"], ignore_index=-1, reduction="sum") / batch["labelled"]
        return cls + squares.sum() / batch["targeted"]
    # each term a mean over its own count in the (micro-)batch
    return F.cross_entropy(out[:, :3], batch["y"], ignore_index=-1) + squares.sum() / targeted.sum().clamp(min=1)


def _fit(devices: int, strategy: Any, summed: bool, path: str,
         inside: bool = False) -> tuple[dict[str, Any], list[str]]:
    import warnings

    import lightning as L

    torch.set_num_threads(1)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = MultiTask(summed) if inside else \
                nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.model(batch, return_dict=True) if inside else _loss(self.model(batch["x"]), batch, summed)
            self.log("train_loss", loss, reduce_fx="sum" if summed else "mean")
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(0, verbose=False)
    module = Module()
    loader = torch.utils.data.DataLoader(_rows(), batch_size=ROWS, collate_fn=_collate)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    trainer.save_checkpoint(path)  # every rank: the whole model's weights
    warned = [str(w.message) for w in caught if "what loss_reduction's function counts" in str(w.message)]
    return torch.load(path, weights_only=False)["state_dict"], warned


def _ranks(rank: int, world_size: int, tmp: str, inside: bool) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    def strategy(reduction: Any) -> Any:
        return PipelineStrategy(num_microbatches=4, wait_timeout=60, loss_reduction=reduction)

    return {"one count": _fit(world_size, strategy(_labelled), False, f"{tmp}/count.ckpt", inside),
            "summed": _fit(world_size, strategy("sum"), True, f"{tmp}/summed.ckpt", inside)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("inside", [False, True], ids=["loss-in-the-step", "loss-in-the-model"])
def test_a_count_that_is_not_every_terms_is_warned_of_and_the_advice_trains_as_on_one_device(
        tmp_path: Path, inside: bool) -> None:
    """The step's terms: its first batches' check against a run on the whole batch; the model's own (captured):
    the counts its graph shows against the given one."""
    results = run_ranks(_ranks, 2, str(tmp_path), inside, timeout=260)
    reference, _ = _fit(1, "auto", False, str(tmp_path / "one.ckpt"), inside)
    (counted, _), (summed, _) = results[0]["one count"], results[0]["summed"]
    for key, value in reference.items():
        torch.testing.assert_close(summed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert max(float((counted[key] - value).abs().max()) for key, value in reference.items()) > 1e-3
    warned = [message for result in results for message in result["one count"][1]]
    assert len(warned) == 1, warned  # once (the model's own: the first stage's, which sees its inputs)
    assert "not a mean over what loss_reduction's function counts" in warned[0]
    assert "loss_reduction='sum'" in warned[0] and "0-dim tensor" in warned[0]
    assert not any(result["summed"][1] for result in results)
