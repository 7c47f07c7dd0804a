"""How a captured model's single-number outputs add up over rows (:mod:`lightning_pipe.capture.scalars`), and the
whole batch's output put together from its micro-batches' by them (:func:`~lightning_pipe.strategy.step_values.
whole_output`); a number argument of the model that changes between captures, named."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_pipe.capture import CaptureError, Splitter
from lightning_pipe.capture.scalars import scalar_kinds
from lightning_pipe.strategy.step_values import whole_output


class Numbers(nn.Module):
    """Returns, beside its output, numbers made in every way the reading tells apart."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.layer(x)
        counted = (x[:, 0] > 0).float().sum()
        return (h,
                -0.5 * torch.sum(1 + h - h.pow(2)),  # a VAE's KL: sum
                h.mean(),  # mean
                counted,  # a count: sum
                F.mse_loss(h, x, reduction="sum") + h.sum(),  # sums added: sum
                h.sum() + h.mean(),  # a sum and a mean added: other
                F.cross_entropy(h, x.argmax(1), reduction="sum") / counted,  # a sum over a count: mean (HF's loss)
                F.cross_entropy(h, x.argmax(1)),  # a loss reduced by its mean
                h.sum() / 2.0,  # scaled by a constant: sum
                torch.logsumexp(h.flatten(), 0))  # other


def test_the_graph_tells_how_each_number_adds_up_over_rows() -> None:
    program = torch.export.export(Numbers(), (torch.randn(3, 4),), strict=False)
    assert scalar_kinds(program) == [None, "sum", "mean", "sum", "sum", "other", "mean", "mean", "sum", "other"]


class Reduced(nn.Module):
    """Numbers and tensors reduced over the rows and over other dims, in both orders."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.layer(x)
        kl = -0.5 * (1 + h - h.pow(2))  # (rows, latent)
        chosen = F.one_hot(h.argmax(-1), 4)  # (rows, experts)
        share, probability = chosen.float().mean(0), h.softmax(-1).mean(0)
        return (h,
                kl.mean(0).sum(),  # averaged over the rows, summed over the latent dims: mean
                kl.sum(0).mean(),  # summed over the rows, averaged over the latent dims: sum
                kl.view(-1).mean(),  # rows x latent flattened, averaged: mean
                kl.sum(1).mean(),  # summed per row, averaged over the rows: mean
                4 * (share * probability).sum(),  # a load-balancing loss: a product of two statistics: other
                chosen.sum(0),  # tokens per expert, without rows: a sum, element by element
                h.softmax(-1).mean(0),  # the experts' mean probability: a mean, element by element
                self.layer.weight.sum(0),  # reads no input (a function of the weights): alike in every micro-batch
                (h.T @ h).sum(),  # the rows contracted: a sum of each row's outer product
                torch.logsumexp(h, 0).sum(),  # not a sum over the rows: other
                (h > 0).sum())  # a count (an integer): a sum


def test_the_reduction_over_the_rows_tells_how_a_number_adds_up() -> None:
    from lightning_pipe.capture.graph_rows import rows_symbols
    from lightning_pipe.capture.scalars import output_kinds

    x = torch.randn(6, 4)
    program = torch.export.export(Reduced(), (x,), dynamic_shapes=({0: torch.export.Dim("rows")},), strict=False)
    inputs = [node for node in program.graph.nodes if node.op == "placeholder" and node.name == "x"]
    rows = rows_symbols(inputs)
    assert rows and output_kinds(program, rows) == [0, "mean", "sum", "mean", "mean", "other", "sum", "mean", "alike",
                                                    "sum", "other", "sum"]
    # without the rows' symbol (a capture of fixed sizes) the last reduction reads, as before
    assert scalar_kinds(program)[1:5] == ["sum", "mean", "mean", "mean"]
    known = [0, 1, 2, 6, 7, 8, 9, 11]  # an output of another kind makes no whole batch's output: left out
    model = Reduced()
    parts = [[model(piece)[index] for index in known] for piece in x.split([2, 4])]
    whole = whole_output(parts, [2, 4], kinds=[output_kinds(program, rows)[index] for index in known])
    for index, want in enumerate(model(x)[index] for index in known):  # one device's, from the micro-batches'
        torch.testing.assert_close(whole[index].float(), want.float(), msg=f"output {known[index]}")


class AtMasked(nn.Module):
    """An MLM's logits at the masked tokens only (fairseq's ``features[masked_tokens]``): ``(masked, vocabulary)``,
    beside the same selected with ``masked_select`` and through ``nonzero``, and a selection ``unique`` makes (which
    the micro-batches' do not make the batch's)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.layer(x)
        where = mask.nonzero()
        return (h[mask], h.masked_select(mask[..., None]), h[where[:, 0], where[:, 1]], torch.unique(h.argmax(-1)),
                where)  # (the indices themselves count from 0 in each micro-batch: not put together)


