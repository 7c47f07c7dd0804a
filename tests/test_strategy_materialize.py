"""Models built on the meta device (configure_model, Trainer.init_module(empty_init=True)): each rank materializes only
its own stages, and training equals one device's from the same initial weights."""

from __future__ import annotations

import copy
import importlib.util
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

    from tests.big_models import materialized_like_pipeline

    with torch.device("meta"):
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

    from tests.big_models import MeteredRegressor, materialized_like_pipeline
    from tests.lightning_models import regression_data

    results = run_ranks(_metered, 2, timeout=180)
    with torch.device("meta"):
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


def _pretrained_lora(rank: int, world_size: int, path: str) -> dict[str, Any]:
    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.big_models import PretrainedLora

    L.seed_everything(SEED)
    model = PretrainedLora(path)
    _trainer(world_size, max_steps=2).fit(model, _tokens())
    return {"state": model.state_dict()}


@pytest.mark.timeout(200)
def test_lora_adapters_made_in_configure_model_start_as_peft_makes_them(tmp_path: Path) -> None:
    """``get_peft_model`` over ``from_pretrained`` in ``configure_model()``: the adapters are built beside their base
    layers on the CPU, initialized by PEFT (LoRA's B at zero) from the same random stream as on one device, not left on
    the meta device for the materializer's seeded values (they were: 0.23 off after two steps); two steps equal one
    device's."""
    import lightning as L

    if not HAS_TRANSFORMERS or importlib.util.find_spec("peft") is None:
        pytest.skip("transformers and peft are not installed (pip install -e '.[dev]')")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.big_models import PretrainedLora

    torch.manual_seed(3)
    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
                     ).save_pretrained(tmp_path / "llama")
    results = run_ranks(_pretrained_lora, 2, str(tmp_path / "llama"), timeout=180)
    L.seed_everything(SEED)
    reference = PretrainedLora(str(tmp_path / "llama"))
    L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(reference, _tokens())
    got = {**results[0]["state"], **results[1]["state"]}
    assert got.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _loaded(rank: int, world_size: int, path: str) -> dict[str, Any]:
    import warnings

    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.big_models import LoadedRegressor, loaded_layers
    from tests.lightning_models import regression_data

    L.seed_everything(SEED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = LoadedRegressor(path)
        _trainer(world_size, max_steps=3).fit(model, regression_data(3))
        trainer = _trainer(world_size, max_steps=3)  # loaded inside Trainer.init_module() too
        with trainer.init_module():
            layers = loaded_layers()
            layers.load_state_dict(torch.load(path, weights_only=True))
            built = LoadedRegressor(path)
            built.layers = layers
        trainer.fit(built, regression_data(3))
    return {"state": model.state_dict(), "init_module": built.state_dict(),
            "warnings": [str(w.message) for w in caught if "meta" in str(w.message)]}


@pytest.mark.timeout(200)
def test_weights_loaded_in_configure_model_reach_the_ranks_that_keep_them(tmp_path: Path) -> None:
    """``load_state_dict`` in ``configure_model()`` (or in a ``Trainer.init_module()`` block) copies into meta
    tensors, which is a no-op (torch only warns): the values are kept and each rank's materialized layers take them,
    layers without ``reset_parameters()`` included (a parameter, a buffer), so training equals one device's from
    those weights, with no warning about initial values (the values used to be the seeded ones, silently)."""
    import lightning as L

    from tests.big_models import LoadedRegressor, loaded_layers
    from tests.lightning_models import regression_data

    torch.manual_seed(5)
    source = loaded_layers()
    with torch.no_grad():
        source[1].offset.add_(0.5)
        source[3].gain.mul_(1.5)
    torch.save(source.state_dict(), tmp_path / "layers.pt")
    results = run_ranks(_loaded, 2, str(tmp_path / "layers.pt"), timeout=180)
    reference = LoadedRegressor(str(tmp_path / "layers.pt"))
    L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False).fit(reference, regression_data(3))
    for which in ("state", "init_module"):
        got = {**results[0][which], **results[1][which]}
        assert got.keys() == reference.state_dict().keys()
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{which} {key}")
    assert results[0]["warnings"] == [] and results[1]["warnings"] == []


