"""Small models of the families the capture must cut: HF GPT-2 / Llama / BERT, a ViT, a ResNet, an autoencoder, a
litgpt-style GPT; each with a batch maker, how the model is called on a micro-batch, and its loss."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Family", "FAMILIES", "VISION_FAMILIES", "HAS_TRANSFORMERS", "family", "ViT", "ResNet", "AutoEncoder", "LitGPT"]

try:
    import transformers  # noqa: F401
    HAS_TRANSFORMERS = True
except ImportError:  # an optional dependency (the dev extra): the Hugging Face tests skip without it
    HAS_TRANSFORMERS = False
VOCAB = 96


# -- a ViT: class token and position embedding on the root, blocks in a ModuleList ----------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, dim = x.shape
        q, k, v = self.qkv(x).view(batch, time, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, time, dim))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 16, patch: int = 4, dim: int = 32, depth: int = 4, heads: int = 4,
                 classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# -- a ResNet: stem with BatchNorm, stages of basic blocks, pooling and a classifier ---------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + identity)


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 16), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(2)
        cin, stages = widths[0], []
        for i, width in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, width, 1 if i == 0 else 2), BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(images))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- message passing over a batch of graphs, written as PyG writes it ----------------------------------------------
class _Passing(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.message, self.update = nn.Linear(width, width), nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor, into: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = F.relu(h, inplace=True)  # written in place where the block's segment gets it (from the last Linear)
        into.index_add_(0, target, self.message(h)[source])  # into a buffer made before the block, on another segment
        return self.update(torch.cat([h, into], -1))


class MessagePassing(nn.Module):
    """Graphs of ``N`` nodes each (a batch's rows), their edges within each graph; every block adds each edge's
    message into a buffer made before it (``torch.zeros_like(h)``, then ``index_add_``), so a cut before a block falls
    between the two; each block first applies ReLU in place to its input."""

    def __init__(self, width: int = 16, blocks: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(_Passing(width) for _ in range(blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, nodes: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        graphs, size, _ = nodes.shape
        h = self.embed(nodes).reshape(graphs * size, -1)
        offset = (torch.arange(graphs, device=nodes.device) * size)[:, None]
        source, target = (edges[..., 0] + offset).reshape(-1), (edges[..., 1] + offset).reshape(-1)
        for block in self.blocks:
            h = block(h, torch.zeros_like(h), source, target)
        return self.head(h.reshape(graphs, size, -1).mean(1))


def _graphs(rows: int, nodes: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, nodes, 6, generator=g), torch.randint(0, nodes, (rows, 2 * nodes, 2), generator=g),
            torch.randint(0, 10, (rows,), generator=g))


# -- deep supervision: an auxiliary head that runs in training only -------------------------------------------------
class AuxHeadNet(nn.Module):
    """GoogLeNet's and Inception's deep supervision: an auxiliary classifier that runs in training only. Train mode
    returns ``(logits, aux_logits)``, eval mode the logits. No repeated blocks: cut before every top-level child, so
    the auxiliary head is a segment of its own that evaluation does not run."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.low = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU())
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, classes))
        self.high = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.low(self.stem(images))
        aux = self.aux(x) if self.training else None
        logits = self.head(self.high(x).mean((2, 3)))
        return (logits, aux) if self.training else logits


# -- an autoencoder: two nn.Sequential, returns (reconstruction, code) ----------------------------------------------
class AutoEncoder(nn.Module):
    def __init__(self, width: int = 32, hidden: int = 16, code: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, code))
        self.decoder = nn.Sequential(nn.Linear(code, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.decoder(z), z


# -- a litgpt-style GPT: blocks in a ModuleList, rope tables as buffers, head tied to the embedding, loss inside -----
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, time, dim = x.shape
        q, k, v = self.attn(x).view(batch, time, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, dim))


class LitBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_1, self.attn, self.norm_2 = nn.LayerNorm(dim), CausalSelfAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), cos, sin)
        return x + self.mlp(self.norm_2(x))


class LitGPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, layers: int = 4, block_size: int = 32,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, dim), drop=nn.Dropout(dropout),
            h=nn.ModuleList(LitBlock(dim, heads, dropout) for _ in range(layers)), ln_f=nn.LayerNorm(dim)))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.head_dim, self.block_size = dim // heads, block_size
        self.register_buffer("cos", torch.empty(block_size, self.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(block_size, self.head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The rope tables (as litgpt's ``GPT.reset_parameters``: what a model built on meta recomputes); assigned
        anew, as litgpt does."""
        inverse = 1.0 / (10000 ** (torch.arange(0, self.head_dim, 2, device=self.cos.device).float() / self.head_dim))
        angles = torch.outer(torch.arange(self.block_size, device=self.cos.device).float(), inverse).repeat(1, 2)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        time = idx.size(1)
        cos, sin = self.cos[:time], self.sin[:time]
        x = self.transformer.drop(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin)
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# -- Hugging Face models from small configs --------------------------------------------------------------------------
def hf_gpt2(layers: int = 4, dropout: float = 0.0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=layers, n_head=4,
                                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                      bos_token_id=0, eos_token_id=0))


def hf_llama(layers: int = 4, attention: str = "sdpa") -> nn.Module:
    """Llama; ``attention="eager"`` for the attention that always applies the mask (Hugging Face's SDPA one, run
    eagerly, takes torch's causal kernel instead when a batch has no padding, which a captured graph cannot)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                        attn_implementation=attention))


def hf_bert(layers: int = 4) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=32, num_labels=3,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def hf_causal(kind: str, layers: int = 4) -> nn.Module:
    """A small decoder-only language model of one more Hugging Face family (``kind``: its config class' prefix)."""
    import transformers

    sizes = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
             "num_attention_heads": 4, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 0,
             "pad_token_id": 0}
    extra = {"Mistral": {"num_key_value_heads": 2, "sliding_window": 8}, "Qwen2": {"num_key_value_heads": 2},
             "Qwen3": {"num_key_value_heads": 2, "head_dim": 8}, "Gemma": {"num_key_value_heads": 1, "head_dim": 8},
             "Phi": {"partial_rotary_factor": 0.5}, "GPTNeoX": {"rotary_pct": 0.5},
             "OPT": {"ffn_dim": 64, "word_embed_proj_dim": 32, "do_layer_norm_before": True, "dropout": 0.0},
             "Gemma2": {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 8},
             "Mixtral": {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}}[kind]
    if kind == "OPT":
        sizes.pop("intermediate_size")
    config = getattr(transformers, f"{kind}Config")(**sizes, **extra)
    return getattr(transformers, f"{kind}ForCausalLM")(config)


def hf_encoder(kind: str, layers: int = 4) -> nn.Module:
    """A small Hugging Face encoder with a sequence-classification head (``kind``: RoBERTa, DistilBert, ...)."""
    import transformers

    if kind == "DistilBert":
        config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=layers, n_heads=4, hidden_dim=64,
                                               max_position_embeddings=32, num_labels=3, dropout=0.0,
                                               attention_dropout=0.0, seq_classif_dropout=0.0)
    else:
        config = getattr(transformers, f"{kind}Config")(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pad_token_id=1)
    return getattr(transformers, f"{kind}ForSequenceClassification")(config)


def hf_t5(layers: int = 2) -> nn.Module:
    """A small encoder-decoder (T5): the encoder's output feeds every decoder block's cross-attention."""
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers,
                                               num_decoder_layers=layers, num_heads=4, dropout_rate=0.0,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def hf_vit(layers: int = 4) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                               num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                                               num_labels=10, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0))


def hf_vision(kind: str) -> nn.Module:
    """A small Hugging Face convolutional classifier (``kind``: ConvNext, or ResNet with its batch norms)."""
    import transformers

    if kind == "ConvNext":
        config = transformers.ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[8, 16, 24, 32],
                                             depths=[1, 1, 2, 1], num_labels=10)
    elif kind == "Swin":  # shifted windows over 8 x 8 patches, then 4 x 4
        config = transformers.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                         window_size=4, num_labels=10, drop_path_rate=0.0)
    else:
        # two stages: 16 x 16 images keep 2 x 2 positions, so a one-row micro-batch's batch norms see 4 values
        config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2],
                                           layer_type="basic", num_labels=10)
    return getattr(transformers, f"{kind}ForImageClassification")(config)


def hf_bloom(layers: int = 4) -> nn.Module:
    """Bloom: ALiBi position biases, and a GELU applied through a custom ``torch.autograd.Function`` whose backward is
    the derivative written out (checked at the capture, then captured)."""
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=layers, n_head=4, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0))


