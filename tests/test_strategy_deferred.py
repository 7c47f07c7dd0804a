"""The step's code before the pipelined layers, on the last stage (:mod:`lightning_pipe.strategy.deferred`): a module
the step calls there is deferred (computed only if used) once a real call showed it safe, but never one that keeps
what a call computed for a later call: RevIN normalizes the series before the model and keeps their statistics to
denormalize its output after it (Time-Series-Library's), trained on 2 gloo ranks against one device."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

from tests.helpers import quiet_trainer, run_ranks


class RevIN(nn.Module):
    """Reversible instance normalization: "norm" keeps each series' mean and deviation, "denorm" applies them."""

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "norm":
            self.mean = x.mean(1, keepdim=True).detach()
            self.stdev = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5).detach()
            return (x - self.mean) / self.stdev
        return x * self.stdev + self.mean


def _forecaster() -> Any:
    import lightning as L
    import torch.nn.functional as F

    class Forecaster(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.revin = RevIN()
            self.model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            forecast = self.revin(self.model(self.revin(x, "norm")), "denorm")
            loss = F.mse_loss(forecast, y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    L.seed_everything(3, verbose=False)
    return Forecaster()


def _series() -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    generator = torch.Generator().manual_seed(5)
    level = torch.randn(32, 1, generator=generator) * 5  # series of their own levels: each micro-batch's differ
    x = level + torch.randn(32, 12, generator=generator)
    return DataLoader(TensorDataset(x, level + torch.randn(32, 4, generator=generator)), batch_size=8)


def _fit(rank: int, world_size: int) -> tuple[dict[str, torch.Tensor], float]:
    from lightning_pipe import PipelineStrategy

    strategy = PipelineStrategy(num_microbatches=2, wait_timeout=60) if world_size > 1 else "auto"
    model = _forecaster()
    trainer = quiet_trainer(world_size, strategy, max_epochs=1)
    trainer.fit(model, _series())
    return model.state_dict(), float(trainer.callback_metrics["train_loss"])


@pytest.mark.timeout(200)
def test_a_module_that_keeps_a_calls_statistics_for_a_later_call_runs_for_real() -> None:
    """Deferred after its first call, RevIN's "norm" never ran again on the last stage, so every "denorm" there used
    the first call's statistics (helper-57: a loss of 51.6 where one device has 1.66)."""
    results = run_ranks(_fit, 2, timeout=180)
    weights, loss = _fit(0, 1)
    held = {**results[0][0], **results[1][0]}
    for name, tensor in weights.items():
        torch.testing.assert_close(held[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert results[1][1] == pytest.approx(loss, rel=1e-5)


def test_a_module_whose_layer_carries_a_hook_of_the_users_runs_for_real() -> None:
    """Feature distillation: a frozen teacher called before the student only for what a forward hook on one of its
    layers stores; deferred, it never ran on the last stage, and micro-batch 1 found no features (found by review:
    KeyError). A module without such a hook is still deferred."""
    from lightning_pipe.strategy.deferred import DeferredCalls

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.teacher = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
            self.plain = nn.Linear(4, 4)
            self.model = nn.Linear(4, 4)

    holder, features = Holder(), {}
    holder.teacher[2].register_forward_hook(lambda module, args, output: features.update(t=output))
    calls = DeferredCalls(holder, lambda child: child is holder.model, torch.device("cpu"))
    for _ in range(2):
        features.clear()
        with calls.around(lambda: False):
            holder.teacher(torch.randn(2, 4))
            holder.plain(torch.randn(2, 4))
        assert "t" in features  # the teacher ran, and its hook stored its features
    assert calls.deferrable.get("plain") is True and calls.deferred == 1 and not calls.deferrable.get("teacher")
    holder.plain.register_forward_hook(lambda module, args, output: features.update(p=output))  # a hook added later
    with calls.around(lambda: False):
        holder.plain(torch.randn(2, 4))
    assert "p" in features and calls.deferred == 1
