"""Pipeline-parallel training for PyTorch Lightning; importing it registers its strategy names with Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_pipe.strategy import PipelineStrategy

__all__ = ["PipelineStrategy"]

PipelineStrategy.register_strategies(StrategyRegistry)
