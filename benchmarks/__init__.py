"""Benchmarks of lightning_pipe; run each from the repository root as ``python -m benchmarks.<name>``."""
