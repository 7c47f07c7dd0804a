"""Splitting a batch into micro-batches: per-row data that is not a tensor goes with its rows; an empty batch is refused."""

from __future__ import annotations

import dataclasses
import warnings
from collections import UserDict, namedtuple
from typing import Any

import pytest
import torch

from lightning_pipe.engine.executor import Pipeline
from lightning_pipe.engine.microbatch import batch_rows, microbatch_weights, owned, split_batch
from lightning_pipe.engine.tree import tree_flatten, tree_map_tensors, tree_unflatten
from tests.helpers import run_ranks
from tests.models import mlp


def test_a_list_of_one_string_per_row_is_split_with_the_rows() -> None:
    x = torch.arange(10)
    parts = split_batch({"x": x, "names": [f"n{i}" for i in range(10)], "ids": tuple(range(10))}, 4)
    assert [p["names"] for p in parts] == [["n0", "n1", "n2"], ["n3", "n4", "n5"], ["n6", "n7"], ["n8", "n9"]]
    assert [p["ids"] for p in parts] == [(0, 1, 2), (3, 4, 5), (6, 7), (8, 9)]
    for part in parts:  # the names stay with their rows
        assert [f"n{int(i)}" for i in part["x"]] == part["names"]


def test_per_row_items_may_be_any_value_without_tensors() -> None:
    meta = [{"path": f"{i}.png", "size": (i, i)} for i in range(4)]
    parts = split_batch((torch.zeros(4, 3), meta), 2)
    assert [p[1] for p in parts] == [meta[:2], meta[2:]]


