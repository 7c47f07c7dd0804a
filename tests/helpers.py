"""The tests' way to run a function on N gloo ranks: :mod:`lightning_pipe.launch`."""

from lightning_pipe.launch import RankError, free_port, run_ranks

__all__ = ["RankError", "free_port", "run_ranks"]
