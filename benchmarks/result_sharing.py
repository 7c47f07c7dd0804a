"""The strategy's fixed cost per step: sending the last stage's result to every rank, pickled broadcast against the
result channel (tensors + JSON, with the batch fingerprint check folded in) as one all_reduce (NCCL's way) and as
gloo messages (the default on gloo: each rank's fingerprint to the last stage, its answer back).

Both sides send what ``Trainer.fit`` of the demo GPT sends each step (the loss and one ``self.log`` value), on
``--ranks`` gloo ranks, ``--steps`` times, alternating blocks of each so that a busy machine slows both alike. The
pickled side is what :class:`~lightning_pipe.strategy.runner.PipelineRunner` did before (``broadcast_object_list``
of the result); the channel side includes encoding, decoding and the batch's fingerprint. Run from the repository
root::

    python -m benchmarks.result_sharing                     # 2 ranks, 2000 steps per side
    python -m benchmarks.result_sharing --json sharing.json

Reports the median and the 10th percentile of the time per step on rank 0 (microseconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import write_json

__all__ = ["main"]


def _result() -> Any:
    from lightning_pipe.strategy.logs import LoggedValue
    from lightning_pipe.strategy.results import StepResult

    options = {"prog_bar": True, "logger": True, "on_step": None, "on_epoch": None, "reduce_fx": "mean",
               "enable_graph": False, "add_dataloader_idx": True, "rank_zero_only": False}
    return StepResult(torch.tensor(2.345), None, [LoggedValue("train/loss", torch.tensor(2.345), None, options, 32)],
                      {}, rows=32)


def _measure(rank: int, world_size: int, steps: int, block: int) -> dict[str, list[float]]:
    from lightning_pipe.strategy.fingerprint import batch_fingerprint
    from lightning_pipe.strategy.results import ResultChannel, decode_result, encode_result

    torch.set_num_threads(1)
    source = world_size - 1
    batch = (torch.randint(0, 256, (32, 32)), torch.randint(0, 256, (32, 32)))
    reducing = ResultChannel(dist.group.WORLD, source, torch.device("cpu"))
    messaging = ResultChannel(dist.group.WORLD, source, torch.device("cpu"))
    messaging.point_to_point = True

    def pickled() -> None:
        box = [_result() if rank == source else None]
        dist.broadcast_object_list(box, src=source)

    def channeled(channel: ResultChannel) -> None:
        fingerprint = batch_fingerprint(batch)
        encoded = encode_result(_result(), "training_step") if rank == source else None
        (structure, tensors), _, _ = channel.share(encoded, fingerprint)
        decode_result(structure, tensors)

    times: dict[str, list[float]] = {"pickled": [], "all_reduce": [], "messages": []}
    sides = (("pickled", pickled), ("all_reduce", lambda: channeled(reducing)),
             ("messages", lambda: channeled(messaging)))
    for _ in range(max(1, steps // block)):
        for name, fn in sides:
            dist.barrier()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lightning_pipe.engine.launch import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--block", type=int, default=100, help="steps of one side before switching")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    times = run_ranks(_measure, args.ranks, args.steps, args.block, timeout=600)[0]
    result: dict[str, Any] = {"ranks": args.ranks, "steps": args.steps}
    for name, values in times.items():
        ordered = sorted(values)
        result[name] = {"median_us": 1e6 * statistics.median(values), "p10_us": 1e6 * ordered[len(ordered) // 10]}
    print(f"{args.ranks} ranks, {args.steps} steps per side, time per step on rank 0:")
    for name in times:
        print(f"  {name:10s}: median {result[name]['median_us']:7.0f} us, 10th percentile {result[name]['p10_us']:7.0f} us")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
