"""The engine's several calls per micro-batch (:mod:`lightning_pipe.engine.calls`) without Lightning: an
``input_fn`` giving ``Calls`` of two inputs trains a 2-stage pipeline, with a batch norm, to one device's gradients and
running statistics (every stage runs each call; the batch norms commit each call's statistics in turn)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_pipe.engine.calls import Calls
from lightning_pipe.engine.executor import Pipeline
from tests.helpers import run_ranks


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                         nn.Linear(12, 4))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 6, generator=generator)


def _loss(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(first, second.flip(-1)) + first.pow(2).mean()


def _ranks(rank: int, world_size: int, schedule: str) -> dict[str, Any]:
    pipe = Pipeline(_model(), schedule=schedule, num_microbatches=1, device="cpu",
                    input_fn=lambda microbatch: Calls((microbatch[0], microbatch[1])),
                    loss_fn=lambda output, _: _loss(*output.each))
    loss = pipe.train_step(_batch())
    state = {name: t.clone() for name, t in pipe.state_dict().items() if "running" in name or "tracked" in name}
    grads = {name: p.grad.clone() for name, p in pipe.named_parameters()}
    return {"loss": loss, "grads": grads, "buffers": state}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_two_calls_per_micro_batch_give_one_devices_gradients_and_statistics(schedule: str) -> None:
    results = run_ranks(_ranks, 2, schedule, timeout=100)
    model = _model()
    first, second = _batch()
    loss = _loss(model(first), model(second))  # one device: two calls, two batch-norm updates
    loss.backward()
    reference = copy.deepcopy({name: p.grad for name, p in model.named_parameters()})
    assert float(results[1]["loss"]) == pytest.approx(float(loss), rel=1e-6)
    grads = {**results[0]["grads"], **results[1]["grads"]}
    buffers = {**results[0]["buffers"], **results[1]["buffers"]}
    assert set(grads) == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in model.named_buffers():
        torch.testing.assert_close(buffers[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert int(buffers["1.num_batches_tracked"]) == 2
