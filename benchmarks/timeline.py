"""Record a real pipeline step and draw it under the simulator's prediction; export it as a Chrome trace.

Stages of sleeping layers (forward t_f, backward t_b), one process per stage. The prediction uses the same
costs; the recorded run is the executor's own per-action timing (``Pipeline(record=True)``).

    .venv/bin/python benchmarks/timeline.py --schedule 1f1b --png docs/img/recorded_1f1b.png --trace docs/trace_1f1b.json

Open the trace in https://ui.perfetto.dev. Every action is recorded, sends and receives included (a receive's
box is the time spent waiting for its message).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import SleepCosts, SleepLayer, run_ranks  # noqa: E402


def _record(rank: int, world_size: int, schedule: str, microbatches: int, costs: SleepCosts, options: dict) -> list:
    from lightning_pipe.engine.executor import Pipeline

    stages = world_size * options.get("virtual_stages", 1) * (2 if schedule == "zb_v" else 1)
    layers = nn.Sequential(*[SleepLayer(costs) for _ in range(stages)])
    pipe = Pipeline(layers, schedule=schedule, num_microbatches=microbatches, record=True,
                    loss_fn=lambda out, mb: out.pow(2).mean(), **options)
    batch = torch.ones(microbatches * 2, 4)
    for _ in range(3):  # warm up, then keep the last step
        pipe.take_records()
        pipe.train_step(batch)
    return [(r.rank, str(r.action), r.start, r.end) for r in pipe.take_records()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--stages", type=int, default=4, help="ranks")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--t-f", type=float, default=0.010)
    parser.add_argument("--t-b", type=float, default=0.020)
    parser.add_argument("--virtual-stages", type=int, default=0)
    parser.add_argument("--png", type=pathlib.Path, required=True)
    parser.add_argument("--trace", type=pathlib.Path)
    args = parser.parse_args()

    from lightning_pipe.engine.schedules import Action, get_schedule
    from lightning_pipe.engine.trace import Record, to_chrome_trace
    from lightning_pipe.planner.simulate import StageCost, predict
    from lightning_pipe.planner.pictures import draw_side_by_side

    options = {"virtual_stages": args.virtual_stages} if args.virtual_stages else {}
    per_stage = 1 / (options.get("virtual_stages", 1) * (2 if args.schedule == "zb_v" else 1))
    costs = SleepCosts.of(args.t_f * per_stage, args.t_b * per_stage)
    rows = [row for rank_rows in run_ranks(_record, args.stages, args.schedule, args.microbatches, costs, options)
            for row in rank_rows]
    records = [Record(rank, Action.parse(action), start, end) for rank, action, start, end in rows]
    # The step starts with the first forward of stage 0; ranks further down were already waiting for it
    # (the end of the previous step reached them earlier), and those waits are clipped to the step.
    origin = min(r.start for r in records if r.action.stage == 0 and r.action.op.value == "F")
    records = [Record(r.rank, r.action, max(0.0, r.start - origin), max(0.0, r.end - origin)) for r in records]
    schedule = get_schedule(args.schedule, args.stages, args.microbatches, **options)
    prediction = predict(schedule, StageCost(costs.forward, costs.backward_input, costs.backward_weight))
    measured = max(r.end for r in records)
    draw_side_by_side(prediction, records, args.png,
                      title=f"{args.schedule}: predicted {prediction.step_time * 1e3:.0f} ms, "
                            f"recorded {measured * 1e3:.0f} ms")
    if args.trace:
        to_chrome_trace(records, args.trace)
    print(f"{args.schedule}: predicted {prediction.step_time * 1e3:.1f} ms, recorded {measured * 1e3:.1f} ms "
          f"({measured / prediction.step_time:.3f}x); picture {args.png}")


if __name__ == "__main__":
    main()
