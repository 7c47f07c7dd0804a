"""A step that sizes the model's input from each batch's values, as speech recipes do (``x[:, :lengths.max()]``, the
padding trimmed to the batch's longest utterance), on 2 gloo ranks against one device: each micro-batch is trimmed to
its own longest row. A model that ignores the padding past each row's length trains as one device does (its
micro-batches' outputs of different lengths are not put together into a batch's), with a warning that says where it
would not and to trim in the collate_fn; one whose capture holds the length fixed (a recurrent layer) is refused on
every rank, saying so (found by review)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_pipe.strategy.step_values import sizes_apart
from tests.helpers import quiet_trainer, run_ranks


class _Utterances(Dataset):
    """Feature frames padded to 20 with zeros past each row's length (10 to 20), and 1 to 3 target tokens."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(5)
        self.lengths = torch.randint(10, 21, (32,), generator=generator)
        self.x = torch.randn(32, 20, 12, generator=generator) * (torch.arange(20)[None, :] < self.lengths[:, None])[
            ..., None]
        self.y_lengths = torch.randint(1, 4, (32,), generator=generator)
        self.y = torch.randint(1, 6, (32, 3), generator=generator)

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "lengths": self.lengths[index], "y": self.y[index],
                "y_lengths": self.y_lengths[index]}


class _Encoder(nn.Module):
    """A strided convolution, then a recurrent layer or a linear one, per frame; the output lengths beside."""

    def __init__(self, recurrent: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 16, 3, stride=2)
        self.middle = nn.LSTM(16, 16, batch_first=True) if recurrent else nn.Linear(16, 16)
        self.out = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x.transpose(1, 2)).transpose(1, 2).relu()
        h = self.middle(h)[0] if isinstance(self.middle, nn.LSTM) else self.middle(h).tanh()
        return self.out(h).log_softmax(-1), torch.div(lengths - 3, 2, rounding_mode="floor") + 1


