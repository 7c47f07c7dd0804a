"""Schedule efficiency: step time over the schedule's ideal time, on stages that sleep instead of computing.

Every stage is one :class:`~benchmarks.common.SleepLayer` that sleeps ``t_f`` in forward and ``t_b`` in backward
(``t_i``/``t_w`` for the halves of a split backward), so the ideal step time is known exactly and does not depend
on the cores. Each schedule runs on lightning_pipe and, in the same run, on torch.distributed.pipelining twice:
as a user runs it (torch's default thread count per rank: impl ``torch``) and tuned with one thread per rank
(impl ``torch_1thread``). All ranks run under ``OMP_WAIT_POLICY=passive``, set by the launcher. Run from the
repository root::

    python -m benchmarks.schedule_efficiency                        # p=4, m=8, t_f=10 ms, t_b=20 ms
    python -m benchmarks.schedule_efficiency --schedules gpipe,1f1b,interleaved_1f1b,zb_h1 --json eff.json
    python -m benchmarks.schedule_efficiency --schedules zb_v,interleaved_zb,async_1f1b,2bw
    python -m benchmarks.schedule_efficiency --trace                # where lightning_pipe's time goes

Rows also carry the simulator's prediction for lightning_pipe's schedule (``predicted_ms``), made from costs
measured in the same run: each sleeping stage's real forward and backward halves, and the link latency (half a
ping-pong through lightning_pipe's Communicator). The asynchronous
schedules are timed per batch in steady state against the bubble-free bound ``m (t_f + t_b)``.

A step's time runs from the first rank entering it to the last rank leaving it (all ranks read the same
monotonic clock). The implementations take ``--rounds`` alternating turns on fresh ranks, each turn ``--warmup``
untimed steps then ``--steps`` timed ones; the table gives the median of all timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import SleepCosts, SleepLayer, markdown_table, run_ranks, write_json

__all__ = ["BenchSchedule", "BENCH_SCHEDULES", "Config", "main", "run"]

WIDTH = 4  # numbers per row of the sleeping layers' tensors: tiny, the work is the sleep
IMPLS = ("lightning_pipe", "torch", "torch_1thread")


# -- the schedules compared --------------------------------------------------------------------------
def fill_drain_ideal(p: int, m: int, c: SleepCosts, v: int) -> float:
    """GPipe and 1F1B: ``(m + p - 1) * (t_f + t_b)``."""
    return (m + p - 1) * (c.forward + c.backward)


def interleaved_ideal(p: int, m: int, c: SleepCosts, v: int) -> float:
    """Interleaved 1F1B, ``v`` stages per rank each costing ``1/v`` of the rank's: ``(m + (p - 1)/v) * (t_f + t_b)``."""
    return (m + (p - 1) / v) * (c.forward + c.backward)


def zb_h1_ideal(p: int, m: int, c: SleepCosts, v: int) -> float:
    """ZB-H1: ``m (t_f + t_b) + (p - 1) max(t_f, t_i, t_f + t_i - t_w)`` (see ``engine/schedules/zoo.zb_h1``)."""
    bubble = max(c.forward, c.backward_input, c.forward + c.backward_input - c.backward_weight)
    return m * (c.forward + c.backward) + (p - 1) * bubble


def zb_v_ideal(p: int, m: int, c: SleepCosts, v: int) -> float:
    """ZB-V with ``m >= 2p - 1`` and ``W <= F = I`` per stage: ``m (t_f + t_b) + (p - 1) t_f / 2``."""
    return m * (c.forward + c.backward) + (p - 1) * c.forward / 2


def bubble_free(p: int, m: int, c: SleepCosts, v: int) -> float:
    """No bubble at all: ``m (t_f + t_b)``; the bound for schedules whose own ideal has no closed form here,
    and for the asynchronous ones in steady state (time per batch)."""
    return m * (c.forward + c.backward)


@dataclass(frozen=True)
class BenchSchedule:
    """A schedule as both implementations name it, how many stages each rank holds, and its ideal step time."""

    name: str | None  # lightning_pipe's schedule name (None: measured on torch only)
    ideal: Callable[[int, int, SleepCosts, int], float]  # (ranks p, micro-batches m, per-rank costs, v) -> s
    torch_schedule: str | None = None  # class in torch.distributed.pipelining, None where it has none
    stages_per_rank: int = 1
    options: dict[str, int] = field(default_factory=dict)  # lightning_pipe schedule options
    placement: str = "loop"  # stages of rank r: r, r + p, ... ("loop") or r, 2p - 1 - r ("v")
    asynchronous: bool = False  # timed per batch in steady state, without a flush between batches


