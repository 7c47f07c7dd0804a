"""A run of the step's code on one micro-batch, as the user hears of it: an error names the micro-batch and its rows
(step code sized by a configured batch size), and a file opened for writing in such a run is warned of (a file
written per batch would hold one micro-batch's rows)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_pipe import PipelineStrategy
from tests.helpers import run_ranks
from tests.lightning_models import Regressor, regression_data


class SizedByTheBatchSize(Regressor):
    """Step code sized by the configured batch size (``where``: before the model, a view; after it, targets)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.where == "before":
            x = x.view(8, x.shape[-1])
        out = self(x)
        target = torch.zeros(8, out.shape[1]) if self.where == "after" else y
        return torch.nn.functional.mse_loss(out, target)


def _trainer(world_size: int, **options: Any) -> Any:
    import lightning as L

    return L.Trainer(strategy=PipelineStrategy(num_microbatches=4), accelerator="cpu", devices=world_size,
                     logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **options)


def _fit_sized(rank: int, world_size: int, where: str) -> None:
    _trainer(world_size, max_steps=1).fit(SizedByTheBatchSize(where), regression_data(2, batch_size=8))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["before", "after"])
def test_an_error_in_a_micro_batchs_run_of_the_step_says_which_micro_batch_and_its_rows(where: str) -> None:
    for rank, text in enumerate(run_ranks(_fit_sized, 2, where, timeout=90, expect_failure=True)):
        assert text is not None, rank
        assert "(this run of training_step got micro-batch 0 of 4: 2 of the batch's 8 rows" in text, text[-3000:]
        assert "not by a configured batch size (8 here), or pass num_microbatches=1" in text, text[-3000:]


def test_an_error_names_the_plain_lists_that_were_split_with_the_rows() -> None:
    """A per-batch list that happens to have as many items as the batch has rows (a vocabulary of two classes, two
    rows) is split one item per row: the error of the step that used it whole says so (found by review)."""
    from lightning_pipe.strategy.step_runs import microbatch_run

    microbatch = {"x": torch.zeros(1, 3), "classes": ["pos"], "files": ("b.png",), "ids": torch.ones(1)}
    with pytest.raises(RuntimeError) as caught, microbatch_run("training_step", 1, 2, 1, 2, microbatch):
        raise RuntimeError("Class values must be smaller than num_classes.")
    note = caught.value.__notes__[-1]
    assert "batch['classes'], batch['files'] held 2 items, one per row, and were split with the rows" in note, note
    # a metric that needs two rows, at a one-row micro-batch of a last, smaller batch (found by review)
    with pytest.raises(ValueError) as caught, microbatch_run("training_step", 0, 4, 1, 4, {"x": torch.zeros(1, 3)}):
        raise ValueError("Needs at least two samples to calculate r2 score.")
    assert "drop a last, smaller batch (DataLoader(drop_last=True)), pass fewer micro-batches" in \
        caught.value.__notes__[-1]
    # an index into the whole batch's rows, which a micro-batch's rows do not reach (found by review: wav2vec2's
    # negatives, offset by row * frames in the collate, were told the few-rows advice)
    with pytest.raises(IndexError) as caught, microbatch_run("training_step", 1, 4, 2, 8, {"x": torch.zeros(2, 3)}):
        torch.zeros(38, 4)[torch.tensor([38])]
    assert "indices into the whole batch's rows" in caught.value.__notes__[-1]
    assert "drop a last" not in caught.value.__notes__[-1]
    with pytest.raises(IndexError) as caught, microbatch_run("training_step", 1, 4, 2, 8, {"x": torch.zeros(2, 3)}):
        torch.zeros(2, 4)[3]  # a row past the micro-batch's own: the few-rows advice, not the offsets'
    assert "indices into the whole batch's rows" not in caught.value.__notes__[-1]
    assert "drop a last" in caught.value.__notes__[-1]
    # a per-batch vector with as many entries as rows (class weights indexed by labels), split with the rows, and a
    # time-major input whose length equals the rows, split along time: said (found by review: the advice was about
    # a configured batch size, or a metric's few rows)
    with pytest.raises(IndexError) as caught, microbatch_run("training_step", 1, 4, 2, 8, {"w": torch.zeros(2)}):
        torch.zeros(2)[torch.tensor([4])]
    assert "one entry per class or item of the batch, not per row" in caught.value.__notes__[-1]
    with pytest.raises(ValueError) as caught, microbatch_run("training_step", 0, 4, 2, 8, {"x": torch.zeros(2, 8, 5),
                                                                                           "y": torch.zeros(2)}):
        raise ValueError("Expected input batch_size (8) to match target batch_size (2).")
    note = caught.value.__notes__[-1]
    assert "shapes (2, 8, 5) also hold 8 along a later dim" in note and "x.transpose(0, 1)" in note, note
    # and, after it, noise sized by the batch size a feature dim also holds (found by review: only time-major said)
    assert note.index("x.transpose(0, 1)") < note.index("size it by the rows it gets (len(x))"), note
    # not for an error that no number of rows explains (a key a hook never stored: found by review)
    with pytest.raises(KeyError) as caught, microbatch_run("training_step", 1, 4, 2, 8, {"x": torch.zeros(2, 3)}):
        raise KeyError("t")
    assert "micro-batch 1 of 4" in caught.value.__notes__[-1] and "drop a last" not in caught.value.__notes__[-1]
    # nor for a refusal of the strategy's own, which says what to do (an input-gradient penalty: found by review)
    from lightning_pipe.engine.microbatch import split_batch

    with pytest.raises(ValueError) as caught, microbatch_run("training_step", 0, 4, 2, 8, {"x": torch.zeros(2, 3)}):
        split_batch(torch.zeros(0, 3), 2)  # (a ValueError raised by lightning_pipe)
    assert "micro-batch 0 of 4" in caught.value.__notes__[-1] and "drop a last" not in caught.value.__notes__[-1]


