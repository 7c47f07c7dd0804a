"""Classify scikit-learn's 8x8 handwritten digits with an MLP cut into a 2-stage GPipe pipeline on CPU.

    .venv/bin/python examples/digits.py                     # well under a minute on 2 cores

The classifier (``lightning_pipe/demos/digits.py``) is an ordinary LightningModule: ``layers`` is an
``nn.Sequential`` of Linear+ReLU blocks and a Linear head, and its validation step logs loss and a torchmetrics
accuracy. ``strategy="gpipe"`` runs every micro-batch's forward, then every backward, re-computing activations
in the backward pass. The data ships inside scikit-learn; the baseline is the entropy of the labels (log 10).
"""

import lightning as L

import lightning_pipe  # noqa: F401 - registers the strategy names "pipedream" and "gpipe" with Lightning
from lightning_pipe.demos import DigitsClassifier, DigitsDataModule


def main() -> None:
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=64)
    model = DigitsClassifier(hidden=128, num_layers=4, lr=2e-3)

    trainer = L.Trainer(strategy="gpipe", accelerator="cpu", devices=2, max_epochs=15,
                        default_root_dir="outputs/digits", num_sanity_val_steps=0, enable_model_summary=False,
                        log_every_n_steps=10)
    trainer.fit(model, datamodule=data)

    if trainer.is_global_zero:
        metrics = trainer.callback_metrics
        print(f"val/loss {metrics['val/loss']:.3f} (baseline {data.baseline:.3f}), val/acc {metrics['val/acc']:.3f}")


if __name__ == "__main__":
    main()
