"""Models built on the meta device (configure_model, Trainer.init_module(empty_init=True)): each rank materializes only
its own stages, and training equals one device's from the same initial weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.capture_models import HAS_TRANSFORMERS
from tests.helpers import run_ranks

SEED = 1234


def _trainer(devices: int, **options: Any) -> Any:
    import lightning as L

    from lightning_pipe import PipelineStrategy

    strategy = options.pop("strategy", None) or PipelineStrategy(schedule="1f1b", num_microbatches=2)
    defaults = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False, "num_sanity_val_steps": 0, "max_steps": 3}
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, **{**defaults, **options})


def _local_names(trainer: Any) -> list[str]:
    return sorted({name.rsplit(".", 1)[0] for name in trainer.lightning_module.state_dict()})


def _fit_meta(rank: int, world_size: int) -> dict[str, Any]:
    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.big_models import LazyRegressor
    from tests.lightning_models import TiedLM, regression_data, token_data

    L.seed_everything(SEED)
    lazy = LazyRegressor()  # its layers are built in configure_model(), on the meta device
    trainer = _trainer(world_size)
    materialized: list[str] = []
    original = trainer.strategy._build

    def build(module: Any, trainer_: Any) -> None:
        original(module, trainer_)
        materialized.extend(trainer.strategy._materializer.materialized)

    trainer.strategy._build = build
    trainer.fit(lazy, regression_data(3))
    tied_trainer = _trainer(world_size, max_steps=2)
    with tied_trainer.init_module(empty_init=True):
        tied = TiedLM()
    meta = all(p.is_meta for p in tied.parameters())
    tied_trainer.fit(tied, token_data(2))
    return {"lazy": lazy.state_dict(), "tied": tied.state_dict(), "materialized": materialized,
            "local": _local_names(trainer), "built_on_meta": meta}


def _one_device(make: Any, data: Any, max_steps: int) -> dict[str, torch.Tensor]:
    import lightning as L

    from tests.big_models import built_like_the_strategy, materialized_like_pipeline

    with built_like_the_strategy():
        model = make()
        model.configure_model()
    materialized_like_pipeline(model, SEED)
    L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(model, data)
    return model.state_dict()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world_size", [2, 4])
def test_meta_built_models_train_like_one_device(world_size: int) -> None:
    """configure_model() and init_module(empty_init=True) (a tied embedding and head): each rank materializes only its
    layers, the initial weights do not depend on the layout, and the trained weights equal one device's (1e-5)
    started from the same initial weights."""
    from tests.big_models import LazyRegressor
    from tests.lightning_models import TiedLM, regression_data, token_data

    results = run_ranks(_fit_meta, world_size, timeout=200)
    expected = {"lazy": _one_device(LazyRegressor, regression_data(3), 3),
                "tied": _one_device(TiedLM, token_data(2), 2)}
    for name, reference in expected.items():
        got: dict[str, torch.Tensor] = {}
        for result in results:
            got.update(result[name])
        assert got.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
    for result in results:
        assert result["built_on_meta"]
        assert result["materialized"], "nothing was materialized"
        for name in result["materialized"]:  # only this rank's layers got storage
            assert any(name == local or name.startswith(f"{local}.") or local.startswith(f"{name}.")
                       for local in result["local"]), (name, result["local"])
    assert len(results[0]["local"]) < 8


def _metered(rank: int, world_size: int) -> dict[str, Any]:
    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.big_models import MeteredRegressor
    from tests.lightning_models import regression_data

    L.seed_everything(SEED)
    model = MeteredRegressor()
    trainer = _trainer(world_size, max_steps=2)
    trainer.fit(model, regression_data(2))
    (logged,) = trainer.validate(model, regression_data(2, seed=9), verbose=False)
    return {"logged": logged, "state": model.state_dict(), "mse_on": str(model.mse.total.device)}


@pytest.mark.timeout(200)
def test_metrics_made_in_configure_model_keep_their_initial_states() -> None:
    """torchmetrics made in configure_model() beside the layers (which are built on the meta device) are built on
    the CPU, so their states start where they should: a running maximum from minus infinity, not from a lost value;
    they log one device's values. They used to be refused ("created on the meta device")."""
    import lightning as L

    from tests.big_models import MeteredRegressor, built_like_the_strategy, materialized_like_pipeline
    from tests.lightning_models import regression_data

    results = run_ranks(_metered, 2, timeout=180)
    with built_like_the_strategy():
        model = MeteredRegressor()
        model.configure_model()
    model.mse, model.worst = type(model.mse)(), type(model.worst)()  # one device's: made in the open
    materialized_like_pipeline(model, SEED)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, regression_data(2))
    (expected,) = trainer.validate(model, regression_data(2, seed=9), verbose=False)
    assert expected["val_worst"] < 0
    for result in results:
        assert result["mse_on"] == "cpu"
        assert result["logged"].keys() == expected.keys()
        for key, value in expected.items():
            assert result["logged"][key] == pytest.approx(value, rel=1e-5), key


def _tokens() -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.randint(0, 40, (16, 8), generator=torch.Generator().manual_seed(2))),
                      batch_size=8)


def _pretrained(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    import lightning_pipe  # noqa: F401
    from tests.big_models import Pretrained

    model = Pretrained(path)
    _trainer(world_size, max_steps=2).fit(model, _tokens())
    return model.state_dict()


@pytest.mark.timeout(200)
def test_from_pretrained_in_configure_model_loads_the_pretrained_weights(tmp_path: Path) -> None:
    """Hugging Face's ``from_pretrained`` in ``configure_model()`` (which refuses to load under a meta device) loads
    on the CPU, so the pipeline fine-tunes the pretrained weights: two steps equal one device's from them."""
    import lightning as L

    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install -e '.[dev]')")
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.big_models import Pretrained

    torch.manual_seed(3)
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=4, n_head=4, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(tmp_path / "gpt2")
    results = run_ranks(_pretrained, 2, str(tmp_path / "gpt2"), timeout=180)
    reference = Pretrained(str(tmp_path / "gpt2"))
    L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(reference, _tokens())
    got = {**results[0], **results[1]}
    assert got.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