# Add a schedule here to benchmark it. A rank's costs per micro-batch are t_f and t_b whatever its number of
# stages: with v stages per rank each stage sleeps 1/v of them, so schedules compare on the same model.
BENCH_SCHEDULES: dict[str, BenchSchedule] = {
    "gpipe": BenchSchedule("gpipe", fill_drain_ideal, "ScheduleGPipe"),
    "1f1b": BenchSchedule("1f1b", fill_drain_ideal, "Schedule1F1B"),
    "interleaved_1f1b": BenchSchedule("interleaved_1f1b", interleaved_ideal, "ScheduleInterleaved1F1B",
                                      stages_per_rank=2, options={"virtual_stages": 2}),
    "zb_h1": BenchSchedule("zb_h1", zb_h1_ideal),  # torch has no ZB-H1 (only interleaved zero-bubble variants)
    "zb_v": BenchSchedule("zb_v", zb_v_ideal, "ScheduleZBVZeroBubble", stages_per_rank=2, placement="v"),
    "interleaved_zb": BenchSchedule(None, bubble_free, "ScheduleInterleavedZeroBubble", stages_per_rank=2),
    "async_1f1b": BenchSchedule("async_1f1b", bubble_free, asynchronous=True),
    "2bw": BenchSchedule("2bw", bubble_free, asynchronous=True),
    "async_1f1b_slack1": BenchSchedule("async_1f1b", bubble_free, asynchronous=True, options={"slack": 1}),
    "2bw_slack1": BenchSchedule("2bw", bubble_free, asynchronous=True, options={"slack": 1}),
}


def _stage_indices(bench: BenchSchedule, rank: int, p: int) -> list[int]:
    if bench.placement == "v":
        return [rank, 2 * p - 1 - rank]
    return [rank + k * p for k in range(bench.stages_per_rank)]


@dataclass(frozen=True)
class Config:
    """One benchmark run: pipeline size, sleep costs (seconds) and how many steps to time."""

    stages: int = 4
    microbatches: int = 8
    costs: SleepCosts = SleepCosts.of(0.010, 0.020)
    warmup: int = 3
    steps: int = 10
    rounds: int = 2  # turns each implementation takes (fresh ranks each turn); steps are pooled over them
    trace: bool = False  # also trace lightning_pipe's actions (in a separate run, not the timed one)
    chrome_trace: str | None = None  # write each traced step there ("{schedule}" in the path is replaced)


def _stage_costs(costs: SleepCosts, v: int) -> SleepCosts:
    return SleepCosts(costs.forward / v, costs.backward / v, costs.backward_input / v, costs.backward_weight / v)


def _loss(output: torch.Tensor, _: Any) -> torch.Tensor:
    return output.pow(2).mean()


# -- one rank ------------------------------------------------------------------------------------------
def _timed_steps(step: Callable[[], None], params: list[torch.nn.Parameter], config: Config) -> list[tuple]:
    """(start, end) of each timed step on this rank's clock; a barrier lines the ranks up before each."""
    spans = []
    for index in range(config.warmup + config.steps):
        for param in params:
            param.grad = None
        dist.barrier()
        start = time.perf_counter()
        step()
        end = time.perf_counter()
        if index >= config.warmup:
            spans.append((start, end))
    return spans


def _steady_state_batches(pipe: Any, batch: torch.Tensor, config: Config) -> list[tuple]:
    """Asynchronous schedules never flush between batches, so a barrier per step would destroy what they
    gain: time ``config.steps`` consecutive batches after the warm-up ones, one span per batch on average."""
    def optimizer_step() -> None:  # the sleeping layers' weights stay as they are
        pass

    for _ in range(config.warmup):
        pipe.train_step(batch, optimizer_step=optimizer_step)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(config.steps):
        pipe.train_step(batch, optimizer_step=optimizer_step)
    end = time.perf_counter()
    pipe.flush()
    per_batch = (end - start) / config.steps
    return [(start + i * per_batch, start + (i + 1) * per_batch) for i in range(config.steps)]