def _targets(counts: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per-image detection targets, as a custom collate_fn leaves them: one dict per row, ``counts[i]`` boxes each."""
    return [{"boxes": torch.full((n, 4), float(i)), "labels": torch.full((n,), i)} for i, n in enumerate(counts)]


def test_a_list_with_one_dict_of_tensors_per_row_is_split_with_the_rows() -> None:
    images = torch.arange(8.0).view(8, 1)
    for counts in ([1, 2, 3, 1, 2, 3, 1, 2], [1, 3], [3] * 8):
        rows = len(counts)
        batch = (images[:rows], _targets(counts))
        assert batch_rows(batch) == rows
        for part in split_batch(batch, 4):
            x, targets = part
            assert batch_rows(part, microbatch=True) == len(x)  # a micro-batch reads as it was cut
            assert [int(t["labels"][0]) for t in targets] == [int(v) for v in x[:, 0]]
            assert [len(t["boxes"]) for t in targets] == [counts[int(v)] for v in x[:, 0]]


def test_dicts_of_as_many_rows_as_the_batch_are_columns_and_a_batch_of_lists_alone_is_refused() -> None:
    """Two encodings of 2 rows each (a pair, as DPO's chosen and rejected) are columns, as before; per-image targets
    with exactly as many boxes as the batch has images look the same, which a warning says. Without a tensor of the
    batch's rows beside them (torchvision's ``tuple(zip(*batch))``), lists of items have no rows to read."""
    pair = [{"input_ids": torch.arange(6).view(2, 3)}, {"input_ids": torch.arange(6, 14).view(2, 4)}]
    with pytest.warns(UserWarning, match="split as columns"):
        parts = split_batch(pair, 2)
    assert [[p[0]["input_ids"].shape, p[1]["input_ids"].shape] for p in parts] == [[(1, 3), (1, 4)]] * 2
    for rows in (4, 8):  # pairs in batches of other sizes: columns, and nothing to warn about
        encodings = [{"input_ids": torch.zeros(rows, 3)}, {"input_ids": torch.zeros(rows, 5)}]
        assert batch_rows(encodings) == rows
    # a micro-batch of 3 images with 3 boxes each, cut from a batch read per row, is not warned of
    batch = (torch.zeros(7, 2), _targets([1, 2, 1, 2, 3, 3, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parts = split_batch(batch, 2)
        assert [batch_rows(part, microbatch=True) for part in parts] == [4, 3]
        assert batch_rows(owned(parts[1])[0]) == 3
    with pytest.warns(UserWarning, match="split as columns"):  # read as a batch of its own: as above
        batch_rows(parts[1])
    images = tuple(torch.zeros(3, 8 + i, 8) for i in range(4))
    with pytest.raises(ValueError, match="beside a tensor of the batch's rows"):
        split_batch((images, tuple(_targets([1, 3, 2, 3]))), 2)


def test_a_list_of_ragged_tensors_one_per_row_is_split_but_equal_sized_columns_stay_columns() -> None:
    x = torch.arange(8.0).view(8, 1)
    sequences = tuple(torch.full((1 + i % 4,), float(i)) for i in range(8))  # ragged: not columns of 8 rows
    parts = split_batch((x, sequences), 4)
    assert all([float(s[0]) for s in p[1]] == p[0][:, 0].tolist() for p in parts)
    assert [batch_rows(p) for p in parts] == [2, 2, 2, 2]
    for rows in (2, 8):  # [x, y] of one dtype and shape: columns, also when the batch has as many rows as columns
        columns = [torch.randn(rows, 5), torch.randn(rows, 5)]
        assert batch_rows(columns) == rows
        assert all(len(p) == 2 and p[0].shape == (rows // 2, 5) for p in split_batch(columns, 2))


def test_a_batch_whose_rows_cannot_be_told_is_refused_saying_what_splits() -> None:
    with pytest.raises(ValueError, match="apart from lists with one item .* per row beside"):
        split_batch((torch.zeros(8, 2), [torch.zeros(3), torch.zeros(5)]), 2)  # 2 items: not one per row


def test_other_leaves_are_given_whole_to_every_microbatch() -> None:
    constant, scale = ["a", "b", "c"], torch.tensor(0.5)  # 3 items in a batch of 8 rows: not per-row
    parts = split_batch((torch.zeros(8, 2), constant, scale, "tag", 7), 4)
    for part in parts:
        assert part[1] == constant and part[2] is scale and part[3:] == ("tag", 7)


def test_a_container_of_tensors_is_a_container_whatever_its_length() -> None:
    x, y = torch.randn(2, 3), torch.randn(2, 3)  # two rows, and the batch is a 2-tuple: still (x, y)
    parts = split_batch((x, y), 2)
    assert len(parts) == 2 and all(isinstance(p, tuple) and len(p) == 2 for p in parts)
    torch.testing.assert_close(parts[1][0], x[1:])
    pair = namedtuple("pair", "a b")  # a namedtuple is a record, never per-row
    parts = split_batch((torch.zeros(2, 1), pair("p", "q")), 2)
    assert [p[1] for p in parts] == [pair("p", "q")] * 2 and all(type(p[1]) is pair for p in parts)


def test_splits_match_tensor_split_and_weights_add_to_one() -> None:
    for rows in range(1, 12):
        for m in range(1, 6):
            x = torch.arange(rows)
            parts = split_batch(x, m)
            assert [p.tolist() for p in parts] == [p.tolist() for p in torch.tensor_split(x, min(m, rows))]
            assert abs(sum(microbatch_weights(parts)) - 1.0) < 1e-12


def test_an_empty_batch_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="the batch has 0 rows.*drop_last=True"):
        split_batch((torch.zeros(0, 3), torch.zeros(0)), 4)


def _names_and_an_empty_batch(rank: int, world_size: int) -> tuple[list, str]:
    seen = []

    def loss_fn(output, microbatch):
        x, y, names = microbatch
        assert names == [f"row{int(i)}" for i in x[:, 0]], "the names are not those of the micro-batch's rows"
        seen.append(names)
        return torch.nn.functional.mse_loss(output, y)

    pipe = Pipeline(mlp(num_layers=4), loss_fn=loss_fn, schedule="1f1b", num_microbatches=4)
    x = torch.arange(10.0).unsqueeze(1).repeat(1, 16)
    pipe.train_step((x, torch.zeros(10, 16), [f"row{i}" for i in range(10)]))
    try:
        pipe.train_step((torch.zeros(0, 16), torch.zeros(0, 16), []))
    except ValueError as error:
        return seen, str(error)
    return seen, "no error"


@pytest.mark.timeout(120)
def test_per_row_names_reach_the_loss_and_an_empty_batch_fails_on_every_rank_at_once() -> None:
    (seen_0, error_0), (seen_1, error_1) = run_ranks(_names_and_an_empty_batch, 2, timeout=100)
    assert seen_0 == [] and [len(names) for names in seen_1] == [3, 3, 2, 2]
    assert "the batch has 0 rows" in error_0 and "the batch has 0 rows" in error_1


class _Encoding(UserDict):
    """A mapping that is not a dict, as Hugging Face's BatchEncoding (a UserDict with attribute access)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


def test_a_mapping_that_is_not_a_dict_splits_and_keeps_its_type() -> None:
    """A data collator's BatchEncoding is split like a dict and each micro-batch is one again (``batch.input_ids``
    and ``model(**batch)`` keep working); tree_flatten round-trips it."""
    batch = _Encoding({"input_ids": torch.arange(10).view(5, 2), "attention_mask": torch.ones(5, 2), "name": "x"})
    parts = split_batch(batch, 2)
    assert [type(part) for part in parts] == [_Encoding, _Encoding]
    assert parts[0].input_ids.tolist() == [[0, 1], [2, 3], [4, 5]] and parts[1].input_ids.tolist() == [[6, 7], [8, 9]]
    assert parts[1]["name"] == "x" and batch_rows(batch) == 5
    leaves, spec = tree_flatten(batch)
    rebuilt = tree_unflatten(leaves, spec)
    assert type(rebuilt) is _Encoding and rebuilt.keys() == batch.keys()
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.arange(8).view(4, 2)})
    assert [type(p).__name__ for p in split_batch(encoding, 2)] == ["BatchEncoding", "BatchEncoding"]


