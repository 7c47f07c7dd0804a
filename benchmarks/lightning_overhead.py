"""Lightning overhead: ``Trainer.fit`` with ``PipelineStrategy`` against the bare engine loop, same model and data.

Both sides train the example GPT (``lightning_pipe.demos.gpt``) on the standard-library text for the same
number of steps, from the same seed, on the same number of ranks. The engine side is the loop a user writes by
hand: ``Pipeline.train_step(batch)``, ``optimizer.step()``, ``optimizer.zero_grad()``. The Trainer side is
``Trainer.fit`` with the unchanged LightningModule (its ``self.log`` included); no logger, checkpoint or progress
bar unless ``--progress-bar``. Each side's ranks are spawned here with the variables torchelastic sets (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT), so Lightning launches nothing
itself. Run from the repository root::

    python -m benchmarks.lightning_overhead                      # 2 ranks, 1f1b, 4 micro-batches, 40 steps
    python -m benchmarks.lightning_overhead --ranks 4 --schedule gpipe --json overhead.json
    python -m benchmarks.lightning_overhead --width 32 --layers 2 --block-size 32   # tiny layers: overhead shows
    python -m benchmarks.lightning_overhead --width 32 --layers 2 --block-size 32 --one-device  # the reference:
        # a plain Trainer on one process against the loop by hand (what Lightning costs without a pipeline)

Time runs on rank 0 from a barrier after ``--warmup`` steps to a barrier after the last step; throughput is
tokens per second of that span. The sides alternate ``--repeats`` times; the best and the median are compared.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin (spinning ones burn the cores other ranks need); libgomp reads this
# when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import queue as queue_module  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from typing_extensions import override  # noqa: E402

from benchmarks.common import write_json  # noqa: E402

__all__ = ["Config", "run_engine", "run_trainer", "main"]


@dataclass
class Config:
    """One comparison: the model, the data and the pipeline both sides run."""

    ranks: int = 2
    """Ranks, one pipeline stage each."""
    schedule: str = "1f1b"
    num_microbatches: int = 4
    steps: int = 40
    """Optimizer steps per side, warm-up included."""
    warmup: int = 5
    """Steps before the clock starts (first-step set-up, allocator warm-up)."""
    width: int = 128
    layers: int = 4
    block_size: int = 128
    batch_size: int = 32
    max_bytes: int = 400_000
    progress_bar: bool = False
    seed: int = 0
    one_device: bool = False
    """The reference instead: Lightning's own cost on one process (a plain ``Trainer``, no pipeline) against the same
    loop written by hand over the whole model."""

    def __post_init__(self) -> None:
        if self.steps <= self.warmup:
            raise ValueError(f"steps ({self.steps}) must be > warmup ({self.warmup}): nothing would be timed")


# -- the shared pieces ----------------------------------------------------------------------------
def _model(cfg: Config) -> Any:
    from lightning_pipe.demos.gpt import GPT

    torch.manual_seed(cfg.seed)
    return GPT(block_size=cfg.block_size, width=cfg.width, num_layers=cfg.layers, num_heads=4,
               lr=1e-3, lr_schedule="constant")


def _data(cfg: Config) -> Any:
    from lightning_pipe.demos.stdlib_text import StdlibTextDataModule

    data = StdlibTextDataModule(block_size=cfg.block_size, batch_size=cfg.batch_size, max_bytes=cfg.max_bytes)
    data.setup("fit")
    return data


def _tokens_per_step(cfg: Config) -> int:
    return cfg.batch_size * cfg.block_size


# -- the engine loop, written by hand -------------------------------------------------------------
def run_engine(cfg: Config) -> dict[str, float] | None:
    """Bare engine on this rank: train ``cfg.steps`` steps; returns this rank's timing."""
    from lightning_pipe.engine.executor import Pipeline

    dist.init_process_group("gloo")
    model = _model(cfg)
    loader = _data(cfg).train_dataloader()
    pipe = Pipeline(model.layers, schedule=cfg.schedule, num_microbatches=cfg.num_microbatches,
                    loss_fn=lambda output, mb: F.cross_entropy(output.flatten(0, 1), mb[1].flatten()))
    params = list(pipe.parameters())  # the same groups as GPT.configure_optimizers, over this rank's stage
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95))
    clock: dict[str, float] = {}
    batches = iter(loader)
    for step in range(cfg.steps):
        if step == cfg.warmup:
            dist.barrier()
            clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()
        batch = next(batches)
        pipe.train_step(batch)
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    clock["end"], clock["cpu_end"] = time.perf_counter(), time.process_time()
    dist.destroy_process_group()
    return _timing(cfg, clock)