def hf_bart(layers: int = 2) -> nn.Module:
    """BART: an encoder-decoder whose token embedding is shared by the encoder, the decoder and the LM head."""
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None))


def peft_lora(layers: int = 4) -> nn.Module:
    """PEFT's LoRA over Llama, as a fine-tuning project wraps a model: the base weights frozen, low-rank adapters on
    the attention's query and value projections; ``PeftModel.forward(*args, **kwargs)`` takes every input by
    keyword."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    adapters = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(hf_llama(layers), adapters)


def peft_lora_checkpointed(layers: int = 4) -> nn.Module:
    """PEFT's LoRA with Hugging Face's activation checkpointing in its reentrant variant, as QLoRA-style recipes
    enable it (``gradient_checkpointing_enable`` also makes the embedding's output need a gradient, through a forward
    hook, so the frozen base passes gradients to the adapters)."""
    model = peft_lora(layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def hf_albert(layers: int = 4) -> nn.Module:
    """ALBERT: one layer's weights shared by every layer, so the cut puts the same parameters on several stages."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    return AlbertForSequenceClassification(AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0))


def hf_whisper(layers: int = 2) -> nn.Module:
    """Whisper: a speech encoder (convolutions over mel features) and a text decoder."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
        dropout=0.0))


def hf_mamba(layers: int = 4) -> nn.Module:
    """Mamba: a selective state-space model (its sequential scan, as run without CUDA kernels)."""
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=layers,
                                        expand=2, conv_kernel=4))


def hf_mamba2(layers: int = 4) -> nn.Module:
    """Mamba 2: its chunked scan pads the sequence to a multiple of the chunk and trims it only when it padded, which
    export records as a guard on the length (``length % 8 == 0``): each length whose padding differs is captured
    anew."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    return Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_heads=4,
                                          head_dim=16, n_groups=1, state_size=8, expand=2, conv_kernel=4, chunk_size=8))


def hf_segformer() -> nn.Module:
    """SegFormer: a hierarchical encoder and an all-MLP decoder with a batch norm; logits at a quarter of the size."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        drop_path_rate=0.0))


def lightning_demo_transformer() -> nn.Module:
    """Lightning's own demo ``Transformer`` (its docs' model-parallel example): torch's ``nn.Transformer`` with a
    causal target mask, which torch compares with a causal mask to pick a kernel (captured as given)."""
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=VOCAB, ninp=32, nhead=4, nhid=64, nlayers=2, dropout=0.0)


def _demo_loss(out: torch.Tensor, mb: Batch) -> torch.Tensor:
    return F.nll_loss(out, mb[0][:, 1:].reshape(-1))


# -- the families --------------------------------------------------------------------------------------------------
Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Family:
    """A model family: how to build one, make a batch, call the model on a (micro-)batch, and take its loss."""

    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[int, int, int], Batch]  # (rows, sequence length, seed) -> batch
    call: Callable[[Batch], tuple[tuple, dict[str, Any]]]
    loss: Callable[[Any, Batch], torch.Tensor]
    hf: bool = False
    requires: str = ""
    """A package the family needs besides transformers (torchvision, timm): its tests skip without it."""

    def skip_without_transformers(self) -> None:
        if self.hf and not HAS_TRANSFORMERS:
            pytest.skip("transformers is not installed (pip install -e '.[dev]')")
        if self.requires and importlib.util.find_spec(self.requires) is None:
            how = ("pip install -e '.[dev]'" if self.requires == "peft" else
                   "here: pip install torch==2.14.1 torchvision==0.29.1 timm, whose torchvision loads its ops")
            pytest.skip(f"{self.requires} is not installed ({how})")


def _tokens(rows: int, length: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (rows, length), generator=g),)


def _masked(rows: int, length: int, seed: int) -> Batch:
    (ids,) = _tokens(rows, length, seed)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[::2, -3:] = 0  # padding at the end of every other row
    return ids, mask


def _classified(rows: int, length: int, seed: int) -> Batch:
    ids, mask = _masked(rows, length, seed)
    return ids, mask, torch.arange(rows) % 3


def _images(rows: int, _length: int, seed: int, size: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, size, size, generator=g), torch.randint(0, 10, (rows,), generator=g)


def _vectors(rows: int, _length: int, seed: int) -> Batch:
    return (torch.randn(rows, 32, generator=torch.Generator().manual_seed(seed)),)


def _spoken(rows: int, length: int, seed: int) -> Batch:
    """Whisper's input: 8 mel bins over 32 frames (twice its 16 source positions); a transcript of ``length // 2``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, 32, generator=g), torch.randint(3, VOCAB, (rows, max(2, length // 2)), generator=g)


