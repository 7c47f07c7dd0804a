"""Command line: profile the model of a training config on this machine and print (and draw) its pipeline plan.

Same configs as ``python -m lightning_pipe.train`` (Hydra, the top-level ``configs/``); the strategy's
``partition``, ``schedule`` and ``num_microbatches`` and the trainer's ``devices`` say what to plan::

    python -m lightning_pipe.plan                                    # the GPT of train.yaml, 2 stages, 1F1B
    python -m lightning_pipe.plan strategy.partition=profile trainer.devices=4
    python -m lightning_pipe.plan strategy.schedule=auto +plan.memory_cap=2e8     # schedule and m chosen under a cap
    python -m lightning_pipe.plan +plan.replicas=auto +plan.topology='[[8,100e9,1e-5],[2,12.5e9,2e-5]]'
    python -m lightning_pipe.plan strategy.partition=profile trainer.devices=4 +plan.replicas=round_robin

Planner options go under ``+plan.``: ``memory_cap`` (bytes per device; default ``strategy.memory_cap``),
``replicas`` (devices per stage; ``auto`` lets PipeDream's dynamic program choose per stage; ``round_robin`` lets it
choose among the layouts ``PipelineStrategy(replicas="auto")`` runs, the last stage on one device; a list such as
``[3,1]`` fixes each stage's count; default 1), ``topology`` (levels ``[devices, bandwidth B/s, latency s, overhead
s]``, lowest first;
default: one level of ``trainer.devices`` on this kind of device), ``cache`` (profile cache folder, ``false`` for
none), ``repeats``, ``picture`` (PNG path).
The profile runs one micro-batch of the first training batch through the sequence on one device.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_pipe.engine.microbatch import batch_rows, split_batch
from lightning_pipe.engine.runtime import available_cores
from lightning_pipe.planner.partition import ROUND_ROBIN
from lightning_pipe.planner import METHODS, Level, Plan, Topology, plan_pipeline, profile_layers
from lightning_pipe.planner.auto import choose_schedule
from lightning_pipe.planner.profile import scale_profiles
from lightning_pipe.planner.cut_plan import default_topology, sequence_input
from lightning_pipe.strategy.split import find_sequence

__all__ = ["main", "plan_from_config", "sequence_input", "default_topology"]  # the last two: from .planning


def _devices(trainer: DictConfig) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, int):
        return devices
    if isinstance(devices, str) and devices.isdigit():
        return int(devices)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    raise ValueError(f"trainer.devices={devices!r}: the planner needs a number of devices; pass trainer.devices=4")


def plan_from_config(cfg: DictConfig) -> tuple[Plan, str]:
    """Profile the configured model and plan it; returns the plan and the text to print."""
    options = cfg.get("plan") or {}
    strategy = cfg.get("strategy") or {}
    trainer = cfg.trainer
    devices, nodes = _devices(trainer), int(trainer.get("num_nodes", 1))
    accelerator = str(trainer.get("accelerator", "cpu"))
    device = torch.device("cuda" if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, available_cores() // devices))  # a rank's share of the cores, as in training
    if cfg.get("seed") is not None:
        torch.manual_seed(cfg.seed)

    model = instantiate(cfg.model)
    _, sequence = find_sequence(model, strategy.get("layers"))
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    inputs = sequence_input(model, sequence, batch)
    m = int(strategy.get("num_microbatches", 4))
    sample = split_batch(inputs, m)[0]

    cache = options.get("cache", str(Path.home() / ".cache" / "lightning_pipe" / "profiles"))
    profiles = profile_layers(sequence, sample, device=device, repeats=int(options.get("repeats", 5)),
                              cache=cache or None)
    if options.get("topology"):
        topology = Topology([Level(*level) for level in OmegaConf.to_container(options.topology)])
    else:
        topology = default_topology(devices, nodes, device.type if device.type == "cuda" else "cpu")
    replicas = options.get("replicas", 1)
    if OmegaConf.is_list(replicas):  # one count per stage: uneven replication, as PipelineStrategy(replicas=[3, 1])
        replicas = [int(count) for count in replicas]
    elif replicas != ROUND_ROBIN:
        replicas = None if replicas in (None, "auto") else int(replicas)
    cap = options.get("memory_cap", strategy.get("memory_cap"))
    cap = float(cap) if cap is not None else None
    partition = strategy.get("partition", "uniform")
    method = list(partition) if OmegaConf.is_list(partition) else str(partition)
    schedule = str(strategy.get("schedule", "1f1b"))

    lines = [f"profiled {len(profiles)} layers on {device} with micro-batches of {batch_rows(sample)} rows "
             f"({batch_rows(inputs)} per batch, {m} micro-batches); topology: {topology.levels}"]
    if schedule == "auto":
        if not (replicas is None or isinstance(replicas, int)):
            raise ValueError(f"strategy.schedule=auto plans one replica count for every stage (or auto), not "
                             f"+plan.replicas={replicas}; name a schedule")
        choice = choose_schedule(profiles, topology, batch_rows=batch_rows(inputs), sample_rows=batch_rows(sample),
                                 memory_cap=cap, replicas=replicas)
        lines += ["schedule=auto: candidates", choice.table()]
        plan = choice.plan
        profiles = scale_profiles(profiles, batch_rows(inputs) / plan.num_microbatches / batch_rows(sample))
    else:
        plan = plan_pipeline(profiles, topology, method=method, schedule=schedule, num_microbatches=m,
                             replicas=_replicas_for(method, replicas), memory_cap=cap)
    lines.append(plan.summary())
    lines.append("other methods (same schedule and micro-batches):")
    for other in METHODS:
        if other == plan.method or (other == "memory" and cap is None):
            continue
        try:
            alt = plan_pipeline(profiles, topology, method=other, schedule=plan.schedule,
                                num_microbatches=plan.num_microbatches, memory_cap=cap,
                                replicas=_replicas_for(other, replicas))
            lines.append(f"  {other:>10}: partition={alt.partition} replicas={alt.replicas} predicted step "
                         f"{alt.step_time * 1e3:.1f} ms, bubble {alt.bubble:.1%}, peak {alt.peak_memory / 2**20:.1f} MiB")
        except ValueError as error:
            lines.append(f"  {other:>10}: {str(error).split('; ')[0]}")
    return plan, "\n".join(lines)


def _replicas_for(method: object, replicas: int | list[int] | str | None) -> int | list[int] | str | None:
    """What ``method`` takes of ``+plan.replicas``: only ``"profile"`` chooses counts (``None``, ``round_robin``)."""
    if method == "profile" or isinstance(replicas, list):
        return replicas
    return replicas if isinstance(replicas, int) else 1


@hydra.main(config_path="pkg://lightning_pipe.configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    plan, text = plan_from_config(cfg)
    print(text, flush=True)
    options = cfg.get("plan") or {}
    picture = options.get("picture") or os.path.join(cfg.get("output_dir") or ".", "plan.png")
    print(draw_plan(plan, picture))


def draw_plan(plan: Plan, picture: str) -> str:
    """Draw ``plan``'s predicted timeline at ``picture``; the line that says where (or why not: without matplotlib,
    the plan printed stands without its picture)."""
    from lightning_pipe.planner.pictures import draw_timeline

    Path(picture).parent.mkdir(parents=True, exist_ok=True)
    try:
        draw_timeline(plan.prediction, picture, title=f"predicted: {plan.schedule}, partition {plan.partition}, "
                                                      f"step {plan.step_time * 1e3:.1f} ms")
    except ModuleNotFoundError as error:
        if error.name != "matplotlib":
            raise
        return f"timeline: not drawn ({error})"
    return f"timeline: {picture}"


if __name__ == "__main__":
    main()
