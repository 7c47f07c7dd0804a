"""``schedule="auto"``: simulate candidate schedules and micro-batch counts, and pick the fastest plan under a memory cap.

A batch of ``batch_rows`` rows split into ``m`` micro-batches makes micro-batches of ``batch_rows / m`` rows; the
profiles (measured on ``sample_rows`` rows) are scaled linearly to that size (:func:`~.profile.scale_profiles`).
Each schedule is cut by PipeDream's dynamic program where it holds one stage per device, and by time where it
holds several (interleaved_1f1b, zb_v); each plan is simulated, and the fastest that fits wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_pipe.engine.schedules import get_schedule, training_schedules
from lightning_pipe.planner.partition import plan_pipeline
from lightning_pipe.planner.plans import MemoryCapError, Plan
from lightning_pipe.planner.profile import LayerProfile, scale_profiles
from lightning_pipe.planner.topology import Topology

__all__ = ["AUTO_SCHEDULES", "Candidate", "ScheduleChoice", "choose_schedule"]

AUTO_SCHEDULES = tuple(training_schedules())  # the synchronous ones: gpipe, 1f1b, interleaved_1f1b, zb_h1, zb_v


@dataclass(frozen=True)
class Candidate:
    """One schedule and micro-batch count that was tried."""

    schedule: str
    num_microbatches: int
    step_time: float | None
    """Predicted seconds per step; ``None`` where no plan was possible."""
    peak_memory: int | None
    """Bytes on the fullest device."""
    note: str = ""
    """Why it was left out (empty if it fits)."""


@dataclass(frozen=True)
class ScheduleChoice:
    """The chosen plan and every candidate considered."""

    plan: Plan
    candidates: tuple[Candidate, ...]

    @property
    def schedule(self) -> str:
        return self.plan.schedule

    @property
    def num_microbatches(self) -> int:
        return self.plan.num_microbatches

    def table(self) -> str:
        lines = [f"{'schedule':>17}  {'m':>3}  {'step ms':>9}  {'memory MiB':>10}  note"]
        for c in sorted(self.candidates, key=lambda c: (c.step_time is None, c.step_time or 0.0)):
            step = f"{c.step_time * 1e3:9.1f}" if c.step_time is not None else f"{'-':>9}"
            memory = f"{c.peak_memory / 2**20:10.1f}" if c.peak_memory is not None else f"{'-':>10}"
            chosen = "  <- chosen" if (c.schedule, c.num_microbatches) == (self.schedule, self.num_microbatches) else ""
            lines.append(f"{c.schedule:>17}  {c.num_microbatches:>3}  {step}  {memory}  {c.note}{chosen}")
        return "\n".join(lines)


def choose_schedule(
    profiles: Sequence[LayerProfile],
    topology: Topology | int,
    *,
    batch_rows: int,
    sample_rows: int,
    memory_cap: float | None = None,
    schedules: Sequence[str] = AUTO_SCHEDULES,
    microbatch_counts: Sequence[int] | None = None,
    replicas: int | None = 1,
) -> ScheduleChoice:
    """The schedule and micro-batch count with the smallest predicted step time whose plan fits ``memory_cap``.

    ``profiles`` were measured on ``sample_rows`` rows; a step takes ``batch_rows`` rows. ``microbatch_counts``
    defaults to powers of two and multiples of the ranks up to ``batch_rows``. ``replicas``: devices per stage
    (1: a pure pipeline over every device; ``None``: the dynamic program chooses per stage).
    """
    topology = Topology.flat(topology) if isinstance(topology, int) else topology
    if batch_rows < 1 or sample_rows < 1:
        raise ValueError(f"batch_rows ({batch_rows}) and sample_rows ({sample_rows}) must be >= 1")
    ranks = topology.num_devices // (replicas or 1)
    if microbatch_counts is None:
        counts = {2**k for k in range(batch_rows.bit_length())} | {ranks * k for k in (1, 2, 4, 8)}
        microbatch_counts = sorted(m for m in counts if 1 <= m <= batch_rows)
    candidates: list[Candidate] = []
    best: Plan | None = None
    for m in microbatch_counts:
        scaled = scale_profiles(profiles, batch_rows / m / sample_rows)
        for name in schedules:
            try:
                probe = get_schedule(name, 1, m)
                one_per_rank = probe.num_stages == probe.num_ranks
                if one_per_rank:
                    plan = plan_pipeline(scaled, topology, method="profile", schedule=name, num_microbatches=m,
                                         replicas=replicas, memory_cap=memory_cap,
                                         num_stages=ranks if replicas else None)
                else:
                    plan = plan_pipeline(scaled, topology, method="time", schedule=name, num_microbatches=m,
                                         replicas=replicas or 1, memory_cap=memory_cap)
            except MemoryCapError as error:
                candidates.append(Candidate(name, m, None, None, f"over the cap: needs {error.least_bytes / 2**20:.1f} MiB"))
                continue
            except ValueError as error:
                candidates.append(Candidate(name, m, None, None, _short(str(error))))
                continue
            candidates.append(Candidate(name, m, plan.step_time, plan.peak_memory))
            if best is None or (plan.step_time, plan.peak_memory) < (best.step_time, best.peak_memory):
                best = plan
    if best is None:
        notes = "; ".join(f"{c.schedule} m={c.num_microbatches}: {c.note}" for c in candidates[:6])
        raise ValueError(f"no schedule and micro-batch count fits: {notes}. Raise memory_cap, use more devices, or "
                         f"try other schedules=/microbatch_counts=")
    return ScheduleChoice(best, tuple(candidates))


def _short(message: str) -> str:
    """The first sentence of an error, for a table cell."""
    return message.split("; ")[0].split(". ")[0][:160]
