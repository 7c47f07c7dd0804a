"""Layers in several nn.Sequential attributes that the step calls in turn (Lightning's README autoencoder) train as
one pipeline on 2 gloo ranks, as on one device; a step that uses a value between them fails on every rank."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from tests.helpers import run_ranks

SEED = 5


def _fit(model_name: str, devices: int, strategy: Any, root: str, meta: bool = False) -> tuple[Any, Any]:
    """Fit ``model_name``; with ``meta``, built under ``trainer.init_module(empty_init=True)`` (on the meta device
    under PipelineStrategy; on one device, built on meta and materialized whole as the pipeline materializes it)."""
    import contextlib

    import lightning as L

    from lightning_pipe.strategy.materialize import LocalMaterializer
    from tests import citizen_models
    from tests.big_models import built_like_the_strategy
    from tests.citizen_models import class_data

    L.seed_everything(SEED, verbose=False)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=1, val_check_interval=3, num_sanity_val_steps=0, default_root_dir=root)
    one_device = devices == 1 and meta
    with built_like_the_strategy() if one_device else trainer.init_module(empty_init=True) if meta else \
            contextlib.nullcontext():
        model = getattr(citizen_models, model_name)()
    if one_device:
        sequence = torch.nn.Sequential(*model.encoder.children(), *model.decoder.children())
        LocalMaterializer(model, sequence, torch.device("cpu"), SEED)([sequence])
    trainer.fit(model, class_data(), class_data(batches=1))
    return model, trainer


def _ranks(rank: int, world_size: int, root: str, schedule: str, meta: bool) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    model, trainer = _fit("ReadmeAutoEncoder", world_size, PipelineStrategy(schedule=schedule, num_microbatches=4),
                          root, meta)
    trainer.save_checkpoint(os.path.join(root, f"{schedule}.ckpt"))
    return {"logged": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "links": sorted(name for name, _ in model.named_children())}


@pytest.mark.timeout(200)
@pytest.mark.parametrize(("schedule", "meta"), [("1f1b", False), ("gpipe", False), ("1f1b", True)])
def test_sequentials_the_step_calls_in_turn_train_as_one_pipeline(tmp_path: Any, schedule: str, meta: bool) -> None:
    """As one device; also built on the meta device (``init_module(empty_init=True)``), each rank materializing its
    own layers: then as one device materializing them all the same way."""
    from tests.citizen_models import ReadmeAutoEncoder

    results = run_ranks(_ranks, 2, str(tmp_path), schedule, meta, timeout=180)
    reference, trainer = _fit("ReadmeAutoEncoder", 1, "auto", str(tmp_path / "reference"), meta)
    state = torch.load(tmp_path / f"{schedule}.ckpt", weights_only=False)["state_dict"]
    assert list(state) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=key)
    for result in results:
        assert result["logged"] == pytest.approx({k: float(v) for k, v in trainer.callback_metrics.items()}, 1e-5)
    loaded = ReadmeAutoEncoder.load_from_checkpoint(tmp_path / f"{schedule}.ckpt")
    assert loaded(torch.ones(2, 12)).shape == (2, 3)


def _evaluated(devices: int, strategy: Any, root: str, model_name: str = "ReadmeAutoEncoder") -> dict[str, Any]:
    from tests.citizen_models import class_data

    model, trainer = _fit(model_name, devices, strategy, root)
    tested = trainer.test(model, class_data(batches=2, batch_size=6), verbose=False)
    predicted = trainer.predict(model, class_data(batches=2, batch_size=6))
    return {"tested": tested, "predicted": predicted}


def _evaluated_ranks(rank: int, world_size: int, root: str, partition: Any) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    return _evaluated(world_size, PipelineStrategy(num_microbatches=4, partition=partition), root)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("partition", ["uniform", [2, 4], [4, 2]])
def test_test_and_predict_through_forward_run_the_links_the_step_calls(tmp_path: Any, partition: Any) -> None:
    """Lightning's README autoencoder tests and predicts through ``forward``, the encoder alone (its embeddings):
    the pipeline runs the chain's layers up to the encoder's last, wherever the cut falls (the stages after pass
    its output on), and gives one device's embeddings and logged values (was refused: "never called
    ['decoder']")."""
    results = run_ranks(_evaluated_ranks, 2, str(tmp_path), partition, timeout=180)
    reference = _evaluated(1, "auto", str(tmp_path / "reference"))
    for result in results:
        assert result["tested"][0] == pytest.approx(reference["tested"][0], rel=1e-5)
        assert [tuple(batch.shape) for batch in result["predicted"]] == [(6, 3), (6, 3)]
        for batch, expected in zip(result["predicted"], reference["predicted"]):
            torch.testing.assert_close(batch, expected, rtol=1e-5, atol=1e-6)


