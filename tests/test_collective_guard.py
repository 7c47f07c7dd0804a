"""The guard that refuses torch.distributed's collectives over every process where no other rank would come
(:mod:`lightning_pipe.strategy.collective_guard`): a subgroup's call goes through, also where guards nest (an
optimizer's step around the step's code); one over every process from code of one's own is refused with its place;
the functions are torch's again afterwards."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_ranks

pytestmark = pytest.mark.timeout(120)


def _guarded(rank: int, world_size: int) -> list[str]:
    import torch.distributed as dist

    from lightning_pipe.strategy.collective_guard import collectives_refused

    sub = dist.new_group([0])
    seen: list[str] = []

    def never(name: str, caller: str) -> None:
        return None

    def always(name: str, caller: str) -> str:
        return f"refused {name} at {caller.rpartition('/')[2]}"

    value = torch.ones(1)
    with collectives_refused(never), collectives_refused(always):  # nested (found by review: the subgroup's call
        # was read through the outer stand-in's signature, as one over every process)
        dist.all_reduce(value, group=sub)
        seen.append("subgroup allowed")
        try:
            dist.all_reduce(value)
        except RuntimeError as error:
            seen.append(str(error))
    seen.append(f"{dist.all_reduce.__module__}.{dist.all_reduce.__name__}")
    return seen


def test_a_subgroups_collective_passes_nested_guards_and_one_over_every_process_is_refused() -> None:
    seen = run_ranks(_guarded, 1)[0]
    assert seen[0] == "subgroup allowed" and seen[1].startswith("refused all_reduce at test_collective_guard.py:")
    assert seen[2] == "torch.distributed.distributed_c10d.all_reduce", seen
