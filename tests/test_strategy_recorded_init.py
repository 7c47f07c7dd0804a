"""A module built on the meta device under the strategy gets what its construction computed, computed again per rank
(lightning_pipe/strategy/recorded_init.py): rope tables, position tables, masks, literal buffers, parameters made
with zeros or ones, and what an enclosing model's ``__init__`` did to its layers; what cannot be known is not
guessed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

from tests.helpers import run_ranks

SEED = 23


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _eager(make: Any, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _tensors(make())


def _materialized(make: Any) -> tuple[nn.Module, Any]:
    from lightning_pipe.strategy.materialize import LocalMaterializer
    from tests.big_models import built_like_the_strategy

    with built_like_the_strategy():
        model = make()
    materializer = LocalMaterializer(model, model, torch.device("cpu"), SEED)
    materializer([model])
    return model, materializer


def _check_initialized_as_built(make: Any) -> nn.Module:
    """``make()`` built on meta and materialized holds what an eager build holds: a value that does not depend on the
    seed bit for bit, a drawn one with the spread of the eager build's (within 30%)."""
    from lightning_pipe.strategy.recorded_init import recorded

    first, second = _eager(make, 0), _eager(make, 1)
    model, materializer = _materialized(make)
    assert not recorded()  # the tape goes with the materialization
    assert materializer.unwritten() is None
    got = _tensors(model)
    assert got.keys() == first.keys()
    for key, value in first.items():
        mine = got[key].detach()
        assert not mine.is_meta and not (mine.is_floating_point() and torch.isnan(mine).any()), key
        if torch.equal(value, second[key]):  # the construction does not draw it
            assert torch.equal(mine, value.detach()), key
        elif value.numel() >= 64:  # drawn: the spread of the model's own initialization
            ratio = float(mine.float().std() / value.detach().float().std())
            assert 0.7 < ratio < 1.4, (key, ratio)
    return model


@pytest.mark.parametrize("name", ["reference_llama", "tutorial_transformer", "nanogpt", "tiny_vit", "parametrized",
                                  "lazy_shaped"])
def test_a_construction_is_computed_again_where_no_initializer_does(name: str) -> None:
    """Built on meta and materialized, each tensor holds what the model's own ``__init__`` computes: a value that does
    not depend on the random seed (a rope table in a complex buffer, the tutorial's sinusoids written through slices,
    a causal mask, ImageNet's mean from ``torch.tensor``, MAE's NumPy sin-cos table, a class token of zeros, the norms'
    ones) bit for bit; a random one from the model's own distribution, which torch's defaults are not (nanoGPT's
    N(0, 0.02) linear and embedding weights, where reset_parameters() draws ~0.1 and N(0, 1), and its projections
    scaled by depth; the tutorial's U(-0.1, 0.1) embedding; a ViT's trunc_normal_ position embedding, orthogonal
    projection, Dirac stem and sparse weight, which torch skips on meta tensors, the last three called through names
    bound at import); and Python numbers the construction reads from a tensor (timm's
    stochastic-depth rates, ``.item()`` of a ``torch.linspace``: an error on meta); torch's orthogonal
    parametrization, whose set-up reads ``torch.allclose``, runs ``torch.geqrf`` (no meta kernel: run on the recorded
    values) and moves its parameter's storage (``set_``). Before, the buffers were an error ("not persistent ... nothing
    recomputes it", or "nothing initialized them" without a checkpoint) and the weights torch's defaults. Lazy layers
    shaped by a forward of zeros while built (then given a weight norm) failed as their parameters were materialized
    (the recording read the shape of an uninitialized parameter)."""
    from tests.constructed_models import MODELS

    model = _check_initialized_as_built(MODELS[name])
    if name == "nanogpt":
        assert model.wte.weight is model.lm_head.weight
        assert 0.015 < float(model.wte.weight.std()) < 0.025  # N(0, 1) from nn.Embedding's own reset_parameters
        assert 0.004 < float(model.h[0].c_proj.weight.std()) < 0.01  # 0.02 / sqrt(2 * 4)
    if name == "parametrized":
        weight = model.rotate.weight.detach()
        torch.testing.assert_close(weight @ weight.T, torch.eye(len(weight)), atol=1e-5, rtol=0)
    if name == "tiny_vit":
        weight = model.project.weight.detach()
        torch.testing.assert_close(weight @ weight.T, torch.eye(len(weight)), atol=1e-5, rtol=0)
        assert 0.015 < float(model.pos_embed.std()) < 0.025
        assert float((model.sparse.weight == 0).float().mean()) == 0.5  # half of each column: sparse_'s zeros
        assert model.drop_rates == MODELS[name]().drop_rates  # read from a meta linspace: computed from the recording


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_t5", "hf_whisper", "hf_mamba", "hf_resnet", "hf_llama", "hf_bart"])
def test_hugging_face_models_initialize_every_module_as_their_initialize_weights_does(name: str) -> None:
    """Hugging Face skips its initialization on the meta device; the strategy's block runs it there (every module in
    post-order by the enclosing model's ``_init_weights``, a parent after its children), so it is recorded and each
    rank replays it for its tensors. Calling ``_init_weights`` only for the module owning each tensor (as before) missed
    what a parent sets: GPT-2's residual projections scaled by depth (3x too wide), T5's attention and feed-forward
    scales (5-16x), Whisper's sinusoidal positions (deterministic: other values), Mamba's convolution and time-step
    initialization, ResNet's fan-out convolutions."""
    from tests.capture_models import HAS_TRANSFORMERS, MORE_FAMILIES, hf_bart, hf_gpt2, hf_llama, hf_mamba, hf_t5, \
        hf_whisper

    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install -e '.[dev]')")
    makers = {"hf_gpt2": hf_gpt2, "hf_t5": hf_t5, "hf_whisper": hf_whisper, "hf_mamba": hf_mamba,
              "hf_resnet": MORE_FAMILIES["hf_resnet"].make, "hf_llama": hf_llama, "hf_bart": hf_bart}
    _check_initialized_as_built(makers[name])


