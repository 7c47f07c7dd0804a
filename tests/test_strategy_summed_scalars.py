"""PyTorch's VAE example cut as one nn.Sequential: the encoder's KL, summed over the batch's rows, is a single number
the layers pass on to the step beside the reconstruction, and the step returns a summed reconstruction error plus it.
No graph says how such a number adds up over micro-batches; the first batch's check of the loss finds that summing it
makes the step's loss a sum over rows, and from then on the pipeline sums it: one device's gradients and logged KL
(before: warned as "neither a mean nor a sum" with advice for counts, gradients 1/4 of one device's, the KL logged
as the micro-batches' mean, 1/4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import run_ranks


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, noise = inputs
        return self.net(x), noise


class Sampler(nn.Module):
    """The reparameterization, and the KL divergence summed over the batch (pytorch/examples' VAE)."""

    def __init__(self) -> None:
        super().__init__()
        self.mu, self.log_var = nn.Linear(32, 4), nn.Linear(32, 4)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, noise = inputs
        mu, log_var = self.mu(h), self.log_var(h)
        kl = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())
        return mu + noise * (0.5 * log_var).exp(), kl


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z, kl = inputs
        return self.net(z), kl


def _fit(devices: int, strategy: Any, path: str) -> tuple[dict[str, Any], list[str]]:
    import warnings

    import lightning as L

    torch.set_num_threads(1)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(Encoder(), Sampler(), Decoder())

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, noise = batch
            recon, kl = self.layers((x, noise))
            self.log("kl", kl)
            return F.mse_loss(recon, x, reduction="sum") + kl

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    L.seed_everything(0, verbose=False)
    generator = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.rand(32, 16, generator=generator),
                                          torch.randn(32, 4, generator=generator))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(path)
    warned = [str(w.message) for w in caught if "neither a mean nor a sum" in str(w.message)]
    return {**torch.load(path, weights_only=False)["state_dict"], "kl": float(trainer.callback_metrics["kl"])}, warned


def _ranks(rank: int, world_size: int, path: str, reduction: str) -> tuple[dict[str, Any], list[str]]:
    from lightning_pipe import PipelineStrategy

    return _fit(world_size, PipelineStrategy(num_microbatches=4, loss_reduction=reduction), path)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("reduction", ["auto", "sum"])
def test_a_sum_the_sequence_passes_on_is_found_summed_and_trains_and_logs_as_on_one_device(
        tmp_path: Path, reduction: str) -> None:
    """Found by "auto"; told with loss_reduction="sum", the gradients were right but the KL logged 1/4."""
    results = run_ranks(_ranks, 2, str(tmp_path / "pipe.ckpt"), reduction, timeout=160)
    reference, _ = _fit(1, "auto", str(tmp_path / "one.ckpt"))
    for state, warned in results:
        assert not warned, warned
        for key, value in reference.items():
            torch.testing.assert_close(torch.as_tensor(state[key]), torch.as_tensor(value), rtol=1e-5, atol=1e-6,
                                       msg=key)


def _warmed_up(rank: int, world_size: int) -> list[str]:
    """A VAE step whose KL, summed over the batch, joins the loss only after a warm-up of 13 steps (past the batches
    whose loss is checked first); the KL is logged from the start, so the step runs on the whole batch every step."""
    import warnings

    import lightning as L

    from lightning_pipe import PipelineStrategy
    from tests.helpers import quiet_trainer

    torch.set_num_threads(1)

    class VAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
            self.dec = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))

        def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
            mu, logvar = self.enc(x).chunk(2, -1)
            return self.dec(mu + eps * torch.exp(0.5 * logvar)), mu, logvar

    class WarmedVAE(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = VAE()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, eps = batch
            recon, mu, logvar = self.model(x, eps)
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            self.log("kl", kl)
            return F.mse_loss(recon, x) + (0.0 if self.global_step < 13 else 1.0) * kl

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    generator = torch.Generator().manual_seed(1)
    rows = list(zip(torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(world_size, PipelineStrategy(num_microbatches=2), max_steps=16, max_epochs=-1).fit(
            WarmedVAE(), torch.utils.data.DataLoader(rows, batch_size=4))
    return [str(w.message) for w in caught if "neither a mean nor a sum" in str(w.message)]


@pytest.mark.timeout(180)
def test_a_term_summed_over_rows_switched_on_after_the_checked_batches_is_warned_of() -> None:
    """The first batches' check saw a mean; from step 13 the summed KL was averaged over micro-batches silently
    (weights 6e-2 off). The step runs on the whole batch at every step for its logged KL anyway: its loss there is
    compared with the micro-batches' too (here an epoch's first batches, probed again, find it first: 4 batches an
    epoch, the term from the second of the fourth epoch; either says so once)."""
    first, last = run_ranks(_warmed_up, 2, timeout=160)
    assert not first and len(last) == 1 and "summed over the batch" in last[0], last
