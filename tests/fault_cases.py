"""Faults injected into a 4-rank ``Trainer`` run, and a launcher that watches every rank as a real job would.

Each rank is its own process (a fork server's child, as :mod:`lightning_pipe.engine.launch`), started the way
torchrun starts ranks (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` in its environment; Lightning builds the
process group, with its default 30-minute timeout). Unlike ``run_ranks``, nothing kills the survivors when one rank
dies: :func:`launch` records each rank's exit time, its error, and its output (stdout and stderr go to
``<folder>/rank<r>.log``), so a test sees how the job itself ends. Used by ``tests/test_faults.py`` and
``benchmarks/faults.py``.

Faults (``fault=``), all on ``victim`` at batch ``AT_BATCH`` (the third step) unless said:

- ``kill-forward`` / ``kill-backward``: SIGKILL inside a layer's forward / a gradient hook of the layer's output;
- ``kill-receive``: SIGKILL once the rank's main thread waits for a message (a receive is posted);
- ``kill-checkpoint``: SIGKILL in ``on_save_checkpoint`` of the second checkpoint (one every 2 steps);
- ``stop``: SIGSTOP in a layer's forward (the rank freezes; the parent SIGKILLs it when the others have ended);
- ``loop``: an endless loop in a layer's forward hook (user code);
- ``load-loop``: an endless loop in the dataset's ``__getitem__`` (a read that never returns, between steps);
- ``nan``: a layer's output becomes NaN on ``victim`` (with ``detect_anomaly=True``);
- ``bad-shape``: the last stage's targets of one batch have a wrong shape (only the last stage sees them);
- ``none``: no fault (a reference run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_pipe.engine import launch

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["RankOutcome", "launch_fit", "FAULTS", "AT_BATCH"]

AT_BATCH = 2
FAULTS = ("kill-forward", "kill-backward", "kill-receive", "kill-checkpoint", "stop", "loop", "load-loop",
          "worker-exit", "nan", "bad-shape", "none")
BATCHES, BATCH_SIZE, WIDTH = 6, 8, 16


@dataclass
class RankOutcome:
    rank: int
    exit_s: float | None  # seconds from the fault to this rank's end (None: it did not end before the timeout)
    exitcode: int | None
    error: str | None  # the rank's exception (type, message, traceback), None if it finished
    log: str  # what it printed


def _fit(rank: int, fault: str, victim: int, folder: str, options: dict[str, Any]) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_pipe  # noqa: F401
    from lightning_pipe import PipelineStrategy
    from lightning_pipe.engine.watchdog import activity
    from tests.lightning_models import Regressor, regression_data

    mark = Path(folder) / "fault_at"

    def fault_now() -> None:
        mark.write_text(repr(time.time()))
        if fault == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os.kill(os.getpid(), signal.SIGKILL)

    class Faulty(Regressor):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
            self.armed = self.global_rank == victim and self.global_step == AT_BATCH
            if self.armed and fault == "kill-receive":
                threading.Thread(target=_kill_when_waiting, args=(activity, fault_now), daemon=True).start()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if fault == "bad-shape" and self.global_step == AT_BATCH:
                if not mark.exists():
                    mark.write_text(repr(time.time()))
                y = y[:, :-1]  # the last stage's targets only: the loss rejects them
            return super().training_step((x, y), batch_idx)

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            if fault == "kill-checkpoint" and self.global_rank == victim and self.global_step == 2 * AT_BATCH:
                fault_now()

    model = Faulty()
    model.armed, model.folder = False, folder
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, output: _hook(model, fault, output, fault_now))
    strategy = PipelineStrategy(num_microbatches=4, wait_timeout=options.get("wait_timeout", 15.0),
                                detect_anomaly=fault == "nan")
    callbacks = []
    if fault in ("kill-checkpoint", "none") or options.get("checkpoints"):
        callbacks.append(ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_last=True, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
                        max_epochs=1, default_root_dir=folder)
    data = regression_data(BATCHES, BATCH_SIZE, WIDTH)
    if fault == "load-loop" and rank == victim:
        data = torch.utils.data.DataLoader(_Hanging(data.dataset, mark), batch_size=BATCH_SIZE)
    if fault == "worker-exit" and rank == victim:
        data = torch.utils.data.DataLoader(_Exiting(data.dataset, mark), batch_size=BATCH_SIZE, num_workers=1)
    trainer.fit(model, data, ckpt_path=options.get("ckpt_path"))


class _Hanging(torch.utils.data.Dataset):
    """``data`` whose first row of batch ``AT_BATCH`` is never read: its ``__getitem__`` loops."""

    def __init__(self, data: Any, mark: Path) -> None:
        self.data, self.mark = data, mark

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        if index == AT_BATCH * BATCH_SIZE:
            self.mark.write_text(repr(time.time()))
            while True:
                time.sleep(0.01)
        return self.data[index]


class _Exiting(_Hanging):
    """``data`` whose DataLoader worker dies (``os._exit``, as the out-of-memory killer ends one) as it reads the first
    row of batch ``AT_BATCH``."""

    def __getitem__(self, index: int) -> Any:
        if index == AT_BATCH * BATCH_SIZE:
            self.mark.write_text(repr(time.time()))
            os._exit(1)
        return self.data[index]


def _hook(model: Any, fault: str, output: torch.Tensor, fault_now: Any) -> torch.Tensor | None:
    if not model.armed:
        return None
    if fault in ("kill-forward", "stop"):
        fault_now()
    if fault == "loop":  # user code that never returns
        Path(model.folder, "fault_at").write_text(repr(time.time()))
        while True:
            time.sleep(0.01)
    if fault == "kill-backward" and output.requires_grad:
        output.register_hook(lambda grad: fault_now())
    if fault == "nan":
        Path(model.folder, "fault_at").write_text(repr(time.time()))
        model.armed = False  # one micro-batch: the first forward of this rank's stage at that step
        return output * float("nan")
    return None


def _kill_when_waiting(activity: Any, fault_now: Any) -> None:
    """SIGKILL this rank as soon as its main thread waits for a peer (a receive posted, in comm's wait)."""
    while True:
        what, waits, _ = activity.state
        if waits and hasattr(what, "sends") and not what.sends:  # comm's wait for received messages
            fault_now()
        time.sleep(0.001)


def _rank_main(rank: int, world_size: int, port: int, fault: str, victim: int, folder: str,
               options: dict[str, Any]) -> None:
    """One rank: output to ``rank<r>.log``, its pid to ``rank<r>.pid``, its error (if any) to ``rank<r>.error``."""
    log = os.open(os.path.join(folder, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "NODE_RANK": "0", "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))
    try:
        _fit(rank, fault, victim, folder, options)
    except BaseException as error:
        Path(folder, f"rank{rank}.error").write_text(f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
        raise


class _Exec:
    """A rank as a fresh interpreter (``python -m tests.fault_cases``): exits as a real job's rank does."""

    def __init__(self, *args: Any) -> None:
        command = [sys.executable, "-m", "tests.fault_cases", json.dumps(args)]
        env = {**os.environ, "OMP_WAIT_POLICY": "passive",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.pid = self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        self.process.kill()

    def join(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def is_alive(self) -> bool:
        return self.process.poll() is None


def launch_fit(fault: str, folder: str | os.PathLike[str], victim: int = 2, world_size: int = 4,
               timeout: float = 120.0, fresh: bool = False, **options: Any) -> list[RankOutcome]:
    """Run the 4-rank fit with ``fault`` on ``victim``; each rank's outcome, exit times counted from the fault (from
    the start for ``none``). A rank still running after ``timeout`` seconds is killed and has ``exit_s=None``.

    ``fresh``: each rank a fresh interpreter, which exits as in a real job (interpreter shutdown included); else a
    fork server's child with Lightning already imported (seconds faster per rank)."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    for stale in Path(folder).glob("rank*.*"):
        stale.unlink()
    Path(folder, "fault_at").unlink(missing_ok=True)
    ctx = None if fresh else launch._context()
    with launch.reserved_port() as port:
        args = (world_size, port, fault, victim, folder, options)
        processes = [_Exec(rank, *args) if fresh else ctx.Process(target=_rank_main, args=(rank, *args), daemon=True)
                     for rank in range(world_size)]
        start = time.time()
        for process in processes:
            if not fresh:
                process.start()
        ended: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while len(ended) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
            for rank, process in enumerate(processes):
                if rank not in ended and process.exitcode is not None:
                    ended[rank] = time.time()
            if fault == "stop" and len(ended) == world_size - 1 and victim not in ended:
                os.kill(processes[victim].pid, signal.SIGKILL)  # the others have ended: the stopped one is ours
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.join(timeout=5)
    mark = Path(folder) / "fault_at"
    origin = float(mark.read_text()) if mark.exists() else start
    outcomes = []
    for rank, process in enumerate(processes):
        log, error = Path(folder, f"rank{rank}.log"), Path(folder, f"rank{rank}.error")
        outcomes.append(RankOutcome(rank, round(ended[rank] - origin, 1) if rank in ended else None,
                                    process.exitcode, error.read_text() if error.exists() else None,
                                    log.read_text(errors="replace") if log.exists() else ""))
    return outcomes


if __name__ == "__main__":
    _rank_main(*json.loads(sys.argv[1]))
