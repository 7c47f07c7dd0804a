"""Random numbers of a stage's layers (dropout): each forward draws from a seed derived from the step, the stage and
the micro-batch, never from a stream that carries state from one step to the next.

One device runs every layer on one stream, so the dropout masks of layer 1 and layer 9 differ. A pipeline runs them on
different ranks; if every rank was seeded alike (``seed_everything``) and every stage drew from its rank's default
generator, stages with the same shapes would draw the same masks, micro-batch after micro-batch. Megatron-LM offsets the
seed by the pipeline rank for that reason. Here each forward of a stage runs with the process's CPU generator (and its
CUDA device's) *forked* to :func:`forward_seed` of the step's seed, the stage's index and the micro-batch's index in its
batch, and the process's own states come back afterwards. So:

- stages, micro-batches and steps draw different masks, and the same (step seed, stage, micro-batch) always draws the
  same ones, whichever rank runs the stage and whatever ran before it;
- nothing is carried from step to step: a run resumed from a checkpoint draws what the uninterrupted run drew, given
  the same step seeds (the strategy derives them from the position in the run), with no generator state saved;
- what the code around the stages draws (a step's ``training_step`` on the first and last stage) is unaffected by how
  many numbers the layers drew: the process's own generators never see the layers' draws;
- re-materialization replays the masks: ``torch.utils.checkpoint`` records the generator state at the start of the
  forward, which is the forked one, and restores it for the recomputation.

The masks are not one device's masks (those come from one stream in layer order), only drawn the same way: see the
README's "what is exact". A layout with other stages (a resumed run on other devices) draws other masks.
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager

import torch

__all__ = ["forward_seed", "step_seed", "forked"]


def _hashed(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(str(int(p)) if not isinstance(p, str) else p for p in parts).encode(),
                             digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1  # < 2**63: every generator takes it


def forward_seed(step_seed: int, stage_index: int, microbatch: int) -> int:
    """The seed of stage ``stage_index``'s forward of micro-batch ``microbatch`` (its index in the batch) in the step
    seeded ``step_seed``: a hash of all three, so no two triples share one (an offset such as Megatron's
    ``seed + 100 * rank`` makes seed 100's stage 0 equal seed 0's stage 1)."""
    text = f"lightning_pipe.forward:{int(step_seed)}:{int(stage_index)}:{int(microbatch)}"  # as _hashed joins them
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def step_seed(base_seed: int, step: int) -> int:
    """The seed of the ``step``-th step of a pipeline whose caller gives no seed of its own (counted per pipeline)."""
    return _hashed("lightning_pipe.step", base_seed, step)


def forked(seed: int, device: torch.device | None = None) -> AbstractContextManager[None]:
    """Inside: torch's CPU generator, and ``device``'s if it is a CUDA device, seeded with ``seed``; afterwards both are
    back in the state they had before (``torch.random.fork_rng`` for one device, in a few microseconds: a forward of a
    pipeline runs in one)."""
    return _Forked(seed, device)


class _Forked:
    __slots__ = ("seed", "generators", "saved")

    def __init__(self, seed: int, device: torch.device | None) -> None:
        self.seed = seed
        self.generators = [torch.default_generator]
        if device is not None and device.type == "cuda":
            self.generators.append(torch.cuda.default_generators[device.index if device.index is not None
                                                                 else torch.cuda.current_device()])
        self.saved: list[torch.Tensor] = []

    def __enter__(self) -> None:
        self.saved = [generator.get_state() for generator in self.generators]
        for generator in self.generators:
            generator.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        for generator, state in zip(self.generators, self.saved):
            generator.set_state(state)