@pytest.mark.parametrize("kind", ["masked", "masked_select", "nonzero"])
def test_what_a_mask_selects_of_the_rows_is_the_batchs_put_together(kind: str) -> None:
    """Found by review: the output had no dim of rows, so the loss check could not run, and a loss averaged over the
    masked tokens trained silently otherwise (47% off). The micro-batches' put together along dim 0 are the batch's."""
    from lightning_pipe.capture import Splitter
    from lightning_pipe.capture.scalars import SELECTED

    model = AtMasked()
    x, mask = torch.randn(6, 3, 4), torch.rand(6, 3) < 0.5
    mask[0, 0] = mask[4, 1] = True
    splitter = Splitter(model)
    splitter.capture((x, mask))
    kinds = splitter.captures[0].output_kinds
    index = ["masked", "masked_select", "nonzero"].index(kind)
    assert kinds[index] == SELECTED and kinds[3] != SELECTED and kinds[4] != SELECTED, kinds
    parts = [[model(x[rows], mask[rows])[index]] for rows in (slice(0, 2), slice(2, 6))]
    whole = whole_output(parts, [2, 4], kinds=[kinds[index]])
    torch.testing.assert_close(whole[0], model(x, mask)[index])


def test_the_whole_batchs_numbers_are_the_micro_batches_sum_or_mean_as_they_add_up() -> None:
    parts = [(torch.ones(3, 2), torch.tensor(2.0), torch.tensor(1.0)), (torch.ones(1, 2), torch.tensor(4.0),
                                                                         torch.tensor(3.0))]
    whole = whole_output(parts, [3, 1], kinds=[None, "sum", "mean"])
    assert whole[0].shape == (4, 2) and float(whole[1]) == 6.0 and float(whole[2]) == 1.5  # mean by rows
    assert whole_output(parts, [3, 1], kinds=[None, "other", "mean"]) is None  # cannot tell: none made
    assert float(whole_output(parts, [3, 1])[1]) == 2.5  # unknown (a Sequential's): by rows, as before
    # a number of the output that is each micro-batch's rows (len(x)), or a multiple of them (its tokens), is the
    # whole batch's; one equal to the rows of micro-batches of equal rows (or a constant?), or otherwise apart: none
    assert whole_output([(torch.ones(3, 2), 3), (torch.ones(1, 2), 1)], [3, 1])[1] == 4
    tokens = whole_output([{"x": torch.ones(3, 2), "n": 15}, {"x": torch.ones(1, 2), "n": 5}], [3, 1])
    assert tokens["n"] == 20 and tokens["x"].shape == (4, 2)
    assert whole_output([(torch.ones(3, 2), 3), (torch.ones(1, 2), 2)], [3, 1]) is None
    assert whole_output([(torch.ones(2, 2), 2), (torch.ones(2, 2), 2)], [2, 2]) is None
    assert whole_output([(torch.ones(2, 2), 5), (torch.ones(2, 2), 5)], [2, 2])[1] == 5  # a constant stays
    assert whole_output([(torch.ones(3, 2), 5, "a"), (torch.ones(1, 2), 5, "a")], [3, 1])[1:] == (5, "a")
    assert whole_output([(torch.ones(3, 2), "a"), (torch.ones(1, 2), "b")], [3, 1]) is None
    assert whole_output([(torch.ones(3, 2), True), (torch.ones(1, 2), True)], [3, 1])[1] is True
    # a number that reads none of the batch (a learned temperature) is taken once; one that differs (a counter the
    # model steps per call) makes none
    alike = [(torch.ones(3, 2), torch.tensor(2.5)), (torch.ones(1, 2), torch.tensor(2.5))]
    assert float(whole_output(alike, [3, 1], kinds=[None, "alike"])[1]) == 2.5
    assert whole_output([alike[0], (torch.ones(1, 2), torch.tensor(3.5))], [3, 1], kinds=[None, "alike"]) is None


class Tagger(nn.Module):
    """A CRF-like tagger: its summed loss given tags, its best tags without (pytorch-crf's two calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, tags: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.layer(x)
        if tags is None:
            return scores.argmax(-1)
        return F.cross_entropy(scores, tags, reduction="sum")


def test_time_major_outputs_are_put_together_along_the_dim_of_their_rows() -> None:
    sizes = [3, 3, 2]  # uneven micro-batches: only the rows' dim matches them all
    parts = [(torch.randn(5, rows, 7), torch.randn(rows, 4)) for rows in sizes]
    whole = whole_output(parts, sizes)
    assert whole[0].shape == (5, 8, 7) and whole[1].shape == (8, 4)
    torch.testing.assert_close(whole[0][:, 3:6], parts[1][0])
    assert whole_output([(torch.randn(2, 2),), (torch.randn(2, 2),)], [2, 2])[0].shape == (4, 2)  # dim 0 first
    assert whole_output([(torch.randn(3, 5),), (torch.randn(2, 6),)], [2, 2]) is None  # no dim of the rows


def test_a_model_called_two_ways_in_a_step_keeps_each_ways_numbers() -> None:
    """Validation scores the summed loss and decodes: two captures, two output structures; the calls' whole outputs
    take each structure's kinds (the loss summed), and a structure no capture gives makes no whole output."""
    from lightning_pipe.engine.calls import Calls
    from lightning_pipe.strategy.captured import _output_kinds

    splitter = Splitter(Tagger())
    x, tags = torch.randn(3, 4), torch.tensor([0, 1, 2])
    splitter.capture((x, tags), {}, training=False)
    splitter.capture((x,), {}, training=False)
    known = _output_kinds(splitter.captures)
    assert [kinds for _, kinds in known] == [["sum"], [0]]

    def kinds(structure: object) -> list | None:
        return next((found for other, found in known if other == structure), None)

    parts = [Calls((torch.tensor(2.0), torch.zeros(3, dtype=torch.long))),
             Calls((torch.tensor(5.0), torch.ones(2, dtype=torch.long)))]
    loss, best = whole_output(parts, [3, 2], kinds=kinds).each
    assert float(loss) == 7.0 and best.tolist() == [0, 0, 0, 1, 1]
    assert whole_output([{"loss": torch.tensor(2.0)}, {"loss": torch.tensor(5.0)}], [3, 2], kinds=kinds) is None


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x))) * scale


