"""The tests' way to run a function on N gloo ranks: :mod:`lightning_pipe.launch`."""

from lightning_pipe import launch
from lightning_pipe.launch import RankError, free_port, run_ranks

__all__ = ["RankError", "free_port", "run_ranks"]

# Many tests run a Trainer on their ranks: let the fork server import Lightning once for all of them.
launch.PRELOAD[:] = [*launch.PRELOAD, "lightning.pytorch", "lightning_pipe.strategy"]