def _segmented(rows: int, _length: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, 32, 32, generator=g), torch.randint(0, 3, (rows, 32, 32), generator=g)


def _segmentation_loss(out: Any, mb: Batch) -> torch.Tensor:
    """The step's own loss on the model's ``.logits`` (no labels given to the model), upsampled to the masks."""
    logits = F.interpolate(out.logits, size=mb[1].shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, mb[1])


def _classifier_loss(out: Any, mb: Batch) -> torch.Tensor:
    """Cross-entropy on the logits; in training, the auxiliary heads' losses weighted in as GoogLeNet's recipe does
    (``AuxHeadNet``'s ``(logits, aux)``, torchvision's ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``)."""
    if isinstance(out, tuple):
        return F.cross_entropy(out[0], mb[1]) + 0.3 * sum(F.cross_entropy(aux, mb[1]) for aux in out[1:])
    return F.cross_entropy(out, mb[1])


def _autoencoder_loss(out: tuple[torch.Tensor, torch.Tensor], mb: Batch) -> torch.Tensor:
    recon, code = out
    return F.mse_loss(recon, mb[0]) + 1e-2 * code.pow(2).mean()


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("hf_gpt2", hf_gpt2, _tokens, lambda mb: ((mb[0],), {"labels": mb[0]}), lambda out, mb: out.loss, hf=True),
    Family("hf_llama", hf_llama, _masked, lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[0]}),
           lambda out, mb: out.loss, hf=True),
    Family("hf_bert", hf_bert, _classified, lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[2]}),
           lambda out, mb: out.loss, hf=True),
    Family("vit", ViT, _images, lambda mb: ((mb[0],), {}), lambda out, mb: F.cross_entropy(out, mb[1])),
    Family("resnet", ResNet, _images, lambda mb: ((mb[0],), {}), lambda out, mb: F.cross_entropy(out, mb[1])),
    Family("aux_head", AuxHeadNet, _images, lambda mb: ((mb[0],), {}), _classifier_loss),
    Family("autoencoder", AutoEncoder, _vectors, lambda mb: ((mb[0],), {}), _autoencoder_loss),
    Family("litgpt", LitGPT, _tokens, lambda mb: ((mb[0],), {"targets": mb[0].roll(-1, 1)}), lambda out, mb: out),
    Family("message_passing", MessagePassing, _graphs, lambda mb: ((mb[0], mb[1]), {}),
           lambda out, mb: F.cross_entropy(out, mb[2])),
]}
# More families (Hugging Face decoders, encoders, an encoder-decoder and vision models): train and validate in
# tests/test_strategy_capture.py::test_more_hugging_face_families_train_and_validate_like_one_device
MORE_FAMILIES: dict[str, Family] = {f.name: f for f in [
    *(Family(f"hf_{kind.lower()}", functools.partial(hf_causal, kind), _masked,
             lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[0]}), lambda out, mb: out.loss, hf=True)
      for kind in ("Mistral", "Qwen2", "Qwen3", "Gemma", "Phi", "GPTNeoX", "OPT", "Gemma2", "Mixtral")),
    *(Family(f"hf_{kind.lower()}", functools.partial(hf_encoder, kind), _classified,
             lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[2]}), lambda out, mb: out.loss, hf=True)
      for kind in ("Roberta", "DistilBert", "Electra")),
    Family("hf_t5", hf_t5, _masked, lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[0].flip(1)}),
           lambda out, mb: out.loss, hf=True),
    Family("hf_vit", hf_vit, _images, lambda mb: ((mb[0],), {"labels": mb[1]}), lambda out, mb: out.loss, hf=True),
    *(Family(f"hf_{kind.lower()}", functools.partial(hf_vision, kind), _images,
             lambda mb: ((mb[0],), {"labels": mb[1]}), lambda out, mb: out.loss, hf=True)
      for kind in ("ConvNext", "ResNet", "Swin")),
    Family("hf_albert", hf_albert, _classified, lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[2]}),
           lambda out, mb: out.loss, hf=True),
    Family("hf_whisper", hf_whisper, _spoken, lambda mb: ((), {"input_features": mb[0], "labels": mb[1]}),
           lambda out, mb: out.loss, hf=True),
    Family("hf_mamba", hf_mamba, _tokens, lambda mb: ((mb[0],), {"labels": mb[0]}), lambda out, mb: out.loss, hf=True),
    Family("hf_mamba2", hf_mamba2, _masked, lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[0]}),
           lambda out, mb: out.loss, hf=True),
    Family("hf_segformer", hf_segformer, _segmented, lambda mb: ((mb[0],), {}), _segmentation_loss, hf=True),
    Family("hf_bloom", hf_bloom, _masked, lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[0]}),
           lambda out, mb: out.loss, hf=True),
    Family("hf_bart", hf_bart, _masked, lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[0].flip(1)}),
           lambda out, mb: out.loss, hf=True),
    Family("lightning_demo_transformer", lightning_demo_transformer, _tokens,
           lambda mb: ((mb[0][:, :-1], mb[0][:, 1:]), {}), _demo_loss),
]}