def test_a_dataclass_batch_splits_field_by_field() -> None:
    """A batch kept in a dataclass (its tensors in fields): each micro-batch is one of the same class."""
    from dataclasses import dataclass, field

    @dataclass
    class Batch:
        tokens: torch.Tensor
        labels: torch.Tensor
        source: str = "train"
        count: int = field(default=0, init=False)

    batch = Batch(torch.arange(12).view(6, 2), torch.arange(6), "val")
    parts = split_batch(batch, 4)
    assert [type(part) for part in parts] == [Batch] * 4 and batch_rows(batch) == 6
    assert [part.labels.tolist() for part in parts] == [[0, 1], [2, 3], [4], [5]]
    assert all(part.source == "val" for part in parts)
    leaves, spec = tree_flatten(batch)
    rebuilt = tree_unflatten(leaves, spec)
    assert type(rebuilt) is Batch and torch.equal(rebuilt.tokens, batch.tokens) and rebuilt.source == "val"


def test_a_batch_class_of_the_users_own_is_refused_saying_to_make_it_a_dataclass() -> None:
    class Batch:  # tensors in attributes, a .to() for Lightning's transfer: no tree walk reads them
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.x, self.y = x, y

        def to(self, device: Any) -> Batch:
            return Batch(self.x.to(device), self.y.to(device))

    for batch in (Batch(torch.ones(4, 2), torch.ones(4)), {"pair": Batch(torch.ones(4, 2), torch.ones(4))}):
        with pytest.raises(ValueError, match=r"a batch of Batch \(a class of its own\).* Make it a dataclass"):
            split_batch(batch, 2)
    with pytest.raises(ValueError, match="batch of single numbers"):  # no object holding tensors: as before
        split_batch([torch.tensor(1.0), "name"], 2)


def test_a_dict_subclass_keeps_its_type_through_a_tree() -> None:
    """A model's output of a dict subclass (Hugging Face's ModelOutput) is rebuilt as its own class, not a dict: the
    step reads ``.logits`` off the whole batch's output when it checks how the loss adds up."""

    class Output(dict):
        @property
        def logits(self) -> torch.Tensor:
            return self["logits"]

    leaves, spec = tree_flatten(Output(logits=torch.ones(2)))
    rebuilt = tree_unflatten(leaves, spec)
    assert type(rebuilt) is Output and torch.equal(rebuilt.logits, torch.ones(2))
    transformers = pytest.importorskip("transformers")
    output = transformers.modeling_outputs.SemanticSegmenterOutput(logits=torch.ones(2, 3))
    leaves, spec = tree_flatten(output)
    rebuilt = tree_unflatten(leaves, spec)
    assert type(rebuilt) is type(output) and torch.equal(rebuilt.logits, output.logits)


def test_a_dict_of_loaders_batches_with_different_rows_says_to_give_them_one_batch_size() -> None:
    batch = {"a": (torch.zeros(16, 8), torch.zeros(16, 1)), "b": (torch.zeros(8, 8), torch.zeros(8, 1))}
    with pytest.raises(ValueError, match=r"entries \['a', 'b'\] have \[16, 8\] rows each.*one batch_size and "
                                         r"drop_last=True"):
        batch_rows(batch)


def test_owned_micro_batches_have_tensors_of_their_own_and_keep_the_batchs_types() -> None:
    batch = {"x": torch.arange(12.0).reshape(6, 2), "names": list("abcdef"), "scale": torch.tensor(2.0)}
    views = split_batch(batch, 3)
    views[1]["x"].mul_(2)  # a view: reaches the batch and bumps every view's version
    assert batch["x"][2, 0] == 8.0 and views[0]["x"]._version == 1
    for piece in split_batch(batch, 3, copy=True) + [owned(views[2])]:
        version = views[0]["x"]._version
        piece["x"].mul_(10)
        piece["scale"].add_(1)
        assert views[0]["x"]._version == version and batch["scale"] == 2.0
        assert piece["names"] in (["a", "b"], ["c", "d"], ["e", "f"])
    assert batch["x"][0, 0] == 0.0 and batch["x"][4, 0] == 8.0


