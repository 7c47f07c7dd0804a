"""Command line for schedules: print one as a grid with its predicted bubble and memory, optionally as a PNG.

    python -m lightning_pipe.schedule show 1f1b --stages 4 --microbatches 8
    python -m lightning_pipe.schedule show interleaved_1f1b --stages 4 --microbatches 8 --virtual-stages 2 --png il.png
    python -m lightning_pipe.schedule show zb_h1 --stages 4 --microbatches 8 --backward-weight 0.5
    python -m lightning_pipe.schedule show 1f1b --replicas 3,1 --microbatches 6 --png 3-1.png     # PipeDream's 3-1
    python -m lightning_pipe.schedule list
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_pipe.engine.schedules.rules import ScheduleError, check_schedule, format_grid
from lightning_pipe.engine.schedules import SCHEDULE_ALIASES, SCHEDULES, get_schedule, registered_name
from lightning_pipe.engine.schedules.replicated import replicated
from lightning_pipe.planner.simulate import Link, Prediction, StageCost, predict

__all__ = ["main", "build_parser", "describe"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_pipe.schedule", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the registered schedule names")
    show = commands.add_parser("show", help="print a schedule's grid, predicted bubble and peak activations")
    show.add_argument("name", type=registered_name, help=f"schedule name: {', '.join(sorted(SCHEDULES))} (or "
                      f"{', '.join(name for name in SCHEDULE_ALIASES if name != 'interleaved1f1b')})")
    show.add_argument("--stages", type=int, default=None,
                      help="pipeline depth in ranks (interleaved_1f1b: ranks; it makes stages x virtual stages)")
    show.add_argument("--replicas", default=None,
                      help="ranks per stage, e.g. 3,1 (1f1b or gpipe with replicated stages taking micro-batches in "
                           "turn); each stage's costs are multiplied by its replicas, as for a stage replicated "
                           "because it is that much slower")
    show.add_argument("--microbatches", type=int, required=True, help="micro-batches per batch")
    show.add_argument("--virtual-stages", type=int, default=None, help="stages per rank (interleaved_1f1b)")
    costs = show.add_argument_group("costs of one stage (any time unit; an unsplit backward B costs I + W)")
    costs.add_argument("--forward", type=float, default=1.0, help="F (default 1)")
    costs.add_argument("--backward-input", type=float, default=1.0, help="I, input gradient (default 1)")
    costs.add_argument("--backward-weight", type=float, default=1.0, help="W, weight gradient (default 1)")
    costs.add_argument("--optimizer", type=float, default=0.0, help="optimizer step (default 0)")
    link = show.add_argument_group("link between ranks")
    link.add_argument("--latency", type=float, default=0.0, help="per message (default 0)")
    link.add_argument("--bandwidth", type=float, default=float("inf"), help="bytes per time unit (default inf)")
    link.add_argument("--message-bytes", type=float, default=0.0, help="bytes of one activation (default 0)")
    show.add_argument("--png", default=None, help="also draw the predicted timeline to this PNG file")
    return parser


def describe(prediction: Prediction) -> str:
    """The prediction as a few lines of text: step time, bubble, and per-rank idle share and peak memory."""
    schedule = prediction.schedule
    lines = [
        f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_stages} stages, "
        f"{schedule.num_microbatches} micro-batches, {prediction.num_messages} messages",
        f"step time {prediction.step_time:.4g} (pipeline {prediction.makespan:.4g}), "
        f"bubble fraction {prediction.bubble_fraction:.3f}",
        "rank | idle fraction | peak activations (micro-batches held, summed over the rank's stages)",
    ]
    for rank, (idle, peak) in enumerate(zip(prediction.idle_fraction, prediction.peak_activations)):
        lines.append(f"{rank:4d} | {idle:13.3f} | {peak}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> None:
    cost = StageCost(args.forward, args.backward_input, args.backward_weight, args.optimizer)
    if args.replicas is not None:
        counts = [int(count) for count in args.replicas.split(",")]
        if args.stages is not None and args.stages != len(counts):
            raise ValueError(f"--stages {args.stages} but --replicas {args.replicas} lists {len(counts)} stages")
        schedule = replicated(counts, args.microbatches, args.name)
        costs: StageCost | list[StageCost] = [
            StageCost(cost.forward * r, cost.backward_input * r, cost.backward_weight * r, cost.optimizer)
            for r in counts]
    else:
        if args.stages is None:
            raise ValueError("give --stages (or --replicas)")
        options = {} if args.virtual_stages is None else {"virtual_stages": args.virtual_stages}
        schedule, costs = get_schedule(args.name, args.stages, args.microbatches, **options), cost
    check_schedule(schedule)
    prediction = predict(schedule, costs, Link(args.latency, args.bandwidth, args.message_bytes))
    print("order of compute actions (one row per step, every action one step long):")
    print(format_grid(schedule))
    print()
    print(describe(prediction))
    if args.png:
        from lightning_pipe.planner.pictures import draw_timeline

        try:
            draw_timeline(prediction, args.png)
        except ModuleNotFoundError as error:
            if error.name != "matplotlib":
                raise
            raise SystemExit(f"--png: {error}") from None
        print(f"timeline drawn to {args.png}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print("\n".join(sorted(SCHEDULES)))
        return 0
    try:
        _show(args)
    except (ValueError, ScheduleError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
