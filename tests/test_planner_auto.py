"""Tests of schedule="auto", per-cut links in the simulator, topologies, and the plan command line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from lightning_pipe.engine.schedules import one_f_one_b
from lightning_pipe.planner import LayerProfile, Level, Link, StageCost, Topology, plan_pipeline, predict
from lightning_pipe.planner.auto import choose_schedule


def layer(forward: float = 1.0, act: int = 1000, params: int = 100) -> LayerProfile:
    return LayerProfile("x", forward, 2 * forward, act, act, act, True, False, params, 4 * params, 4 * params,
                        8 * params)


def test_topology_levels_and_allreduce():
    topology = Topology([Level(4, 100.0, 0.5), Level(2, 10.0, 1.0)])
    assert topology.num_devices == 8
    assert topology.link(0, 3).bandwidth == 100.0 and topology.link(3, 4).bandwidth == 10.0
    assert topology.transfer_time(50, 1, 2) == pytest.approx(0.5 + 0.5)
    assert topology.allreduce_time(400, 0, 4) == pytest.approx(2 * 3 / 4 * 400 / 100 + 2 * 3 * 0.5)
    assert topology.allreduce_time(400, 2, 4) == pytest.approx(2 * 3 / 4 * 400 / 10 + 2 * 3 * 1.0)
    assert topology.allreduce_time(400, 0, 1) == 0.0
    with pytest.raises(ValueError, match="not in this topology of 8 devices"):
        topology.link(0, 8)
    with pytest.raises(ValueError, match="at least one Level"):
        Topology([])


def test_predict_takes_one_link_per_cut():
    schedule = one_f_one_b(3, 4)
    same = predict(schedule, StageCost(1.0, 1.0, 1.0), Link(latency=0.5))
    assert predict(schedule, StageCost(1.0, 1.0, 1.0), [Link(latency=0.5)] * 2).step_time == same.step_time
    slower = predict(schedule, StageCost(1.0, 1.0, 1.0), [Link(latency=0.5), Link(latency=3.0)])
    assert slower.step_time > same.step_time
    with pytest.raises(ValueError, match="one per cut"):
        predict(schedule, StageCost(), [Link()])


def test_a_slow_link_moves_the_cut_to_a_small_activation():
    # Equal layers, but layer 1's output is huge: the two-stage cut should avoid following it.
    profiles = [layer(act=10), layer(act=10**10), layer(act=10), layer(act=10)]
    topology = Topology.flat(2, bandwidth=1e9)
    plan = plan_pipeline(profiles, topology, method="profile", replicas=1)
    assert plan.partition in ([1, 3], [3, 1])
    assert plan_pipeline(profiles, topology, method="time").partition == [2, 2]


def test_replicas_follow_the_bandwidth_hierarchy():
    # Heavy weights and slow nodes: replicate inside a node only; light weights: replicate freely.
    profiles = [layer(params=10**7)] * 4
    topology = Topology([Level(2, 1e12), Level(2, 1e6)])
    plan = plan_pipeline(profiles, topology, method="profile")
    assert all(stage.allreduce < 1.0 for stage in plan.stages)
    assert all(s.first_device // 2 == (s.first_device + s.replicas - 1) // 2 for s in plan.stages)
    light = plan_pipeline([layer(params=1)] * 4, Topology([Level(2, 1e12), Level(2, 1e6)]), method="profile")
    assert light.replicas == [4]  # plain data parallelism: no bubble, allreduce free


def test_choose_schedule_picks_the_fastest_that_fits():
    profiles = [layer(forward=0.01, act=10**6, params=1000) for _ in range(8)]
    free = choose_schedule(profiles, 4, batch_rows=32, sample_rows=4)
    predicted = {(c.schedule, c.num_microbatches): c.step_time for c in free.candidates if c.step_time is not None}
    assert free.plan.step_time == min(predicted.values())
    assert "<- chosen" in free.table()
    # Under a cap that gpipe (all micro-batches in flight) cannot meet, a schedule that holds fewer wins.
    gpipe_peak = min(c.peak_memory for c in free.candidates if c.schedule == "gpipe" and c.peak_memory)
    capped = choose_schedule(profiles, 4, batch_rows=32, sample_rows=4, memory_cap=gpipe_peak * 0.9,
                             schedules=("gpipe", "1f1b"))
    assert capped.schedule == "1f1b" and capped.plan.peak_memory <= gpipe_peak * 0.9
    with pytest.raises(ValueError, match="no schedule and micro-batch count fits"):
        choose_schedule(profiles, 4, batch_rows=32, sample_rows=4, memory_cap=1.0)


def test_the_plan_stands_without_matplotlib_and_says_how_to_draw_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib is not a dependency: the plan command printed its plan, then failed on a bare
    ModuleNotFoundError (found by review); `schedule show --png` did too."""
    import sys

    from lightning_pipe.plan import draw_plan
    from lightning_pipe.schedule import main as schedule_main

    plan = plan_pipeline([layer(1.0), layer(2.0), layer(1.0), layer(2.0)], 2, num_microbatches=4)
    assert draw_plan(plan, str(tmp_path / "plan.png")) == f"timeline: {tmp_path / 'plan.png'}"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    line = draw_plan(plan, str(tmp_path / "again.png"))
    assert line.startswith("timeline: not drawn") and "pip install matplotlib" in line, line
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        schedule_main(["show", "1f1b", "--stages", "2", "--microbatches", "4", "--png", str(tmp_path / "s.png")])


@pytest.mark.parametrize("devices, replicas", [(2, None), (4, "[3,1]"), (4, "round_robin")])
def test_plan_command_line_on_the_digits_config(tmp_path: Path, devices: int, replicas: str | None):
    from lightning_pipe.plan import plan_from_config

    extra = [] if replicas is None else [f"+plan.replicas={replicas}"]
    with initialize_config_module(config_module="lightning_pipe.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"output_dir={tmp_path}", "experiment=digits", "strategy.partition=profile", f"trainer.devices={devices}",
            f"+plan.cache={tmp_path / 'cache'}", "+plan.repeats=1", *extra])
    plan, text = plan_from_config(cfg)
    assert plan.method == "profile" and sum(plan.replicas) == devices
    if replicas is None:
        assert len(plan.partition) == 2
    elif replicas == "[3,1]":
        assert plan.replicas == [3, 1] and plan.prediction.schedule.name == "replicated_1f1b"
    else:  # whatever the planner chose, PipelineStrategy(replicas="auto") can run it: one device for the last stage
        assert plan.replicas[-1] == 1
    assert "predicted step time" in text and "uniform" in text
    assert math.isfinite(plan.step_time) and 0 <= plan.bubble < 1
    assert list((tmp_path / "cache").glob("profile-*.json"))