def _module(recurrent: bool, summed: bool = False, trimmed: bool = True) -> Any:
    import lightning as L

    class Recognizer(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _Encoder(recurrent)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            longest = int(batch["lengths"].max()) if trimmed else batch["x"].shape[1]  # (the padding past the
            log_probs, out_lengths = self.model(batch["x"][:, :longest], batch["lengths"])  # batch's longest row)
            loss = F.ctc_loss(log_probs.transpose(0, 1), batch["y"], out_lengths, batch["y_lengths"],
                              zero_infinity=True, reduction="sum" if summed else "mean")
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(4, verbose=False)
    return Recognizer()


def _fit(recurrent: bool, devices: int, strategy: Any) -> dict[str, Any]:
    model = _module(recurrent)
    trainer = quiet_trainer(devices, strategy, max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(_Utterances(), batch_size=8))
    return {"state": {key: value.clone() for key, value in model.state_dict().items()},  # (this rank's share)
            "train_loss": float(trainer.callback_metrics["train_loss"]),
            "warnings": [str(warning.message) for warning in caught]}


def _ranks(rank: int, world_size: int, recurrent: bool) -> dict[str, Any]:
    from lightning_pipe import PipelineStrategy

    return _fit(recurrent, world_size, PipelineStrategy(num_microbatches=4, wait_timeout=60))


@pytest.mark.timeout(240)
def test_micro_batches_trimmed_each_to_its_longest_row_train_as_one_device_where_the_model_ignores_padding() -> None:
    results = run_ranks(_ranks, 2, False, timeout=220)
    reference = _fit(False, 1, "auto")
    for rank in (0, 1):
        assert results[rank]["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    said = [text for rank in (0, 1) for text in results[rank]["warnings"] if "inputs of different sizes" in text]
    assert said and "collate_fn" in said[0], [text[:200] for rank in (0, 1) for text in results[rank]["warnings"]]
    assert not any("Return outputs with the batch's rows along one dim" in text for text in results[1]["warnings"])
    assert not any("inputs of different sizes" in text for text in reference["warnings"])
    held = {**results[0]["state"], **results[1]["state"]}
    assert set(held) == set(reference["state"])
    for key, value in reference["state"].items():
        torch.testing.assert_close(held[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.timeout(180)
def test_micro_batches_trimmed_to_lengths_a_capture_holds_fixed_are_refused_saying_to_trim_in_the_collate_fn() -> None:
    errors = run_ranks(_ranks, 2, True, timeout=160, expect_failure=True)
    assert len(errors) == 2
    for error in errors:
        assert "differ from a capture's only in sizes" in error and "collate_fn" in error, error[-2000:]


def test_outputs_differ_in_size_besides_their_rows_where_a_length_differs_not_where_a_detector_finds_boxes() -> None:
    trimmed = [(torch.zeros(2, length, 6), torch.zeros(2)) for length in (9, 7)]  # (rows, time, classes), lengths
    time_major = [torch.zeros(length, 2, 6) for length in (9, 7)]
    assert sizes_apart(trimmed, [2, 2]) and sizes_apart(time_major, [2, 2])
    boxes = [[torch.zeros(count, 4), torch.zeros(count)] for count in (3, 5)]  # one image's boxes and scores each
    alike = [torch.zeros(rows, 9, 6) for rows in (3, 2)]
    assert not sizes_apart(boxes, [1, 1]) and not sizes_apart(alike, [3, 2])


def _summed(rank: int, world_size: int, told: bool, trimmed: bool) -> dict[str, Any]:
    """A summed CTC loss over micro-batches of one row each (a recurrent model, whose capture holds the rows fixed),
    told or not; ``trimmed``: over a linear model, each micro-batch trimmed to its longest row."""
    from lightning_pipe import PipelineStrategy

    model = _module(not trimmed, summed=True, trimmed=trimmed)
    strategy = PipelineStrategy(num_microbatches=4, wait_timeout=60, loss_reduction="sum" if told else "auto") \
        if world_size > 1 else "auto"
    trainer = quiet_trainer(world_size, strategy, max_steps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(_Utterances(), batch_size=4))
    return {"state": {key: value.clone() for key, value in model.state_dict().items()},
            "warnings": [str(warning.message) for warning in caught]}


def _assert_one_devices(results: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    held = {**results[0]["state"], **results[1]["state"]}
    for key, value in reference["state"].items():
        torch.testing.assert_close(held[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.timeout(300)
def test_a_summed_loss_over_one_row_micro_batches_of_a_recurrent_model_is_told_a_sum_or_said_where_not() -> None:
    """A summed CTC loss over micro-batches of one row each of a recurrent model, whose capture holds the rows fixed,
    was not told a sum (its outputs were taken for reduced over the rows, and did not put together into a batch's):
    it trained at a quarter of one device's gradients without a word (found by review). Now told, as one device.
    Where the first batches cannot tell (micro-batches trimmed each to its own length, whose outputs make no batch's)
    it is said, with the loss_reduction to pass, which gives one device's weights."""
    found = run_ranks(_summed, 2, False, False, timeout=280)
    assert not any("could not be checked" in text for result in found for text in result["warnings"])
    _assert_one_devices(found, _summed(0, 1, False, False))
    untold = run_ranks(_summed, 2, False, True, timeout=280)
    said = [text for result in untold for text in result["warnings"] if "could not be checked" in text]
    assert said and "loss_reduction='sum'" in said[0], [text[:150] for r in untold for text in r["warnings"]]
    told = run_ranks(_summed, 2, True, True, timeout=280)
    assert not any("could not be checked" in text for result in told for text in result["warnings"])
    _assert_one_devices(told, _summed(0, 1, True, True))


class _OnFrames(nn.Module):
    """A layer on each frame of ``(x, lengths)``, the lengths passed on."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(width, out)

    def forward(self, given: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = given
        return torch.tanh(self.layer(x)), lengths


class _Unpadded(nn.Module):
    """The frames up to the longest row's length: as ``pad_packed_sequence`` gives them, without ``total_length``."""

    def forward(self, given: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, lengths = given
        return x[:, :int(lengths.max())].log_softmax(-1)


def _unpadded(rank: int, world_size: int) -> dict[str, Any]:
    import lightning as L

    from lightning_pipe import PipelineStrategy

    class Tagger(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.Sequential(_OnFrames(12, 16), _OnFrames(16, 6), _Unpadded())

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            log_probs = self.layers((batch["x"], batch["lengths"]))
            loss = F.ctc_loss(log_probs.transpose(0, 1), batch["y"], batch["lengths"], batch["y_lengths"],
                              zero_infinity=True)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    strategy = PipelineStrategy(num_microbatches=4, wait_timeout=60) if world_size > 1 else "auto"
    model, trainer = Tagger(), quiet_trainer(world_size, strategy, max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(_Utterances(), batch_size=8))
    return {"state": {key: value.clone() for key, value in model.state_dict().items()},
            "warnings": [str(warning.message) for warning in caught]}


@pytest.mark.timeout(240)
def test_outputs_a_model_gives_of_each_micro_batchs_length_from_inputs_alike_are_not_said_to_be_trimmed() -> None:
    """A model that gives each micro-batch's frames up to its longest row (``pad_packed_sequence`` without
    ``total_length``), from inputs of one length, is not said to be given inputs of different sizes (found by
    review: a packed BiLSTM, exact, was)."""
    results = run_ranks(_unpadded, 2, timeout=220)
    assert not any("inputs of different sizes" in text for result in results for text in result["warnings"])
    _assert_one_devices(results, _unpadded(0, 1))
