"""Host overhead per action: zero-cost layers, so a step's time is all machinery (executor, packing, messages), here
and in torch.distributed.pipelining, side by side in one run.

Every stage is a :class:`~benchmarks.common.SleepLayer` that sleeps nothing, on rows of 4 numbers. A rank runs ``m``
forwards and ``m`` backwards per stage it holds: ``ms_per_action`` is the step time (first rank in to last rank
out) over that count, so it is what one action costs a rank beyond its compute, waits for messages included.
``vs_torch`` divides ours by torch's tuned run (one thread per rank, as ours). The implementations take turns on
fresh ranks ``--rounds`` times; the rows give the median step and the spread (lowest and highest round medians).
Run from the repository root::

    python -m benchmarks.host_overhead                          # p=4, m=8: gpipe, 1f1b, interleaved_1f1b
    python -m benchmarks.host_overhead --rounds 5 --json docs/host_overhead.json
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any

from benchmarks.common import SleepCosts, markdown_table, run_ranks, write_json
from benchmarks.schedule_efficiency import BENCH_SCHEDULES, Config, _lightning_pipe_rank, _step_times, _torch_rank

__all__ = ["main", "run"]

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
IMPLS = ("lightning_pipe", "lightning_pipe_strict", "torch", "torch_1thread")


def _ours(rank: int, world_size: int, config: Config, names: list[str], strict: bool) -> dict:
    if strict:
        os.environ["LIGHTNING_PIPE_STRICT_P2P"] = "1"
    return _lightning_pipe_rank(rank, world_size, config, names, False)


def run(stages: int, microbatches: int, rounds: int, steps: int, warmup: int,
        names: tuple[str, ...] = SCHEDULES) -> list[dict[str, Any]]:
    """Rows of (schedule, impl): median step time, its spread over rounds, and ms per action."""
    config = Config(stages, microbatches, SleepCosts.of(0.0, 0.0), warmup, steps, rounds)
    starts = {
        "lightning_pipe": lambda: run_ranks(_ours, stages, config, list(names), False),
        "lightning_pipe_strict": lambda: run_ranks(_ours, stages, config, list(names), True),
        "torch": lambda: run_ranks(_torch_rank, stages, config, list(names), False),
        "torch_1thread": lambda: run_ranks(_torch_rank, stages, config, list(names), True),
    }
    times: dict[tuple[str, str], list[list[float]]] = {}
    for _ in range(rounds):
        for impl, start in starts.items():
            per_rank = start()
            for name in names:
                times.setdefault((name, impl), []).append(_step_times(per_rank, name))
    rows = []
    for name in names:
        actions = 2 * microbatches * BENCH_SCHEDULES[name].stages_per_rank  # per rank and step
        torch_ms = None
        for impl in IMPLS:
            per_round = [statistics.median(t) for t in times[(name, impl)]]
            step = statistics.median([s for t in times[(name, impl)] for s in t])
            row = {"schedule": name, "impl": impl, "stages": stages * BENCH_SCHEDULES[name].stages_per_rank,
                   "microbatches": microbatches, "actions_per_rank": actions, "step_ms": 1e3 * step,
                   "step_ms_low": 1e3 * min(per_round), "step_ms_high": 1e3 * max(per_round),
                   "ms_per_action": 1e3 * step / actions}
            rows.append(row)
            if impl == "torch_1thread":
                torch_ms = row["ms_per_action"]
        for row in rows:
            if row["schedule"] == name:
                row["vs_torch"] = row["ms_per_action"] / torch_ms if torch_ms else None
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", "-p", type=int, default=4, help="ranks (one stage each, two for interleaved)")
    parser.add_argument("--microbatches", "-m", type=int, default=8)
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--rounds", type=int, default=3, help="turns each implementation takes, alternating")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    args = parser.parse_args(argv)
    names = tuple(n.strip() for n in args.schedules.split(",") if n.strip())
    unknown = sorted(set(names) - set(SCHEDULES))
    if unknown:
        raise SystemExit(f"unknown schedules {unknown}; choose from {', '.join(SCHEDULES)}")
    load_before = os.getloadavg()[0]
    rows = run(args.stages, args.microbatches, args.rounds, args.steps, args.warmup, names)
    print(markdown_table(rows, ["schedule", "impl", "stages", "microbatches", "step_ms", "step_ms_low", "step_ms_high",
                                "ms_per_action", "vs_torch"]))
    print(f"\n{len(os.sched_getaffinity(0))} cores; 1-minute load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; vs_torch: ms per action over torch.distributed.pipelining's with one "
          f"thread per rank (goal <= 0.5)")
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
