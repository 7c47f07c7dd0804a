"""A run of the step's code aside from the step: to look at what it gives (the model's inputs for the whole batch,
what a micro-batch's loss is a mean over, which links of a chain it calls), leaving no trace.

Inside :func:`run_aside` nothing the code does stays: no gradients are kept, its ``self.log`` calls and logger calls
are dropped, every metric and buffer is as it was, Python's and NumPy's generators and those the module keeps are put
back, and what it changed on the module is undone (:class:`~.step_effects.StepEffects`). Between two runs inside,
:meth:`Aside.undo` puts the module back as it was, so that each run starts where the step did."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_pipe.capture.generators import HeldGenerators
from lightning_pipe.engine.kept import kept_buffers
from lightning_pipe.strategy.logger_calls import LoggerCalls
from lightning_pipe.strategy.logs import LogRecorder
from lightning_pipe.strategy.metric_states import MetricTracker
from lightning_pipe.strategy.randomness import host_random_kept
from lightning_pipe.strategy.step_effects import StepEffects

__all__ = ["Aside", "run_aside"]


class Aside:
    """The module as a run aside found it: the generators it keeps (which drew since) and its state."""

    def __init__(self, module: LightningModule, effects: StepEffects) -> None:
        self.held = HeldGenerators(module)
        self.effects = effects
        self.before = effects.snapshot()

    def drew(self) -> bool:
        """Whether a generator the module keeps drew since (the global ones are the caller's to compare)."""
        return self.held.moved()

    def undo(self) -> None:
        """The module and the generators it keeps as the run found them."""
        self.held.restore()
        self.effects.restore(self.before)


@contextmanager
def run_aside(module: LightningModule, effects: StepEffects, recorder: LogRecorder, logger_calls: LoggerCalls,
              metrics: MetricTracker, logged: list[tuple[str, Any]] | None = None) -> Iterator[Aside]:
    """Run the step's code inside without a trace on ``module`` (see the module's text); the global torch generators
    are the caller's (a run as the first stage ran it forks them to that micro-batch's seed). ``logged``: the names
    and values the code logs are put there, with their graphs (gradients on, outside inference mode)."""
    aside = Aside(module, effects)
    graphs = logged is not None
    try:
        with torch.inference_mode(False) if graphs else nullcontext(), torch.set_grad_enabled(graphs), \
                recorder.discarding(logged), logger_calls.discarding(), metrics.untouched(), \
                host_random_kept(), kept_buffers([module]):
            yield aside
    finally:
        aside.undo()