# -- the reference: one process, no pipeline -------------------------------------------------------
def run_plain_loop(cfg: Config) -> dict[str, float]:
    """The whole model on one process, trained by hand (what ``Trainer.fit`` on one device is compared with)."""
    model = _model(cfg)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    batches = iter(_data(cfg).train_dataloader())
    clock: dict[str, float] = {}
    for step in range(cfg.steps):
        if step == cfg.warmup:
            clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()
        x, y = next(batches)
        F.cross_entropy(model.layers(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    clock["end"], clock["cpu_end"] = time.perf_counter(), time.process_time()
    return _timing(cfg, clock)


def run_plain_trainer(cfg: Config) -> dict[str, float]:
    """The same model through a plain ``Trainer`` on one device (Lightning's own fixed cost per step)."""
    return _timed_fit(cfg, "auto", 1)


# -- the same through Lightning -------------------------------------------------------------------
def run_trainer(cfg: Config) -> dict[str, float] | None:
    """``Trainer.fit`` with the pipeline strategy on this rank; returns this rank's timing."""
    from lightning_pipe import PipelineStrategy

    return _timed_fit(cfg, PipelineStrategy(schedule=cfg.schedule, num_microbatches=cfg.num_microbatches), cfg.ranks)


def _timed_fit(cfg: Config, strategy: Any, devices: int) -> dict[str, float]:
    """``Trainer.fit`` of the model on ``devices`` with ``strategy``, timed from step ``cfg.warmup`` to the last
    (between barriers of all ranks: a single device's are no-ops)."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.times: dict[str, float] = {}

        @override
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == cfg.warmup:
                trainer.strategy.barrier("clock")
                self.times["start"], self.times["cpu_start"] = time.perf_counter(), time.process_time()

        @override
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == cfg.steps:
                trainer.strategy.barrier("clock")
                self.times["end"], self.times["cpu_end"] = time.perf_counter(), time.process_time()

    clock = Clock()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=cfg.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=cfg.progress_bar,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(_model(cfg), train_dataloaders=_data(cfg).train_dataloader())
    return _timing(cfg, clock.times)


def _timing(cfg: Config, clock: dict[str, float]) -> dict[str, float]:
    """This rank's timing: wall time (what the comparison is about) and the CPU time this process spent (which a busy
    machine inflates far less than wall time: the steadier figure for the fixed cost of a step)."""
    seconds = clock["end"] - clock["start"]
    steps = cfg.steps - cfg.warmup
    cpu = clock["cpu_end"] - clock["cpu_start"]
    return {"seconds": seconds, "ms_per_step": 1e3 * seconds / steps,
            "tokens_per_s": steps * _tokens_per_step(cfg) / seconds, "cpu_ms_per_step": 1e3 * cpu / steps}


# -- launching ranks as torchelastic would --------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(side: str, cfg: Config, rank: int, port: int, results: Any) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(cfg.ranks), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(cfg.ranks), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    try:
        run_side = {"engine": run_engine, "trainer": run_trainer, "plain_loop": run_plain_loop,
                    "plain_trainer": run_plain_trainer}[side]
        results.put((rank, True, run_side(cfg)))
    except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def _launch(side: str, cfg: Config, timeout: float = 600.0) -> dict[str, float]:
    """Run one side on ``cfg.ranks`` fresh processes; return rank 0's timing."""
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as a launcher gives
    results = ctx.Queue()
    port = _free_port()
    processes = [ctx.Process(target=_rank_main, args=(side, cfg, rank, port, results), daemon=True)
                 for rank in range(cfg.ranks)]
    for process in processes:
        process.start()
    outcome: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < cfg.ranks:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{side}: ranks {sorted(set(range(cfg.ranks)) - set(outcome))} did not finish "
                                   f"within {timeout:.0f} s")
            try:
                rank, ok, payload = results.get(timeout=1.0)
                outcome[rank] = (ok, payload)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(processes) if r not in outcome and p.exitcode is not None]
                if dead:
                    time.sleep(0.5)
                    if results.empty():
                        raise RuntimeError(f"{side}: ranks {dead} died without a result") from None
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    failed = [f"--- {side} rank {rank} ---\n{text}" for rank, (ok, text) in sorted(outcome.items()) if not ok]
    if failed:
        raise RuntimeError("\n".join(failed))
    timing = dict(outcome[0][1])  # wall time on rank 0; CPU time of the busiest rank (the pipeline waits for it)
    timing["cpu_ms_per_step"] = max(payload["cpu_ms_per_step"] for _, payload in outcome.values())
    return timing