def _from_checkpoint(rank: int, world_size: int, path: str, checkpoint: str) -> dict[str, Any]:
    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.big_models import LoadedRegressor
    from tests.lightning_models import regression_data

    L.seed_everything(SEED)
    trainer = _trainer(world_size, max_steps=2)
    with trainer.init_module(empty_init=True):
        model = LoadedRegressor.load_from_checkpoint(checkpoint, path=path)
    meta = all(p.is_meta for p in model.parameters())
    trainer.fit(model, regression_data(3))
    return {"state": model.state_dict(), "built_on_meta": meta}


@pytest.mark.timeout(200)
def test_load_from_checkpoint_under_init_module_gives_the_checkpoints_weights(tmp_path: Path) -> None:
    """Lightning's way for big models, ``with trainer.init_module(empty_init=True): model =
    Model.load_from_checkpoint(path)``: the module is built on meta and the checkpoint's state dict is loaded into it
    (after ``configure_model``'s own load, which it overrides); each rank's layers take the checkpoint's values, and
    training goes on as one device's from them (it used to start from seeded values, silently)."""
    import lightning as L

    from tests.big_models import LoadedRegressor, loaded_layers
    from tests.lightning_models import regression_data

    def trainer(steps: int) -> Any:
        return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)

    torch.manual_seed(5)
    torch.save(loaded_layers().state_dict(), tmp_path / "layers.pt")
    first = trainer(3)
    first.fit(LoadedRegressor(str(tmp_path / "layers.pt")), regression_data(3))
    first.save_checkpoint(tmp_path / "trained.ckpt")
    results = run_ranks(_from_checkpoint, 2, str(tmp_path / "layers.pt"), str(tmp_path / "trained.ckpt"), timeout=180)
    reference = LoadedRegressor.load_from_checkpoint(tmp_path / "trained.ckpt", path=str(tmp_path / "layers.pt"))
    trainer(2).fit(reference, regression_data(3))
    assert all(result["built_on_meta"] for result in results)
    got = {**results[0]["state"], **results[1]["state"]}
    assert got.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


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


