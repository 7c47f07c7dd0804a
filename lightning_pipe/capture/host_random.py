"""Random numbers a forward draws outside torch: Python's ``random`` and NumPy's generators.

Export runs the forward once, in Python: a number drawn from those generators becomes a constant of the graph (a
mask drawn with NumPy, as Hugging Face's Wav2Vec2 and HuBERT draw their SpecAugment masks), or picks the branch
every later step takes (``if random.random() < p:``, a LayerDrop written with Python's ``random``). On one device
each step draws anew; the captured graph would reuse one draw forever, silently. torch's own draws (``torch.rand``,
``torch.bernoulli``, dropout) are ops of the graph and draw anew at every run.

:func:`watch_host_random` records such draws while export runs: the calls made through the ``random`` and
``numpy.random`` modules' functions, each with the model's module and line; a draw made another way (a function
imported by name before the capture) shows as a change of the generator's state, without a place; so does a draw from
a generator object the model keeps (``self.rng = np.random.default_rng(0)``, ``random.Random(0)``). Either way the
generators are put back as they were, so a capture leaves the user's random streams alone.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from .errors import listed, locate_frame
from .generators import HeldGenerators

__all__ = ["watch_host_random", "host_random_advice"]

_PYTHON = ("random", "uniform", "randint", "randrange", "choice", "choices", "shuffle", "sample", "gauss",
           "normalvariate", "lognormvariate", "expovariate", "vonmisesvariate", "gammavariate", "betavariate",
           "paretovariate", "weibullvariate", "triangular", "getrandbits", "randbytes", "binomialvariate")
_NUMPY = ("rand", "randn", "random", "random_sample", "ranf", "sample", "randint", "random_integers", "choice",
          "shuffle", "permutation", "uniform", "normal", "standard_normal", "binomial", "beta", "poisson",
          "exponential", "gamma", "multinomial", "bytes")


@contextlib.contextmanager
def watch_host_random(names: dict[int, str], model: Any = None) -> Iterator[list[str]]:
    """Records where the block draws from Python's ``random`` or NumPy's global generator (``names``: the model's
    modules by id, for the place), or from such a generator object that ``model``'s modules keep as an attribute
    (``self.rng = np.random.default_rng(0)``, ``random.Random(0)``), and puts them all back as they were before it."""
    numpy = sys.modules.get("numpy")  # NumPy's generator can only have been drawn from where NumPy is imported
    found: list[str] = []
    owned = HeldGenerators(model) if model is not None else None
    python_state = random.getstate()
    numpy_state = numpy.random.get_state() if numpy is not None else None
    patched: list[tuple[ModuleType, str, Any]] = []
    for module, functions in ((random, _PYTHON), (numpy.random if numpy is not None else None, _NUMPY)):
        for name in functions if module is not None else ():
            original = getattr(module, name, None)
            if callable(original):
                patched.append((module, name, original))
                setattr(module, name, _spy(f"{module.__name__}.{name}", original, names, found))
    try:
        yield found
    finally:
        for module, name, original in patched:
            setattr(module, name, original)
        if owned is not None:
            found.extend(f"{where} (a generator the model keeps)" for where in owned.drawn())
            owned.restore()
        if random.getstate() != python_state:
            random.setstate(python_state)
            if not any(place.startswith("random.") for place in found):
                found.append("Python's random module (a function imported from it by name)")
        if numpy is not None and not _same_numpy_state(numpy, numpy.random.get_state(), numpy_state):
            numpy.random.set_state(numpy_state)
            if not any(place.startswith("numpy.random.") for place in found):
                found.append("NumPy's global generator (a function imported from numpy.random by name)")


def _spy(label: str, original: Any, names: dict[int, str], found: list[str]) -> Any:
    def spy(*args: Any, **kwargs: Any) -> Any:
        place = f"{label} in {locate_frame(sys._getframe(1), names)}"
        if place not in found:
            found.append(place)
        return original(*args, **kwargs)

    return spy


def _same_numpy_state(numpy: ModuleType, state: Any, before: Any) -> bool:
    return all(numpy.array_equal(a, b) if isinstance(a, numpy.ndarray) else a == b for a, b in zip(state, before))


def host_random_advice(model_name: str, found: list[str]) -> str:
    """The error for a forward that drew from Python's or NumPy's generators while captured (``found``)."""
    return (f"{model_name}.forward draws random numbers outside torch: {listed(found)}. A captured graph keeps what "
            f"was drawn while capturing as constants (or the branch it picked), so every step would reuse that one "
            f"draw, where one device draws anew each step. Draw with torch instead (torch.rand, torch.randint, "
            f"torch.bernoulli run in the graph and draw at every step), or draw in training_step and pass the "
            f"values to the model, or keep the layers in one nn.Sequential (not captured). Hugging Face's Wav2Vec2, "
            f"HuBERT and their kin draw SpecAugment masks with NumPy: set mask_time_prob=0 and mask_feature_prob=0 "
            f"(or apply_spec_augment=False)")
