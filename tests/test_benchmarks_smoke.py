"""The benchmarks run end to end at tiny sizes and write rows with the documented keys and sane values."""

from __future__ import annotations

import json

import pytest

from benchmarks import host_overhead, memory, schedule_efficiency

pytestmark = pytest.mark.timeout(120)


def test_schedule_efficiency_rows(tmp_path, capsys):
    path = tmp_path / "eff.json"
    schedule_efficiency.main(["-p", "2", "-m", "2", "--t-f", "1", "--t-b", "2", "--warmup", "1", "--steps", "2",
                              "--rounds", "1", "--json", str(path)])
    rows = json.loads(path.read_text())
    keys = {"schedule", "impl", "stages", "microbatches", "step_ms", "ideal_ms", "ratio"}
    assert {(row["schedule"], row["impl"]) for row in rows} == {
        (s, i) for s in ("gpipe", "1f1b") for i in ("lightning_pipe", "torch", "torch_1thread")}
    for row in rows:
        assert keys <= set(row)
        assert row["stages"] == 2 and row["microbatches"] == 2
        assert row["ideal_ms"] == pytest.approx(9.0)  # (m + p - 1) * (t_f + t_b)
        assert row["ratio"] >= 0.98  # a step cannot beat the sleeps it is made of
        assert row["ratio"] == pytest.approx(row["step_ms"] / row["ideal_ms"])
    assert "| schedule | impl |" in capsys.readouterr().out


