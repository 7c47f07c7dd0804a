"""What a module built on the meta device is given while it is built (``configure_model()``, ``Trainer.init_module()``:
:mod:`lightning_pipe.strategy.host_built`): PEFT's adapters, values a ``load_state_dict`` loads, ``load_from_checkpoint``,
deep copies; each rank's materialized layers take them, as one device's start."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.capture_models import HAS_TRANSFORMERS
from tests.helpers import run_ranks
from tests.test_strategy_materialize import SEED, _tokens, _trainer


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


def _kept_peak(rank: int, world_size: int, path: str, scaled: bool, guarded: bool) -> dict[str, Any]:
    import lightning as L

    import lightning_pipe  # noqa: F401
    from tests.big_models import KeptPeakRegressor
    from tests.lightning_models import regression_data

    L.seed_everything(SEED)
    model = KeptPeakRegressor(path, scaled=scaled, guarded=guarded)
    trainer = _trainer(world_size, max_steps=3)
    trainer.fit(model, regression_data(3))
    trainer.validate(model, regression_data(1))  # configure_model() again
    return {"state": model.state_dict(), "peak": model.peak}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scaled", [False, True], ids=["layers", "captured"])
def test_tensors_made_beside_the_layers_in_configure_model_get_their_values(tmp_path: Path, scaled: bool) -> None:
    """A plain tensor attribute made in ``configure_model()`` beside the layers (``self.peak = torch.tensor(-inf)``)
    is given the value its construction computed on every rank (it stayed on meta: torch's "Cannot copy out of meta
    tensor" at the first step), and so is a buffer of a module whose forward is captured (torch's "aten::equal ...
    Meta tensors" in the capture); training and the kept maximum equal one device's."""
    import lightning as L

    from tests.big_models import KeptPeakRegressor, loaded_layers
    from tests.lightning_models import regression_data

    torch.manual_seed(5)
    torch.save(loaded_layers().state_dict(), tmp_path / "layers.pt")
    results = run_ranks(_kept_peak, 2, str(tmp_path / "layers.pt"), scaled, True, timeout=240)
    L.seed_everything(SEED)
    reference = KeptPeakRegressor(str(tmp_path / "layers.pt"), scaled=scaled)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(reference, regression_data(3))
    got = {**results[0]["state"], **results[1]["state"]}
    assert got.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert torch.isfinite(reference.peak)
    torch.testing.assert_close(results[1]["peak"], reference.peak)  # the last stage runs the step


@pytest.mark.timeout(200)
def test_configure_model_that_builds_the_layers_again_is_an_error_that_names_the_guard(tmp_path: Path) -> None:
    """``configure_model()`` without Lightning's "build once" guard builds new layers for ``validate()`` after
    ``fit()`` (on one device: silently the untrained ones); under the pipeline they are on meta in place of the cut
    ones, which used to fail with torch's "Cannot copy out of meta tensor; use to_empty()": now every rank names the
    layers and the guard."""
    from tests.big_models import loaded_layers

    torch.save(loaded_layers().state_dict(), tmp_path / "layers.pt")
    errors = run_ranks(_kept_peak, 2, str(tmp_path / "layers.pt"), False, False, timeout=180, expect_failure=True)
    for text in errors:
        assert text is not None and "configure_model() built layers of KeptPeakRegressor again" in text, text
        assert "if self.layers is not None: return" in text


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


def test_a_plain_tensor_attribute_whose_value_cannot_be_known_is_an_error_that_names_it() -> None:
    """A plain tensor attribute made on meta from nothing the recording can compute again (``torch.empty``) is named
    at the cut, with the fix; one whose construction was recorded gets its value, on every rank the same."""
    from lightning_pipe.strategy.materialize import LocalMaterializer
    from tests.big_models import built_like_the_strategy

    def built(unknown: bool) -> torch.nn.Module:
        with built_like_the_strategy():
            module = torch.nn.Module()
            module.layers = torch.nn.Sequential(torch.nn.Linear(2, 2))
            module.table = torch.arange(4.0).exp()
            module.layers[0].cache = torch.empty(3) if unknown else torch.ones(3)
        return module

    module = built(unknown=False)
    LocalMaterializer(module, module.layers, torch.device("cpu"), SEED)([module.layers])
    assert torch.equal(module.table, torch.arange(4.0).exp()) and torch.equal(module.layers[0].cache, torch.ones(3))
    module = built(unknown=True)
    with pytest.raises(ValueError, match=r"layers\.0\.cache of Module: plain tensor attributes made on the meta "
                                         r"device .* make them in __init__ or setup\(\)"):
        LocalMaterializer(module, module.layers, torch.device("cpu"), SEED)([module.layers])
