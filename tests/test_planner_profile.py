"""Tests of the layer profiler: sane numbers on a small real model, the model left as it was, and the cache."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from lightning_pipe.planner import profile as profile_module
from lightning_pipe.planner import profile_layers
from lightning_pipe.planner.profile import profile_key, scale_profiles


class Sleepy(nn.Module):
    """Forward sleeps 50 ms: the profile must see it in this layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return x + 1


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.BatchNorm1d(32), Sleepy(), nn.Linear(32, 8))


def test_profile_numbers_are_sane():
    model, x = small_model(), torch.randn(10, 16)
    profiles = profile_layers(model, x, repeats=3, warmup=1)
    assert [p.name for p in profiles] == ["0", "1", "2", "3", "4"]
    assert all(p.forward > 0 and p.backward > 0 for p in profiles)
    assert profiles[3].forward >= 0.05  # a lower bound whatever the machine's load (which only adds)
    linear = profiles[0]
    assert (linear.parameters, linear.parameter_bytes) == (16 * 32 + 32, 4 * (16 * 32 + 32))
    assert linear.gradient_bytes == linear.parameter_bytes and linear.optimizer_bytes == 2 * linear.parameter_bytes
    assert (linear.input_bytes, linear.output_bytes) == (10 * 16 * 4, 10 * 32 * 4)
    assert linear.saves_input and not linear.saves_output  # a linear layer keeps its input for the weight gradient
    assert profiles[1].saves_output and profiles[1].parameters == 0  # ReLU keeps its result
    assert profiles[2].saved_bytes > 0  # batch norm keeps its statistics


def test_profile_leaves_the_model_as_it_was():
    model, x = small_model(), torch.randn(10, 16)
    model.eval()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    profile_layers(model, x, repeats=1, warmup=0, optimizer_state_factor=0.0)
    assert not model.training and not model[2].training
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[4].weight.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats too
    assert torch.equal(torch.get_rng_state(), rng)


def test_integer_inputs_and_tuple_outputs():
    class Split(nn.Module):
        def forward(self, x):
            return x[:, :4], x[:, 4:]

    class Join(nn.Module):
        def forward(self, pair):
            return torch.cat(pair, dim=1) * 2

    model = nn.Sequential(nn.Embedding(50, 8), Split(), Join(), nn.Linear(8, 3))
    profiles = profile_layers(model, torch.randint(0, 50, (4, 5)), repeats=1, warmup=0)
    assert profiles[0].input_bytes == 4 * 5 * 8 and profiles[1].output_bytes == 4 * 5 * 8 * 4
    assert profiles[0].backward > 0


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    model, x = small_model(), torch.randn(10, 16)
    first = profile_layers(model, x, repeats=1, warmup=0, cache=tmp_path)
    assert len(list(tmp_path.glob("profile-*.json"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("measured again although the cache holds this model")

    monkeypatch.setattr(profile_module, "_measure", refuse)
    assert profile_layers(model, x, repeats=1, warmup=0, cache=tmp_path) == first
    # Other input shapes, other parameter shapes, another optimizer: another key, measured again.
    for changed_model, changed_x, factor in [(model, torch.randn(12, 16), 2.0),
                                             (nn.Sequential(nn.Linear(16, 33)), x, 2.0), (model, x, 1.0)]:
        with pytest.raises(AssertionError, match="measured again"):
            profile_layers(changed_model, changed_x, repeats=1, warmup=0, cache=tmp_path,
                           optimizer_state_factor=factor)
    assert profile_key(model, x) != profile_key(model, x.double())
    # A corrupt file is measured again, not trusted.
    monkeypatch.undo()
    for path in tmp_path.glob("profile-*.json"):
        path.write_text("{not json")
    assert len(profile_layers(model, x, repeats=1, warmup=0, cache=tmp_path)) == 5


def test_scale_profiles_scales_time_and_activations_not_weights():
    profiles = profile_layers(small_model(), torch.randn(10, 16), repeats=1, warmup=0)
    double = scale_profiles(profiles, 2.0)
    assert double[0].forward == pytest.approx(2 * profiles[0].forward)
    assert double[0].output_bytes == 2 * profiles[0].output_bytes
    assert double[0].parameter_bytes == profiles[0].parameter_bytes


def test_bad_arguments_say_how_to_fix_them():
    with pytest.raises(ValueError, match="repeats"):
        profile_layers(small_model(), torch.randn(2, 16), repeats=0)
    with pytest.raises(ValueError, match="2 for Adam"):
        profile_layers(small_model(), torch.randn(2, 16), optimizer_state_factor=-1)
