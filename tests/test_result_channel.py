"""The step result's channel (last stage to every rank, with every rank's batch fingerprint and flag) behaves the same
whether it travels as gloo messages posted at the start of the step or as the all_reduce that NCCL's rules need:
results small and large, a structure sent once, fingerprints that differ, a flag raised on any rank, and messages
posted ahead while other traffic of the same group runs."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.helpers import run_ranks

pytestmark = pytest.mark.timeout(120)


def _steps(rank: int, world_size: int, point_to_point: bool) -> list[dict[str, Any]]:
    from lightning_pipe.strategy.results import ResultChannel, StepResult, decode_result, encode_result

    source = world_size - 1
    channel = ResultChannel(dist.group.WORLD, source, torch.device("cpu"))
    channel.point_to_point = point_to_point
    cases = [  # (loss, output rows, fingerprints by rank, the rank that raises the flag)
        (1.5, 2, [7] * world_size, None),
        (2.5, 2, [7] * world_size, 0),  # same structure: not sent again
        (3.5, 400, [7] * world_size, None),  # too large for the header: a second message
        (4.5, 2, [7, 8, 7][:world_size], None),  # rank 1 read another batch
        (5.5, 2, [9] * world_size, source),
    ]
    seen = []
    for loss, rows, fingerprints, flagging in cases:
        flag = rank == flagging
        channel.post(fingerprints[rank], flag)  # at the step's start, as the runner does
        # traffic of the same group while the result messages are posted (the pipeline's messages, tag 0)
        token = torch.tensor([float(rank)])
        if rank == 0:
            dist.send(token, 1)
        elif rank == 1:
            dist.recv(token, 0)
        encoded = None
        if rank == source:
            result = StepResult(loss=torch.tensor(loss), output={"rows": torch.arange(rows),
                                                                 "scores": torch.full((rows,), 0.5)})
            encoded = encode_result(result, "training_step")
        (structure, tensors), different, flagged = channel.share(encoded, fingerprints[rank], flag)
        shared = decode_result(structure, tensors)
        torch.save(shared.output, io.BytesIO())  # tensors of two dtypes, as predictions are: each its own storage
        seen.append({"loss": float(shared.loss), "rows": shared.output["rows"].tolist(), "different": different,
                     "flagged": flagged})
    return seen


@pytest.mark.parametrize("point_to_point", [True, False], ids=["messages", "all_reduce"])
def test_every_rank_gets_the_result_the_fingerprints_and_the_flag(point_to_point: bool) -> None:
    results = run_ranks(_steps, 3, point_to_point)
    for seen in results:
        assert [s["loss"] for s in seen] == [1.5, 2.5, 3.5, 4.5, 5.5]
        assert [len(s["rows"]) for s in seen] == [2, 2, 400, 2, 2]
        assert seen[2]["rows"] == list(range(400))
        assert [s["different"] for s in seen] == [None, None, None, [7, 8, 7], None]
        assert [s["flagged"] for s in seen] == [False, True, False, False, True]


def _abandoned(rank: int, world_size: int) -> str:
    from lightning_pipe.strategy.results import ResultChannel

    channel = ResultChannel(dist.group.WORLD, world_size - 1, torch.device("cpu"))
    channel.point_to_point = True
    channel.post(1)
    channel.abandon()  # the step failed after posting
    try:
        channel.post(1)
    except RuntimeError as error:
        return str(error)
    return "no error"


def test_a_step_that_failed_after_posting_leaves_the_channel_refusing() -> None:
    for text in run_ranks(_abandoned, 2):
        assert "failed between sending its result messages and receiving them" in text


def _source_fails(rank: int, world_size: int) -> tuple[str, float]:
    import time

    from lightning_pipe.strategy.results import ResultChannel

    channel = ResultChannel(dist.group.WORLD, world_size - 1, torch.device("cpu"))
    channel.point_to_point, channel.timeout = True, 60.0
    channel.post(5)
    start = time.monotonic()
    if rank == world_size - 1:
        channel.abandon()  # its step failed after posting: the others are told at once
        dist.barrier()
        return "abandoned", 0.0
    try:
        channel.share(None, 5)
    except RuntimeError as error:
        dist.barrier()
        return str(error), time.monotonic() - start
    return "no error", 0.0


def test_a_last_stage_that_fails_before_answering_ends_the_others_at_once() -> None:
    """The others would wait for the answer until their deadline (60 s here); the source's error mark ends them."""
    for rank, (text, waited) in enumerate(run_ranks(_source_fails, 3)[:2]):
        assert "the last stage (rank 2) failed in this step" in text, (rank, text)
        assert waited < 10.0
