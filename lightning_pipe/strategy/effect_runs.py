"""The last stage's runs of a step, one per micro-batch, made to change the module as one device's single run does
(:mod:`.step_effects` follows the changes): each run starts from the module as the step found it
(:class:`MicrobatchRuns`), and :func:`settle` runs the step once more on the whole batch's model output, whose changes
then travel to every rank."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning_pipe.engine.tree import tree_flatten
from lightning_pipe.strategy.step_effects import Patch, Sent, Snapshot, StepEffects
from lightning_pipe.strategy.step_values import OutputKinds, Weights, apart_reason, whole_output
from lightning_pipe.strategy.values import sendable

__all__ = ["MicrobatchRuns", "settle", "kept_whole"]


class MicrobatchRuns:
    """A step's runs on the last stage, one per micro-batch, each from the module as the step found it, as one
    device's single run is: before each run, what the runs before it changed (a memory bank's entries, a counter, a
    running normalizer) is noted and undone; :meth:`rewind` puts the step's start back for one more run (the loss
    probe), and :meth:`remake` makes every run's changes again (lists extended by each, a value the last one's), which
    :func:`settle` then makes one device's by a run on the whole batch. A change that cannot be undone (a large tensor
    changed in place, which is copied from the next step on) leaves the runs as they were, and :attr:`stuck` says so."""

    def __init__(self, effects: StepEffects, start: Snapshot) -> None:
        self.effects, self.start = effects, start
        self.made: list[list[Patch]] = []
        self.ran = self.stuck = False

    def before_run(self) -> None:
        if self.ran and not self.stuck and self.effects.changed(self.start):
            patches = self.effects.changes(self.start)
            if self.effects.restore(self.start):
                self.made.append(patches)
            else:  # as they were: the runs go on from what the earlier ones left
                self.effects.apply(patches, start=self.start)
                self.stuck = True
        self.ran = True

    def rewind(self) -> bool:
        """The step's start again, if the runs changed anything (then :meth:`remake` must follow); whether it did."""
        if not self.made:
            return False
        self.made.append(self.effects.changes(self.start))
        if not self.effects.restore(self.start):
            self.effects.apply(self.made.pop(), start=self.start)
            self.made.clear()
            return False
        return True

    def remake(self) -> None:
        """After :meth:`rewind` (and a run since, undone here): every run's changes made again."""
        self.effects.restore(self.start)
        for patches in self.made:
            self.effects.apply(patches, start=self.start)
        self.made = []


def settle(effects: StepEffects, step: str, start: Snapshot, kept: list[tuple[int, Any, int]], microbatches: int,
           replay: Callable[[Any], None], warn: Callable[[str], None], needs: Sequence[str] = (),
           weights: Weights | None = None, kinds: OutputKinds | None = None, runs: MicrobatchRuns | None = None
           ) -> tuple[list[Sent], bool]:
    """On the last stage, after a step of ``microbatches`` micro-batches: what it changed on the module since
    ``start``, as one device changes it, and whether the step ran once more on the whole batch for it (also for
    ``needs`` alone). ``kept``: (index, model output, rows) of the micro-batches
    whose outputs were kept; ``replay(whole)`` runs the step on the whole batch with the model returning ``whole``;
    ``needs``: what else the step did that only that run does as one device (called the loggers, returned numbers);
    ``weights``: what ``loss_reduction`` counted in each micro-batch (a loss the model computed averages by them);
    ``kinds``: how the model's single numbers add up (:func:`~.step_values.whole_output`); ``runs``: the
    micro-batches' runs, whose changes, each undone before the next run, are made again where no run on the whole
    batch follows (found by review: the last one's alone stood)."""
    patches = effects.changes(start)
    if (patches or needs or (runs is not None and runs.made)) and microbatches > 1:
        whole = kept_whole(kept, microbatches, weights, kinds)
        why = ("its first micro-batches did nothing of the kind, so their model outputs were not kept" if len(kept) <
               microbatches else apart_reason([output for _, output, _ in kept], [rows for _, _, rows in kept]))
        if whole is not None and not effects.restore(start):
            why, whole = "a change could not be undone (a list emptied, a large tensor changed in place)", None
            effects.apply(patches)
        if whole is not None:
            try:
                replay(whole)
                patches = effects.changes(start)
                buffers = sorted(name for _, name, _, _ in patches if "." in name)  # submodules' buffers
                if buffers:  # (read first and updated after, DINO's center, is one device's; not told apart here)
                    warn(f"{step} runs modules that change their buffers ({', '.join(buffers[:4])}) outside the "
                         f"pipelined model: each micro-batch's run starts from them as the step found them and "
                         f"changes them by its own rows, so where the step reads them after changing them (a "
                         f"normalizer updated by the batch before it is applied) what it computes differs from one "
                         f"device's (as a batch norm's does); where it reads them first and updates them after (DINO's "
                         f"center) it is one device's. After each step the buffers are one device's on every rank. "
                         f"num_microbatches=1 matches one device")
                return _sendable(step, patches, warn), True
            except Exception as error:  # noqa: BLE001 - the micro-batches' changes stand instead
                why = f"the step run on the whole batch's output raised {type(error).__name__}: {error}"
                effects.restore(start)
                effects.apply(patches)
        if runs is not None and runs.rewind():  # every run's changes, as the warning says
            runs.remake()
            patches = effects.changes(start)
        warn(_per_microbatch(step, [f"self.{name}" for _, name, _, _ in patches] + list(needs), why))
    return _sendable(step, patches, warn), False


