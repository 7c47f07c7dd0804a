"""Whether a step's code before the model lets the rows of a batch meet, told from the first batch.

The first stage runs the step up to the model on each micro-batch alone. Code there that mixes the batch's rows (a
mixup or cutmix pairing each row with ``x.flip(0)``, a normalization by the batch's statistics), or that draws from
a ``torch.Generator`` it makes and seeds at each step (each micro-batch then draws the first numbers again: a
diffusion model's noise repeated), gives the model other inputs than one device would, and nothing fails. On the
first batch of each step the first stage runs that code once more on the whole batch and compares the model's
inputs with the micro-batches' put together (:func:`lightning_pipe.engine.rows.parts_differ`).
Code drawing from the global generators, or from generators the module holds, is left out: its draws are not one
device's either way (forked per micro-batch, as the README says), and the check puts the module's back. So is a step
that changes its batch in place (its code would then run on another batch); the check runs on a copy of the batch.
"""

from __future__ import annotations

import copy
import random
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from lightning_pipe.engine.rows import parts_differ
from lightning_pipe.engine.tree import tree_flatten

__all__ = ["inputs_warning", "batch_versions", "HeldGenerators"]


def inputs_warning(step: str, parts: Sequence[list[Any]], whole: list[Any]) -> str | None:
    """What to tell a user whose ``step`` gives the model other inputs for the whole batch (``whole``: their tensors)
    than for its micro-batches one by one (``parts``); None if they agree or cannot be compared."""
    difference = parts_differ(list(parts), whole)
    if difference is None:
        return None
    return (f"{step}'s code before the model gives it other inputs for the whole batch than for its {len(parts)} "
            f"micro-batches one by one (relative difference {difference:.2g}, on the first batch): it lets the rows "
            f"of the batch meet before the model (a mixup or cutmix with x.flip(0), a normalization by the batch's "
            f"statistics), or draws random numbers from a torch.Generator of its own "
            f"seeded at each step (each micro-batch then draws the same first numbers). A pipeline runs this code on "
            f"each micro-batch alone, so the model sees other inputs than on one device: mix the rows in the "
            f"dataloader's collate_fn (timm's Mixup can run there), and draw from torch's global generator, which the "
            f"pipeline forks per micro-batch")


def batch_versions(batch: Any) -> list[int]:
    """The version counters of ``batch``'s tensors (an inference tensor's is unknown: -1): a step that changes the
    batch in place shows as a change, and its code would then run on another batch than the micro-batches' own."""
    return [-1 if leaf.is_inference() else leaf._version for leaf in tree_flatten(batch)[0]]


class HeldGenerators:
    """The random generators the module keeps in its attributes and its submodules' (a ``torch.Generator``, NumPy's
    ``default_rng()`` or ``RandomState``, a ``random.Random``), as they are now: whether one drew since, and putting
    them back (a check that runs the step's code once more must not move the user's streams)."""

    def __init__(self, module: nn.Module) -> None:
        self.saved = [(generator, _state(generator)) for part in module.modules() for generator in vars(part).values()
                      if _state(generator) is not None]

    def moved(self) -> bool:
        return any(not _same(_state(generator), state) for generator, state in self.saved)

    def restore(self) -> None:
        for generator, state in self.saved:
            if isinstance(generator, torch.Generator):
                generator.set_state(state)
            elif isinstance(generator, random.Random):
                generator.setstate(state)
            elif hasattr(generator, "bit_generator"):  # numpy.random.Generator
                generator.bit_generator.state = state
            else:  # numpy.random.RandomState
                generator.set_state(state)


def _state(value: Any) -> Any:
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, random.Random):
        return value.getstate()
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.random.Generator):
        return copy.deepcopy(value.bit_generator.state)
    if numpy is not None and isinstance(value, numpy.random.RandomState):
        return value.get_state()
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if type(a).__module__ == "numpy":
        numpy = sys.modules["numpy"]
        return bool(numpy.array_equal(a, b))
    return bool(a == b)