def test_the_replay_follows_the_construction_in_order() -> None:
    """What the construction did, in its order: a host buffer refilled for each layer gives each layer its own
    value; a conversion in ``__init__`` (new storage under the same parameter) and an edit after it; a target network
    loaded from its online network is equal to it; draws from the project's own generator do not depend on which
    layers a rank holds (each draw seeded by its place in the recording) and leave that generator alone; edits made to
    a Hugging Face model after building it come after its initialization (which Hugging Face skips on meta and the
    block runs there, to be recorded in its place)."""
    from lightning_pipe.strategy.materialize import LocalMaterializer
    from tests.big_models import built_like_the_strategy
    from tests.capture_models import HAS_TRANSFORMERS
    from tests.constructed_models import Converted, Drawn, EditedGPT2, Staged, Target

    staged, _ = _materialized(Staged)
    assert [float(layer.weight[0, 0]) for layer in staged.layers] == [1.0, 2.0, 3.0]
    converted, _ = _materialized(Converted)
    assert converted.linear.bias.dtype == torch.float64 and converted.linear.bias.tolist() == [2.0] * 4
    assert converted.linear.weight.dtype == torch.float64 and bool((converted.linear.weight == 4.0).all())
    target, _ = _materialized(Target)
    assert torch.equal(target.target.weight, target.online.weight) and torch.equal(target.target.bias,
                                                                                     target.online.bias)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    whole, _ = _materialized(lambda: Drawn(generator))
    with built_like_the_strategy():
        torch.zeros(3)  # something else recorded first (a project's own tensors, another model): no other values
        part = Drawn(generator)
    LocalMaterializer(part, part.layers, torch.device("cpu"), SEED)([part.layers[2]])  # a rank with the last layer
    assert torch.equal(part.layers[2].weight, whole.layers[2].weight) and part.layers[0].weight.is_meta
    generator.set_state(state)
    with built_like_the_strategy():
        drawn = Drawn(generator)
    built = generator.get_state()
    LocalMaterializer(drawn, drawn.layers, torch.device("cpu"), SEED)([drawn.layers])
    assert torch.equal(generator.get_state(), built)  # the replay's draws came from generators of its own
    if HAS_TRANSFORMERS:
        edited, _ = _materialized(EditedGPT2)
        assert float(edited.model.transformer.h[0].mlp.c_fc.weight.abs().max()) == 0.0
        assert edited.model.transformer.ln_f.weight.tolist() == [0.5] * 32
        assert 0.015 < float(edited.model.transformer.h[1].mlp.c_fc.weight.std()) < 0.025  # Hugging Face's N(0, 0.02)
        assert 0.007 < float(edited.model.transformer.h[1].attn.c_proj.weight.std()) < 0.013  # scaled: 0.02 / 2