def kept_whole(kept: list[tuple[int, Any, int]], microbatches: int, weights: Weights | None = None,
               kinds: OutputKinds | None = None) -> Any:
    """The whole batch's model output from the (index, output, rows) ``kept`` of every one of its ``microbatches``
    (:func:`~.step_values.whole_output`; ``weights`` by micro-batch index); None where some were not kept."""
    if len(kept) != microbatches:
        return None
    kept = sorted(kept, key=lambda item: item[0])
    return whole_output([output for _, output, _ in kept], [rows for _, _, rows in kept],
                        None if weights is None else [weights[index] for index, _, _ in kept], kinds)


def _sendable(step: str, patches: list[Patch], warn: Callable[[str], None]) -> list[Sent]:
    """``patches`` but those holding values no rank can be sent (warned of)."""
    sent = [sendable(patch[2]) and sendable(patch[3]) for patch in patches]
    kept = [(*patch, _on_cpu(patch[3])) for patch, ok in zip(patches, sent) if ok]
    # a class the step makes in a function and keeps (pytorch-forecasting's output class, made at its first use on
    # every rank that needs it) is code, not state: not said (found by review); a class or function chosen from
    # others (self.criterion = F.l1_loss) is
    names = sorted({f"self.{name}" for (_, name, _, value), ok in zip(patches, sent)
                    if not ok and not (isinstance(value, type) and "<locals>" in value.__qualname__)})
    if names:
        warn(f"{step} changes {', '.join(names)} on the module to values that cannot be sent to other ranks "
             f"(tensors, numbers, strings, None, NumPy arrays and lists, tuples and dicts of them can), so only the "
             f"last stage's rank holds them; keep such values as tensors or numbers")
    return kept


def _per_microbatch(step: str, names: list[str], why: str) -> str:
    return (f"{step} changes, calls or returns {', '.join(sorted(set(names)))}; under a pipeline the whole step runs "
            f"on the last stage once per micro-batch, and this could not be done as one device does it ({why}), so "
            f"every rank gets the micro-batches' changes, the loggers their calls (one per micro-batch where one "
            f"device makes one per batch), and the batch-end hooks such outputs as the micro-batches' values, "
            f"listed. Keep what a step collects in its returned outputs with the batch's rows first (on_*_batch_end "
            f"hooks receive them), or compute it in the hook from the step's returned outputs")


def _on_cpu(value: Any) -> bool:
    """Whether every tensor in ``value`` is on the CPU (a step that moved what it keeps there, to spare the device)."""
    return all(tensor.device.type == "cpu" for tensor in tree_flatten(value)[0])
