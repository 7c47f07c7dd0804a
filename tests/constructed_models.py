"""Plain-torch models whose ``__init__`` computes values no initializer recomputes, as projects write them: built on
the meta device, each rank replays the construction (tests/test_strategy_recorded_init.py)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import dirac_, orthogonal_, sparse_  # bound at import, as some projects do
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["Constructed", "constructed_data", "MODELS", "NanoGPT", "Parametrized", "ReferenceLlama", "TinyViT",
           "TutorialTransformer", "VOCAB"]

VOCAB = 64


def _rope_table(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    return torch.polar(torch.ones(end, dim // 2), torch.outer(torch.arange(end, device=freqs.device), freqs))


def _rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * table.view(1, x.shape[1], 1, pairs.shape[-1])).flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.w1, self.w3 = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.w2 = nn.Linear(2 * dim, dim, bias=False)
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        rows, length, dim = x.shape
        q, k, v = (t.view(rows, length, self.heads, dim // self.heads)
                   for t in self.wqkv(self.attention_norm(x)).split(dim, -1))
        q, k = _rotate(q, table), _rotate(k, table)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(rows, length, dim))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class ReferenceLlama(nn.Module):
    """Meta's reference Llama: a complex rope table in a non-persistent buffer, blocks in an ``nn.ModuleList``."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 4, length: int = 32) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(ReferenceBlock(dim, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, VOCAB, bias=False)
        self.register_buffer("freqs_cis", _rope_table(dim // heads, length * 2), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        table = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, table)
        return self.output(self.norm(h)).float()


class PositionalEncoding(nn.Module):
    """torch's transformer tutorial: a persistent sinusoid table written through slices."""

    def __init__(self, dim: int, length: int = 64) -> None:
        super().__init__()
        position = torch.arange(length).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(length, 1, dim)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.size(0)]


class TutorialTransformer(nn.Module):
    """The tutorial's model, sequence-first, with its causal mask kept as a buffer (as older nanoGPT keeps one)."""

    def __init__(self, dim: int = 32, layers: int = 2, length: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, dim)
        self.pos_encoder = PositionalEncoding(dim, length)
        # float32 whatever the default dtype: under bf16-true, converted after it is built
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf"), dtype=torch.float32),
                                                diagonal=1))
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0)
        self.transformer_encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.linear = nn.Linear(dim, VOCAB)
        self.embedding.weight.data.uniform_(-0.1, 0.1)  # the tutorial's init_weights
        self.linear.bias.data.zero_()
        self.linear.weight.data.uniform_(-0.1, 0.1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.pos_encoder(self.embedding(tokens.t()) * math.sqrt(self.embedding.embedding_dim))
        length = tokens.shape[1]
        return self.linear(self.transformer_encoder(x, self.mask[:length, :length])).transpose(0, 1)


class NanoBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(*x.shape[:2], 4, -1).transpose(1, 2) for t in self.c_attn(self.ln_1(x)).split(self.dim, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(x.shape)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's initialization: ``self.apply(self._init_weights)`` (linear and embedding weights from N(0, 0.02),
    not torch's defaults: an embedding's is N(0, 1)), its projections scaled by depth, the head tied to the token
    embedding."""

    def __init__(self, dim: int = 32, layers: int = 4, length: int = 32) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(length, dim)
        self.h = nn.ModuleList(NanoBlock(dim) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _sincos(dim: int, positions: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", np.arange(positions, dtype=np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


class TinyViT(nn.Module):
    """A hand-written ViT as research code writes one: a class token from ``torch.zeros``, a learned position
    embedding drawn by ``trunc_normal_`` (a no-op on meta tensors in torch), a fixed sin-cos table from NumPy
    (MAE's), ImageNet's mean and deviation from ``torch.tensor``, an orthogonal projection, a Dirac (identity) stem
    and a sparse layer (their init functions imported by name, as some projects do), and timm's stochastic depth
    rates read from ``torch.linspace`` into Python."""

    def __init__(self, dim: int = 32, layers: int = 4, patches: int = 16) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        dirac_(self.stem.weight)
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.fixed = nn.Parameter(torch.zeros(1, patches + 1, dim), requires_grad=False)
        self.fixed.data.copy_(torch.from_numpy(_sincos(dim, patches + 1)).float().unsqueeze(0))
        # timm's stochastic-depth rates: Python numbers read from a tensor (a meta tensor cannot give them)
        self.drop_rates = [x.item() for x in torch.linspace(0, 0.1, layers)]
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
                                    for _ in range(layers))
        self.project = nn.Linear(dim, dim, bias=False)
        orthogonal_(self.project.weight)
        self.sparse = nn.Linear(dim, dim, bias=False)
        sparse_(self.sparse.weight, sparsity=0.5)
        self.head = nn.Linear(dim, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(self.stem((images - self.mean) / self.std)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed + self.fixed
        for block in self.blocks:
            x = block(x)
        return self.head(self.sparse(self.project(x[:, 0])))


class Parametrized(nn.Module):
    """torch's parametrizations: an orthogonal weight (its set-up checks the weight with ``torch.allclose``, makes it
    orthogonal with ``torch.geqrf``, which has no meta kernel, and moves the parameter's storage with ``set_``), a
    weight norm and a spectral norm (a power iteration's vectors in buffers)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

        self.rotate = orthogonal(nn.Linear(dim, dim))
        self.scale = weight_norm(nn.Linear(dim, dim))
        self.bound = spectral_norm(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bound(torch.tanh(self.scale(self.rotate(x))))


class LazyShaped(nn.Module):
    """Lazy layers given their shapes by a forward of zeros in the construction (the usual recipe, in
    ``configure_model()`` too), and a weight norm put on one of them after it."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.layers = nn.Sequential(nn.LazyLinear(32), nn.Tanh(), nn.LazyLinear(dim))
        self.layers(torch.zeros(2, dim))
        self.layers[2] = weight_norm(self.layers[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


MODELS = {"reference_llama": ReferenceLlama, "tutorial_transformer": TutorialTransformer, "nanogpt": NanoGPT,
          "tiny_vit": TinyViT, "parametrized": Parametrized, "lazy_shaped": LazyShaped}


class Constructed(L.LightningModule):
    """One of :data:`MODELS`, built in ``configure_model()`` (on the meta device under PipelineStrategy)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = MODELS[self.name]()

    def _loss(self, batch: Any) -> torch.Tensor:
        assert self.model is not None
        if self.name == "tiny_vit":
            images, labels = batch
            return F.cross_entropy(self.model(images), labels)
        (tokens,) = batch
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def constructed_data(name: str, batches: int = 3, rows: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    if name == "tiny_vit":
        data = TensorDataset(torch.randn(batches * rows, 3, 16, 16, generator=generator),
                             torch.randint(0, 10, (batches * rows,), generator=generator))
    else:
        data = TensorDataset(torch.randint(0, VOCAB, (batches * rows, 17), generator=generator))
    return DataLoader(data, batch_size=rows)


# -- constructions the replay must follow in order (tests/test_strategy_recorded_init.py) ---------------------------
class Staged(nn.Module):
    """Layers loaded through one reused host buffer, refilled for each layer."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(3))
        staging = torch.empty(4, 4, device="cpu")
        for index, layer in enumerate(self.layers):
            staging.fill_(float(index + 1))
            with torch.no_grad():
                layer.weight.copy_(staging)


class Converted(nn.Module):
    """Converted to float64 in ``__init__`` (``.data`` given new storage under the same parameter), then edited; a
    weight written in place and then given new storage through ``.data``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.to(torch.float64)
        self.linear.bias.data.fill_(2.0)
        with torch.no_grad():
            self.linear.weight.fill_(3.0)
        self.linear.weight.data = self.linear.weight.data + 1


class Target(nn.Module):
    """A target network that starts as its online network (DQN, BYOL): a ``load_state_dict`` between two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.online, self.target = nn.Linear(8, 8), nn.Linear(8, 8)
        self.target.load_state_dict(self.online.state_dict())


class Drawn(nn.Module):
    """Layers drawn from one ``torch.Generator`` of the project's own."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(8, 8) for _ in range(3)))
        for layer in self.layers:
            with torch.no_grad():
                layer.weight.normal_(0.0, 0.02, generator=generator)


class EditedGPT2(nn.Module):
    """A Hugging Face model whose weights the project edits after building it (Hugging Face skips its initialization
    on meta: the edits must still come after it)."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        self.model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2,
                                                                           n_head=4, n_positions=32))
        nn.init.zeros_(self.model.transformer.h[0].mlp.c_fc.weight)
        self.model.transformer.ln_f.weight.data.fill_(0.5)


class SharedDraw(nn.Module):
    """One random matrix copied into several layers, and a bias copied from a weight's row (eager: equal)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        shared = torch.randn(8, 8) * 0.1
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(shared)
            self.layers[0].bias.copy_(self.layers[0].weight[0])


class DrawnNumber(nn.Module):
    """A random number read into Python while built (a per-layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.empty(1).uniform_(0.5, 1.5).item()
        self.linear = nn.Linear(4, 4)


def hugging_face_initialized(reads: bool) -> nn.Module:
    """A Hugging Face model that initializes a layer through Hugging Face's own ``orthogonal_`` (which calls torch's
    through a table taken at import) and the others from N(0, 0.02); with ``reads``, its initialization also reads a
    weight into NumPy, which cannot run on meta."""
    import transformers
    from transformers import initialization

    class Initialized(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.rotation = nn.Linear(32, 32, bias=False)
            self.linear = nn.Linear(32, 32)
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            if module is self.rotation:
                initialization.orthogonal_(module.weight)
            elif isinstance(module, nn.Linear):
                if reads:
                    module.weight.detach().numpy()  # fails on meta
                initialization.normal_(module.weight, std=0.02)
                initialization.zeros_(module.bias)

    return Initialized(transformers.PretrainedConfig())


class RowDrawn(nn.Module):
    """A parameter drawn row by row into temporaries (a loop), and a temporary copied in after an unrelated op."""

    def __init__(self, unrelated: bool = False) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.empty(3, 256))
        with torch.no_grad():
            for row in range(3):
                self.rows[row] = torch.randn(256) * 0.02
        self.copied = nn.Parameter(torch.empty(8))
        drawn = torch.randn(8)
        if unrelated:
            torch.zeros(1)
        with torch.no_grad():
            self.copied.copy_(drawn)


class Reads(nn.Module):
    """Values read into Python while built: a count of ones after a layer's default draw (known), and a random branch
    (``kind``: "bool" or "tolist", refused)."""

    def __init__(self, kind: str = "") -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.ones = nn.init.ones_(self.linear.weight).sum().item()
        if kind == "bool":
            self.flip = bool(torch.rand(()) < 0.5)
        elif kind == "tolist":
            self.keep = (torch.rand(8) < 0.5).tolist()