def test_draws_shared_by_tensors_hugging_face_fallbacks_and_numbers_drawn_while_built() -> None:
    """One random matrix copied into several layers comes out equal in each (its draw is seeded by the first named
    tensor it flows into, whichever tensor is replayed); Hugging Face's own ``orthogonal_`` (through its table of
    torch's functions) is recorded; a Hugging Face initialization that cannot run on meta (it reads a weight into
    NumPy) falls to the per-module pass, not to torch's defaults; a random number read into Python while the model is
    built (which the materialization would draw otherwise) is refused with what to do."""
    from tests.capture_models import HAS_TRANSFORMERS
    from tests.constructed_models import DrawnNumber, SharedDraw, hugging_face_initialized

    shared, _ = _materialized(SharedDraw)
    assert all(torch.equal(layer.weight, shared.layers[0].weight) for layer in shared.layers)
    assert torch.equal(shared.layers[0].bias, shared.layers[0].weight[0])
    assert 0.07 < float(shared.layers[0].weight.std()) < 0.13  # drawn: 0.1 * N(0, 1)
    with pytest.raises(ValueError, match="a value drawn at random is read into Python"):
        _materialized(DrawnNumber)
    if not HAS_TRANSFORMERS:
        return
    for reads in (False, True):
        model, materializer = _materialized(lambda reads=reads: hugging_face_initialized(reads))
        assert materializer.unwritten() is None
        rotation = model.rotation.weight.detach()
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(32), atol=1e-5, rtol=0, msg=str(reads))
        assert 0.015 < float(model.linear.weight.std()) < 0.025, reads  # not torch's default (~0.1)
        assert not bool(model.linear.bias.any()), reads


def test_draws_into_temporaries_reads_failed_initializations_and_failed_blocks() -> None:
    """Rows drawn in a loop into temporaries are each their own draw (they were one: seeded by their distance to
    the parameter); an unrelated op recorded between a draw and its copy changes nothing; a read of what a draw wrote
    and a later ``ones_`` overwrote is a known value, while a random yes or no read into Python (``bool()``,
    ``.tolist()``) is refused like a number; when Hugging Face's initialization fails on meta, the changes the code
    made to the model afterwards are named in a warning (the per-module pass replaces them); a block that raises drops
    only what it recorded, not what an earlier block did."""
    import warnings

    from lightning_pipe.strategy.recorded_init import recording
    from tests.big_models import built_like_the_strategy
    from tests.capture_models import HAS_TRANSFORMERS
    from tests.constructed_models import Reads, RowDrawn, hugging_face_initialized

    rows, _ = _materialized(RowDrawn)
    assert not torch.equal(rows.rows[0], rows.rows[1]) and not torch.equal(rows.rows[1], rows.rows[2])
    assert 0.015 < float(rows.rows.std()) < 0.025
    unrelated, _ = _materialized(lambda: RowDrawn(unrelated=True))
    assert torch.equal(unrelated.copied, rows.copied) and torch.equal(unrelated.rows, rows.rows)
    assert _materialized(Reads)[0].ones == 16.0
    for kind in ("bool", "tolist"):
        with pytest.raises(ValueError, match="a value drawn at random is read into Python"):
            _materialized(lambda kind=kind: Reads(kind))
    with built_like_the_strategy():
        kept = nn.Linear(64, 64)
        nn.init.normal_(kept.weight, std=0.02)
    with pytest.raises(RuntimeError, match="failed"):
        with recording():
            torch.ones(3)
            raise RuntimeError("failed")
    from lightning_pipe.strategy.materialize import LocalMaterializer

    LocalMaterializer(kept, kept, torch.device("cpu"), SEED)([kept])
    assert 0.015 < float(kept.weight.std()) < 0.025  # torch's default would be ~0.07
    if HAS_TRANSFORMERS:
        def edited() -> nn.Module:
            model = hugging_face_initialized(reads=True)
            nn.init.constant_(model.linear.weight, 0.5)
            return model

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _materialized(edited)
        assert any("Initialized.linear.weight" in str(w.message) and "is lost" in str(w.message) for w in caught)


