"""Partition quality: the profiled plan against uniform, parameter- and time-balanced cuts and the best cut there is.

For each model (``benchmarks/partition_common.MODELS``: a GPT-like and a CNN-like model of layers that sleep
their FLOP-derived costs, and a real small CNN), with 1F1B and ``--microbatches`` micro-batches:

1. profile the layers in this process on one micro-batch (``lightning_pipe.planner.profile_layers``, with a rank's
   share of the cores), and profile the link between ranks as the engine uses it: bandwidth from a ping-pong of
   two sizes, per-message overhead fitted so that the simulator reproduces a pipeline of zero-cost layers;
2. plan: ``profile`` (PipeDream's dynamic program, one replica per stage, refined by simulation), ``pipedream dp``
   (the same without refining), ``uniform``, ``parameters`` (what DeepSpeed does), ``time``; and simulate every
   contiguous cut, keeping the ``--top-k`` fastest;
3. run every distinct cut (all of them take turns, step by step, so the machine's load falls on all alike) and
   take the median step time (first rank in to last rank out). The best cut is the fastest measured.

Sleeping models run on ``--ranks`` ranks; the real CNN on ``--real-ranks`` (default: no more ranks than cores, since
ranks that share a core run at a fraction of the speed the single-device profile saw). Run from the repository root::

    python -m benchmarks.partition_quality                          # all models, p=4, m=8 (about 4 minutes)
    python -m benchmarks.partition_quality --models cnn_sleep --top-k 10 --json quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from benchmarks.common import write_json
from benchmarks.partition_common import (MODELS, sleeping_layer, build_model, is_real, loss_fn, rank_threads,
                                         run_ranks, sample_batch)
from lightning_pipe.planner import Level, Plan, Topology, plan_pipeline, profile_layers

__all__ = ["Config", "measure_link", "run_model", "run", "main"]

METHODS = ("profile", "uniform", "parameters", "time")


@dataclass(frozen=True)
class Config:
    """One benchmark run."""

    models: tuple[str, ...] = tuple(MODELS)
    ranks: int = 4
    real_ranks: int = 0
    """Ranks for the real model; 0: the fewer of ``ranks`` and the cores."""
    microbatches: int = 8
    rows: int = 4
    """Rows per micro-batch of the sleeping models."""
    real_rows: int = 32
    """Rows per micro-batch of the real model (enough work that a message's cost is small beside it)."""
    scale: float = 2.0
    """Sleeping layers sleep this many times their listed costs (longer sleeps: less relative noise)."""
    steps: int = 7
    warmup: int = 1
    top_k: int = 5
    """Fastest predicted cuts (of all contiguous cuts) measured besides the methods' cuts."""


# -- on the ranks -----------------------------------------------------------------------------------------------------
def _timed_steps(pipes: list[Any], batch: Any, warmup: int, steps: int) -> list[list[tuple[float, float]]]:
    """(start, end) of each timed step of each pipeline on this rank; the pipelines take turns step by step."""
    for pipe in pipes:
        for _ in range(warmup):
            pipe.train_step(batch)
    spans: list[list[tuple[float, float]]] = [[] for _ in pipes]
    for _ in range(steps):
        for index, pipe in enumerate(pipes):
            for param in pipe.parameters():
                param.grad = None
            dist.barrier()
            start = time.perf_counter()
            pipe.train_step(batch)
            spans[index].append((start, time.perf_counter()))
    return spans


def _calibration_layers(ranks: int, scale: float) -> list[nn.Module]:
    """One layer per rank sleeping 4 ms forward and 8 ms backward (times ``scale``): a pipeline whose ideal step is
    known, so what it takes beyond that is the engine's cost per message."""
    return [sleeping_layer(0.004 * scale, 0.008 * scale) for _ in range(ranks)]


def _link_rank(rank: int, world_size: int, sizes: list[int], config: Config) -> dict[str, Any]:
    """Half the round trip of a tensor of each size between ranks 0 and 1 through the engine's Communicator; and
    the steps of an even pipeline of sleeping layers (:func:`_calibration_layers`)."""
    from lightning_pipe.engine.comm import Communicator
    from lightning_pipe.engine.executor import Pipeline

    comm = Communicator()
    one_way = []
    for nbytes in sizes:
        payload = torch.zeros(max(1, nbytes // 4))
        times = []
        for _ in range(20):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                comm.send(payload, 1, 0)
                comm.recv(1, 1)
            elif rank == 1:
                comm.send(comm.recv(0, 0), 0, 1)
            comm.wait_sends()
            times.append((time.perf_counter() - start) / 2)
        one_way.append(statistics.median(times))
    pipe = Pipeline(_calibration_layers(world_size, config.scale), loss_fn=loss_fn("gpt_sleep"), schedule="1f1b",
                    num_microbatches=config.microbatches)
    batch = sample_batch("gpt_sleep", config.rows * config.microbatches)
    return {"one_way": one_way, "spans": _timed_steps([pipe], batch, 3, 11)[0]}


def _whole_model_seconds(model: str, layers: nn.Module, config: Config, repeats: int = 7) -> float:
    """Median seconds of forward and backward of the whole model on one micro-batch, in this process."""
    x, y = sample_batch(model, _rows(model, config))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        loss_fn(model)(layers(x), (x, y)).backward()
        times.append(time.perf_counter() - start)
    layers.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _measure_rank(rank: int, world_size: int, model: str, cuts: list[list[int]], config: Config) -> dict[str, Any]:
    """(start, end) of each timed step of each cut on this rank; for a real model also how long the whole model
    takes here while every rank runs it at once (against the profile, taken alone: the machine's contention)."""
    from lightning_pipe.engine.executor import Pipeline

    layers = build_model(model, scale=config.scale)
    together = None
    if is_real(model):
        dist.barrier()
        together = _whole_model_seconds(model, layers, config)
    batch = sample_batch(model, _rows(model, config) * config.microbatches)
    pipes = [Pipeline(layers, loss_fn=loss_fn(model), schedule="1f1b", num_microbatches=config.microbatches,
                      partition=sizes) for sizes in cuts]
    return {"spans": _timed_steps(pipes, batch, config.warmup, config.steps), "together": together}


# -- in this process --------------------------------------------------------------------------------------------------
def _steps(spans: list[list[tuple[float, float]]]) -> list[float]:
    """Each step's time from the first rank in to the last rank out; ``spans[rank][step]``."""
    return [max(rank[step][1] for rank in spans) - min(rank[step][0] for rank in spans) for step in range(len(spans[0]))]


def _rows(model: str, config: Config) -> int:
    return config.real_rows if is_real(model) else config.rows


def measure_link(config: Config) -> Level:
    """The link between ``config.ranks`` ranks of this machine as the engine sees it: bandwidth from two message
    sizes; the per-message overhead that makes the simulator reproduce an even pipeline of sleeping layers (which
    none of the benchmarked models is); latency, the rest of a one-way trip."""
    small, large = 16, 4 << 20
    results = run_ranks(_link_rank, config.ranks, [small, large], config)
    t_small, t_large = results[0]["one_way"]
    bandwidth = (large - small) / max(t_large - t_small, 1e-9)
    measured = statistics.median(_steps([r["spans"] for r in results]))
    layers = nn.Sequential(*_calibration_layers(config.ranks, config.scale))
    profiles = profile_layers(layers, sample_batch("gpt_sleep", config.rows)[0], repeats=5, warmup=2)

    def predicted(overhead: float) -> float:
        level = Level(config.ranks, bandwidth, max(0.0, t_small - 2 * overhead), overhead)
        return plan_pipeline(profiles, Topology([level]), method=[1] * config.ranks, schedule="1f1b",
                             num_microbatches=config.microbatches).step_time

    low, high = 0.0, measured / config.microbatches
    for _ in range(40):  # bisection: the predicted step grows with the overhead
        middle = (low + high) / 2
        low, high = (middle, high) if predicted(middle) < measured else (low, middle)
    overhead = (low + high) / 2
    return Level(config.ranks, bandwidth, max(0.0, t_small - 2 * overhead), overhead)


def _cuts(num_layers: int, num_stages: int):
    for bounds in itertools.combinations(range(1, num_layers), num_stages - 1):
        edges = (0, *bounds, num_layers)
        yield [edges[i + 1] - edges[i] for i in range(num_stages)]


def run_model(model: str, config: Config, link: Level) -> dict[str, Any]:
    """Profile, plan and measure one model on ``config.ranks`` ranks; its rows and summary."""
    torch.set_num_threads(rank_threads(config.ranks))  # profile with a rank's share of the cores
    layers = build_model(model, scale=config.scale)
    started = time.perf_counter()
    profiles = profile_layers(layers, sample_batch(model, _rows(model, config))[0], repeats=5, warmup=2)
    profile_s = time.perf_counter() - started
    topology = Topology([link])
    common = dict(schedule="1f1b", num_microbatches=config.microbatches)
    plans: dict[str, Plan] = {method: plan_pipeline(profiles, topology, method=method, replicas=1, **common)
                              for method in METHODS}
    plans["pipedream dp"] = plan_pipeline(profiles, topology, method="profile", replicas=1, refine=False, **common)
    every = sorted((plan_pipeline(profiles, topology, method=sizes, **common) for sizes in
                    _cuts(len(profiles), config.ranks)), key=lambda plan: plan.step_time)
    for index, plan in enumerate(every[: config.top_k]):
        plans[f"search #{index + 1}"] = plan
    cuts: list[list[int]] = []
    for plan in plans.values():
        if plan.partition not in cuts:
            cuts.append(plan.partition)
    alone = _whole_model_seconds(model, layers, config) if is_real(model) else None
    measured = run_ranks(_measure_rank, config.ranks, model, cuts, config)
    spans = [rank["spans"] for rank in measured]
    slowdown = statistics.median(r["together"] for r in measured) / alone if alone else None
    steps_of = {tuple(cut): _steps([rank[index] for rank in spans]) for index, cut in enumerate(cuts)}
    step_of = {cut: statistics.median(steps) for cut, steps in steps_of.items()}
    best_cut = min(step_of, key=step_of.__getitem__)
    best = step_of[best_cut]
    rows = []
    for name, plan in plans.items():
        actual = step_of[tuple(plan.partition)]
        rows.append({"model": model, "ranks": config.ranks, "method": name, "partition": str(plan.partition),
                     "predicted_ms": plan.step_time * 1e3, "measured_ms": actual * 1e3,
                     "error_pct": 100 * (plan.step_time - actual) / actual, "vs_best": actual / best,
                     "steps_ms": [round(x * 1e3, 1) for x in steps_of[tuple(plan.partition)]]})
    profiled = step_of[tuple(plans["profile"].partition)]
    summary = {
        "model": model, "ranks": config.ranks, "layers": len(profiles), "cuts": len(every), "measured_cuts": len(cuts),
        "best_partition": str(list(best_cut)), "best_ms": best * 1e3, "profile_partition": str(plans["profile"].partition),
        "profile_ms": profiled * 1e3, "profile_over_best": profiled / best,
        "uniform_over_profile": step_of[tuple(plans["uniform"].partition)] / profiled,
        "parameters_over_profile": step_of[tuple(plans["parameters"].partition)] / profiled,
        "prediction_error_pct": 100 * (plans["profile"].step_time - profiled) / profiled,
        "median_abs_error_pct": statistics.median(abs(row["error_pct"]) for row in rows),
        "profile_s": profile_s,
        "slowdown_together": slowdown,
    }
    return {"rows": rows, "summary": summary}


def run(config: Config) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    real_ranks = config.real_ranks or min(config.ranks, os.cpu_count() or 1)
    links: dict[int, Level] = {}
    results: dict[str, Any] = {"config": dataclasses.asdict(config), "links": {}, "models": []}
    for model in config.models:
        ranks = real_ranks if is_real(model) else config.ranks
        local = dataclasses.replace(config, ranks=ranks)
        if ranks not in links:
            links[ranks] = measure_link(local)
            level = links[ranks]
            results["links"][ranks] = {"latency_s": level.latency, "overhead_s": level.overhead,
                                       "bandwidth_Bps": level.bandwidth}
        results["models"].append(run_model(model, local, links[ranks]))
    results["load_average"] = [load_before, os.getloadavg()[0]]
    return results


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    for name in ("ranks", "real_ranks", "microbatches", "rows", "real_rows", "steps", "warmup", "top_k"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--scale", type=float, default=defaults.scale)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    models = tuple(args.models.split(","))
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    config = Config(models, args.ranks, args.real_ranks, args.microbatches, args.rows, args.real_rows, args.scale,
                    args.steps, args.warmup, args.top_k)
    results = run(config)
    for ranks, link in results["links"].items():
        print(f"link between {ranks} ranks (engine Communicator, gloo): latency {link['latency_s'] * 1e3:.3f} ms, "
              f"overhead {link['overhead_s'] * 1e3:.3f} ms per message, bandwidth {link['bandwidth_Bps'] / 1e9:.2f} GB/s")
    print(f"1f1b, m={config.microbatches}, median of {config.steps} steps; load average "
          f"{results['load_average'][0]:.1f} -> {results['load_average'][1]:.1f} on {os.cpu_count()} cores\n")
    rows = [row for model in results["models"] for row in model["rows"]]
    print(_table(rows, ["model", "ranks", "method", "partition", "predicted_ms", "measured_ms", "error_pct", "vs_best"]))
    print()
    print(_table([model["summary"] for model in results["models"]],
                 ["model", "ranks", "cuts", "measured_cuts", "best_partition", "best_ms", "profile_partition",
                  "profile_over_best", "uniform_over_profile", "parameters_over_profile", "prediction_error_pct",
                  "median_abs_error_pct"]))
    for model in results["models"]:
        slowdown = model["summary"]["slowdown_together"]
        if slowdown is not None:
            print(f"{model['summary']['model']}: the whole model's forward and backward take {slowdown:.2f}x as long when "
                  f"all {model['summary']['ranks']} ranks run it at once as when it runs alone (profiled)")
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