def test_a_number_argument_that_changes_between_calls_is_named_with_the_fix() -> None:
    """A Python float passed to the model (an annealed scale) is a constant of each capture: the second capture's
    refusal names the argument and its values, and says to pass it as a tensor."""
    splitter = Splitter(Scaled())
    splitter.capture((torch.randn(3, 4),), {"scale": 1.0})
    with pytest.raises(CaptureError, match=r"other values of scale \(1\.0, then 0\.5\).*as a tensor"):
        splitter.capture((torch.randn(3, 4),), {"scale": 0.5})
    # an int that sizes something (the number of graphs a pooling takes) is told to go as a tensor's length (found
    # by review: PyG's pooling needs an int size, which torch.tensor(count) would not give)
    splitter = Splitter(Scaled())
    splitter.capture((torch.randn(3, 4),), {"scale": 2})
    with pytest.raises(CaptureError, match=r"other values of scale \(2, then 3\).*torch\.arange\(count\).*shape\[0\]"):
        splitter.capture((torch.randn(3, 4),), {"scale": 3})


class TaskHeads(nn.Module):
    """A trunk and a head per task, picked by the task's name."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


def test_a_task_name_that_picks_a_head_is_told_a_way_that_works() -> None:
    """"As a tensor" cannot index a ModuleDict: the refusal says to run every head and pick in the step."""
    splitter = Splitter(TaskHeads())
    splitter.capture((torch.randn(3, 4), "a"))
    with pytest.raises(CaptureError, match=r"\('a', then 'b'\).*cannot be a tensor: run every task's head"):
        splitter.capture((torch.randn(3, 4), "b"))


class PerImage(nn.Module):
    """A detector's loss: a Python loop over the batch's images (which fixes their number in the graph), each image's
    loss summed, then divided by ``divisor`` ("rows": their number, torchvision RetinaNet's mean over images)."""

    def __init__(self, divisor: str | float | None) -> None:
        super().__init__()
        self.divisor, self.linear = divisor, nn.Linear(4, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = images.shape[0]
        total = torch.stack([self.linear(images[b]).pow(2).sum() for b in range(rows)]).sum()
        if self.divisor is None:
            return total
        return total / (rows if self.divisor == "rows" else self.divisor)


@pytest.mark.parametrize("divisor, kind", [("rows", "other"), (None, "sum"), (3.0, "sum")])
def test_a_sum_divided_by_the_rows_the_graph_fixed_is_not_taken_for_a_sum(divisor: str | float | None,
                                                                          kind: str) -> None:
    """Divided by the number of rows the graph fixed (2), a sum is a mean over the rows as much as a scaled sum: not
    known (before, a sum: the whole batch's loss was made as the micro-batches' sum, and the step's loss check then
    counted each micro-batch's loss whole, 4 x one device's gradients). By another number it stays a sum."""
    splitter = Splitter(PerImage(divisor))
    splitter.capture((torch.randn(2, 3, 4),), {})
    assert splitter.captures[0].output_kinds == (kind,)


class SummedOverRows(nn.Module):
    """A VAE's loss as PyTorch's example writes it: a sum over the batch divided by its rows, ``x.size(0)`` or
    ``len(x)``."""

    def __init__(self, length: bool) -> None:
        super().__init__()
        self.length, self.linear = length, nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = (self.linear(x) - x).pow(2).sum()
        return total / (len(x) if self.length else x.size(0))


@pytest.mark.parametrize("dynamic, length", [(False, False), (True, True), (True, False)])
def test_a_sum_divided_by_its_rows_in_a_capture_of_fixed_rows_is_not_taken_for_a_sum(dynamic: bool,
                                                                                     length: bool) -> None:
    """Per shape (``dynamic_shapes=False``) or with ``len(x)`` (a Python int), the rows are the constant 2: the
    division is by a number, which may be the rows (before: a sum, 4 x one device's gradients). Symbolic, it is a
    division by the rows' symbol, not a sum either."""
    splitter = Splitter(SummedOverRows(length), dynamic=dynamic)
    splitter.capture((torch.randn(2, 4),), {})
    assert splitter.captures[0].output_kinds == ("other",)