# torchvision's and timm's own models, unchanged: tests/test_strategy_capture.py::test_torchvision_and_timm_models_...
# (skipped where they are not installed; the CI's torch 2.13 CPU build has no torchvision that loads). Dropout and
# stochastic depth are off: their masks are drawn per stage, not as one device draws them (README, "What is exact").
def torchvision_model(name: str, **options: Any) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10, **options)


def timm_model(name: str, **options: Any) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10, **options)


_photos = functools.partial(_images, size=64)


VISION_FAMILIES: dict[str, Family] = {f.name: f for f in [
    *(Family(f"tv_{name}", functools.partial(torchvision_model, name, **options), _photos, lambda mb: ((mb[0],), {}),
             _classifier_loss, requires="torchvision")
      for name, options in [("resnet18", {}), ("mobilenet_v3_small", {"dropout": 0.0}),
                            ("efficientnet_b0", {"dropout": 0.0, "stochastic_depth_prob": 0.0}),
                            ("googlenet", {"aux_logits": True, "init_weights": True, "dropout": 0.0,
                                           "dropout_aux": 0.0})]),
    Family("tv_vit", functools.partial(torchvision_model, "VisionTransformer", image_size=64, patch_size=16,
                                       num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64),
           _photos, lambda mb: ((mb[0],), {}), _classifier_loss, requires="torchvision"),
    *(Family(f"timm_{name}", functools.partial(timm_model, name, **options), _photos, lambda mb: ((mb[0],), {}),
             _classifier_loss, requires="timm")
      for name, options in [("convnext_atto", {}), ("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 16}),
                            ("efficientnet_b0", {}),  # batch norms of timm's own class (BatchNormAct2d)
                            ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "embed_dim": 24,
                                                              "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4),
                                                              "drop_path_rate": 0.0})]),
]}


def mlp_sequence() -> nn.Sequential:
    """Layers in one nn.Sequential: the path without capture, for the tests that cover both."""
    return nn.Sequential(*(nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU()) for _ in range(4)),
                         nn.Linear(32, 32))


# Variants of a family for one test each.
VARIANTS = {family.name: family for family in [
    Family("mlp_sequence", mlp_sequence, _vectors, lambda mb: ((mb[0],), {}),
           lambda out, mb: F.mse_loss(out, mb[0].flip(1))),
    Family("hf_llama_eager_attention", functools.partial(hf_llama, attention="eager"), _masked,
           lambda mb: ((mb[0],), {"attention_mask": mb[1], "labels": mb[0]}), lambda out, mb: out.loss, hf=True),
    Family("peft_lora", peft_lora, _masked,
           lambda mb: ((), {"input_ids": mb[0], "attention_mask": mb[1], "labels": mb[0]}), lambda out, mb: out.loss,
           hf=True, requires="peft"),
    Family("peft_lora_checkpointed", peft_lora_checkpointed, _masked,
           lambda mb: ((), {"input_ids": mb[0], "attention_mask": mb[1], "labels": mb[0]}), lambda out, mb: out.loss,
           hf=True, requires="peft"),
]}


def family(name: str) -> Family:
    """The family ``name``, skipping the test when it needs transformers and that is not installed."""
    found = {**FAMILIES, **MORE_FAMILIES, **VARIANTS, **VISION_FAMILIES}[name]
    found.skip_without_transformers()
    return found
