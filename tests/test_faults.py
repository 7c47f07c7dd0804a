"""Faults under a 4-rank ``Trainer`` (see ``tests/fault_cases.py``): a rank killed, stopped or looping, a NaN, a bad
batch on one rank. Every rank ends promptly with an error that names the rank at the root of it; nothing waits for
the process group's 30-minute timeout; a fit resumed from the last checkpoint gives the uninterrupted run's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import helpers  # noqa: F401 - the fork server preloads Lightning for the ranks
from tests.fault_cases import BATCH_SIZE, BATCHES, WIDTH, RankOutcome, launch_fit

WAIT_TIMEOUT = 10.0


def _summary(outcomes: list[RankOutcome]) -> str:
    return "\n".join(f"rank {o.rank}: exit after {o.exit_s} s, code {o.exitcode}: "
                     f"{(o.error or 'no error').splitlines()[0][:400]}" for o in outcomes)


def _check_the_others(outcomes: list[RankOutcome], victim: int, within: float, *needles: str) -> None:
    for outcome in outcomes:
        if outcome.rank == victim:
            continue
        assert outcome.exit_s is not None and outcome.exit_s < within, \
            f"rank {outcome.rank} did not end within {within} s of the fault:\n{_summary(outcomes)}"
        assert outcome.exitcode not in (0, None) and outcome.error is not None, _summary(outcomes)
        for needle in needles:
            assert needle in outcome.error, f"rank {outcome.rank} does not say {needle!r}:\n{_summary(outcomes)}"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("fault", ["kill-forward", "kill-backward", "kill-receive"])
def test_a_rank_killed_mid_step_ends_every_rank_naming_it(fault: str, tmp_path: Path) -> None:
    outcomes = launch_fit(fault, tmp_path, victim=1, timeout=120, wait_timeout=WAIT_TIMEOUT)
    assert outcomes[1].exitcode == -9, _summary(outcomes)
    _check_the_others(outcomes, 1, 60.0, "rank 1 is gone", "killed")


@pytest.mark.timeout(200)
def test_a_rank_killed_while_checkpointing_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    import lightning as L

    from tests.lightning_models import Regressor, regression_data

    outcomes = launch_fit("kill-checkpoint", tmp_path, victim=1, timeout=120, wait_timeout=WAIT_TIMEOUT)
    assert outcomes[1].exitcode == -9, _summary(outcomes)
    _check_the_others(outcomes, 1, 60.0, "rank 1 is gone", "writing a checkpoint")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)  # the previous checkpoint is intact
    assert saved["global_step"] == 2

    resumed = launch_fit("none", tmp_path, timeout=120, ckpt_path="last")
    assert all(o.exitcode == 0 for o in resumed), _summary(resumed)
    final = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert final["global_step"] == BATCHES

    model = Regressor()  # the uninterrupted run, on one device: the synchronous schedule's result is the same
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, max_epochs=1).fit(model, regression_data(BATCHES, BATCH_SIZE, WIDTH))
    expected = {key: value for key, value in model.state_dict().items() if key.startswith("layers.")}
    assert expected
    for key, value in expected.items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.timeout(150)
def test_a_stopped_rank_is_named_within_the_wait_timeout(tmp_path: Path) -> None:
    outcomes = launch_fit("stop", tmp_path, victim=2, timeout=120, wait_timeout=WAIT_TIMEOUT)
    _check_the_others(outcomes, 2, WAIT_TIMEOUT + 25.0, "rank 2 stopped answering")
    for outcome in outcomes:
        assert "lost its connection" not in (outcome.error or ""), _summary(outcomes)


@pytest.mark.timeout(150)
def test_an_endless_loop_in_user_code_is_named_and_ended(tmp_path: Path) -> None:
    outcomes = launch_fit("loop", tmp_path, victim=2, timeout=120, wait_timeout=WAIT_TIMEOUT)
    _check_the_others(outcomes, 2, WAIT_TIMEOUT + 25.0, "rank 2 is alive but made no progress", "2F0")
    looping = outcomes[2]  # the watchdog ends it too, once the job has failed
    assert looping.exit_s is not None and looping.exit_s < WAIT_TIMEOUT + 40.0, _summary(outcomes)
    assert "PipelineStuck" in (looping.error or ""), _summary(outcomes)


@pytest.mark.timeout(150)
def test_a_rank_looping_in_its_own_data_loading_is_ended_once_the_job_failed(tmp_path: Path) -> None:
    """Between two steps (a read that never returns), not in a compute action: it outlived the job (found by
    review: still reading 150 s after the others had ended)."""
    outcomes = launch_fit("load-loop", tmp_path, victim=2, timeout=120, wait_timeout=WAIT_TIMEOUT)
    _check_the_others(outcomes, 2, WAIT_TIMEOUT + 25.0, "rank 2 is alive but made no progress")
    looping = outcomes[2]
    assert looping.exit_s is not None and looping.exit_s < WAIT_TIMEOUT + 40.0, _summary(outcomes)
    assert "PipelineStuck" in (looping.error or "") and "loading a batch" in looping.error, _summary(outcomes)


@pytest.mark.timeout(150)
def test_a_dataloader_worker_that_dies_on_one_rank_ends_every_rank_with_that_error(tmp_path: Path) -> None:
    """torch's DataLoader raises from its SIGCHLD handler, in the middle of whatever the rank waits in: taken for a
    lost peer, every rank blamed a healthy one ("rank 0 is alive but made no progress", found by review)."""
    outcomes = launch_fit("worker-exit", tmp_path, victim=1, timeout=120, wait_timeout=WAIT_TIMEOUT,
                          fresh=True)  # (a fork server's children are daemons, which start no workers)
    assert "DataLoader worker" in (outcomes[1].error or "") and "exited unexpectedly" in outcomes[1].error, \
        _summary(outcomes)
    # (where the error reached a rank: "rank 1 failed: ..." or, in the engine's messages, "rank 1 failed in the
    # messages before 1F1: ...")
    _check_the_others(outcomes, 1, WAIT_TIMEOUT + 25.0, "rank 1 failed", ": RuntimeError: DataLoader worker")
    assert not any("failed: rank 1 failed" in (outcome.error or "") for outcome in outcomes), _summary(outcomes)


@pytest.mark.timeout(150)
def test_detect_anomaly_names_step_microbatch_and_stage_on_every_rank(tmp_path: Path) -> None:
    outcomes = launch_fit("nan", tmp_path, victim=2, timeout=120)
    _check_the_others(outcomes, -1, 30.0, "NaN first appeared in the output of stage 2's forward",
                      "stage 2, micro-batch 0 of global step 2")


@pytest.mark.timeout(150)
def test_a_batch_only_the_last_stage_rejects_ends_every_rank(tmp_path: Path) -> None:
    outcomes = launch_fit("bad-shape", tmp_path, victim=3, timeout=120)
    _check_the_others(outcomes, -1, 30.0, "rank 3 failed in 3F0", "must match the size of tensor b (15)")