def _switching(rank: int, world_size: int, root: str) -> None:
    from lightning_pipe import PipelineStrategy

    _evaluated(world_size, PipelineStrategy(num_microbatches=2), root, "SwitchingAutoEncoder")


@pytest.mark.timeout(120)
def test_a_step_calling_more_links_than_on_its_first_batch_fails_on_every_rank(tmp_path: Any) -> None:
    for error in run_ranks(_switching, 2, str(tmp_path), expect_failure=True, timeout=100):
        assert error is not None and "calls the nn.Sequential at 'decoder' in test_step on this batch" in error, error


def _peeking(rank: int, world_size: int, root: str) -> None:
    from lightning_pipe import PipelineStrategy

    _fit("PeekingAutoEncoder", world_size, PipelineStrategy(num_microbatches=2), root)


@pytest.mark.timeout(120)
def test_a_step_using_a_value_between_the_links_fails_on_every_rank(tmp_path: Any) -> None:
    errors = run_ranks(_peeking, 2, str(tmp_path), expect_failure=True, timeout=100)
    for error in errors:
        assert error is not None and "the step uses the output of 'encoder'" in error, error


@pytest.mark.timeout(120)
def test_a_discriminator_called_on_real_and_generated_samples_is_refused_with_the_ways_out(tmp_path: Any) -> None:
    """A GAN trained by one optimizer: the error said the chain's links must take each other's outputs, and not what
    to do (found by review)."""
    errors = run_ranks(_no_grad, 2, str(tmp_path), "OneOptimizerGAN", expect_failure=True, timeout=100)
    for error in errors:
        assert error is not None and "calls 'disc' on something other than the output" in error, error
        assert "PipelineStrategy(layers='disc')" in error and "DDP" in error, error


def _no_grad(rank: int, world_size: int, root: str, name: str = "NoGradAutoEncoder") -> None:
    from lightning_pipe import PipelineStrategy

    _fit(name, world_size, PipelineStrategy(num_microbatches=2), root)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["NoGradAutoEncoder", "UnfrozenTeacherFirst", "UnfrozenTeacher"])
def test_a_link_called_under_no_grad_in_training_is_refused_with_the_freeze_that_works(name: str,
                                                                                       tmp_path: Any) -> None:
    """The chain ran it with gradients: a frozen feature extractor was trained (found by review: 5.7e-2 off). A
    distillation teacher left trainable, called before the student, gave the student its logits (a shape error
    in the pipeline), and called after it, a message that the student runs only inside steps (found by review):
    both are said as they are, with the freeze that works."""
    errors = run_ranks(_no_grad, 2, str(tmp_path), name, expect_failure=True, timeout=100)
    link = "encoder" if name == "NoGradAutoEncoder" else "teacher"
    for error in errors:
        assert error is not None and f"self.{link}.requires_grad_(False)" in error, error
        if name == "UnfrozenTeacher":
            assert "calls the nn.Sequential at 'student' before 'teacher'" in error, error
        else:
            assert f"calls the nn.Sequential at '{link}' under torch.no_grad()" in error, error


def test_the_chain_is_chosen_for_sequentials_holding_every_trainable_parameter() -> None:
    import torch.nn as nn

    from lightning_pipe.strategy.chain import chain_paths
    from lightning_pipe.strategy.model_choice import CHAIN, choose_model
    from tests.citizen_models import ReadmeAutoEncoder

    model = ReadmeAutoEncoder()
    assert choose_model(model, None) == (CHAIN, None) and chain_paths(model) == ["encoder", "decoder"]
    model.head = nn.Linear(2, 2)  # trainable and not an nn.Sequential: no chain
    assert chain_paths(model) is None
