"""The multi-process tests again, in the transport's strict mode: NCCL's rules emulated on gloo, so that an order NCCL
would deadlock on deadlocks here too (``LIGHTNING_PIPE_STRICT_P2P=1``: one tag, exact sizes, and a rank issues a
group only once the one before it has completed, its sends included, as NCCL's stream runs ``batch_isend_irecv``).

Also: the executor issues exactly the groups of its comm plan (what :mod:`tests.test_nccl_rules` proves safe), and
strict mode really holds a rank to the stream rule (an order that plain gloo runs blocks there).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_pipe.engine.comm import STRICT_ENV, Communicator
from tests.helpers import RankError, run_ranks
from tests.models import make_batch, mlp, mse_loss

STRICT = {STRICT_ENV: "1"}


@pytest.mark.timeout(300)
def test_gradients_equal_single_process_in_strict_mode() -> None:
    from tests.test_engine_equivalence import CASES, _compare_with_reference

    reports = run_ranks(_compare_with_reference, 2, CASES, env=STRICT, timeout=280)
    assert len(reports[0]) == len(CASES)
    for rank, rank_reports in enumerate(reports):
        for report in rank_reports:
            case = report["case"]
            if rank == (0 if case[1] == "zb_v" else 1):
                torch.testing.assert_close(report["loss"], report["ref_loss"], rtol=0, atol=1e-6, msg=str(case))
            for name, grad in report["grads"].items():
                torch.testing.assert_close(grad, report["ref_grads"][name], rtol=0, atol=1e-6,
                                           msg=f"{case} rank {rank} {name}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,slack", [("async_1f1b", 0), ("2bw", 1)])
def test_asynchronous_schedules_in_strict_mode(mode: str, slack: int) -> None:
    """Gradients sent in one batch and received in the next, and a drain: the weights of the hand computation."""
    from tests.test_async import _by_hand, _run_async

    m = 2 + slack
    results = run_ranks(_run_async, 2, mode, 4, m, 0.2, slack, env=STRICT)
    got = [results[s]["weights"][f"{s}.weight"].item() for s in range(2)]
    assert got == pytest.approx(_by_hand(mode, 4, m, 0.2, slack=slack), rel=1e-5)


@pytest.mark.timeout(200)
def test_replicated_stages_in_strict_mode() -> None:
    from tests.test_replicated import CASES, _replicated_equals_one_process

    cases = [case for case in CASES if case[1] == [2, 1]]
    for report in run_ranks(_replicated_equals_one_process, 3, cases, env=STRICT, timeout=180)[2]:
        for name, grad in report["grads"].items():
            torch.testing.assert_close(grad, report["ref_grads"][name], rtol=0, atol=1e-6)


@pytest.mark.timeout(240)
def test_trainer_in_strict_mode_equals_one_device(tmp_path: Path) -> None:
    """Tuples between stages (gpipe) and two stages per rank (interleaved 1F1B) through ``Trainer.fit``."""
    from tests.test_strategy_trainer import _full_state, _train, _train_on_ranks

    cases = ["tuple", "virtual"]
    results = run_ranks(_train_on_ranks, 2, cases, str(tmp_path), env=STRICT, timeout=220)
    for case in cases:
        expected = _train(case, 1, str(tmp_path / "reference"))["state"]
        got = _full_state([r[case]["state"] for r in results])
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"{case} {key}")


def _issued_groups(rank: int, world_size: int, schedule: str, m: int) -> tuple[list, list]:
    """The groups the executor issues in one step, and its comm plan's steps, both as (sends, receives)."""
    from lightning_pipe.engine.executor import Pipeline

    pipe = Pipeline(mlp(num_layers=8), loss_fn=mse_loss, schedule=schedule, num_microbatches=m, strict_p2p=True)
    issued = []
    exchange = pipe.comm.exchange

    def recording(sends, recvs, labels=None):
        issued.append(([(dst, channel) for _, dst, channel in sends], list(recvs)))
        return exchange(sends, recvs, labels)

    pipe.comm.exchange = recording
    pipe.train_step(make_batch(16))
    plan = pipe.comm_plan(pipe.schedule_for(m)).steps[rank]
    planned = [([(t.dst, t.channel) for t in step.sends], [(t.src, t.channel) for t in step.recvs])
               for step in plan if step.sends or step.recvs]
    return issued, planned


@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule,m", [("1f1b", 4), ("interleaved_1f1b", 4), ("zb_v", 4)])
def test_the_executor_issues_its_comm_plan(schedule: str, m: int) -> None:
    for issued, planned in run_ranks(_issued_groups, 2, schedule, m):
        assert issued == planned


def _sends_first(rank: int, world_size: int, strict: bool) -> str:
    """Both ranks send, then receive what the other sent, in two groups: fine where a send never waits (gloo), a
    deadlock where the next group waits for the sends of the one before (NCCL's stream)."""
    comm = Communicator(strict=strict)
    peer = 1 - rank
    comm.exchange([(torch.ones(2), peer, "x")], [])
    comm.exchange([], [(peer, "x")])
    comm.wait_sends()
    return "done"


@pytest.mark.timeout(60)
def test_strict_mode_holds_ranks_to_the_stream_rule() -> None:
    assert run_ranks(_sends_first, 2, False, timeout=30) == ["done", "done"]
    with pytest.raises(RankError, match="did not finish"):
        run_ranks(_sends_first, 2, True, timeout=8)
