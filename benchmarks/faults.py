"""How a 4-rank Trainer run ends under each fault of ``tests/fault_cases.py``, measured from outside; and what the
heartbeat costs a step.

Faults: each rank a fresh interpreter started as torchrun would (``LOCAL_RANK``, ``MASTER_PORT``; Lightning's
30-minute process-group timeout left as it is), ``wait_timeout=15``. For every rank: seconds from the fault to the
process's exit, its exit code, the first line of its error; and what is left on disk (checkpoints). Heartbeat: the
engine alone (zero-cost layers, p=4, m=8, 1f1b), step time with the heartbeat threads and without, rounds taken in
turn. Run from the repository root::

    python -m benchmarks.faults --json docs/faults.json           # both, prints markdown tables
    python -m benchmarks.faults --only heartbeat --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import SleepCosts, markdown_table, run_ranks, write_json
from benchmarks.schedule_efficiency import Config, _lightning_pipe_rank, _step_times

__all__ = ["main", "faults", "heartbeat"]

FAULTS = {  # fault -> rank it hits
    "kill-forward": 1, "kill-backward": 1, "kill-receive": 1, "kill-checkpoint": 1, "stop": 2, "loop": 2,
    "nan": 2, "bad-shape": 3,
}


def faults(wait_timeout: float = 15.0, names: tuple[str, ...] = tuple(FAULTS)) -> list[dict[str, Any]]:
    """One row per fault and rank."""
    from tests.fault_cases import launch_fit

    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as folder:
            outcomes = launch_fit(name, folder, victim=FAULTS[name], timeout=240, fresh=True,
                                  wait_timeout=wait_timeout)
            left = sorted(path.name for path in Path(folder).glob("*.ckpt"))
        for outcome in outcomes:
            first = (outcome.error or "").strip().splitlines()[0] if outcome.error else ""
            if not first and outcome.exitcode == -9:
                first = "(SIGKILL)" if name != "stop" else "(SIGSTOP; SIGKILL from the test once the others ended)"
            rows.append({"fault": name, "rank": outcome.rank, "victim": outcome.rank == FAULTS[name],
                         "exit_s": outcome.exit_s, "exit_code": outcome.exitcode, "error": first[:600],
                         "checkpoints_left": ", ".join(left) or "-"})
            print(f"{name} rank {outcome.rank}: {outcome.exit_s} s, code {outcome.exitcode}: {first[:200]}",
                  flush=True)
    return rows


def _without_heartbeat(rank: int, world_size: int, config: Config, names: list[str], record: bool) -> dict:
    import lightning_pipe.engine.comm as comm

    comm.start_heartbeat = lambda: None  # type: ignore[assignment]
    return _lightning_pipe_rank(rank, world_size, config, names, record)


def heartbeat(rounds: int = 3, steps: int = 60) -> list[dict[str, Any]]:
    """Median step time of the engine with and without the heartbeat threads (zero-cost layers)."""
    config = Config(4, 8, SleepCosts.of(0.0, 0.0), 5, steps, rounds)
    times: dict[str, list[float]] = {"with heartbeat": [], "without heartbeat": []}
    for _ in range(rounds):
        for label, fn in (("with heartbeat", _lightning_pipe_rank), ("without heartbeat", _without_heartbeat)):
            times[label].extend(_step_times(run_ranks(fn, 4, config, ["1f1b"], False), "1f1b"))
    return [{"run": label, "median_step_ms": round(1e3 * statistics.median(values), 3),
             "p10_ms": round(1e3 * sorted(values)[len(values) // 10], 3),
             "p90_ms": round(1e3 * sorted(values)[9 * len(values) // 10], 3), "steps": len(values)}
            for label, values in times.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("faults", "heartbeat"))
    parser.add_argument("--wait-timeout", type=float, default=15.0)
    parser.add_argument("--faults", nargs="+", choices=tuple(FAULTS), default=list(FAULTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    results: dict[str, Any] = {"cores": os.cpu_count()}
    if args.only != "heartbeat":
        results["faults"] = faults(args.wait_timeout, tuple(args.faults))
        print(markdown_table(results["faults"], ["fault", "rank", "exit_s", "exit_code", "error", "checkpoints_left"]))
    if args.only != "faults":
        results["heartbeat"] = heartbeat(args.rounds)
        print(markdown_table(results["heartbeat"], ["run", "median_step_ms", "p10_ms", "p90_ms", "steps"]))
    write_json(results, args.json)


if __name__ == "__main__":
    main()