class WritesItsOutputs(Regressor):
    """A test step that saves each batch's outputs to a file of its own and appends a line per batch."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        torch.save(out.detach(), f"{self.folder}/test_{batch_idx}.pt")
        with open(f"{self.folder}/lines.txt", "a") as lines:
            lines.write(f"{batch_idx} {len(x)}\n")


def _test_writing(rank: int, world_size: int, folder: str) -> list[str]:
    Path(folder, str(rank)).mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(world_size).test(WritesItsOutputs(f"{folder}/{rank}"), regression_data(2, batch_size=8))
    return [str(w.message) for w in caught if "for writing" in str(w.message)]


@pytest.mark.timeout(120)
def test_a_file_written_in_a_micro_batchs_run_of_the_step_is_warned_of_once(tmp_path: Path) -> None:
    first, last = run_ranks(_test_writing, 2, str(tmp_path), timeout=90)
    assert not first  # the first stage runs the step only up to the model
    assert len(last) == 1, last
    assert f"test_step opens '{tmp_path}/1/test_0.pt' for writing (mode 'wb') in its run on a micro-batch" in last[0]
    assert "on_test_batch_end(outputs=...)" in last[0] and "BasePredictionWriter" in last[0]


class Curriculum(torch.utils.data.Dataset):
    """Rows scaled by a difficulty the step raises after the model (a curriculum written in the step)."""

    def __init__(self) -> None:
        self.x, self.y, self.scale = torch.randn(32, 16), torch.randn(32, 16), 1.0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index] * self.scale, self.y[index]


class RaisesTheDifficulty(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.trainer.train_dataloader.dataset.scale = 1 + 0.1 * (self.global_step + 1)
        return loss


def _fit_curriculum(rank: int, world_size: int) -> None:
    from torch.utils.data import DataLoader

    _trainer(world_size, max_steps=4).fit(RaisesTheDifficulty(), DataLoader(Curriculum(), batch_size=8))


@pytest.mark.timeout(120)
def test_a_dataset_the_steps_code_changes_is_named_when_the_ranks_batches_differ() -> None:
    for rank, text in enumerate(run_ranks(_fit_curriculum, 2, timeout=90, expect_failure=True)):
        assert text is not None and "DifferentBatches" in text, rank
        assert "the step's code after the model runs on the last stage only, so a dataset or sampler it changes" \
            in text and "on_train_batch_end" in text, text[-3000:]
        assert "At the first step" not in text, text[-3000:]  # (the batches differ from the second step on)


class Weighted(torch.utils.data.Dataset):
    """Rows with an index and a per-sample weight the step sets from each row's loss (hard-example mining)."""

    def __init__(self) -> None:
        self.x, self.y, self.weights = torch.randn(32, 16), torch.randn(32, 16), torch.ones(32)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[index], self.y[index], index


class RecordsHardness(Regressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, index = batch
        rows = torch.nn.functional.mse_loss(self(x), y, reduction="none").mean(1)
        self.trainer.train_dataloader.dataset.weights[index] = rows.detach()
        return rows.mean()


def _fit_hardness(rank: int, world_size: int) -> list[str]:
    from torch.utils.data import DataLoader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(world_size, max_steps=2).fit(RecordsHardness(), DataLoader(Weighted(), batch_size=8))
    return [str(w.message) for w in caught if "changes trainer.train_dataloader.dataset" in str(w.message)]


@pytest.mark.timeout(120)
def test_a_dataset_the_steps_code_changes_after_the_model_is_warned_of_on_the_rank_that_changes_it() -> None:
    """Rank 0 never saw the per-sample weights (all 1.0 there): silent (found by review)."""
    first, last = run_ranks(_fit_hardness, 2, timeout=90)
    assert not first
    assert len(last) == 1 and "changes trainer.train_dataloader.dataset.weights" in last[0], last
    assert "on_train_batch_end" in last[0]