def _lightning_pipe_rank(rank: int, world_size: int, config: Config, names: list[str], record: bool) -> dict:
    from lightning_pipe.engine.executor import Pipeline

    out: dict[str, Any] = {"threads": None}
    for name in names:
        bench = BENCH_SCHEDULES[name]
        if bench.name is None:
            continue
        costs = _stage_costs(config.costs, bench.stages_per_rank)
        layers = [SleepLayer(costs, WIDTH) for _ in range(world_size * bench.stages_per_rank)]
        pipe = Pipeline(layers, loss_fn=_loss, schedule=bench.name, num_microbatches=config.microbatches,
                        record=record, **bench.options)
        batch = torch.ones(config.microbatches, WIDTH)
        if bench.asynchronous:
            out[name] = {"spans": _steady_state_batches(pipe, batch, config), "records": []}
            out["threads"] = torch.get_num_threads()
            continue
        spans = _timed_steps(lambda: pipe.train_step(batch), list(pipe.parameters()), config)
        records = []
        if record:  # one more step, traced alone
            pipe.take_records()
            dist.barrier()
            pipe.train_step(batch)
            records = pipe.take_records()
        out[name] = {"spans": spans, "records": records}
        out["threads"] = torch.get_num_threads()
    return out


def _torch_rank(rank: int, world_size: int, config: Config, names: list[str], one_thread: bool) -> dict:
    from torch.distributed import pipelining

    if one_thread:
        torch.set_num_threads(1)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for name in names:
        bench = BENCH_SCHEDULES[name]
        v = bench.stages_per_rank
        costs = _stage_costs(config.costs, v)
        num_stages = world_size * v
        indices = _stage_indices(bench, rank, world_size)  # as lightning_pipe places them
        stages = [pipelining.PipelineStage(SleepLayer(costs, WIDTH), index, num_stages, torch.device("cpu"))
                  for index in indices]
        schedule_cls = getattr(pipelining, bench.torch_schedule)
        schedule = schedule_cls(stages[0] if v == 1 else stages, config.microbatches, loss_fn=_loss)
        batch = torch.ones(config.microbatches, WIDTH)
        holds_first, holds_last = 0 in indices, num_stages - 1 in indices
        args = (batch,) if holds_first else ()
        kwargs = {"target": batch} if holds_last else {}
        params = [p for s in stages for p in s.submod.parameters()]
        out[name] = {"spans": _timed_steps(lambda: schedule.step(*args, **kwargs), params, config), "records": []}
    return out


# -- measuring -----------------------------------------------------------------------------------------
def _step_times(per_rank: list[dict], name: str) -> list[float]:
    """Each step from the first rank's start to the last rank's end, in seconds. Asynchronous schedules keep the
    ranks a few micro-batches apart for good, so there a batch takes the slowest rank's time per batch."""
    spans = [result[name]["spans"] for result in per_rank]
    if BENCH_SCHEDULES[name].asynchronous:
        return [max(s[i][1] - s[i][0] for s in spans) for i in range(len(spans[0]))]
    return [max(s[i][1] for s in spans) - min(s[i][0] for s in spans) for i in range(len(spans[0]))]


