"""Captured batch norms follow the stage's deferred rule (engine/batchnorm.py): running statistics of the whole batch,
committed once per step, never by a recomputation; outside a stage they are plain batch norms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_pipe.capture import Splitter
from lightning_pipe.engine.batchnorm import DeferredBatchNorm1d
from lightning_pipe.engine.microbatch import microbatch_weights, split_batch
from lightning_pipe.engine.stage import PipelineStage
from tests.capture_models import ResNet

STATS = ("running_mean", "running_var", "num_batches_tracked")


class NormAct1d(nn.BatchNorm1d):
    """A subclass of torch's batch norm with a forward of its own, normalizing then activating (timm's
    ``BatchNormAct2d`` is one): a stage cannot swap its forward, but a captured graph calls none."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return F.silu(x)


class NormFirst(nn.Module):
    """A batch norm on the data itself (its input does not depend on any weight), then layers with another."""

    def __init__(self, norm: type[nn.BatchNorm1d] = nn.BatchNorm1d) -> None:
        super().__init__()
        self.norm = norm(6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _stage_steps(model: nn.Module, batches: list[torch.Tensor], num_microbatches: int, remat: bool) -> nn.Module:
    """SGD steps of ``model`` captured into segments and run as one pipeline stage, micro-batch by micro-batch."""
    splitter = Splitter(model)
    segments = splitter.segments((split_batch(batches[0], num_microbatches)[0],))
    stage = PipelineStage(nn.Sequential(*segments), 0, 1, checkpoint_activations=remat)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in batches:
        microbatches = split_batch(batch, num_microbatches)
        for index, (x, weight) in enumerate(zip(microbatches, microbatch_weights(microbatches))):
            output = stage.forward(index, splitter.flat_inputs((x,)))
            stage.hold(index, output.square().mean() * weight)
        for index in range(len(microbatches)):
            stage.backward(index, None)
        stage.end_step()
        optimizer.step()
        optimizer.zero_grad()
    return model


def _one_device_steps(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in batches:
        model(batch).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "rematerialized"])
def test_one_microbatch_equals_one_device_in_weights_and_buffers(remat: bool) -> None:
    """A ResNet (stem, blocks and downsampling with batch norms) captured into segments, 3 steps of one micro-batch:
    every weight and buffer equals one device's, with and without re-materialization (which used to count and update
    every batch norm twice)."""
    torch.manual_seed(0)
    reference = ResNet().train()
    model = copy.deepcopy(reference)
    batches = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _stage_steps(model, batches, 1, remat)
    _one_device_steps(reference, batches)
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-5, msg=name)
    assert int(model.bn1.num_batches_tracked) == 3


class Repeated(nn.Module):
    """One block with a batch norm at three places (weights shared across depth)."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh())
        self.inp, self.blocks, self.head = nn.Linear(6, 6), nn.ModuleList([block] * 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_a_batch_norm_at_several_places_counts_and_updates_once_per_place() -> None:
    """Its graph counts each place on the result of the place before (not on the buffer itself): every count is
    deferred, and the commit takes one update per place, in order, as one device (one micro-batch)."""
    torch.manual_seed(0)
    reference = Repeated().train()
    model = copy.deepcopy(reference)
    batches = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _stage_steps(model, batches, 1, False)
    _one_device_steps(reference, batches)
    for (name, value), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-5, msg=name)
    assert int(model.blocks[0][1].num_batches_tracked) == 9


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, NormAct1d], ids=["torch", "subclass"])
@pytest.mark.parametrize("remat", [False, True], ids=["plain", "rematerialized"])
def test_several_microbatches_commit_the_whole_batchs_statistics(remat: bool, norm: type[nn.BatchNorm1d]) -> None:
    """With 4 micro-batches the running statistics of a batch norm whose input is the data equal one device's
    (the whole batch's, once per step), while each micro-batch is normalized with its own statistics; a subclass
    with its own forward too (it used to update them once per micro-batch, silently)."""
    torch.manual_seed(0)
    reference = NormFirst(norm).train()
    model = copy.deepcopy(reference)
    batches = [torch.randn(12, 6, generator=torch.Generator().manual_seed(i)) * (i + 1) + i for i in range(3)]
    _stage_steps(model, batches, 4, remat)
    _one_device_steps(reference, batches)
    if norm is nn.BatchNorm1d:
        assert isinstance(model.norm, DeferredBatchNorm1d), "the stage converted the model's own batch norm"
    else:
        assert type(model.norm) is NormAct1d, "a subclass keeps its class (and its forward)"
    for name in STATS:
        torch.testing.assert_close(getattr(model.norm, name), getattr(reference.norm, name), rtol=0, atol=1e-5,
                                   msg=name)


def test_outside_a_stage_captured_batch_norms_are_plain() -> None:
    """Segments run on their own (no stage) update the running statistics per call, as the model does."""
    torch.manual_seed(0)
    model = NormFirst().train()
    reference = copy.deepcopy(model)
    splitter = Splitter(model)
    x = torch.randn(8, 6)
    splitter.segments((x,))
    torch.testing.assert_close(splitter.run(x), reference(x), rtol=0, atol=1e-6)
    for name in STATS:
        torch.testing.assert_close(getattr(model.norm, name), getattr(reference.norm, name), rtol=0, atol=0)
    model.eval()
    reference.eval()
    for segment in splitter.segments():
        segment.eval()
    splitter.capture((x,), training=False)
    torch.testing.assert_close(splitter.run(x), reference(x), rtol=0, atol=1e-6)
    assert F is not None


def test_a_stage_that_calls_a_batch_norm_subclass_itself_warns() -> None:
    """In an nn.Sequential stage a subclass's own forward runs, which updates the running statistics once per
    micro-batch: the stage says so rather than differ silently."""
    with pytest.warns(UserWarning, match="NormAct1d .*once per micro-batch"):
        PipelineStage(nn.Sequential(nn.Linear(6, 6), NormAct1d(6)), 0, 1)
