"""Hydra configuration groups of ``python -m lightning_pipe.train`` (a package so ``pkg://`` can find them)."""