def _uninitialized(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.big_models import ScaledRegressor
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
    for make in (ScaledRegressor, OutsideParameters):
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
    """A layer without reset_parameters() built on the meta device: a clear error on every rank, unless a checkpoint
    gives its values (then training equals the eagerly built module's); a module whose trainable layers lie outside
    the sequence takes the captured path, which materializes its share as well."""
    results = run_ranks(_uninitialized, 2, str(tmp_path), timeout=160)
    for result in results:
        first, outside = result["messages"]
        assert ".1.gain' (Scale)" in first and "nothing initialized them" in first and "reset_parameters()" in first and "ckpt_path" in first, first
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


def test_values_given_to_meta_tensors_while_the_module_is_built_reach_the_tensors_that_keep_them() -> None:
    """In the block that builds a module on the meta device: what a ``load_state_dict`` copies into a meta tensor (after
    the load's pre-hooks; a one-element value into a scalar; not a non-persistent buffer, which a load skips), and
    the values of real tensors moved to meta (PEFT's adapters beside a base built on meta: LoRA's A as PEFT drew it,
    its B at zero) reach the tensors when they are materialized; a name tied after the load to another loaded tensor
    keeps that one's value, as on one device; a module deep-copied in the block starts as its source (its loaded
    values, else its initialization); the records go once given. An initialization that reads the base's
    weights (PiSSA) fails with an error that says why and what to do."""
    from lightning_pipe.strategy.host_built import MetaBuildError, built_on_host, loaded_values
    from lightning_pipe.strategy.materialize import LocalMaterializer

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.register_buffer("table", torch.zeros(2), persistent=False)
            self.register_load_state_dict_pre_hook(self._renamed)

        def reset_parameters(self) -> None:
            with torch.no_grad():
                self.scale.fill_(1.0)
                self.table.copy_(torch.arange(2.0))

        @staticmethod
        def _renamed(module: Any, state_dict: dict, prefix: str, *args: Any) -> None:  # an old checkpoint's name
            if prefix + "gain" in state_dict:
                state_dict[prefix + "scale"] = state_dict.pop(prefix + "gain")

    cpu = torch.device("cpu")
    with torch.device("meta"), built_on_host():
        module = torch.nn.Module()
        module.emb, module.head, module.layer = torch.nn.Embedding(4, 3), torch.nn.Linear(3, 4, bias=False), Layer()
        module.load_state_dict({"emb.weight": torch.ones(4, 3, device=cpu), "head.weight": torch.zeros(4, 3, device=cpu),
                                "layer.gain": torch.full((1,), 5.0, device=cpu),
                                "layer.table": torch.full((2,), 7.0, device=cpu)}, strict=False)
        module.head.weight = module.emb.weight  # tied after the load
    assert len(loaded_values(module)) == 2  # emb's (tied to the head) and the scale
    LocalMaterializer(module, module, cpu, SEED)([module])
    assert torch.equal(module.head.weight, torch.ones(4, 3)) and module.head.weight is module.emb.weight
    assert float(module.layer.scale) == 5.0
    assert torch.equal(module.layer.table, torch.arange(2.0))  # recomputed, not loaded: a load skips it
    assert loaded_values(module) == {}

    with torch.device("meta"), built_on_host():  # copies made in the block start as their sources (EMA teachers)
        pair = torch.nn.Module()
        pair.student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
        pair.teacher = copy.deepcopy(pair.student)  # seeded: initialized as the student is
        pair.loaded = torch.nn.Linear(2, 2)
        pair.early_copy = copy.deepcopy(pair.loaded)  # made before the load: the initial values, as on one device
        pair.loaded.load_state_dict({"weight": torch.full((2, 2), 3.0, device=cpu), "bias": torch.ones(2, device=cpu)})
        pair.loaded_copy = copy.deepcopy(pair.loaded)  # loaded: takes the loaded values
    LocalMaterializer(pair, pair, cpu, SEED)([pair])
    assert all(torch.equal(s, t) for s, t in zip(pair.student.parameters(), pair.teacher.parameters()))
    assert not torch.equal(pair.student[0].weight, torch.zeros(3, 3))
    assert torch.equal(pair.loaded_copy.weight, torch.full((2, 2), 3.0))
    assert not torch.equal(pair.early_copy.weight, torch.full((2, 2), 3.0)) and not pair.early_copy.weight.is_meta

    def state(value: float) -> dict[str, torch.Tensor]:
        return {"weight": torch.full((2, 2), value, device=cpu), "bias": torch.zeros(2, device=cpu)}

    with torch.device("meta"), built_on_host():  # each copy holds what its source held when it was made
        chain = torch.nn.Module()
        chain.source = torch.nn.Linear(2, 2)
        chain.first = copy.deepcopy(chain.source)
        chain.first.load_state_dict(state(7.0))
        chain.second = copy.deepcopy(chain.first)  # a copy of a loaded copy
        chain.source.load_state_dict(state(1.0))
        chain.between = copy.deepcopy(chain.source)  # between two loads of its source
        chain.source.load_state_dict(state(2.0))
        with pytest.raises(TypeError):  # a move that fails leaves the meta tensors in place
            chain.to("cpu", torch.int64)
    assert [name for name, _ in chain.named_parameters()][:2] == ["source.weight", "source.bias"]
    LocalMaterializer(chain, chain, cpu, SEED)([chain])
    for name, value in {"source": 2.0, "first": 7.0, "second": 7.0, "between": 1.0}.items():
        assert torch.equal(chain.get_submodule(name).weight, torch.full((2, 2), value)), name

    if not HAS_TRANSFORMERS or importlib.util.find_spec("peft") is None:
        return
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"), built_on_host():
        base = LlamaForCausalLM(config)
        torch.manual_seed(7)
        lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    LocalMaterializer(lora, lora, cpu, SEED)([lora])
    eager_base = LlamaForCausalLM(config)
    torch.manual_seed(7)  # the adapters' draws, as in the block above
    eager = dict(get_peft_model(eager_base, LoraConfig(r=4, target_modules=["q_proj"])).named_parameters())
    adapters = {name: p for name, p in lora.named_parameters() if "lora_" in name}
    assert adapters and all(torch.equal(p, eager[name]) for name, p in adapters.items() if "lora_A" in name)
    assert all(not p.any() for name, p in adapters.items() if "lora_B" in name)
    with pytest.raises(MetaBuildError, match=r"PiSSA and OLoRA.*load the base with from_pretrained"):
        with torch.device("meta"), built_on_host():
            get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"],
                                                                init_lora_weights="pissa"))
