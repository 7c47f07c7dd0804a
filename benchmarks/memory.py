"""Memory per rank: bytes of activations saved for backward (exact, counted by autograd hooks) and peak RSS.

Runs ``gpipe``, ``1f1b`` and ``gpipe`` with re-materialization (``checkpoint_activations=True``) on an MLP whose
stages are ``--layers-per-stage`` blocks of Linear + ReLU, every configuration in fresh processes. Each rank runs
a warm-up step, then the measured step; peak RSS is that step's (VmHWM reset in between, glibc told to return
freed tensors to the OS), ``base_rss_mb`` the RSS before it. Run from the repository root::

    python -m benchmarks.memory                              # p=4, m=8, width 1024, 256 rows per micro-batch
    python -m benchmarks.memory --rows 64 --json memory.json

``saved_bytes_peak`` is the largest number of bytes that tensors saved for backward kept alive at once during the
step, parameters excluded (they live anyway), each storage counted once (a saved view counts the bytes it
spans). ``activation_microbatches_peak`` divides it by what one micro-batch saves at that stage *without*
re-materialization, so it reads "how many micro-batches of activations the stage held". Expected shape: under
``gpipe`` every stage holds ``m``; under ``1f1b`` stage ``s`` holds ``p - s``; with re-materialization only
the stage inputs are kept (the activations recomputed during a backward are held by ``torch.utils.checkpoint``
out of the hooks' sight, one micro-batch at a time).
"""

from __future__ import annotations

import argparse
import resource
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import markdown_table, reset_peak_rss, return_freed_memory, run_ranks, write_json

__all__ = ["SavedTensorCounter", "Config", "CONFIGURATIONS", "main", "run"]

# (schedule, re-materialization) measured, in this order.
CONFIGURATIONS: list[tuple[str, bool]] = [("gpipe", False), ("1f1b", False), ("gpipe", True)]


# -- counting saved tensors ----------------------------------------------------------------------------
class _Saved:
    """What a pack hook hands autograd instead of the tensor; autograd drops it when the tensor is released."""

    __slots__ = ("tensor", "counter", "key", "span")

    def __init__(self, tensor: torch.Tensor, counter: SavedTensorCounter, key: int, span: tuple[int, int]) -> None:
        self.tensor, self.counter, self.key, self.span = tensor, counter, key, span

    def __del__(self) -> None:
        self.counter._release(self.key, self.span)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """Byte range of its storage that ``tensor`` (possibly a strided view) reaches."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    if tensor.numel() == 0:
        return start, start
    last = sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * size


def _union(spans: Iterable[tuple[int, int]]) -> int:
    total, end = 0, -1
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


class SavedTensorCounter:
    """Exact count of the bytes that tensors saved for backward keep alive, and their peak.

    Inside ``with counter:`` every tensor autograd saves goes through a pack hook that wraps it in a small
    handle; autograd holds the handle exactly as long as it would hold the tensor, and drops it when the node
    that saved it has run its backward or the graph is freed. The count is the union of the byte ranges that the
    live handles reach, per storage, so a tensor saved by two nodes (a ReLU's output that the next Linear saves
    as input) counts once. Tensors sharing storage with ``exclude`` (the parameters) are not counted.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.spans: dict[int, Counter[tuple[int, int]]] = {}
        self.bytes_per_storage: dict[int, int] = {}
        self.bytes = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensorCounter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.bytes

    def _pack(self, tensor: torch.Tensor) -> Any:
        key = tensor.untyped_storage().data_ptr()
        if key in self.excluded or tensor.device.type == "meta":
            return tensor
        span = _span(tensor)
        self.spans.setdefault(key, Counter())[span] += 1
        self._recount(key)
        return _Saved(tensor, self, key, span)

    @staticmethod
    def _unpack(handle: Any) -> torch.Tensor:
        return handle.tensor if isinstance(handle, _Saved) else handle

    def _release(self, key: int, span: tuple[int, int]) -> None:
        spans = self.spans[key]
        spans[span] -= 1
        if not spans[span]:
            del spans[span]
        self._recount(key)
        if not spans:
            del self.spans[key]

    def _recount(self, key: int) -> None:
        new = _union(self.spans[key]) if key in self.spans else 0
        self.bytes += new - self.bytes_per_storage.get(key, 0)
        self.bytes_per_storage[key] = new
        if not new:
            del self.bytes_per_storage[key]
        self.peak = max(self.peak, self.bytes)


# -- the model and one rank ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Pipeline and model sizes."""

    stages: int = 4
    microbatches: int = 8
    width: int = 1024
    rows: int = 256  # per micro-batch
    layers_per_stage: int = 2  # Linear + ReLU blocks


def _model(config: Config) -> nn.Sequential:
    torch.manual_seed(0)
    width = config.width
    blocks = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(config.stages * config.layers_per_stage)]
    return nn.Sequential(*blocks)