class _Masked(nn.Module):
    """A mask computed from a weight that an unseen initialization set (a comparison carries no NaN)."""

    def __init__(self) -> None:
        super().__init__()
        from tests.big_models import skipping_orthogonal_

        self.weight = nn.Parameter(torch.empty(4, 4))
        skipping_orthogonal_(self.weight)
        self.register_buffer("mask", self.weight.detach().abs() > 0.1, persistent=False)
        self.register_buffer("scale", torch.ones(4), persistent=False)


class _Copied(nn.Module):
    """A layer whose weight a large host tensor gives through ``.data.copy_`` (no load_state_dict to record)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(value.shape[1], value.shape[0])
        self.linear.weight.data.copy_(value)


class _Late(nn.Module):
    """A buffer computed from a meta tensor made before the block: nothing recorded can give its value."""

    def __init__(self, made_before: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", made_before * 2, persistent=False)


def test_what_the_recording_cannot_know_is_not_guessed() -> None:
    """Values copied in from a host tensor (5 MB here) are given; a value computed from a tensor the recording never
    saw, or initialized by a project's own function that skips meta tensors (which the block cannot see), is not
    guessed: it falls to the module's other initializers, and else to the errors that say what to do, as before."""
    from tests.big_models import Rotation

    value = torch.randn(1100, 1200)
    copied, _ = _materialized(lambda: _Copied(value))
    assert torch.equal(copied.linear.weight.detach(), value)
    with torch.device("meta"):
        made_before = torch.ones(3)
    with pytest.raises(ValueError, match="the buffer 'table' of _Late .* is not persistent"):
        _materialized(lambda: _Late(made_before))
    rotation, materializer = _materialized(lambda: Rotation(8))
    message = materializer.unwritten()
    assert message is not None and "'weight' (Rotation)" in message, message
    with pytest.raises(ValueError, match="the buffer 'mask' of _Masked"):  # not a mask of falses
        _materialized(_Masked)


