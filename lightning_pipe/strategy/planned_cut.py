"""How PipelineStrategy plans its cut under a Trainer: the first batch of the running stage's dataloader, and a plan
made on global rank 0 that every rank receives (or rank 0's error, raised everywhere).

The batch is fetched through Lightning's loops (``loop._data_source`` and ``_request_dataloader``, private pieces
that the strategy's tests pin down); :mod:`lightning_pipe.planner.cut_plan` does the profiling and planning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_pipe.planner.cut_plan import CutPlan

__all__ = ["first_batch", "plan_on_rank_zero"]


def first_batch(trainer: Trainer, how: str) -> tuple[Any, str]:
    """The first batch of the running stage's dataloader (on the host) and the step that takes it; ``how`` ends the
    error raised when there is none."""
    loops = {TrainerFn.FITTING: (trainer.fit_loop, "train_dataloader", "training_step"),
             TrainerFn.VALIDATING: (trainer.validate_loop, "val_dataloader", "validation_step"),
             TrainerFn.TESTING: (trainer.test_loop, "test_dataloader", "test_step"),
             TrainerFn.PREDICTING: (trainer.predict_loop, "predict_dataloader", "predict_step")}
    loop, hook, step = loops[trainer.state.fn]
    source = loop._data_source
    if not source.is_defined():
        raise ValueError(f"there is no {hook}: {how.format(hook=hook)}")
    mode = "max_size_cycle" if trainer.state.fn == TrainerFn.FITTING else "sequential"
    loaders = _request_dataloader(source)
    _hand_over(source, loaders)
    # the loop's own wrapping: the user's CombinedLoader (with its mode) as it is, other loaders in the loop's mode
    combined = loaders if isinstance(loaders, CombinedLoader) else CombinedLoader(loaders, mode)
    generators = _generators(combined.iterables)  # a shuffle's own generator draws an order as the loader starts:
    states = [generator.get_state() for generator in generators]  # put back, so the fit's first epoch is one device's
    drawn_from = torch.get_rng_state()  # (the loader's base seed: one device's iterations draw theirs from it)
    try:
        batch = next(iter(combined))[0]
    except StopIteration:
        raise ValueError(f"{hook} is empty: {how.format(hook=hook)}. Its first batch is read at set-up, before "
                         f"any hook of the run (data that on_train_epoch_start makes is not there yet: make it before "
                         f"fit; rollouts gathered with the model in a hook cannot be, since the model runs only in "
                         f"the steps)") from None
    finally:
        if combined is loaders:  # the user's: left as it came (no iterator, no workers)
            combined.reset()
        for generator, state in zip(generators, states):
            generator.set_state(state)
        torch.set_rng_state(drawn_from)
    return batch, step


def _hand_over(source: Any, loaders: Any) -> None:
    """Have the loop's next request of ``source`` (its ``setup_data``, as the stage runs) take ``loaders``: a hook of
    the module's or the DataModule's was called once more than on one device, and one with effects (a curriculum
    chosen by how many loaders it built, a split drawn per call, an expensive build) then gave the fit other data
    (found by review: 25 steps where one device trained 20, silently). A loader given to the Trainer is the same
    object either way; one handed over for another instance (a fit that failed before its loop asked) is not taken."""
    if not source.is_module():
        return
    instance = source.instance

    def once() -> Any:
        vars(source).pop("dataloader", None)  # the class's own from now on (reload_dataloaders_every_n_epochs)
        return loaders if source.instance is instance else source.dataloader()

    source.dataloader = once


def _generators(loaders: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` s of ``loaders`` (one, or a list or dict of them) and of their samplers and batch
    samplers (``DataLoader(generator=...)``, ``RandomSampler(generator=...)``), each once."""
    found: dict[int, torch.Generator] = {}
    items = loaders.values() if isinstance(loaders, dict) else loaders if isinstance(loaders, (list, tuple)) \
        else [loaders]
    for loader in items:
        for holder in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                       getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            generator = getattr(holder, "generator", None)
            if isinstance(generator, torch.Generator):
                found.setdefault(id(generator), generator)
    return list(found.values())


def plan_on_rank_zero(strategy: Strategy, make: Callable[[], CutPlan]) -> CutPlan:
    """``make()`` on global rank 0, its plan broadcast to every rank; its error raised on every rank (the others
    would otherwise wait for a plan forever)."""
    outcome: dict[str, Any] | None = None  # plain data: the strategy's broadcast sends JSON, never pickles
    failure: Exception | None = None
    if strategy.is_global_zero:
        try:
            plan = make()
            rank_zero_info(f"PipelineStrategy planned the cut:\n{plan.report}")
            outcome = {"plan": asdict(plan)}
        except Exception as error:  # noqa: BLE001 - the other ranks wait for the plan: tell them why there is none
            failure = error
            outcome = {"error": [isinstance(error, ValueError), f"{type(error).__name__}: {error}"]}
    shared = strategy.broadcast(outcome)
    if failure is not None:
        raise failure
    if "error" in shared:
        value_error, message = shared["error"]
        raise (ValueError if value_error else RuntimeError)(f"planning the cut on global rank 0 failed: {message}")
    return CutPlan(**shared["plan"])
