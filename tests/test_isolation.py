"""Tests leave no seeding behind (tests/conftest.py): a later test's ranks would inherit it."""

from __future__ import annotations

import os

import lightning as L

SEED_BEFORE = os.environ.get("PL_GLOBAL_SEED")  # at collection, before any test ran


def test_a_test_that_seeds_everything() -> None:
    L.seed_everything(77, verbose=False)
    assert os.environ["PL_GLOBAL_SEED"] == "77"


def test_the_next_test_finds_the_seed_as_before() -> None:
    """Runs after the one above (file order): its seed_everything ended with it."""
    assert os.environ.get("PL_GLOBAL_SEED") == SEED_BEFORE
