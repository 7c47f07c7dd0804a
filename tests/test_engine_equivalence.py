"""Pipelined gradients equal single-process gradients: 2 and 4 ranks, gpipe and 1f1b, every batch shape."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn as nn

from lightning_pipe.engine.executor import Pipeline
from tests.helpers import run_ranks
from tests.models import in_place_model, make_batch, mlp, mse_loss, tuple_model

pytestmark = pytest.mark.timeout(300)

CASES = [
    # (model, schedule, checkpoint_activations, rows, num_microbatches)
    ("mlp", "gpipe", False, 16, 4),
    ("mlp", "1f1b", False, 16, 4),
    ("mlp", "1f1b", False, 16, 8),
    ("mlp", "gpipe", True, 16, 4),
    ("mlp", "1f1b", True, 16, 8),
    ("tuple", "gpipe", False, 12, 4),
    ("tuple", "1f1b", True, 12, 3),
    ("mlp", "1f1b", False, 10, 4),  # uneven: 3, 3, 2, 2 rows
    ("mlp", "gpipe", True, 10, 4),
    ("mlp", "gpipe", False, 3, 8),  # fewer rows than micro-batches: one micro-batch per row
    ("mlp", "1f1b", False, 2, 8),
    ("mlp", "interleaved_1f1b", False, 16, 4),
    ("mlp", "interleaved_1f1b", True, 16, 8),
    ("mlp", "interleaved_1f1b", False, 3, 4),  # 3 micro-batches: not a multiple of the ranks, runs fill-drain
    ("tuple", "interleaved_1f1b", False, 12, 4),
    ("mlp", "zb_h1", False, 16, 4),
    ("mlp", "zb_h1", False, 10, 8),
    ("mlp", "zb_h1", False, 3, 8),  # fewer rows than micro-batches
    ("tuple", "zb_h1", False, 12, 4),
    ("mlp", "zb_v", False, 16, 8),
    ("mlp", "zb_v", False, 3, 8),
    # a stage whose first layer writes its input in place (a leaf needing a gradient; a buffer received beside a
    # tensor that a layer keeps for its backward)
    ("in_place", "1f1b", False, 16, 4),
    ("in_place", "gpipe", True, 16, 4),
    ("in_place", "zb_h1", False, 16, 4),
]


def _compare_with_reference(rank: int, world_size: int, cases: list) -> list[dict]:
    reports = []
    for model_name, schedule, remat, rows, num_microbatches in cases:
        model = {"tuple": tuple_model, "in_place": in_place_model}.get(model_name, lambda: mlp(num_layers=8))()
        stages_needed = world_size * (2 if schedule in ("interleaved_1f1b", "zb_v") else 1)
        if stages_needed > len(model):
            continue
        reference = copy.deepcopy(model)
        batch = make_batch(rows)
        pipe = Pipeline(model, loss_fn=mse_loss, schedule=schedule, num_microbatches=num_microbatches,
                        checkpoint_activations=remat)
        loss = pipe.train_step(batch)
        ref_loss = mse_loss(reference(batch[0]), batch)
        ref_loss.backward()
        grads = {name: p.grad for name, p in pipe.named_parameters()}
        ref_grads = {name: p.grad for name, p in reference.named_parameters() if name in grads}
        reports.append({"case": (model_name, schedule, remat, rows, num_microbatches), "loss": loss,
                        "ref_loss": ref_loss.detach(), "grads": grads, "ref_grads": ref_grads})
    return reports


@pytest.mark.parametrize("world_size", [2, 4])
def test_gradients_equal_single_process(world_size: int) -> None:
    reports = run_ranks(_compare_with_reference, world_size, CASES)
    assert len(reports[0]) >= len(CASES) - 2
    for rank, rank_reports in enumerate(reports):
        for report in rank_reports:
            case = report["case"]
            last_rank = 0 if case[1] == "zb_v" else world_size - 1  # zb_v's last stage comes back to rank 0
            if rank == last_rank:
                torch.testing.assert_close(report["loss"], report["ref_loss"], rtol=0, atol=1e-6, msg=str(case))
            else:
                assert report["loss"] is None, f"rank {rank} is not the last stage but returned a loss"
            assert report["grads"], f"rank {rank} holds no parameters in {case}"
            for name, grad in report["grads"].items():
                torch.testing.assert_close(grad, report["ref_grads"][name], rtol=0, atol=1e-6,
                                           msg=f"{case} rank {rank} {name}")


def _dropout_grads(rank: int, world_size: int, schedule: str) -> list[dict]:
    grads = []
    for remat in (False, True):
        pipe = Pipeline(mlp(num_layers=8, dropout=0.3), loss_fn=mse_loss, schedule=schedule, num_microbatches=4,
                        checkpoint_activations=remat)
        torch.manual_seed(1234)
        pipe.train_step(make_batch(16))
        grads.append({name: p.grad for name, p in pipe.named_parameters()})
    return grads


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_rematerialization_replays_dropout_masks(schedule: str) -> None:
    """Recomputing a forward during backward must draw the dropout masks of the original forward."""
    for rank, (plain, remat) in enumerate(run_ranks(_dropout_grads, 2, schedule)):
        for name, grad in plain.items():
            assert grad.abs().sum() > 0
            torch.testing.assert_close(remat[name], grad, rtol=0, atol=1e-6, msg=f"rank {rank} {name}")


def _output_storage_at_backward(rank: int, world_size: int, schedule: str) -> dict[str, list[bool]]:
    """Whether stage 0's output storage is alive when the backward of its micro-batch starts (rank 0, 4 micro-batches),
    for a stage that ends in a Linear (nothing saves its output) and one that ends in Tanh (which saves its result)."""
    alive: dict[str, list[bool]] = {}
    for last in ("linear", "tanh"):
        model = mlp(num_layers=4, width=64)  # 2 layers per stage: model[1] ends stage 0
        if last == "linear":
            model[1] = nn.Linear(64, 64)
        seen = alive[last] = []

        def watch(_module, _inputs, output, seen=seen):
            storage = weakref.ref(output.untyped_storage())  # no reference to the output itself
            output.grad_fn.register_prehook(lambda grads: seen.append(storage() is not None))

        model[1].register_forward_hook(watch)
        pipe = Pipeline(model, loss_fn=mse_loss, schedule=schedule, num_microbatches=4)
        pipe.train_step(make_batch(16, width=64))
    return alive if rank == 0 else {}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_sent_output_is_freed_until_its_backward_unless_saved(schedule: str) -> None:
    """Once a micro-batch's activations are sent, the stage keeps only its output's gradient edge: the output's memory
    is gone before its backward, unless a layer saved it (tanh keeps its result), when freeing it would corrupt nothing
    but also save nothing (tests/test_exactness.py checks the gradients of such stages)."""
    alive = run_ranks(_output_storage_at_backward, 2, schedule)[0]
    assert alive == {"linear": [False] * 4, "tanh": [True] * 4}
