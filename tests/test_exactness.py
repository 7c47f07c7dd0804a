"""Synchronous schedules give one device's result, whatever crosses the stage boundaries: a matrix of patterns x schedules.

Each pattern is a model of 8 blocks that puts one thing at *every* block boundary, so that every cut (2, 4 or 8 stages)
has it at every stage boundary. Each case trains a pipeline for 3 SGD steps on batches of 10 rows in 4 (uneven)
micro-batches and compares, on every rank and at every step, the loss and every gradient, and at the end every weight
and buffer, with one device (1e-6, plus 2e-6 relative; 4 times that for group norm). One spawned run per world size loops over every case; the one-device reference is
computed once per pattern. A new pattern is one entry of ``PATTERNS``, a new schedule one line of ``SCHEDULES``.

The reference is one device on the whole batch, except for batch norm, where the pipeline normalizes each micro-batch
with its own statistics (GPipe's semantics): there one device runs the same micro-batches one after the other, and its
running statistics are updated once per step from the inputs each batch norm saw in the step (a plain ``BatchNorm1d``
forward over all of them), which is what the pipeline's deferred batch norm promises.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_pipe.engine import schedules as registry
from lightning_pipe.engine.executor import Pipeline
from tests.helpers import run_ranks

pytestmark = pytest.mark.timeout(900)

WIDTH, ROWS, MICROBATCHES, STEPS, BLOCKS, LR = 8, 10, 4, 3, 8, 0.1
# |pipeline - one device| <= ATOL + RTOL * |one device|, elementwise. Summing 4 micro-batches' gradients instead of one
# batch's rounds differently: after two SGD steps a few float32 ulps (1.3e-6 on gradients of 0.9, group norm).
ATOL, RTOL = 1e-6, 2e-6
# Group norm over groups of 2 features divides by their small deviations, which amplifies that rounding: on an AVX-512
# machine (torch's kernels there add in another order) 2.6e-6 at the third step's gradients, 1.3e-6 on an AVX2 one.
SCALED = {"groupnorm": 4.0}


class Block(nn.Module):
    """One of the 8 blocks of a pattern's model: knows whether it is the first (takes the batch's tensor) or the last
    (returns one tensor for the loss)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.first, self.last = index == 0, index == BLOCKS - 1
        self.linear = nn.Linear(WIDTH, WIDTH)


class Saved(Block):
    """The stage returns ``(new_h, h)`` where ``h`` also fed this block's Linear, which saved it for backward (fused
    (hidden, residual) blocks, U-Net skips). Freeing a sent ``h`` by writing its ``.data`` corrupted the saved input
    (issue 11: 0.05-0.1 away from one device after 4 steps)."""

    def forward(self, inputs):
        h = self.linear(inputs) if self.first else inputs[0] + inputs[1]
        new_h = torch.tanh(self.linear(h))
        return new_h if self.last else (new_h, h)


class InputThrough(Block):
    """The stage returns its own input (a skip) untouched next to its result: an output that is an autograd leaf."""

    def forward(self, inputs):
        if self.first:
            skip = self.linear(inputs)
            return torch.tanh(skip), skip
        h, skip = inputs
        h = torch.tanh(self.linear(h))
        return h + skip if self.last else (h, skip)