def test_a_conversion_after_the_block_is_replayed_too() -> None:
    """``bf16-true`` converts a meta-built model after the block (its float32 buffers become new bfloat16 tensors): the
    strategy records that conversion too, so the tables are their own, converted."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    from lightning_pipe.strategy.materialize import LocalMaterializer
    from lightning_pipe.strategy.recorded_init import recording
    from tests.big_models import built_like_the_strategy
    from tests.constructed_models import TutorialTransformer

    eager = HalfPrecision("bf16-true").convert_module(TutorialTransformer())
    with built_like_the_strategy():
        model = TutorialTransformer()
    with recording():
        HalfPrecision("bf16-true").convert_module(model)
    LocalMaterializer(model, model, torch.device("cpu"), SEED)([model])
    assert model.pos_encoder.pe.dtype == torch.bfloat16
    assert torch.equal(model.pos_encoder.pe, eager.pos_encoder.pe)
    assert torch.equal(model.mask, eager.mask)


def _fit(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    import lightning as L

    from lightning_pipe import PipelineStrategy
    from tests.constructed_models import Constructed, constructed_data

    results = {}
    for name in names:
        L.seed_everything(SEED, verbose=False)
        model = Constructed(name)
        trainer = L.Trainer(strategy=PipelineStrategy(num_microbatches=4), accelerator="cpu", devices=world_size,
                            max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False)
        trainer.fit(model, constructed_data(name))
        results[name] = {key: value for key, value in model.state_dict().items() if not value.is_meta}
    # bf16-true converts the model after the block: its float32 mask too, a conversion recorded for the replay
    model = Constructed("tutorial_transformer")
    trainer = L.Trainer(strategy=PipelineStrategy(num_microbatches=4), accelerator="cpu", devices=world_size,
                        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, precision="bf16-true")
    trainer.fit(model, constructed_data("tutorial_transformer"))
    state = model.state_dict()
    results["bf16-true"] = {key: state[f"model.{key}"] for key in ("mask", "pos_encoder.pe")
                            if f"model.{key}" in state and not state[f"model.{key}"].is_meta}
    return results


@pytest.mark.timeout(400)
def test_models_that_compute_in_their_construction_train_like_one_device_built_on_meta() -> None:
    """Meta's reference Llama (complex rope table), torch's transformer tutorial (sinusoids, causal mask buffer),
    nanoGPT (its own initialization, a tie across the first and last stage) and a hand-written ViT, each built in
    ``configure_model()`` under ``pipedream`` on 2 ranks: after three steps every rank's weights equal one device's
    from the same construction, replayed whole (they used to fail at setup, or start from torch's defaults)."""
    import lightning as L

    from lightning_pipe.strategy.materialize import LocalMaterializer
    from tests.big_models import built_like_the_strategy
    from tests.constructed_models import Constructed, constructed_data

    from lightning.pytorch.plugins.precision import HalfPrecision

    from tests.constructed_models import TutorialTransformer

    names = ["reference_llama", "tutorial_transformer", "nanogpt", "tiny_vit"]
    results = run_ranks(_fit, 2, names, timeout=360)
    precision = HalfPrecision("bf16-true")
    with precision.tensor_init_context():  # as configure_model() runs on one device (in bfloat16 by default)
        eager = precision.convert_module(TutorialTransformer()).state_dict()
    converted = {**results[0]["bf16-true"], **results[1]["bf16-true"]}
    assert converted.keys() == {"mask", "pos_encoder.pe"}
    for key, value in converted.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, eager[key]), key
    for name in names:
        L.seed_everything(SEED, verbose=False)
        with built_like_the_strategy():
            reference = Constructed(name)
            reference.configure_model()
        LocalMaterializer(reference, reference.model, torch.device("cpu"), SEED)([reference.model])
        L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False).fit(reference, constructed_data(name))
        expected = reference.state_dict()
        got = {**results[0][name], **results[1][name]}
        assert got.keys() == expected.keys(), name
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")


def test_the_recording_keeps_no_host_tensor_it_only_took_a_layout_from() -> None:
    """A meta tensor made like a host tensor (``empty_like``: the conversion's stand-ins of a mapped checkpoint's
    tensors, strategy/conversion.py) is recorded by its layout, not with a reference that would keep the host tensor
    in memory until the materialization."""
    import gc
    import weakref

    from lightning_pipe.strategy.init_replay import replay
    from lightning_pipe.strategy.recorded_init import forget_recording, recorded, recording

    host = torch.arange(12.0).view(3, 4).t()
    gone = weakref.ref(host)
    with recording():
        stand_in = torch.empty_like(host, device="meta")
        filled = torch.ones(4, 3, device="meta")
    del host
    gc.collect()
    assert gone() is None and recorded()
    assert replay([stand_in]) == [None]  # what nothing wrote is not guessed
    assert torch.equal(replay([filled])[0], torch.ones(4, 3))
    forget_recording()
    assert not recorded()


def test_initializations_made_by_other_threads_while_a_model_is_built_are_not_recorded() -> None:
    """torch's ``orthogonal_`` runs recording code for every caller while the block runs (so that a name bound at
    import is seen): a call from another thread (a data loader's, a logger's) is not the model's construction."""
    import threading

    from lightning_pipe.strategy.init_tape import TAPE
    from lightning_pipe.strategy.recorded_init import forget_recording, recording

    with recording():
        weight = torch.empty(4, 4, device="meta")
        before = len(TAPE)
        other = threading.Thread(target=lambda: torch.nn.init.orthogonal_(torch.empty(4, 4, device="meta")))
        other.start()
        other.join()
        after_other = len(TAPE)
        torch.nn.init.orthogonal_(weight)
        after_own = len(TAPE)
    forget_recording()
    assert after_other == before and after_own == before + 1