def test_host_overhead_rows(tmp_path, capsys):
    path = tmp_path / "overhead.json"
    host_overhead.main(["-p", "2", "-m", "2", "--schedules", "1f1b", "--rounds", "1", "--steps", "2", "--warmup", "1",
                        "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [row["impl"] for row in rows] == list(host_overhead.IMPLS)
    for row in rows:
        assert row["schedule"] == "1f1b" and row["actions_per_rank"] == 4
        assert row["step_ms_low"] <= row["step_ms_high"] and row["ms_per_action"] > 0
        assert row["ms_per_action"] == pytest.approx(row["step_ms"] / 4)
    assert rows[-1]["vs_torch"] == pytest.approx(1.0)
    assert "| schedule | impl |" in capsys.readouterr().out


def test_memory_rows_have_the_expected_shape(tmp_path):
    path = tmp_path / "memory.json"
    memory.main(["-p", "2", "-m", "2", "--width", "32", "--rows", "4", "--json", str(path)])
    rows = json.loads(path.read_text())
    async_rows = [row for row in rows if row["schedule"] in ("async_1f1b", "2bw")]
    rows = [row for row in rows if row not in async_rows]
    versions = {(row["schedule"], row["rank"]): row["weight_versions"] for row in async_rows}
    assert versions == {("async_1f1b", 0): 2, ("async_1f1b", 1): 1, ("2bw", 0): 2, ("2bw", 1): 2}
    keys = {"schedule", "remat", "rank", "saved_bytes_peak", "activation_microbatches_peak", "peak_rss_mb"}
    assert len(rows) == 3 * 2
    for row in rows:
        assert keys <= set(row)
        assert row["saved_bytes_peak"] > 0 and row["peak_rss_mb"] > 0
    by = {(row["schedule"], row["remat"], row["rank"]): row["activation_microbatches_peak"] for row in rows}
    assert by["gpipe", False, 0] == by["gpipe", False, 1] == 2  # m micro-batches on every stage
    assert (by["1f1b", False, 0], by["1f1b", False, 1]) == (2, 1)  # p - s micro-batches on stage s
    assert by["gpipe", True, 0] < 2  # re-materialization keeps only the stage input
    config = memory.Config(stages=2, microbatches=2, width=32, rows=4)
    assert memory.check_shape(rows, config) == []


def test_saved_tensor_counter_counts_each_storage_once_and_frees_after_backward():
    import torch

    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with memory.SavedTensorCounter(exclude=linear.parameters()) as counter:
        hidden = torch.relu(linear(x))  # Linear saves x; ReLU saves its output, which the next Linear saves again
        out = linear(hidden).sum()
        assert counter.bytes == 2 * 4 * 8 * 4
    out.backward()
    assert counter.bytes == 0 and counter.peak == 2 * 4 * 8 * 4


@pytest.mark.timeout(240)
def test_uneven_replication_rows(tmp_path):
    """Every layout trains through the Trainer on 4 ranks; none beats the sleeps it is made of."""
    from benchmarks import uneven_replication

    path = tmp_path / "uneven.json"
    uneven_replication.main(["--grad-mb", "0", "--heavy", "0.5", "--batch-size", "24", "--warmup", "1", "--steps",
                             "1", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [row["config"] for row in rows] == ["3-1", "2x2", "4x1", "1x4"]
    for row in rows:
        assert row["ideal_ms"] == pytest.approx(24 * 4 * 0.5 / 4)
        assert row["ratio"] >= 0.98 and row["vs_3-1"] == pytest.approx(row["step_ms"] / rows[0]["step_ms"])
    assert sum(row["fastest"] == "yes" for row in rows) == 1


def test_capture_overhead_row(tmp_path):
    """The captured and the direct variant train the same model side by side; the row has both times and the ratio."""
    from benchmarks import capture_overhead

    path = tmp_path / "capture.json"
    capture_overhead.main(["--width", "16", "--layers", "2", "--block-size", "8", "--batch-size", "4", "--steps", "2",
                           "--warmup", "1", "--json", str(path)])
    (row,) = json.loads(path.read_text())
    assert row["segments"] == 4  # Embed, two blocks, Head: one segment per layer
    assert row["capture_s"] > 0
    for prefix in ("wall", "cpu"):
        assert row[f"{prefix}_direct_ms"] > 0 and row[f"{prefix}_captured_ms"] > 0
        spread = [row[f"{prefix}_ratio{key}"] for key in ("_min", "_q1", "", "_q3", "_max")]
        assert spread == sorted(spread)


@pytest.mark.timeout(240)
def test_random_step_code_denoiser_learns_through_the_pipeline(tmp_path):
    """The diffusion-style denoiser (noise drawn in the step code, dropout in its first layers) learns as on one
    device; when the stages drew different noise it stayed at ~1.0, the noise's variance."""
    from benchmarks import random_step_code

    path = tmp_path / "denoiser.json"
    result = random_step_code.main(["--steps", "100", "--tail", "20", "--json", str(path)])
    assert json.loads(path.read_text())["pipeline"] == result["pipeline"]
    assert result["one_device"] < 0.5 and result["pipeline"] < 0.5
    assert abs(result["pipeline"] - result["one_device"]) < 0.1


def test_result_sharing_rows(tmp_path):
    from benchmarks import result_sharing

    path = tmp_path / "sharing.json"
    result_sharing.main(["--steps", "40", "--block", "10", "--json", str(path)])
    rows = json.loads(path.read_text())
    assert rows["steps"] == 40 and all(rows[side]["median_us"] > 0 for side in ("pickled", "all_reduce", "messages"))


def test_bigger_rows(tmp_path):
    from benchmarks import bigger

    path = tmp_path / "bigger.json"
    bigger.main(["--size-mb", "4", "--ranks", "2", "--formats", "sharded", "--folder", str(tmp_path),
                 "--json", str(path)])
    rows = json.loads(path.read_text())
    assert [row["rank"] for row in rows] == [0, 1]
    for row in rows:
        assert row["format"] == "sharded" and row["ranks"] == 2 and row["model_mb"] == 4
        assert all(row[phase] > 0 for phase in bigger.PHASES) and row["save_s"] > 0 and row["load_s"] > 0
        # Adam's states exist from the first step on: training holds more than setup
        assert row["training"] > row["setup"] and row["resumed_training"] > row["setup"]
    assert [name for name in tmp_path.iterdir() if name.name.endswith(".ckpt")] == []  # checkpoints removed


@pytest.mark.parametrize("one_device", [False, True], ids=["pipeline", "one-device-reference"])
def test_lightning_overhead_rows(tmp_path, one_device):
    from benchmarks import lightning_overhead

    path = tmp_path / "overhead.json"
    lightning_overhead.main(["--width", "16", "--layers", "2", "--block-size", "16", "--batch-size", "8",
                             "--steps", "8", "--warmup", "2", "--json", str(path)] + (["--one-device"] if one_device
                                                                                        else []))
    result = json.loads(path.read_text())
    assert result["config"]["one_device"] is one_device
    for name in ("best", "median"):
        assert result[name]["engine_tokens_per_s"] > 0 and result[name]["trainer_tokens_per_s"] > 0
        assert result[name]["ratio"] == pytest.approx(result[name]["trainer_tokens_per_s"]
                                                      / result[name]["engine_tokens_per_s"])


def test_pretrained_rows(tmp_path):
    from benchmarks import pretrained
    from tests.capture_models import HAS_TRANSFORMERS

    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (pip install -e '.[dev]')")
    rows = pretrained.run(4, 2, "float32", "bf16-true", str(tmp_path))
    assert [row["rank"] for row in rows] == [0, 1]
    for row in rows:
        assert row["stored"] == "float32" and row["precision"] == "bf16-true" and row["ranks"] == 2
        assert all(row[key] >= 0 for key in ("loaded_mapped_mb", "loaded_anon_mb", "mapped_mb", "anon_mb"))
        # each rank holds its share, in bfloat16: less than half the float32 checkpoint
        assert 0 < row["local_mb"] < row["checkpoint_mb"] / 2 and row["setup_peak_mb"] > 0