class ViewOfOutput(Block):
    """The stage returns a Linear's output and a slice of it (a view sharing its storage)."""

    def forward(self, inputs):
        h = inputs if self.first else inputs[0] + torch.cat([inputs[1], inputs[1]], dim=1)
        h = self.linear(torch.tanh(h))
        return h if self.last else (h, h[:, : WIDTH // 2])


class SameTensorTwice(Block):
    """The stage returns the same tensor twice in one tuple: its gradients arrive separately and must add up."""

    def forward(self, inputs):
        h = inputs if self.first else inputs[0] * torch.tanh(inputs[1])
        h = self.linear(h)
        return h if self.last else (h, h)


class NonContiguous(Block):
    """The stage returns a transposed (non-contiguous) view of a 3-d reshape of its result."""

    def forward(self, inputs):
        h = inputs if self.first else inputs.transpose(1, 2).reshape(inputs.shape[0], WIDTH)
        h = self.linear(torch.tanh(h))
        return h if self.last else h.view(h.shape[0], 2, WIDTH // 2).transpose(1, 2)


class IntAndBool(Block):
    """The stage returns, besides its result, a bool mask and int64 indices computed from it: no gradient for those."""

    def forward(self, inputs):
        if not self.first:
            h, mask, index = inputs
            assert mask.dtype == torch.bool and index.dtype == torch.int64
            inputs = h * mask + 0.1 * F.one_hot(index, WIDTH).float()
        h = torch.tanh(self.linear(inputs))
        return h if self.last else (h, h > 0, h.argmax(dim=1))


class LongSkips(Block):
    """U-Net: the first four blocks push a skip each, the last four pop them, so skips cross up to seven boundaries (and
    ride through several stages as those stages' own inputs passed through)."""

    def forward(self, inputs):
        h, skips = (inputs, ()) if self.first else (inputs[0], tuple(inputs[1:]))
        if self.index < BLOCKS // 2:
            skips = skips + (h,)
        else:
            h, skips = h + skips[-1], skips[:-1]
        h = torch.tanh(self.linear(h))
        return h if self.last else (h, *skips)


class InPlaceAfter(Block):
    """In-place operations after the stage's last layer: the output's autograd node is that of the in-place op."""

    def forward(self, inputs):
        h = self.linear(inputs if self.first else torch.tanh(inputs))
        h.mul_(0.5).add_(0.1)
        if self.index % 2:
            h.relu_()
        return h


class BatchNormBlock(Block):
    """Linear, BatchNorm1d, Tanh: per-micro-batch normalization, running statistics of the whole batch once per step."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.norm = nn.BatchNorm1d(WIDTH)

    def forward(self, inputs):
        return torch.tanh(self.norm(self.linear(inputs)))


class GroupNormBlock(Block):
    """Linear, GroupNorm, Tanh: normalization within each row, so exactly one device's."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.norm = nn.GroupNorm(2, WIDTH)

    def forward(self, inputs):
        return torch.tanh(self.norm(self.linear(inputs)))


class Plain(Block):
    def forward(self, inputs):
        return torch.tanh(self.linear(inputs))


class ParameterFree(nn.Module):
    """A block that owns no parameters."""

    def forward(self, inputs):
        return torch.tanh(inputs) * 1.5


def _blocks(block: Callable[[int], nn.Module]) -> Callable[[], nn.Sequential]:
    return lambda: nn.Sequential(*[block(i) for i in range(BLOCKS)])


def _free_middle() -> nn.Sequential:
    """Blocks 2-5 own no parameters: with 4 or 8 stages, whole stages in the middle have none."""
    return nn.Sequential(*[ParameterFree() if 2 <= i <= 5 else Plain(i) for i in range(BLOCKS)])


def _frozen(first: int, last: int) -> Callable[[], nn.Sequential]:
    def build() -> nn.Sequential:
        model = nn.Sequential(*[Plain(i) for i in range(BLOCKS)])
        for block in model[first : last + 1]:
            block.requires_grad_(False)
        return model

    build.__doc__ = f"Blocks {first}-{last} frozen (requires_grad=False): whole stages with nothing to train."
    return build


PATTERNS: dict[str, Callable[[], nn.Sequential]] = {
    "saved": _blocks(Saved),
    "input_through": _blocks(InputThrough),
    "view": _blocks(ViewOfOutput),
    "twice": _blocks(SameTensorTwice),
    "noncontiguous": _blocks(NonContiguous),
    "int_bool": _blocks(IntAndBool),
    "long_skips": _blocks(LongSkips),
    "inplace_after": _blocks(InPlaceAfter),
    "batchnorm": _blocks(BatchNormBlock),
    "groupnorm": _blocks(GroupNormBlock),
    "free_middle": _free_middle,
    "frozen_head": _frozen(0, 3),  # with 2 stages, stage 0 sends an output that needs no gradient
    "frozen_tail": _frozen(4, 7),
}

SCHEDULES: list[tuple[str, bool]] = [  # (schedule, checkpoint_activations)
    ("gpipe", False),
    ("gpipe", True),
    ("1f1b", False),
    ("1f1b", True),
    ("interleaved_1f1b", False),
    ("interleaved_1f1b", True),
    ("zb_h1", False),  # the zero-bubble schedules split the backward and refuse re-materialization
    ("zb_v", False),
]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(ROWS, WIDTH, generator=generator), torch.randn(ROWS, WIDTH, generator=generator))
            for _ in range(STEPS)]


def _loss(output: torch.Tensor, microbatch: tuple) -> torch.Tensor:
    return F.mse_loss(output, microbatch[1])


def _model(pattern: str) -> nn.Sequential:
    torch.manual_seed(0)
    return PATTERNS[pattern]()


def _one_device(model: nn.Sequential, batches: list) -> tuple[list, dict]:
    """Per step (loss, gradients) and the final state of one device; micro-batch by micro-batch for batch norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LR)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    steps = []
    for x, y in batches:
        if norms:
            before = {id(m): (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                      for m in norms}
            seen: dict[int, list] = {id(m): [] for m in norms}
            hooks = [m.register_forward_pre_hook(lambda m, a, seen=seen: seen[id(m)].append(a[0].detach()))
                     for m in norms]
            loss = torch.zeros(())
            for xs, ys in zip(torch.tensor_split(x, MICROBATCHES), torch.tensor_split(y, MICROBATCHES)):
                part = _loss(model(xs), (xs, ys)) * (len(xs) / ROWS)
                part.backward()  # gradient accumulation, as the pipeline does it
                loss = loss + part.detach()
            for hook in hooks:
                hook.remove()
            with torch.no_grad():  # one update from everything each batch norm saw in the step
                for m in norms:
                    m.running_mean.copy_(before[id(m)][0])
                    m.running_var.copy_(before[id(m)][1])
                    m.num_batches_tracked.copy_(before[id(m)][2])
                    m(torch.cat(seen[id(m)]))
        else:
            loss = _loss(model(x), (x, y))
            loss.backward()
        steps.append((loss.detach(), {n: None if p.grad is None else p.grad.clone()
                                      for n, p in model.named_parameters()}))
        optimizer.step()
        optimizer.zero_grad()
    return steps, copy.deepcopy(model.state_dict())


def _close(a: torch.Tensor | None, b: torch.Tensor | None, scale: float = 1.0) -> str | None:
    if a is None or b is None:
        return None if a is None and b is None else f"one is None ({a is None}, {b is None})"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    if not a.is_floating_point():
        return None if torch.equal(a, b) else "differs"
    excess = ((a.double() - b.double()).abs() - scale * (ATOL + RTOL * b.double().abs())).max().item() \
        if a.numel() else -1.0
    return None if excess <= 0 else f"differs by {(a.double() - b.double()).abs().max().item():.3g}"


def _matrix(rank: int, world_size: int, patterns: list[str], schedules: list) -> tuple[int, list[str]]:
    """Every case on this rank: (number of comparisons made, what differed)."""
    checks, failures = 0, []
    batches = _batches()
    for pattern in patterns:
        reference = _one_device(_model(pattern), batches)
        for schedule, remat in schedules:
            case = f"{pattern} {schedule}{' remat' if remat else ''} rank {rank}/{world_size}"
            try:
                pipe = Pipeline(_model(pattern), loss_fn=_loss, schedule=schedule, num_microbatches=MICROBATCHES,
                                checkpoint_activations=remat)
                params = [p for p in pipe.parameters() if p.requires_grad]
                optimizer = torch.optim.SGD(params, lr=LR) if params else None
                for step, (batch, (ref_loss, ref_grads)) in enumerate(zip(batches, reference[0])):
                    loss = pipe.train_step(batch)
                    if pipe.is_last_rank:
                        checks += 1
                        if (problem := _close(loss, ref_loss, SCALED.get(pattern, 1.0))) is not None:
                            failures.append(f"{case} step {step} loss {problem}")
                    for name, param in pipe.named_parameters():
                        checks += 1
                        if (problem := _close(param.grad, ref_grads[name], SCALED.get(pattern, 1.0))) is not None:
                            failures.append(f"{case} step {step} grad {name} {problem}")
                    if optimizer is not None:
                        optimizer.step()
                        optimizer.zero_grad()
                for name, value in pipe.state_dict().items():
                    checks += 1
                    if (problem := _close(value, reference[1][name], SCALED.get(pattern, 1.0))) is not None:
                        failures.append(f"{case} final {name} {problem}")
            except Exception as error:
                raise RuntimeError(f"{case} raised") from error
    return checks, failures


def test_every_schedule_of_the_registry_is_in_the_matrix() -> None:
    """A new synchronous schedule joins the matrix, with and without re-materialization where it allows it."""
    expected = {(name, remat) for name, kind in registry.SCHEDULES.items() if kind.trains and not kind.asynchronous
                for remat in ((False, True) if kind.rematerializes else (False,))}
    assert set(SCHEDULES) == expected


@pytest.mark.parametrize("world_size", [2, 4])
def test_matrix_of_stage_boundaries_equals_one_device(world_size: int) -> None:
    results = run_ranks(_matrix, world_size, list(PATTERNS), SCHEDULES, timeout=800)
    failures = [failure for _, rank_failures in results for failure in rank_failures]
    assert not failures, f"{len(failures)} differences from one device:\n" + "\n".join(failures[:60])
    assert sum(checks for checks, _ in results) > len(PATTERNS) * len(SCHEDULES) * STEPS
