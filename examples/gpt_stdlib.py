"""Train a byte-level GPT on Python's own standard library with a 2-stage PipeDream (1F1B) pipeline on CPU.

    .venv/bin/python examples/gpt_stdlib.py                 # 3-4 minutes on 2 cores
    .venv/bin/python examples/gpt_stdlib.py --steps 50      # a quick look

The model (``lightning_pipe/demos/gpt.py``) is an ordinary LightningModule whose layers are one
``nn.Sequential``: ``Embed, Block x 4, Head``. ``strategy="pipedream"`` cuts it into two stages, one per process;
the training step's loss and ``self.log`` run on the last stage, and the values reach the progress bar on rank 0.
The text is the ``.py`` files of the standard library of the Python running this (no download); a model that
ignores context cannot beat the unigram entropy of the bytes, so that is the baseline the loss must get under.
Lightning starts rank 1 by re-running this script: everything that trains sits under ``__main__``.
"""

import argparse

import lightning as L

import lightning_pipe  # noqa: F401 - registers the strategy names "pipedream" and "gpipe" with Lightning
from lightning_pipe.demos import GPT, StdlibTextDataModule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--devices", type=int, default=2, help="pipeline stages, one process each")
    args = parser.parse_args()

    # 1. Every rank builds the whole model from the same seed, then keeps only its own stage.
    L.seed_everything(1234)
    data = StdlibTextDataModule(block_size=128, batch_size=32, max_bytes=2_000_000)
    model = GPT(block_size=128, width=128, num_layers=4, num_heads=4, lr=3e-3, warmup_steps=30)

    # 2. The pipeline: 4 micro-batches of 8 sequences per batch, 1F1B schedule, one stage per CPU process.
    trainer = L.Trainer(strategy="pipedream", accelerator="cpu", devices=args.devices, max_steps=args.steps,
                        val_check_interval=min(200, args.steps), check_val_every_n_epoch=None,
                        limit_val_batches=20, num_sanity_val_steps=0, default_root_dir="outputs/gpt_stdlib",
                        enable_model_summary=False)
    trainer.fit(model, datamodule=data)

    # 3. The checkpoint holds every stage's weights: load it whole on rank 0 and let the model write Python.
    if trainer.is_global_zero:
        path = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
        print(f"val/loss {trainer.callback_metrics['val/loss']:.3f} nats/byte; unigram baseline "
              f"{data.baseline:.3f}; checkpoint {path}")
        whole = GPT.load_from_checkpoint(path, map_location="cpu").eval()
        print(whole.generate(b"def ", 300).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
