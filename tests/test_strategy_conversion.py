"""A precision that converts the weights (``bf16-true``) converts a captured model on meta stand-ins and each rank
its own share after the cut (:mod:`lightning_pipe.strategy.conversion`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import run_ranks
from tests.test_strategy_materialize import SEED, _trainer


class _Refusing(torch.nn.Module):
    """Two linear layers whose forward fails while ``refuse`` is set (a capture that fails, then is fixed)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.refuse = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.refuse:
            raise ValueError("not this time")
        return self.second(torch.tanh(self.first(x)))


def _retried(rank: int, world_size: int) -> dict[str, Any]:
    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.lightning_models import regression_data

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _Refusing()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    states = {}
    for retry in (False, True):
        L.seed_everything(SEED)
        module = Module()
        if retry:
            module.net.refuse = True
            try:
                _trainer(world_size, precision="bf16-true").fit(module, regression_data(2))
            except Exception as error:  # noqa: BLE001 - the capture's error, on every rank
                states["error"] = f"{type(error).__name__}: {error}"
            states["after_failure"] = {k: (v.device.type, v.dtype) for k, v in module.state_dict().items()}
            module.net.refuse = False
        _trainer(world_size, precision="bf16-true").fit(module, regression_data(2))
        states["retried" if retry else "once"] = module.state_dict()
    return states


@pytest.mark.timeout(200)
def test_a_fit_whose_capture_failed_under_bf16_true_leaves_the_module_whole_for_the_next(tmp_path: Path) -> None:
    """``bf16-true`` converts a captured model on meta stand-ins until the cut; a capture that fails puts the
    originals back, converted whole (as the conversion used to leave them), so that a second fit of the same module
    trains from its own weights, not from the materializer's seeded ones."""
    for result in run_ranks(_retried, 2, timeout=180):
        assert "not this time" in result["error"]
        assert set(result["after_failure"].values()) == {("cpu", torch.bfloat16)}
        assert result["retried"].keys() == result["once"].keys()
        for key, value in result["once"].items():
            torch.testing.assert_close(result["retried"][key], value, rtol=0, atol=0, msg=key)


def _converted_model() -> torch.nn.Module:
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4))
    module.model[2].weight = module.model[0].weight  # a tie across stages
    module.model[0].weight.no_weight_decay = True  # an attribute a project gives a parameter
    module.scale = torch.nn.Parameter(torch.full((3,), 1.1))  # the step code's own: converted at once
    return module


def _tensors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def test_a_precisions_conversion_waits_for_the_cut_and_each_rank_converts_its_share() -> None:
    """``bf16-true`` over a float32 model: the captured model's tensors become meta stand-ins in bfloat16, the
    originals untouched; the materializer gives this rank's share the originals' values converted (as ``.to`` rounds
    them; a parameter keeps its attributes), the step code's own tensors are converted at once, and the other ranks'
    stay on meta; a tensor the step code holds too is converted at once; gradient hooks stay; a cut that never
    comes (a capture failed) leaves the module converted whole. Precisions that
    change no dtype of the model, or do more than change dtypes, convert at once as before."""
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, Precision

    from lightning_pipe.strategy.conversion import converted_later, restore
    from lightning_pipe.strategy.materialize import LocalMaterializer

    module = _converted_model()
    originals = _tensors_of(module.model)
    expected = {name: t.detach().to(torch.bfloat16) if t.is_floating_point() else t.clone()
                for name, t in originals.items()}
    sources = converted_later(module, module.model, HalfPrecision("bf16-true"))
    assert module.scale.dtype == torch.bfloat16 and not module.scale.is_meta
    for name, tensor in _tensors_of(module.model).items():
        assert tensor.is_meta and tensor.dtype == expected[name].dtype, name
        assert originals[name].dtype in (torch.float32, torch.int64) and not originals[name].is_meta, name
    assert module.model[2].weight is module.model[0].weight
    materializer = LocalMaterializer(module, module.model, torch.device("cpu"), SEED, sources=sources)
    assert not materializer.seeded  # every value is given: no warning about initial values
    materializer([module.model[0], module.model[1]])  # this rank's stages
    assert materializer.sources == {}  # the originals go
    for name, tensor in _tensors_of(module.model).items():
        if name == "2.bias":
            assert tensor.is_meta  # another rank's
        else:
            assert torch.equal(tensor, expected[name]), name
    assert module.model[2].weight is module.model[0].weight and module.model[0].weight.no_weight_decay
    assert materializer.unwritten() is None

    double = _converted_model()
    sources = converted_later(double, double.model, DoublePrecision())
    assert sources and all(t.is_meta and t.dtype in (torch.float64, torch.int64)
                           for t in _tensors_of(double.model).values())
    for precision, dtype in ((Precision(), torch.float32), (HalfPrecision("bf16-true"), torch.bfloat16)):
        unchanged = _converted_model()
        if dtype == torch.bfloat16:
            unchanged.model.to(torch.bfloat16)  # already in the precision's dtype
        before = _tensors_of(unchanged.model)
        assert converted_later(unchanged, unchanged.model, precision) == {}
        after = _tensors_of(unchanged.model)
        assert all(after[name] is before[name] for name in before), precision

    shared = _converted_model()  # a head in the step code tied to the model's first layer: converted at once
    shared.head = torch.nn.Linear(4, 4, bias=False)
    shared.head.weight = shared.model[0].weight
    sources = converted_later(shared, shared.model, HalfPrecision("bf16-true"))
    assert len(sources) == 7  # the model's other tensors: a bias, BatchNorm's weight, bias and 3 buffers, a bias
    assert not shared.head.weight.is_meta and shared.head.weight.dtype == torch.bfloat16
    assert shared.head.weight is shared.model[0].weight and shared.model[2].bias.is_meta

    hooked = _converted_model()  # gradient hooks stay on the parameter through its stand-in and materialization
    seen: list[str] = []
    hooked.model[2].bias.register_hook(lambda grad: seen.append("hook"))
    sources = converted_later(hooked, hooked.model, HalfPrecision("bf16-true"))
    LocalMaterializer(hooked, hooked.model, torch.device("cpu"), SEED, sources=sources)([hooked.model[2]])
    assert sources == {}  # the caller's dict, emptied as the values were copied: no original kept alive
    hooked.model[2](torch.ones(2, 4, dtype=torch.bfloat16)).sum().backward()
    assert seen == ["hook"]

    failed = _converted_model()  # the cut never came (a capture failed): the module as a whole conversion leaves it
    expected = {name: t.detach().to(torch.bfloat16) if t.is_floating_point() else t.clone()
                for name, t in _tensors_of(failed.model).items()}
    sources = converted_later(failed, failed.model, HalfPrecision("bf16-true"))
    restore(failed, sources, HalfPrecision("bf16-true"))
    assert sources == {}
    for name, tensor in _tensors_of(failed.model).items():
        assert not tensor.is_meta and torch.equal(tensor, expected[name]), name

    class Replacing(HalfPrecision):  # a conversion that may replace layers (as bitsandbytes' does)
        pass

    replaced = _converted_model()
    assert converted_later(replaced, replaced.model, Replacing("bf16-true")) == {}
    assert all(not t.is_meta and (t.dtype == torch.bfloat16 or not t.is_floating_point())
               for t in _tensors_of(replaced.model).values())
