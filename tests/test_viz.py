"""Tests of the timeline pictures: PNGs are written for schedules, predictions and recorded runs."""

import pytest

from lightning_pipe.engine.schedules import Action, get_schedule
from lightning_pipe.engine.trace import Record
from lightning_pipe.planner import StageCost, predict
from lightning_pipe.planner.pictures import draw_side_by_side, draw_timeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


@pytest.mark.parametrize(
    ("name", "options"), [("1f1b", {}), ("zb_h1", {}), ("interleaved_1f1b", {"virtual_stages": 2})]
)
def test_draw_schedule(tmp_path, name, options):
    path = tmp_path / f"{name}.png"
    draw_timeline(get_schedule(name, 4, 8, **options), path, title=name)
    assert_png(path)


def test_draw_prediction(tmp_path):
    path = tmp_path / "prediction.png"
    draw_timeline(predict(get_schedule("zb_h1", 3, 6), StageCost(1.0, 1.0, 0.5)), path)
    assert_png(path)


def recorded_run(prediction, slowdown=1.1):
    """Records that look like a run of ``prediction``: one list per rank, a little slower, in seconds."""
    per_rank = []
    for rank, actions in enumerate(prediction.schedule.actions):
        per_rank.append([
            Record(rank, action, 100.0 + begin * slowdown * 1e-3, 100.0 + end * slowdown * 1e-3)
            for action, begin, end in zip(actions, prediction.timeline.start[rank], prediction.timeline.end[rank])
        ])
    return per_rank


def test_draw_side_by_side(tmp_path):
    schedule = get_schedule("1f1b", 3, 4)
    prediction = predict(schedule, StageCost(1e-3, 1e-3, 1e-3))
    records = recorded_run(predict(schedule))
    path = tmp_path / "side.png"
    draw_side_by_side(prediction, records, path, title="1f1b, 3 ranks")
    assert_png(path)
    flat = tmp_path / "flat.png"
    draw_side_by_side(schedule, [r for rank in records for r in rank], flat)
    assert_png(flat)


def test_draw_records_with_waiting_receive(tmp_path):
    a = Action.parse
    records = [Record(0, a("0F0"), 0.0, 1.0), Record(1, a("1RECV_F0"), 0.0, 1.2), Record(1, a("1F0"), 1.2, 2.0)]
    path = tmp_path / "records.png"
    draw_timeline(records, path)
    assert_png(path)


def test_draw_rejects_other_things(tmp_path):
    with pytest.raises(TypeError, match="draw a Timeline, Schedule, Prediction, or Records"):
        draw_timeline([1, 2, 3], tmp_path / "x.png")
