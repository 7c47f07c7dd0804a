"""Tests of ``python -m lightning_pipe.schedule``."""

import subprocess
import sys

from lightning_pipe.schedule import main


def test_show_prints_grid_bubble_and_peaks(capsys):
    assert main(["show", "1f1b", "--stages", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert "   0 | 0F0" in out
    assert "bubble fraction 0.273" in out  # 3 / 11
    assert "   0 |         0.273 | 4" in out and "   3 |         0.273 | 1" in out


def test_show_interleaved_with_png(tmp_path, capsys):
    png = tmp_path / "il.png"
    argv = ["show", "interleaved_1f1b", "--stages", "2", "--microbatches", "4", "--virtual-stages", "2",
            "--png", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 ranks, 4 stages, 4 micro-batches" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_show_costs(capsys):
    argv = ["show", "zb_h1", "--stages", "4", "--microbatches", "8", "--backward-weight", "0.5"]
    assert main(argv) == 0
    assert "pipeline 24.5" in capsys.readouterr().out  # 8 * 2.5 + 3 * (1 + 1 - 0.5)


def test_show_replicated_stages(capsys):
    """--replicas 3,1: stage 0's costs are three times stage 1's. Each stage-0 replica is busy 2 x (3 + 6) = 18, and
    the last one idles 9 waiting for its gradients: 27."""
    assert main(["show", "1f1b", "--replicas", "3,1", "--microbatches", "6"]) == 0
    out = capsys.readouterr().out
    assert "replicated_1f1b: 4 ranks, 2 stages, 6 micro-batches" in out and "pipeline 27" in out
    assert main(["show", "1f1b", "--replicas", "1,3", "--microbatches", "6"]) == 2
    assert "the last stage must have one rank" in capsys.readouterr().err


def test_show_takes_the_names_the_strategy_takes(capsys):
    """The strategy's aliases and any case ("interleaved", "pipedream", "GPipe") were unknown here (found by review)."""
    for alias, name in (("interleaved", "interleaved_1f1b"), ("PipeDream", "1f1b"), ("GPipe", "gpipe")):
        assert main(["show", alias, "--stages", "2", "--microbatches", "4"]) == 0
        shown = capsys.readouterr().out
        assert main(["show", name, "--stages", "2", "--microbatches", "4"]) == 0
        assert shown == capsys.readouterr().out


def test_errors_say_how_to_fix(capsys):
    assert main(["show", "interleaved_1f1b", "--stages", "4", "--microbatches", "6"]) == 2
    assert "use 8 or schedule='1f1b'" in capsys.readouterr().err
    assert main(["show", "nope", "--stages", "4", "--microbatches", "6"]) == 2
    assert "unknown schedule 'nope'" in capsys.readouterr().err


def test_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "lightning_pipe.schedule", "list"], capture_output=True,
                            text=True, check=True)
    assert "zb_h1" in result.stdout.split()
