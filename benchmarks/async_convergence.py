"""Convergence of PipeDream's asynchronous schedules against 1F1B, on data that ships offline.

Same model, same data order, same number of samples for every schedule; validation after every epoch (the
asynchronous pipelines are flushed first, so they are evaluated on one consistent set of weights):

- digits: scikit-learn's 8x8 handwritten digits, an MLP of 4 blocks over 4 stages;
- text: next-character prediction on Python's standard-library sources, a 4-block MLP over 4 stages.

    .venv/bin/python benchmarks/async_convergence.py --json docs/async_convergence.json --png docs/img/async_convergence.png

Under ``async_1f1b`` every stage steps its optimizer after every micro-batch (PipeDream's unit of work), with
that micro-batch's mean loss; under ``2bw`` and ``1f1b`` once per batch with the batch's mean loss. The
learning rate is the same for all, so async_1f1b takes m times more, smaller and staler steps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import markdown_table, run_ranks  # noqa: E402

VARIANTS = [  # (label, schedule, vertical_sync)
    ("1f1b", "1f1b", False),
    ("async_1f1b", "async_1f1b", False),
    ("async_1f1b+vsync", "async_1f1b", True),
    ("2bw", "2bw", False),
]
CONTEXT = 16


def digits_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], nn.Sequential]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    torch.manual_seed(0)
    width = 128
    model = nn.Sequential(
        nn.Sequential(nn.Linear(64, width), nn.GELU()),
        nn.Sequential(nn.Linear(width, width), nn.GELU()),
        nn.Sequential(nn.Linear(width, width), nn.GELU()),
        nn.Linear(width, 10),
    )
    return (x[:1400], y[:1400]), (x[1400:], y[1400:]), model


def text_data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], nn.Sequential]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(encoding="utf-8", errors="ignore") for p in sorted(root.glob("*.py"))[:40])[:300_000]
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text])
    windows = ids.unfold(0, CONTEXT + 1, 7)  # overlapping windows, every 7th position
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    windows = windows[order][:24_000]
    x, y = windows[:, :CONTEXT], windows[:, CONTEXT]
    torch.manual_seed(0)
    width, vocab_size = 192, len(vocab)
    model = nn.Sequential(
        nn.Sequential(nn.Embedding(vocab_size, 12), nn.Flatten(), nn.Linear(12 * CONTEXT, width), nn.GELU()),
        nn.Sequential(nn.Linear(width, width), nn.GELU()),
        nn.Sequential(nn.Linear(width, width), nn.GELU()),
        nn.Linear(width, vocab_size),
    )
    return (x[:20_000], y[:20_000]), (x[20_000:], y[20_000:]), model


def _train(rank: int, world_size: int, dataset: str, schedule: str, vertical_sync: bool, epochs: int,
           batch_size: int, microbatches: int, lr: float) -> dict:
    from lightning_pipe.engine.executor import Pipeline

    (x, y), (vx, vy), model = digits_data() if dataset == "digits" else text_data()
    pipe = Pipeline(model, schedule=schedule, num_microbatches=microbatches, vertical_sync=vertical_sync,
                    loss_fn=lambda out, mb: F.cross_entropy(out, mb[1]))
    optimizer = torch.optim.Adam(pipe.parameters(), lr=lr)
    curve = []
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x) - batch_size + 1, batch_size):  # full batches only: same steps for all
            index = order[i : i + batch_size]
            if pipe.asynchronous:
                pipe.train_step((x[index], y[index]), optimizer_step=optimizer.step)
            else:
                pipe.train_step((x[index], y[index]))
                optimizer.step()
                optimizer.zero_grad()
        pipe.flush()
        losses, correct = [], 0
        for i in range(0, len(vx), 256):
            loss, outputs = pipe.eval_step((vx[i : i + 256], vy[i : i + 256]))
            if pipe.is_last_rank:
                losses.append(loss.item() * len(vx[i : i + 256]))
                correct += int((torch.cat(outputs).argmax(-1) == vy[i : i + 256]).sum())
        if pipe.is_last_rank:
            curve.append({"epoch": epoch + 1, "val_loss": sum(losses) / len(vx), "val_acc": correct / len(vx)})
    return {"curve": curve, "seconds": time.perf_counter() - start} if pipe.is_last_rank else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--digits-epochs", type=int, default=12)
    parser.add_argument("--text-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--datasets", default="digits,text")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--png", type=pathlib.Path)
    args = parser.parse_args()

    rows = []
    for dataset in args.datasets.split(","):
        epochs = args.digits_epochs if dataset == "digits" else args.text_epochs
        for label, schedule, vertical_sync in VARIANTS:
            results = run_ranks(_train, args.stages, dataset, schedule, vertical_sync, epochs, args.batch_size,
                                args.microbatches, args.lr)
            last = next(r for r in results if r)
            rows.append({"dataset": dataset, "schedule": label, "curve": last["curve"],
                         "final_val_loss": round(last["curve"][-1]["val_loss"], 4),
                         "final_val_acc": round(last["curve"][-1]["val_acc"], 4),
                         "train_seconds": round(last["seconds"], 1)})
            print(f"{dataset:6s} {label:17s} val loss {rows[-1]['final_val_loss']:.4f} "
                  f"acc {rows[-1]['final_val_acc']:.4f} ({rows[-1]['train_seconds']} s)", flush=True)
    for row in rows:
        base = next(r for r in rows if r["dataset"] == row["dataset"] and r["schedule"] == "1f1b")
        row["loss_vs_1f1b"] = round(row["final_val_loss"] - base["final_val_loss"], 4)
    print(markdown_table(rows, ["dataset", "schedule", "final_val_loss", "loss_vs_1f1b", "final_val_acc",
                                "train_seconds"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.png:
        _plot(rows, args.png)


def _plot(rows: list[dict], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    datasets = sorted({r["dataset"] for r in rows})
    figure = Figure(figsize=(5 * len(datasets), 3.6 * 2))
    axes = figure.subplots(2, len(datasets), squeeze=False)
    for column, dataset in enumerate(datasets):
        for row in (r for r in rows if r["dataset"] == dataset):
            epochs = [point["epoch"] for point in row["curve"]]
            axes[0][column].plot(epochs, [p["val_loss"] for p in row["curve"]], marker="o", label=row["schedule"])
            axes[1][column].plot(epochs, [p["val_acc"] for p in row["curve"]], marker="o", label=row["schedule"])
        axes[0][column].set_title(f"{dataset}: validation loss")
        axes[1][column].set_title(f"{dataset}: validation accuracy")
        axes[1][column].set_xlabel("epoch (same samples for every schedule)")
        axes[0][column].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