def _uninitialized(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.big_models import RotatedRegressor, ScaledRegressor
    from tests.lightning_models import OutsideParameters, regression_data

    L.seed_everything(SEED)
    # the same layers, loaded from a checkpoint of an eager build: trains as the eager build does
    eager = ScaledRegressor()
    with torch.no_grad():
        for param in eager.parameters():
            param.add_(0.1)
    checkpointing = _trainer(world_size, max_steps=1)
    checkpointing.fit(eager, regression_data(2))
    path = f"{tmp}/eager.ckpt"
    checkpointing.save_checkpoint(path)
    eager_resumed = ScaledRegressor()
    _trainer(world_size, max_steps=2).fit(eager_resumed, regression_data(2), ckpt_path=path)
    trainer = _trainer(world_size, max_steps=2)
    with trainer.init_module(empty_init=True):
        meta_resumed = ScaledRegressor()
    trainer.fit(meta_resumed, regression_data(2), ckpt_path=path)
    messages = []  # last: a failure inside a step leaves the ranks unable to run another fit together
    for make in (RotatedRegressor, OutsideParameters):
        trainer = _trainer(world_size, max_steps=1)
        with trainer.init_module(empty_init=True):
            model = make()
        try:
            trainer.fit(model, regression_data(2))
            messages.append("no error")
        except Exception as error:
            messages.append(f"{type(error).__name__}: {error}")
    return {"messages": messages, "eager": eager_resumed.state_dict(), "meta": meta_resumed.state_dict()}


@pytest.mark.timeout(200)
def test_meta_tensors_nothing_initializes_need_a_checkpoint(tmp_path: Path) -> None:
    """A layer built on the meta device whose values neither an initializer nor the recorded construction gives (an
    orthogonal_ bound by name before the block, which torch skips on meta): a clear error on every rank; and a layer
    without reset_parameters() whose values a checkpoint gives trains as the eagerly built module does; a module whose trainable layers lie outside
    the sequence takes the captured path, which materializes its share as well."""
    results = run_ranks(_uninitialized, 2, str(tmp_path), timeout=160)
    for result in results:
        first, outside = result["messages"]
        assert ".1.weight' (Rotation)" in first and "nothing initialized them" in first and "reset_parameters()" in first and "ckpt_path" in first, first
        # its layers are spread over two attributes and its forward: the captured path, which materializes a meta
        # build per rank too (torch's layers initialize themselves)
        assert outside == "no error", outside
        for key, value in result["eager"].items():
            torch.testing.assert_close(result["meta"][key], value, rtol=0, atol=0, msg=key)


class _DataInit(torch.nn.Module):
    """Initializes through ``.data`` (no version bump), a buffer by assigning ``.data`` anew."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(4, 4))
        self.register_buffer("t", torch.empty(3), persistent=False)

    def reset_parameters(self) -> None:
        self.w.data.uniform_(-1, 1)
        self.t.data = torch.arange(3.0)


class _WeightOnly(torch.nn.Module):
    """An enclosing model whose ``_init_weights`` writes a Linear's weight only (its bias is reset_parameters')."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 64)

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            module.weight.data.normal_(0.0, 0.02)


class _NoArgInit(torch.nn.Module):
    """A ``_init_weights(self)`` of another convention (timm's): never called with a module."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def _init_weights(self) -> None:
        raise AssertionError("called with a module")


def test_the_materializer_sees_writes_through_data_and_keeps_what_each_initializer_wrote() -> None:
    """Writes through ``.data`` bump no version counter: they count as initialized (they used to be "unwritten", an
    error); an initializer that writes only some tensors keeps them when the next one runs; an enclosing
    ``_init_weights`` of another convention is not called while ``reset_parameters`` covers the layer."""
    from lightning_pipe.strategy.materialize import LocalMaterializer

    with torch.device("meta"):
        layers = torch.nn.Sequential(_DataInit(), _DataInit())
    materializer = LocalMaterializer(layers, layers, torch.device("cpu"), SEED)
    materializer([layers])
    assert materializer.unwritten() is None
    assert not torch.isnan(layers[1].w).any() and layers[1].t.tolist() == [0.0, 1.0, 2.0]
    with torch.device("meta"):
        other = _NoArgInit()
    LocalMaterializer(other, other, torch.device("cpu"), SEED)([other])
    assert not torch.isnan(other.linear.weight).any()
    import sys
    import types

    # an enclosing Hugging Face model (any PreTrainedModel subclass is one): its _init_weights comes first
    fake = types.ModuleType("transformers")
    fake.PreTrainedModel = _WeightOnly  # type: ignore[attr-defined]
    saved = sys.modules.get("transformers")
    sys.modules["transformers"] = fake
    try:
        with torch.device("meta"):
            model = _WeightOnly()
        LocalMaterializer(model, model, torch.device("cpu"), SEED)([model])
    finally:
        if saved is not None:
            sys.modules["transformers"] = saved
        else:
            del sys.modules["transformers"]
    assert 0.015 < float(model.linear.weight.detach().std()) < 0.025  # kept: reset_parameters' would be ~0.07
    assert not torch.isnan(model.linear.bias).any()  # from reset_parameters
