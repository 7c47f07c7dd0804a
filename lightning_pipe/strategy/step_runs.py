"""A run of the step's code on one micro-batch, as the user should hear of it.

Under a pipeline the step's code runs once per micro-batch (the code before the model on the first stage, all of it
on the last). Two things a user cannot see from their own code follow, and :func:`microbatch_run` says them where they
happen: an error the run raises gets a note naming the micro-batch and its rows (a step sized by a configured batch
size fails on torch's shape check, which names sizes the user never saw); and a file the run opens for writing is
warned of once per step, since a file written per batch then holds one micro-batch's rows and an appended line
appears once per micro-batch (the run on the whole batch that some batches get is left alone: it writes what one
device writes).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from lightning_pipe.capture.graph_rows import known_rows
from lightning_pipe.engine.microbatch import per_row_lists
from lightning_pipe.engine.notices import PipelineError
from lightning_pipe.strategy.share_warning import shares_read

__all__ = ["microbatch_run"]

_RUN_NOTE = "this run of "
_BATCH_END_HOOKS = {"training_step": "on_train_batch_end", "validation_step": "on_validation_batch_end",
                     "test_step": "on_test_batch_end", "predict_step": "on_predict_batch_end"}


class _Writes:
    """The files opened for writing while a micro-batch's run of a step is watched: Python's ``open`` through an audit
    hook, installed once per process on the first run (audit hooks cannot be taken away, so it only looks while
    watching), and ``torch.save`` to a path, which opens its file in C++, through ``torch.save`` replaced for the
    run."""

    def __init__(self) -> None:
        self.installed = False
        self.watching = 0
        self.opened: list[tuple[str, str]] = []  # (path, mode)
        self.warned: set[str] = set()  # the steps warned of

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.watching or event != "open" or len(args) < 2:
            return
        path, mode = args[0], args[1]
        if isinstance(mode, str) and any(letter in mode for letter in "wax+") and isinstance(path, (str, bytes)):
            path = path.decode(errors="replace") if isinstance(path, bytes) else path
            if not path.startswith(("/dev/", "/proc/")):
                self.opened.append((path, mode))

    @contextmanager
    def watched(self, step: str) -> Iterator[None]:
        if step in self.warned:
            yield
            return
        if not self.installed:
            sys.addaudithook(self.hook)
            self.installed = True
        self.watching += 1
        start = len(self.opened)
        save = torch.save  # writes through its own file handle, which Python's audit hook does not see

        def watched_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(f, (str, os.PathLike)):
                self.opened.append((os.fspath(f), "wb"))
            return save(obj, f, *args, **kwargs)

        torch.save = watched_save
        try:
            yield
        finally:
            torch.save = save
            self.watching -= 1
            opened, self.opened[start:] = self.opened[start:], []
        if opened:
            self.warned.add(step)
            path, mode = opened[0]
            warnings.warn(
                f"{step} opens {path!r} for writing (mode {mode!r}) in its run on a micro-batch. Under "
                f"PipelineStrategy the step's code runs once per micro-batch (the code before the model on the first "
                f"stage, all of it on the last), so a file written per batch holds one micro-batch's rows (the last "
                f"one's) and a line appended per batch appears once per micro-batch. Write a batch's outputs where "
                f"the whole batch's are given once: return them from the step and write them in "
                f"{_BATCH_END_HOOKS.get(step, 'on_train_batch_end')}(outputs=...) under `if "
                f"trainer.is_global_zero:`, use a BasePredictionWriter callback for predictions, or name each file by "
                f"its row's own id", stacklevel=2)


_WRITES = _Writes()


@contextmanager
def microbatch_run(step: str, index: int, count: int, rows: int, total: int, microbatch: Any = None
                   ) -> Iterator[None]:
    """Around a run of ``step``'s code on ``microbatch``, number ``index`` of ``count`` (``rows`` of the batch's
    ``total``): an error it raises gets a note saying so, and naming the lists split with the rows, and a file it
    opens for writing is warned of (see the module)."""
    reads = shares_read()
    try:
        with _WRITES.watched(step), known_rows(rows):
            yield
    except Exception as error:
        notes = getattr(error, "__notes__", ())
        if isinstance(error, RuntimeError) and "Missing key(s) in state_dict" in str(error) \
                and shares_read() > reads:  # (a share read in this run: DQN's target synced from it)
            error.add_note("(the state dict loaded was read from the pipelined model, whose state this rank holds "
                           "only its share of (said in a warning before): a copy of the model kept whole beside "
                           "it and loaded from it, as a DQN's target network is, cannot be pipelined; train such "
                           "a model on one device or with DDP)")
        if rows != total and not isinstance(error, PipelineError) \
                and not any(isinstance(note, str) and note.startswith(f"({_RUN_NOTE}") for note in notes):
            sized = re.search(rf"(?<![\d.]){total}(?![\d.])", str(error)) is not None
            lists = per_row_lists(microbatch, rows) if microbatch is not None else []
            # an index past a size of this micro-batch's rows, that the whole batch's rows would have held
            beyond = re.search(r"index (\d+) is out of bounds for dimension \d+ with size (\d+)", str(error))
            offsets = isinstance(error, IndexError) and beyond is not None and rows > 0 and int(beyond.group(2)) > 0 \
                and int(beyond.group(2)) >= 2 * rows and int(beyond.group(2)) % rows == 0 \
                and int(beyond.group(1)) < int(beyond.group(2)) * total // rows  # (a flattened dim: rows x length)
            # a tensor that also holds the batch's count along a later dim: its rows may lie there (time-major)
            # (where the error names the batch's count: a size mismatch)
            crossed = sorted({str(tuple(t.shape)) for t in tree_leaves(microbatch) if isinstance(t, torch.Tensor)
                              and t.dim() >= 2 and total in t.shape[1:]}) if microbatch is not None and sized else []
            # an index into a tensor of this run's rows, below the whole batch's: a per-batch vector split as rows
            vector = isinstance(error, IndexError) and beyond is not None and not offsets \
                and int(beyond.group(2)) == rows and int(beyond.group(1)) < total
            sized = sized and not crossed
            error.add_note(
                f"({_RUN_NOTE}{step} got micro-batch {index} of {count}: {rows} of the batch's {total} rows; under "
                f"PipelineStrategy the step's code runs once per micro-batch" + (
                    f": size its tensors by the rows it gets (len(x), x.shape[0]), not by a configured batch size "
                    f"({total} here), or pass num_microbatches=1" if sized else "") + (
                    f"; {', '.join(lists)} held {total} items, one per row, and were split with the rows: a list "
                    f"that is one per batch (a vocabulary) with as many items as the batch has rows must be kept "
                    f"elsewhere (on the module) or nested in a list of one" if lists else "") + (
                    "; a tensor of the batch holding indices into the whole batch's rows (each row's offset by "
                    "row * length, as Hugging Face's wav2vec2 pre-training collates its sampled negatives) is split "
                    "with the rows but still points into the whole batch: make the indices each row's own in the "
                    "collate_fn and add the offsets in the step (index + torch.arange(len(x))[:, None] * length)"
                    if offsets else "") + (
                    f"; its tensors of shapes {', '.join(crossed)} also hold {total} along a later dim: one whose "
                    f"rows lie there (a time-major (T, B, ...) input whose length T equals the batch's rows, a (B, B) "
                    f"target of pairs) was split along dim 0 as if it held the rows: make it batch-first in the "
                    f"collate_fn (x.transpose(0, 1)), or make pairs in the step from per-row tensors; or, where "
                    f"the step sizes a tensor by a configured batch size (torch.randint(0, T, ({total},))), size it "
                    f"by the rows it gets (len(x))"
                    if crossed else "") + (
                    "; a tensor of the batch with one entry per class or item of the batch, not per row (class "
                    "weights indexed by the labels), that has as many entries as the batch has rows was split with "
                    "the rows: keep it out of the batch (on the module, or computed in the step)" if vector else
                    "") + (
                    f"; if its code needs more rows than {rows} (torchmetrics' R2Score needs two): drop a last, "
                    f"smaller batch (DataLoader(drop_last=True)), pass fewer micro-batches, or update the metric "
                    f"(metric.update(...)) and log the metric object" if rows <= 2 and not sized and isinstance(
                        error, (ValueError, IndexError, ZeroDivisionError)) and not _raised_here(error)
                    and not offsets and not crossed else "")
                + ")")
        raise


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` was raised by lightning_pipe itself (a refusal, which says what to do: no few-rows advice)."""
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return traceback is not None and os.path.abspath(traceback.tb_frame.f_code.co_filename).startswith(package + os.sep)
