"""``precision="16-mixed"``'s gradient scaler under a pipeline, on 2 gloo ranks (CPU float16 autocast through
``MixedPrecision("16-mixed", "cpu")``): the first stage's gradients overflow where the last stage's do not, and every
stage skips those steps together; the scales stay equal on every rank, and the weights are those of the same
micro-batches run by hand on one device under one ``GradScaler``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import run_ranks

STEPS = 6
MICROBATCHES = 4
INPUT_SCALE = 30.0  # large inputs, a first layer scaled down to match: only its weight's gradient overflows float16


def _module() -> Any:
    import lightning as L

    class Regressor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
            with torch.no_grad():
                self.net[0].weight.div_(INPUT_SCALE)
            self.history: list[tuple[float, bool]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.mse_loss(self.net(x).float(), y)
            self.log("loss", loss)
            return loss

        def on_before_optimizer_step(self, optimizer: Any) -> None:  # after the unscale: this rank's own infs
            finite = all(bool(torch.isfinite(p.grad).all()) for p in self.parameters() if p.grad is not None)
            self.history.append((self.trainer.precision_plugin.scaler.get_scale(), finite))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    return Regressor()


def _data() -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(STEPS * 16, 16, generator=g) * INPUT_SCALE, torch.randn(STEPS * 16, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _fit(rank: int, world_size: int) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_pipe import PipelineStrategy

    model = _module()
    trainer = L.Trainer(strategy=PipelineStrategy(num_microbatches=MICROBATCHES), accelerator="cpu",
                        devices=world_size, plugins=[MixedPrecision("16-mixed", "cpu")], max_steps=STEPS,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    trainer.fit(model, _data())
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "history": model.history,
            "scale": trainer.precision_plugin.scaler.get_scale()}


def _by_hand() -> tuple[dict[str, torch.Tensor], list[float]]:
    """One device: each batch's micro-batches under float16 autocast, each backward seeded with its share of the
    loss times the scale, then one scaler step and update."""
    model = _module()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu")
    scales = []
    for x, y in _data():
        for xs, ys in zip(x.chunk(MICROBATCHES), y.chunk(MICROBATCHES)):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.mse_loss(model.net(xs).float(), ys)
            scaler.scale(loss * (len(xs) / len(x))).backward()
        scales.append(scaler.get_scale())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return model.state_dict(), scales


@pytest.mark.timeout(120)
def test_every_stage_skips_an_overflowing_step_together() -> None:
    results = run_ranks(_fit, 2, timeout=100)
    expected, scales = _by_hand()
    first, last = (result["history"] for result in results)
    assert [scale for scale, _ in first] == [scale for scale, _ in last] == scales
    assert any(not a and b for (_, a), (_, b) in zip(first, last)), \
        "no step overflowed on the first stage alone: the case this test is for did not happen"
    assert results[0]["scale"] == results[1]["scale"] < 65536.0
    merged = {**results[0]["state"], **results[1]["state"]}
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_fused_optimizer_which_unscales_in_its_own_step_is_refused() -> None:
    from lightning_pipe.strategy.grad_scaler import refuse_self_unscaling

    param = torch.nn.Parameter(torch.ones(4))
    refuse_self_unscaling([torch.optim.Adam([param])])
    with pytest.raises(ValueError, match=r"Adam with fused=True .* pass fused=False"):
        refuse_self_unscaling([torch.optim.Adam([param], fused=True)])
