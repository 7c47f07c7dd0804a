"""Random numbers of a step's own code: the same on every rank for the same micro-batch, from derived seeds.

Under a pipeline the code of ``training_step`` around the pipelined layers runs twice per micro-batch: on the first
stage up to the layers (to capture their input) and on the last stage around them (loss, logs). A step that draws
random numbers there (diffusion noise before the model and a loss against it, an MLM mask, a random crop) would draw
different numbers on the two ranks, and the last stage would train against noise or masks the first stage never
used: silently, since nothing fails. So each micro-batch's step code runs with torch's generators *forked* to a seed
derived from an agreed base seed, the step's place in the run and the micro-batch's index:

- identical on every rank, whatever other code (layers with dropout, a sampler) drew before;
- a function of the position in the run only, so a resumed fit draws what the uninterrupted one drew;
- forked, not advanced: after the step code the global generators are exactly as before, so the layers inside the
  stages, the data loading and everything else see the stream they would have seen without it.

Only torch's generators are forked (the CPU one and the step device's): saving and restoring Python's ``random``
(~0.1 ms) and NumPy's global state (~0.4 ms) per micro-batch would cost more than the step of a small model. Step
code that draws from those must use a generator it seeds itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_pipe.capture.generators import HeldGenerators, same_state
from lightning_pipe.engine.rng import forked

__all__ = ["derive_seed", "forked_random", "fresh_seed", "name_digest", "Stream", "global_random_states", "set_global_random_states",
           "same_random_states", "same_state", "host_random_kept", "random_states_digest"]

_MASK64 = (1 << 64) - 1


class Stream:
    """Which random stream a derived seed belongs to (the first part of every derived seed)."""

    TRAIN = 1
    VALIDATE = 2
    TEST = 3
    PREDICT = 4
    SANITY_CHECK = 5
    BATCH_TRANSFER = 6  # the module's on_after_batch_transfer / transfer_batch_to_device
    DATA_ORDER = 10  # samplers
    DATA_WORKERS = 11  # DataLoader worker seeds
    DATA_LOADING = 12  # the dataset and collate function, loading in the main process


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (any sign or size): the same in every process, different for different parts."""
    x = 0x2545F4914F6CDD1D
    for part in parts:
        x = _splitmix64(x ^ (int(part) & _MASK64))
    return x >> 1


def name_digest(name: str) -> int:
    """A 64-bit integer of ``name`` (a module's or tensor's), the same in every process, for :func:`derive_seed`."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def fresh_seed() -> int:
    """A new random 63-bit seed that draws nothing from any generator (for a run without ``seed_everything``)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


forked_random = forked  # torch's CPU (and the device's CUDA) generator seeded inside, restored after


@contextmanager
def host_random_kept(module: torch.nn.Module | None = None) -> Iterator[HeldGenerators | None]:
    """Python's ``random`` and NumPy's global state, and the generators ``module`` keeps (``self.gen``, yielded: which
    drew), as they were after the code inside: for the step code only the last stage runs once more (the whole-batch
    checks), so that its draws do not put that rank's streams ahead of the first stage's, which a step drawing from
    them before the model (a NumPy mixup, a diffusion model's noise from its own generator) reads alike."""
    python = random.getstate()
    numpy = sys.modules.get("numpy")
    state = numpy.random.get_state() if numpy is not None else None
    held = HeldGenerators(module) if module is not None else None
    try:
        yield held
    finally:
        random.setstate(python)
        if state is not None:
            numpy.random.set_state(state)
        if held is not None:
            held.restore()


def global_random_states() -> dict[str, Any]:
    """This process's global generators' states (torch CPU and CUDA, Python's ``random``, NumPy's) in types that
    ``torch.load(weights_only=True)`` reads (NumPy's key array as a tensor)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:
        return states
    name, keys, position, has_gauss, cached = numpy.random.get_state()
    states["numpy"] = (str(name), torch.from_numpy(keys.astype("int64")), int(position), int(has_gauss), float(cached))
    return states


def random_states_digest() -> str:
    """A hash of this process's global generators' states (torch's CPU one, Python's, NumPy's), to compare ranks'."""
    states = global_random_states()
    digest = hashlib.sha256(states["torch"].numpy().tobytes())
    digest.update(repr(states["python"]).encode())
    if "numpy" in states:
        name, keys, *rest = states["numpy"]
        digest.update(keys.numpy().tobytes() + repr((name, *rest)).encode())
    return digest.hexdigest()


def same_random_states(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """Whether two of :func:`global_random_states`' results are the same (no generator drew in between)."""
    return same_state(first, second)


def set_global_random_states(states: dict[str, Any]) -> None:
    """Give this process's global generators the states :func:`global_random_states` took."""
    torch.set_rng_state(states["torch"])
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        import numpy

        name, keys, position, has_gauss, cached = states["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, cached))
