"""PipeDream's asynchronous schedules: which weight version each micro-batch uses, and the resulting weights
checked against an independent hand computation of the same semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.schedules.rules import check_schedule
from lightning_pipe.engine.schedules.asynchronous import alone, async_1f1b, stream, two_bw
from tests.helpers import run_ranks

# Version each stage runs micro-batch j on (p = 3 stages, m = 3 micro-batches, 3 batches back to back).
# async_1f1b: stage s has taken one step per finished backward, max(0, j - (p - 1 - s)) of them.
# vertical sync: every stage uses stage 0's version. 2bw: batch b runs on the weights after batch b - 2.
VERSION_TABLES = {
    "async_1f1b": [[0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7, 8]],
    "vertical_sync": [[0, 0, 0, 1, 2, 3, 4, 5, 6]] * 3,
    "2bw": [[0, 0, 0, 0, 0, 0, 1, 1, 1]] * 3,
}


def test_async_streams_obey_every_rule() -> None:
    for schedule_fn in (async_1f1b, two_bw):
        for p in range(1, 9):
            for m in range(p, 33):
                for batches in (1, 3):
                    check_schedule(stream(schedule_fn(p, m), batches))
                    if m > p:
                        check_schedule(stream(schedule_fn(p, m, slack=1), batches))
                if m <= p + 2:  # a short last batch run alone: any count below m
                    for short in range(1, m):
                        check_schedule(alone(schedule_fn(p, m), short))


def test_async_needs_enough_microbatches() -> None:
    with pytest.raises(ValueError, match=r"num_microbatches \(2\) must be >= the number of stages \(4\) \+ slack "
                                         r"\(0\) for 2bw"):
        two_bw(4, 2)


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


def _loss(output: torch.Tensor, microbatch: tuple) -> torch.Tensor:
    return 0.5 * (output - microbatch[1]).pow(2).mean()


def _run_async(rank: int, world_size: int, mode: str, num_batches: int, m: int, lr: float, slack: int = 0) -> dict:
    schedule = "2bw" if mode == "2bw" else "async_1f1b"
    model = nn.Sequential(*[Scalar(0.5 + 0.25 * s) for s in range(world_size)])
    pipe = Pipeline(model, loss_fn=_loss, schedule=schedule, num_microbatches=m, vertical_sync=mode == "vertical_sync",
                    slack=slack)
    stage = next(iter(pipe.stages.values()))
    stage.version_history = []
    optimizer = torch.optim.SGD(pipe.parameters(), lr=lr)
    for batch in _batches(num_batches, m):
        pipe.train_step(batch, optimizer_step=optimizer.step)
    pipe.flush()
    return {"versions": [v for _, v in sorted(stage.version_history)],
            "weights": {name: p.detach().clone() for name, p in pipe.named_parameters()},
            "peak_versions": pipe.weight_versions}


def _batches(num_batches: int, m: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(m, generator=g, dtype=torch.float64).float(), torch.randn(m, generator=g).float())
            for _ in range(num_batches)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["async_1f1b", "vertical_sync", "2bw"])
def test_versions_follow_the_written_table(mode: str) -> None:
    results = run_ranks(_run_async, 3, mode, 3, 3, 0.1)
    for stage, result in enumerate(results):
        assert result["versions"] == VERSION_TABLES[mode][stage], f"stage {stage}"
    if mode == "async_1f1b":  # stage s holds at most its in-flight count (p - s) weight versions
        assert [r["peak_versions"] for r in results] == [3, 2, 1]
    if mode == "2bw":
        assert max(r["peak_versions"] for r in results) <= 2


def _by_hand(mode: str, num_batches: int, m: int, lr: float, p: int = 2, slack: int = 0) -> list[float]:
    """PipeDream's semantics for a chain of scalar weights, in plain floats: micro-batch j runs on stage s's
    version ``table[s][j]`` in both its forward and backward; async_1f1b steps after every micro-batch with
    its own gradient, 2bw after every batch with the batch's mean gradient."""
    d = [p - 1 - s + slack for s in range(p)]  # micro-batches in flight on stage s
    n = num_batches * m

    def version(s: int, j: int) -> int:
        if mode == "2bw":
            return max(0, j // m - 1)
        return max(0, j - d[0]) if mode == "vertical_sync" else max(0, j - d[s])

    weights = [[0.5 + 0.25 * s] for s in range(p)]  # weights[s][k]: stage s after k steps
    grads: list[list[float]] = [[] for _ in range(p)]
    data = [(float(x), float(t)) for xs, ts in _batches(num_batches, m) for x, t in zip(xs, ts)]
    for j in range(n):
        x, t = data[j]
        used = [weights[s][version(s, j)] for s in range(p)]
        acts = [x]
        for s in range(p):
            acts.append(used[s] * acts[-1])
        upstream = acts[-1] - t  # d loss / d output for one row: 0.5 (z - t)^2
        for s in reversed(range(p)):
            grads[s].append(upstream * acts[s])
            upstream *= used[s]
        for s in range(p):  # apply every step this micro-batch completes (order between stages is irrelevant)
            if mode == "2bw":
                if j % m == m - 1:
                    batch_grads = grads[s][j - m + 1 : j + 1]
                    weights[s].append(weights[s][-1] - lr * sum(batch_grads) / m)
            else:
                weights[s].append(weights[s][-1] - lr * grads[s][j])
    return [weights[s][-1] for s in range(p)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,slack", [("async_1f1b", 0), ("vertical_sync", 0), ("2bw", 0), ("async_1f1b", 1),
                                        ("vertical_sync", 1), ("2bw", 1)])
def test_stashed_weight_gradients_match_hand_computation(mode: str, slack: int) -> None:
    m = 2 + slack
    results = run_ranks(_run_async, 2, mode, 4, m, 0.2, slack)
    expected = _by_hand(mode, 4, m, 0.2, slack=slack)
    got = [results[s]["weights"][f"{s}.weight"].item() for s in range(2)]
    assert got == pytest.approx(expected, rel=1e-5), (got, expected)
    # And the semantics matter: plain synchronous SGD on the same data ends elsewhere.
    other = "2bw" if mode != "2bw" else "async_1f1b"
    assert got != pytest.approx(_by_hand(other, 4, m, 0.2, slack=slack), rel=1e-5)
