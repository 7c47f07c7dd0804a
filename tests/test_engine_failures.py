"""A failure in one rank ends every rank with that error, named, instead of leaving ranks blocked."""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
import torch
import torch.nn as nn

from lightning_pipe.engine.comm import PipelineError
from lightning_pipe.engine.executor import Pipeline
from tests.helpers import run_ranks
from tests.models import make_batch, mse_loss

pytestmark = pytest.mark.timeout(120)


class Boom(ValueError):
    """The user's own exception type (module level: every rank's program has it)."""


class Explode(nn.Module):
    """Raises on the micro-batch given, in forward or backward."""

    def __init__(self, microbatch: int, where: str) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.microbatch, self.where, self.calls = microbatch, where, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        if self.where == "forward" and call == self.microbatch:
            raise Boom("boom in stage 2")
        y = self.linear(x)
        if self.where == "backward" and call == self.microbatch:
            y.register_hook(lambda grad: (_ for _ in ()).throw(Boom("boom in stage 2 backward")))
        return y


def _failing_pipeline(rank: int, world_size: int, schedule: str, where: str) -> float:
    layers = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), Explode(1, where), nn.Linear(16, 16))
    pipe = Pipeline(layers, loss_fn=mse_loss, schedule=schedule, num_microbatches=4)
    start = time.monotonic()
    try:
        pipe.train_step(make_batch(8))
    except PipelineError as error:
        assert error.origin_rank == 2
        if not isinstance(error, Boom):  # the user's type on every rank (except Boom, except ValueError)
            raise RuntimeError(f"untyped on rank {rank}: {type(error).__mro__}") from None
        raise
    return time.monotonic() - start


@pytest.mark.parametrize("schedule,where", [("1f1b", "forward"), ("gpipe", "forward"), ("1f1b", "backward")])
def test_exception_in_stage_2_of_4_ends_every_rank(schedule: str, where: str) -> None:
    start = time.monotonic()
    errors = run_ranks(_failing_pipeline, 4, schedule, where, timeout=60, expect_failure=True)
    assert time.monotonic() - start < 60
    for rank, text in enumerate(errors):
        assert text is not None, f"rank {rank} finished although rank 2 failed"
        assert "PipelineError: rank 2 failed in 2" in text, text
        assert "boom in stage 2" in text and "untyped" not in text, text


def test_a_ranks_own_error_keeps_its_type_where_python_can_make_one() -> None:
    from lightning_pipe.engine.notices import failed_as

    class NeedsTwo(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a} {b}")

    for error, kind in ((ValueError("x"), ValueError), (torch.OutOfMemoryError("oom"), torch.OutOfMemoryError),
                        (NeedsTwo(1, 2), NeedsTwo), (OSError("disk"), OSError),
                        (ExceptionGroup("several", [ValueError("x")]), None)):
        made = failed_as(error, "rank 2 failed in 2F1: ...", 2)
        assert isinstance(made, PipelineError) and made.origin_rank == 2 and str(made) == "rank 2 failed in 2F1: ..."
        assert type(made).__name__ == "PipelineError" and (kind is None or isinstance(made, kind))
    group = ExceptionGroup("several", [ValueError("x")])  # a type that cannot be made from a message alone
    assert type(failed_as(group, "m", 0)) is PipelineError
    assert str(failed_as(KeyError("k"), "rank 2 failed:\nKeyError: 'k'", 2)) == "rank 2 failed:\nKeyError: 'k'"


class _Handler:
    """A signal handler that is an object with ``__call__``."""

    def __call__(self, number: int, frame: object) -> None:
        raise Boom("from the handler object")


def _raising(number: int, frame: object, what: str = "") -> None:
    raise Boom(f"from the handler {what}")


def _decorated(handler: Any) -> Any:
    @functools.wraps(handler)
    def call(*args: object) -> None:
        return handler(*args)
    return call


