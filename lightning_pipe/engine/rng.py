"""Each stage's own random stream: its layers (dropout) draw from it, so stages never draw copies of each other's masks.

One device runs every layer on one stream, so the dropout masks of layer 1 and layer 9 differ. A pipeline runs them on
different ranks; if every rank was seeded alike (``seed_everything``) and every stage drew from its rank's default
generator, stages with the same shapes would draw the same masks, micro-batch after micro-batch. Megatron-LM offsets the
seed by the pipeline rank for that reason. Here each stage gets a stream seeded from a base seed that every rank shares
and the stage's index (virtual stages of one rank get streams of their own); the stage's forwards swap it in for the
process's CPU generator and its device's CUDA generator, and swap the process's state back afterwards. So:

- the stream continues across micro-batches and steps (each forward takes up where the last one stopped);
- what the code around the stages draws (a step's ``training_step`` on the first and last stage) is unaffected by how
  many numbers the layers drew: the process's own generators never see the layers' draws;
- re-materialization replays the masks: ``torch.utils.checkpoint`` records the generator state at the start of the
  forward, which is the stage's stream, and restores it for the recomputation.

The masks are not one device's masks (those come from one stream in layer order), only drawn the same way: see the
README's "what is exact".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["StageRandomStream", "stage_seed"]


def stage_seed(base_seed: int, stage_index: int) -> int:
    """The seed of stage ``stage_index``'s stream: a hash of both, so no two (base seed, stage) pairs share one (an offset
    such as Megatron's ``seed + 100 * rank`` makes seed 100's stage 0 equal seed 0's stage 1)."""
    digest = hashlib.blake2b(f"lightning_pipe.stage:{int(base_seed)}:{int(stage_index)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1  # < 2**63: every generator takes it


class StageRandomStream:
    """The generator states of one stage: the CPU generator's, and its CUDA device's when it runs on one.

    ``with stream.active():`` makes them the process's current states; on leaving, the stream keeps where it got to and
    the process gets its own states back.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.seed = int(seed)
        self.device = torch.device(device)
        self._cpu_state = torch.Generator().manual_seed(self.seed).get_state()
        self._cuda_state: torch.Tensor | None = None
        if self.device.type == "cuda":
            self._cuda_state = torch.Generator(device=self.device).manual_seed(self.seed).get_state()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the body on this stream."""
        outer_cpu = torch.get_rng_state()
        torch.set_rng_state(self._cpu_state)
        outer_cuda = None
        if self._cuda_state is not None:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self._cuda_state, self.device)
        try:
            yield
        finally:
            self._cpu_state = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if outer_cuda is not None:
                self._cuda_state = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def get_state(self) -> dict[str, torch.Tensor | None]:
        """Where the stream is (to save with a checkpoint, so a resumed run continues it)."""
        return {"cpu": self._cpu_state.clone(), "cuda": None if self._cuda_state is None else self._cuda_state.clone()}

    def set_state(self, state: dict[str, torch.Tensor | None]) -> None:
        """Continue from a state :meth:`get_state` returned."""
        self._cpu_state = state["cpu"].clone()
        if self._cuda_state is not None and state.get("cuda") is not None:
            self._cuda_state = state["cuda"].clone()