def test_a_packed_sequence_or_a_nested_tensor_is_refused_with_what_to_give_instead() -> None:
    """Neither lays out rows along dim 0: a PackedSequence got a bare shapes message (its data, batch sizes and
    indices), a nested tensor torch's "slice(): not supported for NestedTensor" (found by review)."""
    from torch.nn.utils.rnn import pack_sequence

    sequences = [torch.randn(3, 2), torch.randn(2, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's prototype warning for the strided layout)
        batches = {"a PackedSequence": (pack_sequence(sequences, enforce_sorted=False), torch.zeros(2)),
                   "a nested tensor": {"x": torch.nested.nested_tensor(sequences, layout=torch.jagged)},
                   "a nested tensor ": [torch.nested.nested_tensor(sequences), torch.zeros(2)]}
    for what, batch in batches.items():
        with pytest.raises(ValueError, match=f"cannot split a batch holding {what.strip()} into") as caught:
            split_batch(batch, 2)
        assert "a list of tensors, one per row" in str(caught.value) and "pad_sequence" in str(caught.value)


@dataclasses.dataclass
class _Scaled:
    """A batch class whose __post_init__ transforms its input (a scale), derives a field (its rows) and leaves one for
    the collate_fn to set after it."""

    pixels: torch.Tensor
    labels: torch.Tensor
    tokens: int = 0  # (taken by the constructor, and counted by __post_init__ from the rows)
    rows: int = dataclasses.field(init=False)
    weights: Any = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        self.pixels = self.pixels / 255
        self.rows = self.pixels.shape[0]
        self.tokens = int(self.labels.numel())


def test_a_dataclass_batch_is_split_without_transforming_its_fields_again() -> None:
    """Rebuilt by its constructor, each micro-batch's pixels were divided by 255 twice (silent), and a field set after
    construction was lost (found by review): the part keeps the transformed rows, derives its own row count, and
    holds its rows of a field set later and of an attribute outside the fields."""
    batch = _Scaled(torch.arange(12.0).view(6, 2) * 255, torch.arange(6))
    batch.weights = torch.linspace(0, 1, 6)
    batch.source = "collate"  # not a field
    batch.extra = torch.arange(6.0)  # per-row, not a field either: split with the rows (review: went whole)
    parts = split_batch(batch, 3)
    assert [part.extra.tolist() for part in parts] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert torch.equal(torch.cat([part.pixels for part in parts]), batch.pixels)
    assert [part.rows for part in parts] == [2, 2, 2] and batch.rows == 6
    assert [part.tokens for part in parts] == [2, 2, 2] and batch.tokens == 6  # (review: the whole batch's count)
    assert torch.equal(torch.cat([part.weights for part in parts]), batch.weights)
    assert all(part.source == "collate" for part in parts)
    moved = tree_map_tensors(torch.Tensor.clone, batch)  # (a move to a device, a detach): a copy, not made again
    assert torch.equal(moved.pixels, batch.pixels) and moved.rows == 6 and moved.source == "collate"
    assert moved.pixels is not batch.pixels


@dataclasses.dataclass
class _Fixed:
    x: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != 4:
            raise ValueError("a batch holds 4 rows")


def test_a_dataclass_whose_constructor_refuses_a_part_is_copied_field_by_field() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no field outside the rows: nothing to say)
        parts = split_batch(_Fixed(torch.arange(4.0)), 2)
    assert [part.x.tolist() for part in parts] == [[0.0, 1.0], [2.0, 3.0]] and type(parts[0]) is _Fixed


@dataclasses.dataclass
class _Counted:
    x: torch.Tensor
    scale: dataclasses.InitVar[float]  # (no default: dataclasses.replace cannot make a part)
    rows: int = dataclasses.field(init=False)
    augmented: bool = True  # (a flag and a weight, not counts: not named)
    weight: float = 0.5

    def __post_init__(self, scale: float) -> None:
        self.x, self.rows = self.x * scale, len(self.x)


def test_a_dataclass_whose_constructor_cannot_make_a_part_says_which_fields_stay_the_whole_batchs() -> None:
    """A row count derived by __post_init__ from an InitVar's batch was the whole batch's in every part, silently
    (found by review): said, naming the field."""
    with pytest.warns(UserWarning, match=r"_Counted's constructor refuses .*InitVar.* \(rows\) keep the whole"):
        parts = split_batch(_Counted(torch.arange(4.0), 2.0), 2)
    assert [part.x.tolist() for part in parts] == [[0.0, 2.0], [4.0, 6.0]]


@dataclasses.dataclass
class _MinMax:
    x: torch.Tensor

    def __post_init__(self) -> None:
        self.x = (self.x - self.x.min()) / (self.x.max() - self.x.min())


def test_a_dataclass_batch_scaled_over_the_whole_batch_is_not_scaled_again_per_micro_batch() -> None:
    """A min-max scaling over the batch in __post_init__ was applied again to each micro-batch's rows (found by
    review): the micro-batches hold the batch's rows as one device sees them."""
    batch = _MinMax(torch.arange(8.0))
    assert torch.equal(torch.cat([part.x for part in split_batch(batch, 2)]), batch.x)