@pytest.mark.parametrize("kind", ["function", "partial", "wrapped", "object"])
def test_an_error_a_signal_handler_raises_inside_a_wait_is_the_ranks_own_whatever_the_handler_is(kind: str) -> None:
    """An error raised by a signal handler inside a wait (torch's DataLoader's SIGCHLD) is the rank's own, not a
    peer's; a handler that is a functools.partial, a decorated function or an object with __call__ was not
    recognised (found by review): its rank blamed a healthy peer."""
    import os
    import signal

    from lightning_pipe.engine.notices import own_error

    handler = {"function": _raising, "partial": functools.partial(_raising, what="partial"),
               "wrapped": _decorated(_raising), "object": _Handler()}[kind]
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with pytest.raises(Boom) as raised:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # (the handler runs at the next bytecode)
        assert own_error(raised.value)
        with pytest.raises(Boom) as elsewhere:
            _raising(0, None)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        assert not own_error(elsewhere.value)  # (the same code, called directly, with no handler installed)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_other_ranks_read_the_users_exception_type_from_the_notice_where_their_program_has_it() -> None:
    from lightning_pipe.engine.notices import failed_as, from_notice, notice_text

    class Local(Exception):
        pass

    oom = torch.OutOfMemoryError
    for error, kind in ((Boom("b"), Boom), (KeyError("k"), KeyError), (oom("o"), oom), (Local("l"), None),
                        (ExceptionGroup("g", [ValueError("x")]), None)):
        text = notice_text(failed_as(error, "rank 3 failed in 3F0: ...\nline two", 3))
        read = from_notice(text)
        assert isinstance(read, PipelineError) and read.origin_rank == 3
        assert str(read) == "rank 3 failed in 3F0: ...\nline two"
        assert (kind is None and type(read) is PipelineError) or isinstance(read, kind), (text, type(read).__mro__)
    for head in ("3 builtins:KeyboardInterrupt", "3 builtins:SystemExit", "3 not_imported_here:Error", "3 builtins:len",
                 "3 tests.test_engine_failures:Explode", "3 builtins:ValueError.mro"):
        read = from_notice(f"{head}\nmessage")  # only exception types of modules already imported count
        assert type(read) is PipelineError and read.origin_rank == 3 and str(read) == "message", head
    assert from_notice("2\nplain notice").origin_rank == 2
    assert from_notice("cut sh", unknown_rank=1).origin_rank == 1


class Masked(nn.Linear):
    """Writes its own weight in forward (a masked layer, PixelCNN style), under torch.no_grad()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.weight.mul_(torch.ones_like(self.weight).tril())
        return super().forward(x)


class _ReluInPlaceLater(nn.Module):
    """Writes its input in place from its second call on (data-dependent, as a rarely taken branch is): the stage's
    first forward, which runs on a copy to find such writes, sees none."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.relu_() if self.calls > 1 else x.relu()


