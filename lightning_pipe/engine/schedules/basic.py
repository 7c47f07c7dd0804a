"""The two classic schedules, GPipe's fill-drain and PipeDream-flush's 1F1B, and the forward-only one of evaluation.

Clock cycles of ``gpipe`` with 3 stages and 4 micro-batches (forward and backward drawn as one cycle each)::

    rank 0 | 0F0 0F1 0F2 0F3                         0B0 0B1 0B2 0B3
    rank 1 |     1F0 1F1 1F2 1F3             1B0 1B1 1B2 1B3
    rank 2 |         2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3

and of ``1f1b``: rank ``s`` runs ``stages - s - 1`` warm-up forwards, then alternates one forward and one
backward, then drains the backwards still owed, so it never holds more than ``stages - s`` micro-batches::

    rank 0 | 0F0 0F1 0F2             0B0 0F3     0B1     0B2     0B3
    rank 1 |     1F0 1F1     1B0 1F2     1B1 1F3     1B2     1B3
    rank 2 |         2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Action, Op, Schedule, add_communication, check_sizes

__all__ = ["gpipe", "one_f_one_b", "forward_only"]


def gpipe(num_stages: int, num_microbatches: int, stage_to_rank: Sequence[int] | None = None) -> Schedule:
    """GPipe's fill-drain: every forward of the batch, then every backward. Holds all m micro-batches.

    ``stage_to_rank`` places several stages on one rank (default: stage ``s`` on rank ``s``); a rank then runs
    its stages' forwards in stage order and their backwards in reverse order. Any ``m`` works for any
    placement, so this is also the fallback for a last partial batch that a schedule cannot split.
    """
    check_sizes("gpipe", num_stages, num_microbatches)
    owners = list(stage_to_rank) if stage_to_rank is not None else list(range(num_stages))
    compute: list[list[Action]] = [[] for _ in range(max(owners) + 1)]
    for stage in range(num_stages):
        compute[owners[stage]].extend(Action(stage, Op.FORWARD, mb) for mb in range(num_microbatches))
    for stage in reversed(range(num_stages)):
        compute[owners[stage]].extend(Action(stage, Op.BACKWARD, mb) for mb in range(num_microbatches))
    return add_communication("gpipe", compute, owners, num_microbatches)


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """PipeDream-Flush (1F1B): same bubble as GPipe, but stage ``s`` holds at most ``p - s`` micro-batches."""
    check_sizes("1f1b", num_stages, num_microbatches)
    compute = []
    for stage in range(num_stages):
        num_warmup = min(num_stages - stage - 1, num_microbatches)
        num_steady = num_microbatches - num_warmup
        actions = []
        # Warm-up: forwards only, filling the pipeline below this stage.
        for mb in range(num_warmup):
            actions.append(Action(stage, Op.FORWARD, mb))
        # Steady state: one forward, then the backward of the oldest micro-batch in flight.
        for i in range(num_steady):
            actions.append(Action(stage, Op.FORWARD, num_warmup + i))
            actions.append(Action(stage, Op.BACKWARD, i))
        # Cool-down: the backwards still owed.
        for mb in range(num_steady, num_microbatches):
            actions.append(Action(stage, Op.BACKWARD, mb))
        compute.append(actions)
    return add_communication("1f1b", compute, range(num_stages), num_microbatches)


def forward_only(
    num_stages: int, num_microbatches: int, stage_to_rank: Sequence[int] | None = None
) -> Schedule:
    """Forwards only, stage by stage and micro-batch by micro-batch: evaluation and prediction.

    ``stage_to_rank`` places several stages on one rank (default: stage ``s`` on rank ``s``).
    """
    check_sizes("forward_only", num_stages, num_microbatches)
    owners = list(stage_to_rank) if stage_to_rank is not None else list(range(num_stages))
    compute: list[list[Action]] = [[] for _ in range(max(owners) + 1)]
    for stage in range(num_stages):
        compute[owners[stage]].extend(Action(stage, Op.FORWARD, mb) for mb in range(num_microbatches))
    return add_communication("forward_only", compute, owners, num_microbatches)
