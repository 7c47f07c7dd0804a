"""An evaluation step that writes into its batch, read by a hook after it (anomalib's ``test_step`` puts its
predictions into the batch, and its ``Evaluator`` callback reads them from ``on_test_batch_end``'s batch): every rank's
hook reads the batch as the step left it, as on one device (found by review: a bare error, or the loader's zeros
read silently)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers import quiet_trainer, run_ranks


@dataclasses.dataclass
class Images:
    """A dataclass batch with a field for the predictions, empty until the step fills it (anomalib's ``ImageBatch``)."""

    x: torch.Tensor
    y: torch.Tensor
    pred: torch.Tensor | None = None

    @staticmethod
    def collate(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> Images:
        return Images(torch.stack([x for x, _ in rows]), torch.stack([y for _, y in rows]))


def _data(kind: str) -> Any:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    if kind == "dataclass":
        return torch.utils.data.DataLoader(list(zip(x, y)), batch_size=10, collate_fn=Images.collate)
    if kind == "tuple":  # (x, y, a slot for the predictions)
        return torch.utils.data.DataLoader(list(zip(x, y, torch.zeros(30, dtype=torch.long))), batch_size=10)
    if kind == "in_place":  # a first micro-batch counting nothing: its loss, NaN, runs the step again aside
        y = torch.where(torch.arange(30) % 10 < 4, -100, y)
    rows = [{"x": a, "y": b, **({"pred": torch.tensor(0)} if kind == "in_place" else {})} for a, b in zip(x, y)]
    return torch.utils.data.DataLoader(rows, batch_size=10)


def _test(devices: int, strategy: Any, kind: str) -> dict[str, Any]:
    import lightning as L

    torch.set_num_threads(1)

    class Read(L.Callback):
        def __init__(self) -> None:
            self.read: list[list[int]] = []
            self.names: list[str] = []

        def on_test_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, *args: Any) -> None:
            pred = batch.pred if kind == "dataclass" else batch[2] if kind == "tuple" else batch["pred"]
            self.read.append(pred.tolist())
            self.names.append(batch["name"] if kind == "new_key" else str(batch.label.tolist()) if kind == "dataclass"
                              else f"{float(batch['x'].abs().sum()):.4f}" if kind == "in_place" else "")

    class PostProcess(L.Callback):  # anomalib's PostProcessor: sets labels on the step's outputs, the batch itself
        def on_test_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, *args: Any) -> None:
            if kind == "dataclass":
                outputs.label = outputs.pred * 10

    class Writing(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

        def test_step(self, batch: Any, batch_idx: int) -> Any:
            x = batch.x if kind == "dataclass" else batch[0] if kind == "tuple" else batch["x"]
            logits = self.net(x)
            pred = logits.argmax(1)
            if kind == "tuple":
                batch[2].copy_(pred)
            elif kind == "dataclass":
                batch.pred = pred
                return batch  # (anomalib's batch.update(...), in place)
            elif kind == "in_place":
                batch["pred"].copy_(pred)
                batch["x"].mul_(2)  # (twice, found by review, where the run aside took the micro-batch as changed)
                self.log("test_loss", F.cross_entropy(logits, batch["y"]))
            else:
                batch["pred"], batch["name"] = pred, "scored"  # (a value every micro-batch sets alike)
                batch["files"] = [Path(f"row{i}") for i in range(len(pred))]  # (cannot travel: left out, said)
            return None

    read = Read()
    trainer = quiet_trainer(devices, strategy, callbacks=[PostProcess(), read])
    trainer.test(Writing(), _data(kind), verbose=False)
    # (a pipeline evaluates under torch.no_grad, not inference_mode: NCCL's default, whose tensors it cannot copy)
    return {"read": read.read, "names": read.names, "inference": trainer.test_loop.inference_mode}


def _ranks(rank: int, world_size: int, kind: str) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    return _test(world_size, PipelineStrategy(num_microbatches=3, wait_timeout=60), kind)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["in_place", "new_key", "dataclass", "tuple"])
def test_hooks_after_an_evaluation_step_read_the_batch_as_the_step_left_it_on_every_rank(kind: str) -> None:
    reference = _test(1, "auto", kind)
    assert len(reference["read"]) == 3 and any(any(row) for row in reference["read"])
    assert run_ranks(_ranks, 2, kind, timeout=150) == [{**reference, "inference": False}] * 2


def _fit(devices: int, strategy: Any) -> dict[str, Any]:
    import lightning as L

    torch.set_num_threads(1)

    class Accuracy(L.Callback):  # reads what the training step kept on its batch
        def __init__(self) -> None:
            self.read: list[list[int]] = []

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, *args: Any) -> None:
            self.read.append([*batch["pred"].tolist(), *batch["slot"].tolist()])

    class Training(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            logits = self.net(batch["x"])
            batch["pred"] = logits.argmax(1)  # (a new key)
            batch["slot"].copy_(batch["y"] * 2)  # (in place)
            return F.cross_entropy(logits, batch["y"])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    read = Accuracy()
    rows = [{"x": row["x"], "y": row["y"], "slot": torch.tensor(0)} for row in _data("new_key").dataset]
    trainer = quiet_trainer(devices, strategy, callbacks=[read], max_steps=3)
    trainer.fit(Training(), torch.utils.data.DataLoader(rows, batch_size=10))
    return {"read": read.read}


def _fit_ranks(rank: int, world_size: int) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    return _fit(world_size, PipelineStrategy(num_microbatches=3, wait_timeout=60))


@pytest.mark.timeout(200)
def test_a_training_steps_writes_reach_every_ranks_on_train_batch_end() -> None:
    """A prediction the training step keeps on its batch for a callback's accuracy, a tensor it writes in place:
    every rank's ``on_train_batch_end`` reads them as on one device (a KeyError on the other ranks before)."""
    reference = _fit(1, "auto")
    assert len(reference["read"]) == 3 and any(any(row) for row in reference["read"])
    assert run_ranks(_fit_ranks, 2, timeout=150) == [reference] * 2
