"""Tests of run records: Chrome trace export and conversion to a drawable timeline."""

import json

import pytest

from lightning_pipe.engine.schedules import Action
from lightning_pipe.engine.trace import Record, timeline_from_records, to_chrome_trace


def make_records():
    # Two ranks, one stage each, times on a shared clock that does not start at zero.
    a = Action.parse
    return [
        Record(0, a("0F0"), 10.000, 10.002),
        Record(0, a("0SEND_F0"), 10.002, 10.0021),
        Record(1, a("1RECV_F0"), 10.001, 10.0025),
        Record(1, a("1F0"), 10.0025, 10.0045),
        Record(1, a("1B0"), 10.0045, 10.0085),
        Record(0, a("0B0"), 10.009, 10.013),
    ]


def test_chrome_trace_is_valid_json(tmp_path):
    path = tmp_path / "trace.json"
    to_chrome_trace(make_records(), path)
    trace = json.loads(path.read_text())
    spans = [event for event in trace["traceEvents"] if event["ph"] == "X"]
    assert len(spans) == 6
    first = next(event for event in spans if event["name"] == "0F0")
    assert first == {
        "name": "0F0", "cat": "compute", "ph": "X", "ts": pytest.approx(0.0), "dur": pytest.approx(2000.0),
        "pid": 0, "tid": 0, "args": {"stage": 0, "op": "F", "microbatch": 0},
    }
    assert next(e for e in spans if e["name"] == "1B0")["ts"] == pytest.approx(4500.0)
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert names == {0: "rank 0", 1: "rank 1"}


def test_timeline_from_records():
    timeline = timeline_from_records(make_records())
    schedule = timeline.schedule
    assert [str(a) for a in schedule.actions[0]] == ["0F0", "0SEND_F0", "0B0"]
    assert [str(a) for a in schedule.actions[1]] == ["1RECV_F0", "1F0", "1B0"]
    assert schedule.stage_to_rank == (0, 1)
    assert (schedule.num_stages, schedule.num_microbatches) == (2, 1)
    assert timeline.start[0][0] == 0.0
    assert timeline.end[0][-1] == pytest.approx(0.013)
    assert timeline.makespan == pytest.approx(0.013)


def test_record_errors():
    with pytest.raises(ValueError, match="ends .* before it starts"):
        Record(0, Action.parse("0F0"), 2.0, 1.0)
    with pytest.raises(ValueError, match="no records"):
        timeline_from_records([])


def test_timeline_of_replicated_stages_keeps_their_ranks():
    """Stage 0 ran on ranks 0 and 1 (micro-batches in turn), stage 1 on rank 2: the timeline's schedule says so."""
    a = Action.parse
    records = [Record(0, a("0F0"), 0.0, 1.0), Record(1, a("0F1"), 0.0, 1.0), Record(2, a("1F0"), 1.0, 2.0),
               Record(2, a("1F1"), 2.0, 3.0)]
    schedule = timeline_from_records(records).schedule
    assert schedule.stage_replicas == ((0, 1), (2,)) and schedule.stage_to_rank == (0, 2)
    assert schedule.rank_of(0, 1) == 1