def run(config: Config, names: list[str]) -> tuple[list[dict], dict[str, Any]]:
    """Measure every schedule in ``names`` on every implementation; return the rows and a diagnosis of ours.

    The implementations take turns, ``config.rounds`` times, each turn on fresh ranks, so that a slow spell of a
    shared machine does not fall on one implementation only; the median is over all their timed steps.
    """
    unknown = sorted(set(names) - set(BENCH_SCHEDULES))
    if unknown:
        raise ValueError(f"unknown schedules {unknown}; choose from {', '.join(BENCH_SCHEDULES)}")
    p, m = config.stages, config.microbatches
    torch_names = [n for n in names if BENCH_SCHEDULES[n].torch_schedule]
    ours = [n for n in names if BENCH_SCHEDULES[n].name]
    runs: dict[str, Callable[[], list[dict]]] = {
        "lightning_pipe": lambda: run_ranks(_lightning_pipe_rank, p, config, ours, False),
        "torch": lambda: run_ranks(_torch_rank, p, config, torch_names, False),
        "torch_1thread": lambda: run_ranks(_torch_rank, p, config, torch_names, True),
    }
    if not torch_names:
        del runs["torch"], runs["torch_1thread"]
    if not ours:
        del runs["lightning_pipe"]
    calibration = _calibrate(config, names)
    step_times: dict[tuple[str, str], list[float]] = {}
    threads: dict[str, int] = {}
    for _ in range(config.rounds):
        for impl, start in runs.items():
            per_rank = start()
            threads[impl] = per_rank[0]["threads"]
            for name in names:
                if name in per_rank[0]:
                    step_times.setdefault((name, impl), []).extend(_step_times(per_rank, name))
    rows = []
    for name in names:
        bench = BENCH_SCHEDULES[name]
        ideal = bench.ideal(p, m, config.costs, bench.stages_per_rank)
        predicted = _predicted(bench, config, calibration)
        for impl in runs:
            if (name, impl) in step_times:
                step = statistics.median(step_times[name, impl])
                rows.append({"schedule": name, "impl": impl, "stages": p * bench.stages_per_rank,
                             "microbatches": m, "step_ms": 1e3 * step, "ideal_ms": 1e3 * ideal,
                             "ratio": step / ideal, "predicted_ms": predicted and 1e3 * predicted,
                             "vs_predicted": predicted and step / predicted, "threads": threads[impl]})
    diagnosis = {}
    if config.trace:
        traced = run_ranks(_lightning_pipe_rank, p, config, names, True)
        diagnosis = {name: _diagnose([r[name]["records"] for r in traced], config,
                                     BENCH_SCHEDULES[name].stages_per_rank) for name in names}
        if config.chrome_trace:
            from lightning_pipe.engine.trace import to_chrome_trace

            for name in names:
                to_chrome_trace([rec for r in traced for rec in r[name]["records"]],
                                config.chrome_trace.replace("{schedule}", name))
    return rows, diagnosis


def _measure_layer(costs: SleepCosts, repeats: int = 15) -> tuple[float, float, float]:
    """Median seconds of a sleeping stage's forward, input half and weight half as they really run here
    (a sleep overshoots by a fraction of a millisecond, and the autograd calls around it cost a little)."""
    layer = SleepLayer(costs, WIDTH)
    forward, backward_input, backward_weight = [], [], []
    for _ in range(repeats):
        x = torch.ones(2, WIDTH, requires_grad=True)
        start = time.perf_counter()
        y = layer(x).pow(2).mean()
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.autograd.grad(y, [x], retain_graph=True)
        backward_input.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch.autograd.grad(y, [layer.weight])
        backward_weight.append(time.perf_counter() - start)
    return statistics.median(forward), statistics.median(backward_input), statistics.median(backward_weight)


def _ping(rank: int, world_size: int, repeats: int) -> float:
    """Half the round trip of one small tensor through lightning_pipe's Communicator: the link's latency."""
    from lightning_pipe.engine.comm import Communicator

    comm, x, times = Communicator(), torch.ones(2, WIDTH), []
    for _ in range(repeats):
        start = time.perf_counter()
        if rank == 0:
            comm.send(x, 1, 0)
            comm.recv(1, 1)
        else:
            comm.send(comm.recv(0, 0), 0, 1)
        times.append(time.perf_counter() - start)
    comm.wait_sends()
    return statistics.median(times) / 2


def _calibrate(config: Config, names: list[str]) -> dict[str, Any]:
    """Measured inputs of the prediction: each stage size's real costs, and the link latency (ping-pong)."""
    sizes = {BENCH_SCHEDULES[n].stages_per_rank for n in names}
    latency = run_ranks(_ping, 2, 200)[0]
    return {"latency": latency,
            "costs": {v: _measure_layer(_stage_costs(config.costs, v)) for v in sizes}}


def _predicted(bench: BenchSchedule, config: Config, calibration: dict[str, Any]) -> float | None:
    """The simulator's step time for lightning_pipe's schedule with the measured stage costs and link latency:
    per batch in steady state for the asynchronous schedules (one more batch in a stream of batches)."""
    if bench.name is None:
        return None
    from lightning_pipe.engine.schedules import asynchronous as schedules_async
    from lightning_pipe.engine.schedules import get_schedule
    from lightning_pipe.planner.simulate import Link, StageCost, predict

    cost = StageCost(*calibration["costs"][bench.stages_per_rank])
    link = Link(latency=calibration["latency"])
    schedule = get_schedule(bench.name, config.stages, config.microbatches, **bench.options)
    if not bench.asynchronous:
        return predict(schedule, cost, link).step_time
    batches = 8
    longer = predict(schedules_async.stream(schedule, batches + 1), cost, link).step_time
    return longer - predict(schedules_async.stream(schedule, batches), cost, link).step_time


