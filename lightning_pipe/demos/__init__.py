"""Example models and data that ship with the package, so `python -m lightning_pipe.train` runs offline."""

from lightning_pipe.demos.digits import DigitsClassifier, DigitsDataModule
from lightning_pipe.demos.gpt import GPT
from lightning_pipe.demos.stdlib_text import StdlibTextDataModule

__all__ = ["GPT", "StdlibTextDataModule", "DigitsClassifier", "DigitsDataModule"]
