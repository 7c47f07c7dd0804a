"""GradientAverager on 2 gloo ranks: buckets start during the last micro-batch's backward, in the same order on every
replica, and every gradient ends as the replicas' average (also where only some replicas had one)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

from tests.helpers import run_ranks


def _average(rank: int, world_size: int) -> dict[str, Any]:
    import torch.distributed as dist

    from lightning_pipe.engine.replicas import GradientAverager

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    unused_here = nn.Parameter(torch.ones(3))  # gets a gradient on rank 1 only
    never = nn.Parameter(torch.ones(2))  # gets none anywhere
    params = [unused_here, never, *model.parameters()]  # buckets go in reverse: these two come last
    averager = GradientAverager(params, dist.group.WORLD, bucket_bytes=8 * 8 * 4 + 8 * 4)  # one Linear per bucket
    started_after = []
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(rank))
    with averager.averaging(num_microbatches=3):
        for microbatch in x:
            loss = model(microbatch).square().mean()
            if rank == 1:
                loss = loss + unused_here.sum()
            loss.backward()
            started_after.append(averager._next)
    local = torch.autograd.grad(sum(model(mb).square().mean() for mb in x), list(model.parameters()))
    return {"started_after": started_after, "buckets": len(averager.buckets),
            "grads": [p.grad.clone() for p in model.parameters()], "local": [g.clone() for g in local],
            "unused_here": None if unused_here.grad is None else unused_here.grad.clone(), "never": never.grad}


@pytest.mark.timeout(60)
def test_buckets_start_during_the_last_backward_and_average() -> None:
    results = run_ranks(_average, 2, timeout=50)
    for result in results:
        # nothing before the last micro-batch; in it, every bucket whose parameters are all final (the one holding
        # the parameter only rank 1 uses, and the one nobody uses, wait for the end)
        assert result["started_after"] == [0, 0, result["buckets"] - 1]
        for got, a, b in zip(result["grads"], results[0]["local"], results[1]["local"]):
            torch.testing.assert_close(got, (a + b) / 2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(result["unused_here"], torch.full((3,), 1.5))  # (0 + 3 micro-batches) / 2
        assert result["never"] is None
