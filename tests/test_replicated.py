"""Replicated stages inside one pipeline (PipeDream's "3-1"): the round-robin schedules obey every rule, and the engine
on 3 and 4 gloo ranks gives the gradients, losses, outputs and trained weights of one process."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.schedules.rules import activation_peaks, check_schedule, simulate
from lightning_pipe.engine.schedules import COMPUTE_OPS, Action, one_f_one_b
from lightning_pipe.engine.schedules.replicated import (in_flight_limits, replica_ranks, replicated,
                                                        replicated_forward_only)
from tests.helpers import run_ranks
from tests.models import make_batch, mlp, mse_loss, tuple_model

LAYOUTS = [[2, 1], [3, 1], [2, 1, 1], [1, 2, 1], [3, 2, 1], [1, 3, 1], [2, 2, 1]]


def _compute(schedule, rank: int) -> str:
    return " ".join(str(action) for action in schedule.compute_actions(rank))


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_one_rank_per_stage_is_1f1b(stages: int) -> None:
    for m in range(1, 10):
        assert replicated([1] * stages, m).actions == one_f_one_b(stages, m).actions


def test_3_1_literal_lists() -> None:
    """Stage 0's ranks take micro-batches 0, 3 / 1, 4 / 2, 5, each holding at most ceil(4 / 3) = 2; the last stage
    runs 1F1B on what arrives, taking from the three in turn."""
    schedule = replicated([3, 1], 6)
    assert schedule.stage_replicas == ((0, 1, 2), (3,)) and schedule.stage_to_rank == (0, 3)
    assert [_compute(schedule, rank) for rank in range(4)] == [
        "0F0 0F3 0B0 0B3", "0F1 0F4 0B1 0B4", "0F2 0F5 0B2 0B5", "1F0 1B0 1F1 1B1 1F2 1B2 1F3 1B3 1F4 1B4 1F5 1B5"]
    assert " ".join(map(str, schedule.actions[3][:4])) == "1RECV_F0 1F0 1B0 1SEND_B0"
    assert [schedule.rank_of(0, mb) for mb in range(6)] == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("replicas", LAYOUTS)
def test_every_rule_holds_and_memory_stays_within_the_limit(replicas: list[int]) -> None:
    limits = in_flight_limits(replicas)
    stage_of = [stage for stage, ranks in enumerate(replica_ranks(replicas)) for _ in ranks]
    for m in range(1, 14):
        for name in ("1f1b", "gpipe"):
            check_schedule(replicated(replicas, m, name))
        check_schedule(replicated_forward_only(replicas, m))
        peaks = activation_peaks(replicated(replicas, m))
        assert all(peak <= limits[stage_of[rank]] for rank, peak in enumerate(peaks)), (m, peaks)


@pytest.mark.parametrize("replicas", [[3, 1], [2, 1], [2, 1, 1]])
def test_balanced_replicas_keep_the_bubble_of_the_slowest_replica(replicas: list[int]) -> None:
    """With stage s taking replicas[s] units per forward (twice per backward), a step of m micro-batches takes the
    busiest rank's work plus one forward and one backward of the slowest replica: fill and drain, as in 1F1B."""
    m = 12

    def cost(action: Action) -> float:
        return replicas[action.stage] * (1 if action.op.value == "F" else 2) if action.op in COMPUTE_OPS else 0.0

    busiest = max(3 * count * len(range(0, m, count)) for count in replicas)
    fill_drain = sum(3 * count for count in replicas) - 3
    assert simulate(replicated(replicas, m), cost).makespan <= busiest + fill_drain


