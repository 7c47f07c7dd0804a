"""A stage's split backward (input half, then weight half) equals its plain backward and does no work twice."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lightning_pipe.engine.stage import PipelineStage


class Borrower(nn.Module):
    """Uses another module's parameter without owning it: the captured split cannot see that use."""

    def __init__(self, lender: nn.Linear) -> None:
        super().__init__()
        self.lender = [lender]  # a plain list: not a child, so the parameter is not registered here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.lender[0].weight.t()


def _split_vs_plain(module: nn.Module, microbatches: int = 3) -> tuple[PipelineStage, list, list]:
    plain, split = copy.deepcopy(module), module
    x = [torch.randn(4, 8, requires_grad=True) for _ in range(microbatches)]
    g = [torch.randn(4, 8) for _ in range(microbatches)]
    stage = PipelineStage(split, 1, 3)
    stage.enable_split_backward()
    reference = PipelineStage(plain, 1, 3)
    input_grads, ref_input_grads = [], []
    for mb in range(microbatches):
        xa, xb = x[mb].detach().requires_grad_(), x[mb].detach().requires_grad_()
        stage.forward(mb, xa)
        reference.forward(mb, xb)
    for mb in range(microbatches):
        input_grads += stage.backward_input(mb, [g[mb]])
        ref_input_grads += reference.backward(mb, [g[mb]])
    for mb in range(microbatches):
        stage.backward_weight(mb)
    for a, b in zip(input_grads, ref_input_grads):
        torch.testing.assert_close(a, b)
    for (name, p), q in zip(split.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    return stage, input_grads, ref_input_grads


def test_split_backward_is_exact() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    stage, _, _ = _split_vs_plain(module, microbatches=3)
    assert stage._split_mode == "captured"


def test_weight_half_does_only_weight_gradient_work() -> None:
    """4 bias-free 64x64 layers, 16 rows: each gradient matmul is X = 2*16*64*64 FLOPs. The input half must
    cost 4X (input gradients) and the weight half 4X; a weight half that restarted from the stage's output
    would redo the input gradients of layers 3, 2, 1 on its way down: 7X."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    stage = PipelineStage(nn.Sequential(*[nn.Linear(64, 64, bias=False) for _ in range(4)]), 1, 3)
    stage.enable_split_backward()
    x = 2 * 16 * 64 * 64
    for mb in range(2):
        stage.forward(mb, torch.randn(16, 64, requires_grad=True))
    for mb in range(2):
        with FlopCounterMode(display=False) as counter:
            stage.backward_input(mb, [torch.randn(16, 64)])
        assert counter.get_total_flops() == 4 * x
    stage.backward_weight(0)  # the first one also checks itself against a plain weight half
    with FlopCounterMode(display=False) as counter:
        stage.backward_weight(1)
    assert counter.get_total_flops() == 4 * x


def test_split_backward_falls_back_when_a_parameter_is_used_by_a_module_that_does_not_own_it() -> None:
    torch.manual_seed(0)
    lender = nn.Linear(8, 8)
    module = nn.Sequential(lender, nn.Tanh(), Borrower(lender), nn.Tanh())
    stage, _, _ = _split_vs_plain(module, microbatches=3)
    assert stage._split_mode == "full"


class SparseBias(nn.Module):
    """Adds rows of an ``nn.Embedding(sparse=True)``, whose weight gets a sparse gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 8, sparse=True)
        self.register_buffer("ids", torch.tensor([1, 3, 3, 7]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table(self.ids)


def test_split_backward_of_a_sparse_gradient_is_exact() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), SparseBias(), nn.Linear(8, 8))
    _, _, _ = _split_vs_plain(module, microbatches=2)
    assert module[2].table.weight.grad.is_sparse


class ComplexGain(nn.Module):
    """A gain made complex from two real parameters (an S4D kernel's): the real part's gradient is a strided view."""

    def __init__(self) -> None:
        super().__init__()
        self.log_real, self.imag = nn.Parameter(torch.randn(8, 4)), nn.Parameter(torch.randn(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = -self.log_real.exp() + 1j * self.imag
        return x * (gain.exp().sum(-1)).real


def test_split_backward_lays_a_first_gradient_out_as_its_parameter() -> None:
    """Found by review: zb_h1 printed torch's "grad and param do not obey the gradient layout contract" warning, the
    first micro-batch's gradient of a complex gain's real part kept with the strides of the view it came from."""
    import warnings

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), ComplexGain(), nn.Linear(8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _split_vs_plain(module, microbatches=3)
    assert not [w for w in caught if "layout contract" in str(w.message)], [str(w.message) for w in caught]
    assert module[1].log_real.grad.stride() == module[1].log_real.stride()


def test_a_loss_that_needs_no_gradient_is_an_error_not_a_step_without_one() -> None:
    """A forward that runs its layers under no_grad (a reversible Function's, captured with
    allow_autograd_functions=True: found by review, Reformer trained not one weight, silently) gives a loss that needs
    no gradient: one device's loss.backward() raises; so does the stage's backward, saying why."""
    import pytest

    class NoGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.linear(x).pow(2).mean()

    stage = PipelineStage(NoGrad(), 0, 1)
    for microbatch in range(2):
        stage.forward(microbatch, torch.randn(4, 8))
        stage.backward(microbatch, None)
    with pytest.raises(RuntimeError, match="each of the step's 2 micro-batch.*needs no gradient.*torch.no_grad"):
        stage.end_step()

    class Sometimes(nn.Module):  # a micro-batch with nothing to learn from returns a constant: as on one device
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).pow(2).mean() if x.sum() > 0 else torch.zeros(())

    stage = PipelineStage(Sometimes(), 0, 1)
    for microbatch, sign in enumerate((1.0, -1.0)):
        stage.forward(microbatch, sign * torch.ones(4, 8))
        stage.backward(microbatch, None)
    stage.end_step()
    assert stage.module.linear.weight.grad is not None
