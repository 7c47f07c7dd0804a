"""Timeline pictures of schedules, predictions and recorded runs: ranks as rows, time across (PNG, matplotlib Agg)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from lightning_pipe.engine.schedules.rules import Timeline
from lightning_pipe.engine.schedules import COMPUTE_OPS, Op, Schedule
from lightning_pipe.engine.trace import Record, timeline_from_records
from lightning_pipe.planner.simulate import Prediction, predict

__all__ = ["draw_timeline", "draw_side_by_side"]

_NO_MATPLOTLIB = ("drawing a timeline needs matplotlib, which lightning_pipe does not install by itself: pip install "
                 "matplotlib (or the package with its examples' extras, pip install 'lightning_pipe[examples]')")

_COLOURS = {
    Op.FORWARD: "#4c72b0",
    Op.BACKWARD: "#55a868",
    Op.BACKWARD_INPUT: "#dd8452",
    Op.BACKWARD_WEIGHT: "#8172b3",
}
_NAMES = {
    Op.FORWARD: "forward F",
    Op.BACKWARD: "backward B",
    Op.BACKWARD_INPUT: "input grad I",
    Op.BACKWARD_WEIGHT: "weight grad W",
}
_COMM_COLOUR = "#b0b0b0"

Drawable = Timeline | Schedule | Prediction


def _as_timeline(item: Drawable | Iterable[Record] | Iterable[Iterable[Record]]) -> Timeline:
    """A timeline to draw: schedules are simulated with F = I = W = 1 (so B = 2); records are converted."""
    if isinstance(item, Timeline):
        return item
    if isinstance(item, Prediction):
        return item.timeline
    if isinstance(item, Schedule):
        return predict(item).timeline
    problem = TypeError("draw a Timeline, Schedule, Prediction, or Records (a flat list or one list per rank), "
                        f"not {type(item).__name__}")
    if not isinstance(item, Iterable):
        raise problem
    flat: list[Record] = []
    for entry in item:
        flat.extend([entry] if isinstance(entry, Record) else entry if isinstance(entry, Iterable) else [entry])
    if not all(isinstance(record, Record) for record in flat):
        raise problem
    return timeline_from_records(flat)


def _lighten(colour: str, amount: float) -> tuple[float, float, float]:
    """Mix ``colour`` with white; later virtual stages of a rank are drawn lighter."""
    from matplotlib.colors import to_rgb

    return tuple(c + (1.0 - c) * amount for c in to_rgb(colour))  # type: ignore[return-value]


def _end_time(timeline: Timeline) -> float:
    return max((max(ends) for ends in timeline.end if ends), default=0.0)


def _draw_on(ax, timeline: Timeline, title: str | None, span: float) -> None:
    from matplotlib.patches import Patch

    schedule = timeline.schedule
    num_ranks = schedule.num_ranks
    chunks = [schedule.stages_of(rank) for rank in range(num_ranks)]
    several = any(len(stages) > 1 for stages in chunks)
    # Width of one time unit in points, to size labels so they stay inside their boxes.
    ax_width_pts = ax.get_position().width * ax.figure.get_figwidth() * 72
    points_per_time = ax_width_pts / span if span else 0.0
    seen: set[Op] = set()
    comm_seen = False
    for rank, actions in enumerate(schedule.actions):
        for action, begin, finish in zip(actions, timeline.start[rank], timeline.end[rank]):
            duration = finish - begin
            if action.op not in COMPUTE_OPS:
                # Communication that took time (a receive waiting, a slow send): a thin grey bar.
                if duration > 0:
                    comm_seen = True
                    ax.broken_barh([(begin, duration)], (rank + 0.4, 0.08), facecolors=_COMM_COLOUR)
                continue
            seen.add(action.op)
            stages = chunks[rank]
            chunk = stages.index(action.stage) if action.stage in stages else 0
            shade = 0.55 * chunk / max(len(stages) - 1, 1)
            ax.broken_barh([(begin, duration)], (rank - 0.4, 0.8),
                           facecolors=[_lighten(_COLOURS[action.op], shade)], edgecolors="white", linewidth=0.6)
            box_pts = duration * points_per_time
            label = str(action.microbatch)
            size = min(9.0, box_pts / (0.7 * len(label) + 0.6))
            if size < 4:
                continue
            centre = begin + duration / 2
            if several:
                ax.text(centre, rank - 0.08, label, ha="center", va="center", fontsize=size, color="black")
                ax.text(centre, rank + 0.22, f"s{action.stage}", ha="center", va="center",
                        fontsize=min(0.85 * size, box_pts / (0.7 * len(f"s{action.stage}") + 0.6)), color="#333333")
            else:
                ax.text(centre, rank, label, ha="center", va="center", fontsize=size, color="black")
    ax.set_ylim(num_ranks - 0.5, -0.5)  # rank 0 on top
    ax.set_yticks(range(num_ranks), [f"rank {rank}" for rank in range(num_ranks)])
    ax.set_xlim(0, span)
    ax.set_xlabel("time")
    ax.grid(axis="x", color="#eeeeee", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles = [Patch(facecolor=_COLOURS[op], label=_NAMES[op]) for op in _COLOURS if op in seen]
    if several:
        handles.append(Patch(facecolor=_lighten("#777777", 0.55), label="lighter: later stage on the rank"))
    if comm_seen:
        handles.append(Patch(facecolor=_COMM_COLOUR, label="send / receive (waiting)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10, loc="left")


def _figure(num_rows: int, timelines: Sequence[Timeline]):
    # A bare Figure renders with Agg when saved and leaves pyplot's global state (and backend) alone.
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ModuleNotFoundError(_NO_MATPLOTLIB, name="matplotlib") from None

    most_actions = max(
        max((len(t.schedule.compute_actions(rank)) for rank in range(t.schedule.num_ranks)), default=1)
        for t in timelines
    )
    width = min(22.0, max(9.0, 0.3 * most_actions + 3))
    heights = [0.55 * t.schedule.num_ranks + 1.0 for t in timelines]
    fig = Figure(figsize=(width, sum(heights) + 0.3))
    axes = fig.subplots(num_rows, 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    fig.subplots_adjust(left=0.07, right=0.83, hspace=0.7, bottom=0.12 if num_rows == 1 else 0.08)
    return fig, [row[0] for row in axes]


def draw_timeline(
    timeline_or_schedule: Drawable | Iterable[Record],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> None:
    """Draw one timeline as a PNG at ``path``: F, B, I, W in distinct colours, micro-batch numbers in the boxes.

    A :class:`Schedule` is simulated first with F = I = W = 1 (B = 2); pass a :class:`Prediction` from
    :func:`~lightning_pipe.planner.simulate.predict` for other costs, or :class:`Record` s of a run.
    """
    timeline = _as_timeline(timeline_or_schedule)
    fig, (ax,) = _figure(1, [timeline])
    name = timeline.schedule.name
    _draw_on(ax, timeline, title or f"{name}: {timeline.schedule.num_ranks} ranks, "
             f"{timeline.schedule.num_stages} stages, {timeline.schedule.num_microbatches} micro-batches",
             _end_time(timeline))
    fig.savefig(path, dpi=120, bbox_inches="tight")


def draw_side_by_side(
    predicted: Drawable,
    recorded: Timeline | Iterable[Record] | Iterable[Iterable[Record]],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> None:
    """Draw a prediction above a recorded run on the same time axis, as a PNG at ``path``.

    ``recorded`` is a timeline or the run's :class:`Record` s (flat, or one list per rank). Give the
    prediction in the same unit as the records (seconds) for the two to line up.
    """
    top, bottom = _as_timeline(predicted), _as_timeline(recorded)
    span = max(_end_time(top), _end_time(bottom))
    fig, (ax_top, ax_bottom) = _figure(2, [top, bottom])
    _draw_on(ax_top, top, f"predicted: {top.schedule.name}, step {_end_time(top):.4g}", span)
    _draw_on(ax_bottom, bottom, f"recorded, step {_end_time(bottom):.4g}", span)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=120, bbox_inches="tight")
