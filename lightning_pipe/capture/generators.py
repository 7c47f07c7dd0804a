"""Random generators a model keeps as attributes (a ``torch.Generator``, NumPy's ``default_rng()`` or ``RandomState``,
a ``random.Random``): their states, whether one drew, and putting them back.

Code that runs the user's code once more than one device would (a capture's trace of the forward, the strategy's
checks that run the step on the whole batch) must leave these streams where they were: a step that draws a diffusion
model's noise from ``self.gen`` would otherwise draw other noise on the rank that ran the check than on the others.
"""

from __future__ import annotations

import copy
import random
import sys
from typing import Any

import torch
import torch.nn as nn

__all__ = ["HeldGenerators", "generator_state", "same_state"]


def generator_state(value: Any) -> Any:
    """``value``'s state if it is a generator of torch, Python or NumPy, else None."""
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, random.Random):
        return value.getstate()
    numpy = sys.modules.get("numpy")  # a NumPy generator can only exist where NumPy is imported
    if numpy is not None and isinstance(value, numpy.random.Generator):
        return copy.deepcopy(value.bit_generator.state)
    if numpy is not None and isinstance(value, numpy.random.RandomState):
        return value.get_state()
    return None


def _set_state(generator: Any, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, random.Random):
        generator.setstate(state)
    elif hasattr(generator, "bit_generator"):  # numpy.random.Generator
        generator.bit_generator.state = state
    else:  # numpy.random.RandomState
        generator.set_state(state)


def same_state(a: Any, b: Any) -> bool:
    """Whether two generator states (tensors, numpy arrays, and dicts, lists and tuples of them) are equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    if type(a).__module__ == "numpy":
        numpy = sys.modules["numpy"]
        return bool(numpy.array_equal(a, b))
    return bool(a == b)


class HeldGenerators:
    """The generators ``module`` and its submodules keep in their attributes, as they are now: which drew since, and
    putting them back."""

    def __init__(self, module: nn.Module) -> None:
        self.saved: list[tuple[str, Any, Any]] = []  # (where, generator, state)
        seen: set[int] = set()
        for path, part in module.named_modules():
            for attribute, value in vars(part).items():
                state = generator_state(value)
                if state is not None and id(value) not in seen:
                    seen.add(id(value))
                    owner = f"module '{path}'" if path else f"the model ({type(module).__name__})"
                    self.saved.append((f"{type(value).__module__}.{type(value).__name__} self.{attribute} of {owner}",
                                       value, state))

    def drawn(self) -> list[str]:
        """Where each generator that drew since is kept."""
        return [where for where, generator, state in self.saved if not same_state(generator_state(generator), state)]

    def moved(self) -> bool:
        return bool(self.drawn())

    def shift(self) -> None:
        """Advance each generator by one draw (restored by :meth:`restore`): code run again then draws other numbers
        from them, as it does from a global generator forked to another seed."""
        for _, generator, _ in self.saved:
            if isinstance(generator, torch.Generator):
                torch.empty(1, device=generator.device).uniform_(generator=generator)
            else:  # random.Random, NumPy's Generator and RandomState
                generator.random()

    def restore(self) -> None:
        for _, generator, state in self.saved:
            _set_state(generator, state)