def _loss(output: torch.Tensor, microbatch: Any) -> torch.Tensor:
    return F.mse_loss(output, microbatch[1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the peak, in KiB too


def _rank(rank: int, world_size: int, config: Config, schedule: str, remat: bool) -> dict[str, Any]:
    from lightning_pipe.engine.executor import Pipeline

    return_freed_memory()
    pipe = Pipeline(_model(config), loss_fn=_loss, schedule=schedule, num_microbatches=config.microbatches,
                    checkpoint_activations=remat)
    rows = config.rows * config.microbatches
    generator = torch.Generator().manual_seed(1)
    batch = (torch.randn(rows, config.width, generator=generator), torch.randn(rows, config.width, generator=generator))
    params = list(pipe.parameters())
    (stage_index,) = pipe.stages  # one stage per rank
    # A first step does one-time work (imports on first use: torch.utils.checkpoint's alone add ~80 MB of RSS,
    # gloo connections, gradient buffers); the second step is the one measured.
    pipe.train_step(batch)
    reset_peak_rss()
    base_rss_kib = _status_kib("VmRSS")
    counter = SavedTensorCounter(exclude=params)
    with counter:
        pipe.train_step(batch)
    peak = counter.peak
    peak_rss_kib = _status_kib("VmHWM")
    if counter.bytes:  # every saved tensor must be released by the end of a synchronous step
        raise RuntimeError(f"rank {rank}: {counter.bytes} bytes saved for backward still alive after the step")

    # What one micro-batch saves at this stage without re-materialization: its forward (and loss) alone.
    module = pipe.modules()[0]
    x = torch.randn(config.rows, config.width, requires_grad=stage_index > 0)
    target = torch.randn(config.rows, config.width)
    last = stage_index == config.stages - 1
    with SavedTensorCounter(exclude=params) as one:
        output = module(x)
        if last:
            output = _loss(output, (x, target))
        per_microbatch = one.bytes
    with SavedTensorCounter(exclude=params) as loss_only:  # what the loss alone saves (kept under remat too)
        loss = _loss(torch.randn(config.rows, config.width, requires_grad=True), (x, target)) if last else None
        loss_bytes = loss_only.bytes
    del output, loss
    return {"schedule": schedule, "remat": remat, "rank": rank, "saved_bytes_peak": peak,
            "activation_microbatches_peak": peak / per_microbatch, "peak_rss_mb": peak_rss_kib / 1024,
            "base_rss_mb": base_rss_kib / 1024, "microbatch_saved_bytes": per_microbatch,
            "stage_input_bytes": x.numel() * x.element_size(), "loss_saved_bytes": loss_bytes}


def _async_rank(rank: int, world_size: int, config: Config, schedule: str) -> dict[str, Any]:
    """Weight versions and activations an asynchronous schedule holds in steady state (no flush between steps)."""
    from lightning_pipe.engine.executor import Pipeline

    pipe = Pipeline(_model(config), loss_fn=_loss, schedule=schedule, num_microbatches=config.microbatches)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    rows = config.rows * config.microbatches
    batch = (torch.randn(rows, config.width, generator=generator), torch.randn(rows, config.width, generator=generator))
    params = list(pipe.parameters())
    for _ in range(2):  # into the steady state
        pipe.train_step(batch, optimizer_step=optimizer.step)
    counter = SavedTensorCounter(exclude=params)
    with counter:
        pipe.train_step(batch, optimizer_step=optimizer.step)
    pipe.flush(optimizer.step)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"schedule": schedule, "rank": rank, "weight_versions": pipe.weight_versions,
            "weight_version_mb": pipe.weight_versions * param_bytes / 2**20,
            "in_flight_microbatches": config.stages - rank, "saved_bytes_peak": counter.peak}


def run_async(config: Config) -> list[dict[str, Any]]:
    """Steady-state rows of the asynchronous schedules, one per (schedule, rank)."""
    return [row for schedule in ("async_1f1b", "2bw") for row in run_ranks(_async_rank, config.stages, config, schedule)]


def run(config: Config) -> list[dict[str, Any]]:
    """One training step of each configuration on fresh ranks; one row per (configuration, rank)."""
    rows = []
    for schedule, remat in CONFIGURATIONS:
        rows += run_ranks(_rank, config.stages, config, schedule, remat)
    return rows


def check_shape(rows: list[dict[str, Any]], config: Config) -> list[str]:
    """Where the rows differ from the expected shape (empty when all is as expected)."""
    p, m, problems = config.stages, config.microbatches, []
    for row in rows:
        s, per_mb = row["rank"], row["microbatch_saved_bytes"]
        if row["remat"]:
            # Only stage inputs, plus on the last stage what the loss saves (output and target of each micro-batch).
            expected = m * (row["stage_input_bytes"] + row["loss_saved_bytes"])
            expected_text = "m stage inputs" + (" and loss inputs" if row["loss_saved_bytes"] else "")
        else:
            expected = (m if row["schedule"] == "gpipe" else min(m, p - s)) * per_mb
            expected_text = f"{expected // per_mb} micro-batches"
        if row["saved_bytes_peak"] != expected:
            problems.append(f"{row['schedule']} remat={row['remat']} rank {s}: saved {row['saved_bytes_peak']} B, "
                            f"expected {expected} B ({expected_text})")
    return problems


# -- command line -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", "-p", type=int, default=4)
    parser.add_argument("--microbatches", "-m", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=256, help="rows per micro-batch")
    parser.add_argument("--layers-per-stage", type=int, default=2, help="Linear + ReLU blocks per stage")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    args = parser.parse_args(argv)

    config = Config(args.stages, args.microbatches, args.width, args.rows, args.layers_per_stage)
    rows = run(config)
    print(markdown_table(rows, ["schedule", "remat", "rank", "saved_bytes_peak", "activation_microbatches_peak",
                                "peak_rss_mb", "base_rss_mb"]))
    problems = check_shape(rows, config)
    print("\nexpected shape: " + ("as expected (gpipe m, 1f1b p - s micro-batches; remat m stage inputs)"
                                  if not problems else "DIFFERS\n  " + "\n  ".join(problems)))
    async_rows = run_async(config)
    print("\nAsynchronous schedules in steady state (weight copies held besides the live weights):\n")
    print(markdown_table(async_rows, ["schedule", "rank", "in_flight_microbatches", "weight_versions",
                                      "weight_version_mb", "saved_bytes_peak"]))
    rows = rows + async_rows
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