def _diagnose(records: list[list[Any]], config: Config, v: int) -> dict[str, float]:
    """Where one traced step of lightning_pipe spent its time beyond the sleeps, in ms.

    ``compute_overhead``: mean time of a compute action beyond its sleep; ``send``: mean time of a send call;
    ``message_latency``: from the later of (send called, receive called) to the receive's return, median and 90th
    percentile; ``recv_wait_per_rank``: total time a rank spent in receives; ``gap``: mean time between two
    consecutive actions of a rank (the executor's loop).
    """
    costs = _stage_costs(config.costs, v)
    sleep = {"F": costs.forward, "B": costs.backward, "I": costs.backward_input, "W": costs.backward_weight}
    compute, sends, recv_total, gaps = [], {}, 0.0, []
    receives = []
    for rank_records in records:
        for r in rank_records:
            stage, op, mb = r.action
            if op.value in sleep:
                compute.append(r.duration - sleep[op.value])
            elif op.value == "SEND_F":
                sends[("F", stage + 1, mb)] = r
            elif op.value == "SEND_B":
                sends[("B", stage - 1, mb)] = r
            else:
                receives.append((("F" if op.value == "RECV_F" else "B", stage, mb), r))
                recv_total += r.duration
        gaps += [after.start - before.end for before, after in zip(rank_records, rank_records[1:])]
    latencies = sorted(r.end - max(r.start, sends[key].start) for key, r in receives if key in sends)
    begin = min(r[0].start for r in records)
    finish = max(r[-1].end for r in records)

    def mean_ms(values: list[float]) -> float:
        return 1e3 * statistics.mean(values) if values else 0.0

    return {"step_ms": 1e3 * (finish - begin), "compute_overhead_ms": mean_ms(compute),
            "send_ms": mean_ms([r.duration for r in sends.values()]),
            "message_latency_median_ms": 1e3 * statistics.median(latencies) if latencies else 0.0,
            "message_latency_p90_ms": 1e3 * latencies[int(0.9 * (len(latencies) - 1))] if latencies else 0.0,
            "recv_wait_per_rank_ms": 1e3 * recv_total / len(records), "gap_ms": mean_ms(gaps)}


# -- command line -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", default="gpipe,1f1b",
                        help=f"comma-separated, from: {', '.join(BENCH_SCHEDULES)}")
    parser.add_argument("--stages", "-p", type=int, default=4, help="ranks, one stage each (v for interleaved)")
    parser.add_argument("--microbatches", "-m", type=int, default=8)
    parser.add_argument("--t-f", type=float, default=10.0, help="forward sleep per micro-batch and rank, ms")
    parser.add_argument("--t-b", type=float, default=20.0, help="backward sleep per micro-batch and rank, ms")
    parser.add_argument("--t-i", type=float, default=None, help="input-gradient half of t_b, ms (default t_b/2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="turns each implementation takes, alternating")
    parser.add_argument("--trace", action="store_true", help="also trace lightning_pipe's actions and print "
                                                             "where its time goes beyond the sleeps")
    parser.add_argument("--chrome-trace", metavar="PATH", help="with --trace, write the traced steps as Chrome "
                        "traces; '{schedule}' in PATH is replaced by the schedule's name")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    args = parser.parse_args(argv)

    t_i = None if args.t_i is None else args.t_i / 1e3
    config = Config(args.stages, args.microbatches, SleepCosts.of(args.t_f / 1e3, args.t_b / 1e3, t_i),
                    args.warmup, args.steps, args.rounds, args.trace or bool(args.chrome_trace), args.chrome_trace)
    names = [n.strip() for n in args.schedules.split(",") if n.strip()]
    load_before = os.getloadavg()[0]
    rows, diagnosis = run(config, names)
    print(markdown_table(rows, ["schedule", "impl", "stages", "microbatches", "threads", "step_ms", "ideal_ms",
                                "ratio", "predicted_ms", "vs_predicted"]))
    print(f"\n{len(os.sched_getaffinity(0))} cores; 1-minute load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after (a loaded machine delays the ranks' wake-ups: compare ratios only "
          f"within one run)")
    for name, numbers in diagnosis.items():
        print(f"\nlightning_pipe {name}, traced step: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()))
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
