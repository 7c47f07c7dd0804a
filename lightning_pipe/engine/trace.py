"""Records of what each rank actually ran and when, exported as a Chrome trace or as a drawable timeline."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from .schedules.rules import Timeline
from .schedules import COMPUTE_OPS, Action, Schedule

__all__ = ["Record", "to_chrome_trace", "timeline_from_records"]


@dataclass(frozen=True)
class Record:
    """One action as it ran: ``start`` and ``end`` in seconds on a clock shared by all ranks."""

    rank: int
    action: Action
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"Record of {self.action} on rank {self.rank} ends ({self.end}) before it starts "
                             f"({self.start}); take both times from the same clock")

    @property
    def duration(self) -> float:
        return self.end - self.start


def to_chrome_trace(records: Iterable[Record], path: str | os.PathLike[str]) -> None:
    """Write ``records`` as Chrome trace JSON (open it in https://ui.perfetto.dev or chrome://tracing).

    One track per rank; times are microseconds from the earliest record, so traces of several runs line up.
    """
    records = list(records)
    origin = min((record.start for record in records), default=0.0)
    events: list[dict] = []
    for rank in sorted({record.rank for record in records}):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
    for record in records:
        stage, op, mb = record.action
        events.append({
            "name": str(record.action),
            "cat": "compute" if op in COMPUTE_OPS else "communication",
            "ph": "X",
            "ts": (record.start - origin) * 1e6,
            "dur": record.duration * 1e6,
            "pid": 0,
            "tid": record.rank,
            "args": {"stage": stage, "op": op.value, "microbatch": mb},
        })
    with open(path, "w") as file:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, file)


def timeline_from_records(records: Iterable[Record], name: str = "recorded") -> Timeline:
    """Turn records into a :class:`~.schedules.rules.Timeline` (times from the earliest record), for drawing.

    The schedule it carries holds each rank's actions in the order they started; stages and micro-batch
    counts are read off the records.
    """
    per_rank: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        per_rank[record.rank].append(record)
    if not per_rank:
        raise ValueError("no records to turn into a timeline; run at least one action with tracing on")
    origin = min(record.start for rank_records in per_rank.values() for record in rank_records)
    num_ranks = max(per_rank) + 1
    rows = [sorted(per_rank.get(rank, []), key=lambda record: record.start) for rank in range(num_ranks)]
    actions = [record.action for row in rows for record in row]
    num_stages = max(action.stage for action in actions) + 1
    holders: list[set[int]] = [set() for _ in range(num_stages)]
    for rank, row in enumerate(rows):
        for record in row:
            holders[record.action.stage].add(rank)
    ranks = [sorted(found) or [stage % num_ranks] for stage, found in enumerate(holders)]  # unseen stage: a guess
    schedule = Schedule(
        name=name,
        num_stages=num_stages,
        num_microbatches=max(action.microbatch for action in actions) + 1,
        stage_to_rank=tuple(found[0] for found in ranks),
        actions=tuple(tuple(record.action for record in row) for row in rows),
        stage_replicas=tuple(tuple(found) for found in ranks) if any(len(found) > 1 for found in ranks) else (),
    )
    start = tuple(tuple(record.start - origin for record in row) for row in rows)
    end = tuple(tuple(record.end - origin for record in row) for row in rows)
    return Timeline(schedule, start, end)
