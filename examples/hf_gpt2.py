"""A Hugging Face GPT-2 trained unchanged under ``Trainer(strategy="pipedream")``: no nn.Sequential anywhere.

The strategy captures ``self.model`` (``lightning_pipe.capture``) from the first batch, cuts it before every
transformer block and after the last, gives each rank a share of the pieces, and runs the step around it: ``.loss``
of the model's own ``ModelOutput`` comes back on the last stage, where ``self.log`` runs. Needs ``transformers``
(``pip install -e '.[dev]'``). Run from the repository root::

    python examples/hf_gpt2.py                  # 2 ranks on CPU, 40 steps of counting sequences (x, x+1, ...)
"""

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

import lightning_pipe  # noqa: F401  registers the strategy names with Lightning


class CausalLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4,
                                                bos_token_id=0, eos_token_id=0))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    L.seed_everything(0)
    tokens = (torch.randint(0, 256, (320, 1)) + torch.arange(32)) % 256  # each next token is the last one + 1
    trainer = L.Trainer(strategy="pipedream", accelerator="cpu", devices=2, max_steps=40, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(CausalLM(), DataLoader(tokens, batch_size=8))
    if trainer.is_global_zero:
        print(f"train_loss after 40 steps: {float(trainer.callback_metrics['train_loss']):.3f} (ln 256 = 5.545)")
