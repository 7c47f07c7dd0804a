"""Lightning's script launcher, whose watch over the ranks it started gives rank 0 time to end with a failed rank's error.

Lightning's launcher (``python train.py`` with ``devices=2``) checks every 5 s whether a rank it started has ended,
and when one ended with an error it kills every rank at once, rank 0 too, with SIGKILL: under DDP a rank left in a
collective would hang. A pipeline's ranks hear of another's failure through the job's store and end with its error
themselves (:mod:`lightning_pipe.engine.notices`), but rank 0 busy in its own code for those seconds was killed first:
exit code 137 and no error, no ``except`` around ``fit`` and no ``OnExceptionCheckpoint`` on the process the shell sees
(found by review). Here, once rank 0 is connected to the others (before, nothing would tell it), the kill waits until
it had the time its own waits take to give up (``grace``: the strategy's ``wait_timeout`` and a margin); a rank 0
that ended by then was never killed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from typing_extensions import override

__all__ = ["PatientLauncher"]

MARGIN = 30.0  # seconds beyond the waits' timeout: rank 0's report of the failure, its checkpoint on exception


class PatientLauncher(_SubprocessScriptLauncher):
    """:class:`_SubprocessScriptLauncher` whose child-process observer waits ``grace`` seconds after a rank's failure
    before it kills the ranks still running."""

    def __init__(self, cluster_environment: Any, num_processes: int, num_nodes: int, grace: float) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.grace = grace

    @override
    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            PatientObserver(os.getpid(), self.procs, self.grace).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class PatientObserver(_ChildProcessObserver):
    """Lightning's observer, killing all only ``grace`` seconds after it first saw a rank's failure."""

    def __init__(self, main_pid: int, child_processes: list[subprocess.Popen], grace: float,
                 sleep_period: float = 5) -> None:
        super().__init__(main_pid, child_processes, sleep_period=sleep_period)  # type: ignore[arg-type]
        self.grace = grace
        self.failed_at: float | None = None

    @override
    def _run(self) -> bool:
        codes = [proc.poll() for proc in self._child_processes]
        if all(code == 0 for code in codes):
            return True
        if not any(codes):  # running, or ended well
            return False
        if not dist.is_initialized():  # rank 0 may wait to connect to the failed rank: nothing tells it
            return super()._run()
        if self.failed_at is None:
            self.failed_at = time.monotonic()
        if time.monotonic() - self.failed_at < self.grace:
            return False
        return super()._run()