class _OneIdBags(nn.Module):
    """nn.EmbeddingBag over bags of one id each, ids and offsets read from the input's first columns (as DLRM's
    one-hot features give them: as long as the batch, so split with its rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.bags = nn.EmbeddingBag(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bags(x[:, 1].long(), x[:, 0].long())


def _bad_shape(rank: int, world_size: int, kind: str = "shape") -> None:
    if kind == "bags":  # the offsets travel as the batch's rows: micro-batch 1's start at 2
        layers, rows = nn.Sequential(nn.Identity(), _OneIdBags()), 4
    elif kind == "shape":  # stage 1 expects 16 features but stage 0 produces 8: a shape error on rank 1 only
        layers, rows = nn.Sequential(nn.Linear(16, 8), nn.Linear(16, 16)), 4
    elif kind == "in place":  # micro-batch 1's forward changes the weight micro-batch 0's backward needs
        layers = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), Masked(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                               nn.Linear(16, 16), nn.Tanh())
        rows = 4
    elif kind == "input in place":  # stage 1's first layer, one of the user's, writes its input (a leaf) in place
        layers, rows = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), _ReluInPlaceLater(), nn.Linear(16, 16)), 4
    else:  # a batch norm given a micro-batch of 1 row: 3 rows into 2 micro-batches
        layers, rows = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)), 3
    schedule = "gpipe" if kind == "in place" else "1f1b"  # gpipe: both forwards before the backwards
    batch = make_batch(rows)
    if kind == "bags":  # offsets 0, 1, 2, 3 of one id each
        batch[0][:, 0], batch[0][:, 1] = torch.arange(rows), torch.arange(rows) % 16
    Pipeline(layers, loss_fn=mse_loss, schedule=schedule, num_microbatches=2).train_step(batch)


def test_bad_shape_names_the_rank() -> None:
    errors = run_ranks(_bad_shape, 2, timeout=60, expect_failure=True)
    for text in errors:
        assert "rank 1 failed in 1F0" in text and "mat1 and mat2 shapes cannot be multiplied" in text, text


def test_a_batch_norm_given_a_micro_batch_of_one_row_says_what_to_do() -> None:
    errors = run_ranks(_bad_shape, 2, "batch norm", timeout=60, expect_failure=True)
    for text in errors:  # torch's message alone named no micro-batch
        assert "rank 1 failed in 1F1" in text and "Expected more than 1 value per channel" in text, text
        assert "the batch had fewer than 4 rows" in text and "drop_last=True" in text, text


def test_embedding_bag_offsets_split_as_rows_say_what_to_do() -> None:
    """Bags of one id each make the flattened ids and the offsets as long as the batch, so they were split with its
    rows, and torch's message alone ("offsets[0] has to be 0") said nothing of the pipeline (found by review: DLRM's
    one-hot sparse features). The failing action is said in words too (it was "1F1" alone)."""
    errors = run_ranks(_bad_shape, 2, "bags", timeout=60, expect_failure=True)
    for text in errors:
        assert "rank 1 failed in 1F1 (stage 1's forward of micro-batch 1)" in text, text
        assert "offsets[0] has to be 0" in text and "one padded row per sample" in text, text


def test_a_forward_writing_its_own_weight_in_place_says_why_and_what_to_do() -> None:
    errors = run_ranks(_bad_shape, 2, "in place", timeout=60, expect_failure=True)
    assert errors[0] is not None  # (rank 1 owes rank 0 nothing after its backwards: its step ends first)
    for text in [error for error in errors if error is not None]:  # torch's alone: "enable anomaly detection"
        assert "modified by an inplace operation" in text, text
        assert "the forwards of later micro-batches run before the backwards of earlier ones" in text, text
        assert "on_train_batch_start or on_before_optimizer_step" in text, text


def test_a_first_layer_writing_its_stages_input_in_place_says_what_to_do() -> None:
    """torch's message alone ("a leaf Variable that requires grad ...") does not say that the leaf is the stage's
    input, which on one device was the last layer's output (a write the stage's first forward shows trains exactly:
    tests/test_engine_equivalence.py)."""
    errors = run_ranks(_bad_shape, 2, "input in place", timeout=60, expect_failure=True)
    for text in errors:
        assert "rank 1 failed in 1F1" in text and "stage's first layer writes its input in place" in text, text
        assert "inplace = True" in text, text


def _too_few_layers(rank: int, world_size: int, schedule: str) -> None:
    layers = nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)])
    Pipeline(layers, loss_fn=mse_loss, schedule=schedule, num_microbatches=2)


@pytest.mark.parametrize("schedule,advice", [
    ("zb_v", "'zb_v' puts 2 stages on each of the pipeline's 2 ranks. Use at most 1 rank per pipeline with it"),
    ("1f1b", None),
])
def test_too_few_layers_for_the_stages_says_how_many_ranks_fit(schedule: str, advice: str | None) -> None:
    """A schedule holding two stages per rank: the advice counts ranks that fit it (it said "use at most 3 devices",
    which made it worse: found by review)."""
    if advice is None:
        run_ranks(_too_few_layers, 2, schedule, timeout=60)  # 3 layers into 2 stages: fine
        return
    for text in run_ranks(_too_few_layers, 2, schedule, timeout=60, expect_failure=True):
        assert "cannot cut 3 layers into 4 stages" in text and advice in text, text
