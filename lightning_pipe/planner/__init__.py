"""The planner: predicts (and later profiles and partitions) pipelines without running them."""

from lightning_pipe.planner.simulate import Link, Prediction, StageCost, predict

__all__ = ["Link", "Prediction", "StageCost", "predict"]