def run(cfg: Config, repeats: int = 1) -> dict[str, Any]:
    """Alternate engine and Trainer ``repeats`` times; compare their best and their median throughputs.

    The best of several runs is the steadier figure on a shared machine: other work only ever adds time. The CPU time
    per step of the busiest rank is compared too (``cpu_ratio``: engine over Trainer): on a machine that other jobs
    keep busy, wall times vary by several times from run to run, CPU times much less.
    """
    engine, trainer = [], []
    sides = ("plain_loop", "plain_trainer") if cfg.one_device else ("engine", "trainer")
    one = Config(**{**asdict(cfg), "ranks": 1}) if cfg.one_device else cfg
    for _ in range(repeats):
        engine.append(_launch(sides[0], one))
        trainer.append(_launch(sides[1], one))
    result: dict[str, Any] = {"config": asdict(cfg), "repeats": repeats, "engine": engine, "trainer": trainer}
    for name, pick in (("best", max), ("median", statistics.median)):
        engine_rate = pick(r["tokens_per_s"] for r in engine)
        trainer_rate = pick(r["tokens_per_s"] for r in trainer)
        low = min if pick is max else pick  # the best CPU time is the least
        engine_cpu = low(r["cpu_ms_per_step"] for r in engine)
        trainer_cpu = low(r["cpu_ms_per_step"] for r in trainer)
        result[name] = {"engine_tokens_per_s": engine_rate, "trainer_tokens_per_s": trainer_rate,
                        "ratio": trainer_rate / engine_rate,
                        "overhead_ms_per_step": 1e3 * _tokens_per_step(cfg) * (1 / trainer_rate - 1 / engine_rate),
                        "engine_cpu_ms_per_step": engine_cpu, "trainer_cpu_ms_per_step": trainer_cpu,
                        "cpu_ratio": engine_cpu / trainer_cpu}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Config()
    parser.add_argument("--ranks", type=int, default=defaults.ranks)
    parser.add_argument("--schedule", default=defaults.schedule)
    parser.add_argument("--microbatches", "-m", type=int, default=defaults.num_microbatches)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--layers", type=int, default=defaults.layers, help="transformer blocks")
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--progress-bar", action="store_true", help="give the Trainer its progress bar")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times")
    parser.add_argument("--one-device", action="store_true",
                        help="the reference: a plain Trainer on one process against a hand-written loop")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")
    args = parser.parse_args(argv)
    cfg = Config(ranks=args.ranks, schedule=args.schedule, num_microbatches=args.microbatches, steps=args.steps,
                 warmup=args.warmup, width=args.width, layers=args.layers, block_size=args.block_size,
                 batch_size=args.batch_size, progress_bar=args.progress_bar, one_device=args.one_device)
    result = run(cfg, args.repeats)
    timed = cfg.steps - cfg.warmup
    if cfg.one_device:
        print(f"one process, no pipeline (engine loop = the loop by hand, Trainer.fit = a plain Trainer), GPT width "
              f"{cfg.width} x {cfg.layers} blocks, {timed} timed steps, {args.repeats} run(s) per side:")
    else:
        print(f"{cfg.ranks} ranks, {cfg.schedule}, {cfg.num_microbatches} micro-batches, GPT width {cfg.width} x "
              f"{cfg.layers} blocks, {cfg.batch_size}x{cfg.block_size} tokens/step, {timed} timed steps, "
              f"{args.repeats} run(s) per side:")
    for name in ("best", "median"):
        row = result[name]
        print(f"  {name:6s}: engine loop {row['engine_tokens_per_s']:8,.0f} tokens/s, Trainer.fit "
              f"{row['trainer_tokens_per_s']:8,.0f} tokens/s, ratio {row['ratio']:.3f}, "
              f"Lightning adds {row['overhead_ms_per_step']:+.1f} ms/step; CPU per step of the busiest rank: engine "
              f"{row['engine_cpu_ms_per_step']:.2f} ms, Trainer {row['trainer_cpu_ms_per_step']:.2f} ms, ratio "
              f"{row['cpu_ratio']:.3f}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