@pytest.mark.parametrize("replicas, message", [
    ([1, 3], "the last stage must have one rank"),
    ([2, 0, 1], "must list a positive number of ranks"),
])
def test_layouts_that_cannot_run(replicas: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replicated(replicas, 4)
    with pytest.raises(ValueError, match="does not run with replicated stages"):
        replicated([2, 1], 4, "zb_h1")


CASES = [
    # (model, replicas, schedule, checkpoint_activations, rows, num_microbatches)
    ("mlp", [3, 1], "1f1b", False, 24, 6),
    ("mlp", [3, 1], "1f1b", True, 20, 8),  # uneven rows: micro-batches of 3 and 2 rows
    ("mlp", [3, 1], "gpipe", False, 16, 4),  # replica 0 of stage 0 runs micro-batches 0 and 3, the others one
    ("mlp", [3, 1], "1f1b", False, 2, 8),  # fewer rows than ranks in stage 0: the third replica gets nothing
    ("tuple", [3, 1], "1f1b", False, 12, 6),
    ("mlp", [2, 1, 1], "1f1b", False, 16, 8),
    ("mlp", [1, 2, 1], "1f1b", True, 16, 5),
    ("mlp", [2, 1], "1f1b", False, 12, 4),
]


def _replicated_equals_one_process(rank: int, world_size: int, cases: list) -> list[dict]:
    reports = []
    for model_name, replicas, schedule, remat, rows, m in cases:
        if sum(replicas) != world_size:
            continue
        model = tuple_model() if model_name == "tuple" else mlp(num_layers=8)
        reference = copy.deepcopy(model)
        batch = make_batch(rows)
        pipe = Pipeline(model, loss_fn=mse_loss, schedule=schedule, num_microbatches=m, checkpoint_activations=remat,
                        replicas=replicas)
        loss = pipe.train_step(batch)
        ref_loss = mse_loss(reference(batch[0]), batch)
        ref_loss.backward()
        grads = {name: p.grad.clone() for name, p in pipe.named_parameters()}
        ref_grads = {name: p.grad.clone() for name, p in reference.named_parameters() if name in grads}
        pipe.train_step(batch)  # without zeroing: gradients accumulate, and the replicas' sum counts the first once
        twice = {name: p.grad.clone() for name, p in pipe.named_parameters()}
        eval_loss, outputs = pipe.eval_step(batch)
        ref_outputs = reference(batch[0]).detach()
        # Three SGD steps on other batches: replicas must stay equal to each other and to one process.
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for seed in range(3):
            step_batch = make_batch(rows, seed=10 + seed)
            for opt in (optimizer, ref_optimizer):
                opt.zero_grad()
            pipe.train_step(step_batch)
            mse_loss(reference(step_batch[0]), step_batch).backward()
            optimizer.step()
            ref_optimizer.step()
        ref_state = reference.state_dict()
        reports.append({"case": (model_name, replicas, schedule, remat, rows, m), "loss": loss,
                        "ref_loss": ref_loss.detach(), "grads": grads, "ref_grads": ref_grads, "twice": twice,
                        "eval_loss": eval_loss, "outputs": None if outputs is None else torch.cat(outputs),
                        "ref_outputs": ref_outputs,
                        "state": pipe.state_dict(), "ref_state": {k: ref_state[k] for k in pipe.state_dict()}})
    return reports


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [3, 4])
def test_replicated_stages_equal_one_process(world_size: int) -> None:
    results = run_ranks(_replicated_equals_one_process, world_size, CASES, timeout=180)
    assert len(results[0]) == sum(sum(case[1]) == world_size for case in CASES)
    for rank, reports in enumerate(results):
        for report in reports:
            case = report["case"]
            last = rank == world_size - 1
            assert (report["loss"] is not None) == last, f"rank {rank} {case}"
            if last:
                torch.testing.assert_close(report["loss"], report["ref_loss"], rtol=0, atol=1e-6, msg=str(case))
                torch.testing.assert_close(report["eval_loss"], report["ref_loss"], rtol=0, atol=1e-6)
                torch.testing.assert_close(report["outputs"], report["ref_outputs"], rtol=0, atol=1e-6)
            assert report["grads"], f"rank {rank} holds no parameters in {case}"
            for name, grad in report["grads"].items():
                torch.testing.assert_close(grad, report["ref_grads"][name], rtol=0, atol=1e-6,
                                           msg=f"{case} rank {rank} {name}")
                torch.testing.assert_close(report["twice"][name], 2 * report["ref_grads"][name], rtol=0, atol=2e-6,
                                           msg=f"{case} rank {rank} {name}, accumulated over two steps")
            for name, value in report["state"].items():
                torch.testing.assert_close(value, report["ref_state"][name], rtol=0, atol=1e-6,
                                           msg=f"{case} rank {rank} {name} after 3 steps")


def _different_seeds(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    pipe = Pipeline(mlp(num_layers=4, seed=rank), loss_fn=mse_loss, replicas=[3, 1])
    return pipe.state_dict()


@pytest.mark.timeout(60)
def test_replicas_start_from_the_first_ones_weights() -> None:
    """Ranks that build the model with different random weights: each stage's replicas take its first rank's."""
    states = run_ranks(_different_seeds, 4, timeout=50)
    expected = mlp(num_layers=4, seed=0).state_dict()
    for rank in (0, 1, 2):
        for name, value in states[rank].items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=f"rank {rank} {name}")


def _bad_replicas(rank: int, world_size: int, options: dict) -> None:
    Pipeline(mlp(num_layers=4), loss_fn=mse_loss, **options)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("options, message", [
    ({"replicas": [2, 1]}, r"replicas=\[2, 1\] places 3 ranks, but the pipeline's group has 4"),
    ({"replicas": [3, 1], "schedule": "zb_h1"}, "replicated stages run schedule='1f1b' or 'gpipe'"),
    ({"replicas": [1, 3]}, "the last stage must have one rank"),
])
def test_bad_replica_layouts_fail_on_every_rank(options: dict, message: str) -> None:
    errors = run_ranks(_bad_replicas, 4, options, expect_failure=True, timeout=50)
    assert all(error is not None and re.search(message, error) for error in errors), errors


def _idle_replicas(rank: int, world_size: int) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Pipeline(mlp(num_layers=4), loss_fn=mse_loss, replicas=[3, 1], num_microbatches=2)
    return [str(w.message) for w in caught]


@pytest.mark.timeout(60)
def test_fewer_microbatches_than_replicas_warns() -> None:
    for messages in run_ranks(_idle_replicas, 4, timeout=50):
        assert any("num_microbatches=2 is fewer than the 3 ranks of the widest stage" in m for m in messages), messages
