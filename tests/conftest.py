"""Every test: Lightning's seeding variables as they were before it (a test's seed_everything ends with it)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# What L.seed_everything writes to os.environ and never takes back.
SEEDING_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")


@pytest.fixture(autouse=True)
def _seeding_variables_restored() -> Iterator[None]:
    """Put back ``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS`` after each test.

    A test that calls ``seed_everything`` in the pytest process (a one-device reference) leaves them set, and every
    later test's ranks inherit them: torchrun nodes through ``os.environ``, ``run_ranks`` ranks if the fork server
    starts after it. Lightning seeds the ``DistributedSampler`` it gives replicas from ``PL_GLOBAL_SEED``, so the
    replicas of a later test then read another shuffle than its one-device reference: the two-node test failed after
    tests/test_strategy_citizen.py (seed 77) with weights off by ~1e-4, which looked like a race in the averager.
    """
    saved = {name: os.environ.get(name) for name in SEEDING_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
