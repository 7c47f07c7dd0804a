"""Parts of a captured model in their own mode, as on one device: a frozen backbone's batch norms and dropout put in
eval in ``__init__``, by a hook looking for them by class (``isinstance`` on every rank) or at the step's top, a model
whose ``train()`` keeps its batch norms in eval (mmdetection's ``norm_eval``), and Lightning's ``BaseFinetuning``
switching a batch norm's ``track_running_stats`` off and on again (a flag its forward reads: graphs of each value) on
the first stage or the last, captured for every size or per shape, with validation putting every module in eval and
back between epochs; on 2 gloo ranks against one device."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import quiet_trainer, run_ranks


class _Net(nn.Module):
    def __init__(self, norm_eval: bool = False, dropout: bool = False) -> None:
        super().__init__()
        self.norm_eval = norm_eval  # (a dropout in training draws other masks on a pipeline: only a frozen one here)
        self.stem = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Dropout(0.3) if dropout else nn.Identity())
        self.body = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))

    def train(self, mode: bool = True) -> _Net:
        super().train(mode)
        if self.norm_eval:  # the batch norms stay in eval whatever the mode
            for module in self.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.eval()
        return self


def _fit(rank: int, world_size: int, case: str) -> dict[str, torch.Tensor]:
    import lightning as L
    from lightning.pytorch.callbacks import BaseFinetuning

    from lightning_pipe import PipelineStrategy

    class Finetuning(BaseFinetuning):
        def freeze_before_training(self, pl_module: Any) -> None:
            self.freeze(self.part(pl_module), train_bn=False)  # batch norms: track_running_stats off

        def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
            if epoch == 1:
                self.unfreeze_and_add_param_group(self.part(pl_module), optimizer, train_bn=True)

        @staticmethod
        def part(pl_module: Any) -> Any:  # the first stage's stem, or the last stage's body
            return pl_module.model.body if case == "finetune_last" else pl_module.model.stem

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _Net(norm_eval=case == "norm_eval", dropout=case == "init")
            if case == "init":  # a pretrained stem, frozen as it is: its batch norms and dropout in eval
                self.model.stem.requires_grad_(False).eval()
            if case == "norm_eval":
                self.model.train()

        def on_train_epoch_start(self) -> None:
            if case == "hook":  # the detectron idiom: every batch norm frozen, found by its class
                for module in self.model.modules():
                    if isinstance(module, nn.BatchNorm1d):
                        module.eval()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if case == "step":  # frozen at the step's top, every step (its first step too)
                self.model.stem.eval()
            loss = F.cross_entropy(self.model(batch[0]), batch[1])
            self.log("loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", F.cross_entropy(self.model(batch[0]), batch[1]))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    torch.set_num_threads(1)
    L.seed_everything(5, verbose=False)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 12, generator=generator) * 2 + 1, torch.randint(0, 4, (48,), generator=generator)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Module()
    strategy = PipelineStrategy(num_microbatches=1, layers="model", split_points=["body"],
                                dynamic_shapes=case != "finetune_static") if world_size > 1 else "auto"
    callbacks = [Finetuning()] if case.startswith("finetune") else []
    quiet_trainer(world_size, strategy, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                  num_sanity_val_steps=0, callbacks=callbacks).fit(module, data, data)
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", ["init", "hook", "step", "norm_eval", "finetune", "finetune_last", "finetune_static"])
def test_parts_of_a_captured_model_in_their_own_mode_train_as_on_one_device(case: str) -> None:
    reference = _fit(0, 1, case)
    frozen = "body" if case == "finetune_last" else "stem"
    tracked = int(reference[f"model.{frozen}.1.num_batches_tracked"])
    assert tracked == (3 if case.startswith("finetune") else 0)  # one device's: frozen, or tracked from epoch 1
    held: dict[str, torch.Tensor] = {}
    for state in run_ranks(_fit, 2, case, timeout=200):
        held.update({name: value for name, value in state.items() if not value.is_meta})
    assert set(held) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(held[name], value, rtol=0, atol=1e-5, msg=name)
