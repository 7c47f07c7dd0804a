"""A failure on one rank ends every rank of a Trainer run promptly, with that rank's error, also across replicas."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from lightning_pipe import PipelineStrategy
from tests.helpers import run_ranks
from tests.lightning_models import Regressor, regression_data


class FailsOnRank(Regressor):
    """Raises in ``training_step`` on one global rank, at the second batch (after the first full step)."""

    def __init__(self, failing_rank: int) -> None:
        super().__init__()
        self.failing_rank = failing_rank

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 1 and self.global_rank == self.failing_rank:
            raise ValueError(f"boom on rank {self.failing_rank}")
        return super().training_step(batch, batch_idx)


def _fit_failing(rank: int, world_size: int, strategy_args: dict, failing_rank: int) -> None:
    import lightning as L

    import lightning_pipe  # noqa: F401

    trainer = L.Trainer(strategy=PipelineStrategy(**strategy_args), accelerator="cpu", devices=world_size,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_epochs=1)
    trainer.fit(FailsOnRank(failing_rank), regression_data(6, batch_size=8))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy_args,failing_rank", [({}, 1), ({"num_stages": 2}, 3)],
                         ids=["pipeline-of-2", "2-stages-x-2-replicas"])
def test_an_error_on_one_rank_ends_every_rank_with_it(strategy_args: dict, failing_rank: int) -> None:
    world_size = 4 if strategy_args else 2
    start = time.monotonic()
    errors = run_ranks(_fit_failing, world_size, strategy_args, failing_rank, timeout=90, expect_failure=True)
    assert time.monotonic() - start < 90
    for rank, text in enumerate(errors):
        assert text is not None, f"rank {rank} finished although rank {failing_rank} failed"
        assert f"boom on rank {failing_rank}" in text, f"rank {rank} did not report the error:\n{text[-2000:]}"
