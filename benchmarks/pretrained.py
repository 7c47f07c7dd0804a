"""Fine-tuning from ``from_pretrained`` in ``configure_model()``: how much of the pretrained checkpoint each rank reads.

A GPT-2 of about ``--size-mb`` MiB (12 blocks) is saved with ``save_pretrained`` (safetensors) in the stored dtype,
then fine-tuned for 2 steps by ``ranks`` processes under ``PipelineStrategy``, each calling
``GPT2LMHeadModel.from_pretrained`` in ``configure_model()``. Hugging Face maps the safetensors files into memory
(mmap) and gives the model tensors that point into the mapping, so a page of the file is read only when something
touches it. Each rank reports, at ``on_train_start`` (after the cut, before the first step):

- ``mapped_mb``: the resident part of the checkpoint's mappings (the pages this process read and still maps; the page
  cache is shared between processes, so this is what the rank touched, not memory it owns);
- ``anon_mb``: anonymous memory above the rank's baseline (its own tensors: conversions, copies);
- ``setup_peak_mb``: the peak RSS (VmHWM: both kinds) above the baseline until then;
- ``local_mb``: the parameters this rank holds after the cut (its share of the model);

and ``loaded_mapped_mb``, ``loaded_anon_mb``: the first two right after ``from_pretrained`` returns.

Without a dtype change no rank reads the weights before its first step (which reads its share); a precision that
converts them (``bf16-true`` over a float32 checkpoint) converts each rank's share after the cut
(``lightning_pipe/strategy/conversion.py``). Run from the repository root (docs/checkpoints.md has the table)::

    python -m benchmarks.pretrained --size-mb 512 --ranks 1 2 4 --json docs/pretrained_512mb.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import torch

from benchmarks.common import markdown_table, reset_peak_rss, return_freed_memory, run_ranks, status_kib, write_json

__all__ = ["main", "run"]

BLOCKS = 12
VOCAB = 1024
CASES = (("float32", "32-true"), ("float32", "bf16-true"), ("bfloat16", "bf16-true"))
COLUMNS = ("stored", "precision", "checkpoint_mb", "ranks", "rank", "loaded_mapped_mb", "loaded_anon_mb", "mapped_mb",
           "anon_mb", "setup_peak_mb", "local_mb")


def _status_mb(field: str) -> float:
    return status_kib(field) / 1024


def _mapped_mb(suffix: str = ".safetensors") -> float:
    """The resident MiB of this process's mappings of files ending in ``suffix`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line: its range, ..., its path
                inside = line.rstrip().endswith(suffix)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total / 1024


def width_for(size_mb: float) -> int:
    """The width of a 12-block GPT-2 (about 12 width² parameters a block) worth ``size_mb`` MiB of float32."""
    return max(64, int((size_mb * 2**20 / 4 / BLOCKS / 12) ** 0.5) // 64 * 64)


def save(folder: str, width: int, dtype: str) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = os.path.join(folder, f"gpt2-{width}-{dtype}")
    if not os.path.isdir(path):
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=width, n_layer=BLOCKS, n_head=max(1, width // 64))
        GPT2LMHeadModel(config).to(getattr(torch, dtype)).save_pretrained(path)
    return path


def _fit(rank: int, world_size: int, path: str, precision: str) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_pipe  # noqa: F401 - registers the strategy
    from lightning_pipe import PipelineStrategy

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return_freed_memory()
    baseline_rss, baseline_anon = _status_mb("VmRSS"), _status_mb("RssAnon")
    reset_peak_rss()
    seen: dict[str, float] = {}

    class FineTune(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: Any = None

        def configure_model(self) -> None:
            if self.model is None:
                from transformers import GPT2LMHeadModel

                self.model = GPT2LMHeadModel.from_pretrained(path)
                seen.update(loaded_mapped_mb=_mapped_mb(), loaded_anon_mb=_status_mb("RssAnon") - baseline_anon)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (tokens,) = batch
            return self.model(input_ids=tokens, labels=tokens).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Reader(L.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            seen.update(mapped_mb=_mapped_mb(), anon_mb=_status_mb("RssAnon") - baseline_anon,
                        setup_peak_mb=_status_mb("VmHWM") - baseline_rss,
                        local_mb=sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20)

    tokens = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(strategy=PipelineStrategy(num_microbatches=2), accelerator="cpu", devices=world_size,
                        precision=precision, max_steps=2, callbacks=[Reader()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(FineTune(), DataLoader(TensorDataset(tokens), batch_size=8))
    return {"rank": rank, **{key: round(value, 1) for key, value in seen.items()}}


def run(size_mb: float, ranks: int, stored: str, precision: str, folder: str) -> list[dict[str, Any]]:
    """One configuration: every rank's row."""
    path = save(folder, width_for(size_mb), stored)
    checkpoint_mb = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)
                        if name.endswith(".safetensors")) / 2**20
    rows = run_ranks(_fit, ranks, path, precision, timeout=1800)
    return [{"stored": stored, "precision": precision, "checkpoint_mb": round(checkpoint_mb), "ranks": ranks, **row}
            for row in rows]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=256.0, help="float32 MiB of the GPT-2's parameters")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--folder", default=None, help="where the checkpoints are saved (default: a temporary one)")
    parser.add_argument("--json", default=None)
    arguments = parser.parse_args(argv)
    folder = arguments.folder or tempfile.mkdtemp(prefix="lightning_pipe_pretrained_")
    rows = []
    for stored, precision in CASES:
        for ranks in arguments.ranks:
            rows += run(arguments.size_mb, ranks, stored, precision, folder)
            print(markdown_table(rows[-ranks:], COLUMNS), flush=True)
    write_json(rows, arguments.json)
    return rows


if __name__ == "__main__":
    main()
