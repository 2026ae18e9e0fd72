"""The Mistral decoder in plain PyTorch, made bidirectional, and the NV-Embed model around it.

NV-Embed (arXiv 2405.17428, section 3.1; PAPER.md sections 1-3) removes Mistral-7B's causal mask:
every token attends to every real token, only padding is masked (`causal=False`). NVEmbed = decoder
+ pooling (pooling.py) + tokenizer and pool mask (data.py). Unlike transformers' MistralModel /
LlamaModel: positions count from each row's first real token (HF's hidden states under left padding
depend on the padding); no KV cache, no LM head; parameter names are HF's less "model.", so
checkpoints load as they are. Parity tests: `python -m pytest tests/test_model.py`.

Shapes: B batch, T tokens, D hidden, H query heads, Hkv key/value heads, Dh head dim, F MLP width.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from data import TextRule, length_batches, padded_rows, token_rows, tokenize
from plumbing.base_checkpoints import (hf_decoder_fields, load_checked, read_hf_checkpoint,
                                       weights_fingerprint)
from plumbing.compiled import compile_forward
from plumbing.st_api import SentenceTransformersAPI
from pooling import check_pool_mask

log = logging.getLogger("nvembed.model")  # notices: errors.py


@dataclass
class MistralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # Mistral-7B-v0.1; None for Llama-family models
    rope_scaling: dict | None = None  # Llama 3.1+'s, as HF writes it (llama3_rope_scaling)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads} (GQA needs it)")

    @classmethod
    def preset(cls, name: str) -> "MistralConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config") -> "MistralConfig":
        """An HF `config.json` dict of a Mistral or Llama-family model (hf_decoder_fields refuses by
        name anything that would change the computation and that this file does not implement)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hf_decoder_fields(hf, source).items() if k in known})


PRESETS = {
    # Mistral-7B-v0.1, the backbone of NV-Embed (PAPER.md section 1).
    "mistral-7b": dict(),
    # A tiny model for the default CPU run and the tests (fits the byte tokenizer).
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 sliding_window=None),
    # SmolLM2-135M, the real Llama-family model used for the CPU experiments.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, sliding_window=None),
}

# ----------------------------------------------------------------------------
# The decoder: blocks, the causal switch, the model


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 as HF does (it matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, config: MistralConfig, dtype: torch.dtype):
    """cos and sin of the rotary angles position * theta^(-2i/Dh), each (B, T, Dh), in HF's "rotate
    half" layout (the halves of the head dimension pair up; HF's q_proj / k_proj are permuted for
    it, so an interleaved RoPE would silently mismatch). Llama 3.1 scales the frequencies."""
    even = torch.arange(0, config.head_dim, 2, device=positions.device).float()  # (Dh/2,): 2i
    inv_freq = 1.0 / config.rope_theta ** (even / config.head_dim)  # (Dh/2,)
    if config.rope_scaling is not None:
        inv_freq = llama3_rope_scaling(inv_freq, config.rope_scaling)  # (Dh/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate each (x_i, x_{i + Dh/2}) pair of x (B, H, T, Dh) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, H, T, Dh/2)
    rotated_half = torch.cat([-x2, x1], dim=-1)  # (B, H, T, Dh)
    return x * cos[:, None] + rotated_half * sin[:, None]  # cos, sin: (B, 1, T, Dh)


class Attention(nn.Module):
    """Grouped-query attention: H query heads share Hkv key/value heads (Mistral: 32 / 8)."""

    def __init__(self, config: MistralConfig):
        super().__init__()
        D, H, Dh = config.hidden_size, config.num_attention_heads, config.head_dim
        Hkv = config.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def forward(self, x, cos, sin, attn_mask, is_causal):
        B, T, _ = x.shape
        # (B, H, T, Dh)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        # (B, Hkv, T, Dh)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if gqa and attn_mask is not None and x.device.type != "cpu":
            # SDPA's fused GPU kernels take a mask (memory-efficient) or GQA (flash), not both:
            # repeat each key/value head for its query heads, or math runs. The CPU's takes both.
            groups = self.num_heads // self.num_kv_heads
            # (B, H, T, Dh)
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            gqa = False
        # enable_gqa: each group of H / Hkv query heads reads one key/value head, no copies.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=gqa)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*Dh)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MistralConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block; attribute names match HF's `layers.N.*`."""

    def __init__(self, config: MistralConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, is_causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask: torch.Tensor, causal: bool, sliding_window: int | None):
    """Boolean, True where query i may attend to key j: every real key when bidirectional (the
    paper's encoder sees the whole text, no window): (B, 1, 1, T), alike for all queries; causal
    adds j <= i and, with a window W, i - j < W (HF's Mistral): (B, 1, T, T). Every position sees
    itself, or a left-padded row would see nothing and SDPA would give NaN."""
    B, T = attention_mask.shape
    real = attention_mask.bool()
    if not causal and bool(real.any(1).all()):  # every query sees a real key: no row sees nothing
        return real[:, None, None, :]  # (B, 1, 1, T): SDPA broadcasts it, nothing to build
    mask = real[:, None, None, :].expand(B, 1, T, T)  # keys: (B, 1, T, T)
    idx = torch.arange(T, device=attention_mask.device)
    if causal:
        allowed = idx[None, :] <= idx[:, None]  # (T, T): j <= i
        if sliding_window is not None:
            allowed = allowed & (idx[:, None] - idx[None, :] < sliding_window)
        mask = mask & allowed
    return mask | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


class Mistral(nn.Module):
    """The Mistral / Llama decoder without LM head; returns final-normed hidden states."""

    def __init__(self, config: MistralConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.activation_checkpointing = False  # recompute each layer in backward to save memory

    def forward(self, input_ids, attention_mask=None, causal: bool = False):
        T, cfg = input_ids.shape[1], self.config
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        # Positions count from each row's first real token, so left padding does not shift the
        # rotary angles: (pad, a, b, c) -> (0, 0, 1, 2); leading pads are clamped to 0 (unused).
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        cos, sin = rotary_cos_sin(positions, cfg, self.embed_tokens.weight.dtype)  # (B, T, Dh) each

        window_active = causal and cfg.sliding_window is not None and T > cfg.sliding_window
        if bool(attention_mask.all()) and not window_active:
            # No padding: SDPA builds the (causal or empty) mask itself, allowing its fused kernels.
            attn_mask, is_causal = None, causal
        else:  # padding masked, and causal (with a window) if asked
            attn_mask = attention_mask_4d(attention_mask, causal, cfg.sliding_window)
            is_causal = False

        x = self.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, is_causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, is_causal)
        return self.norm(x)

    def compile(self, dynamic: bool = True, backend: str = "inductor") -> "Mistral":
        """torch.compile each layer in place, as torchtitan does (before FSDP's fully_shard), the
        glue eager. dynamic: symbolic batch and sequence sizes."""
        for layer in self.layers:
            compile_forward(layer, dynamic, backend)
        return self

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype=torch.float32, device="cpu"):
        """An HF Mistral / Llama checkpoint folder ((sharded) safetensors, .bin) or a .gguf file.
        HF's names less "model." are this module's (lm_head dropped). Built on the meta device,
        then assigned tensor by tensor: about the checkpoint's size in memory."""
        hf_config, source, state = read_hf_checkpoint(Path(path), dtype)
        with torch.device("meta"):
            model = cls(MistralConfig.from_hf(hf_config, source=source))
        load_checked(model, state, source=str(path))
        return model.to(device)


def llama3_rope_scaling(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's RoPE frequencies (Dh/2,) from the plain ones (HF's rope_type "llama3"). It
    stretches the context by `factor` without retraining every frequency: one whose wavelength fits
    many times into the original context (high: local order) is kept, one longer than it (low:
    positions never seen in pretraining) is divided by `factor`, the band between interpolated
    linearly in original / wavelength from low_freq_factor (all scaled) to high_freq_factor."""
    original = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    periods_in_context = original * inv_freq / (2 * math.pi)  # (Dh/2,): original / wavelength
    kept = ((periods_in_context - low) / (high - low)).clamp(0, 1)  # (Dh/2,): 1 = unscaled
    return kept * inv_freq + (1 - kept) * inv_freq / scaling["factor"]


# ----------------------------------------------------------------------------
# NV-Embed: decoder + pooling + tokenizer


class NVEmbed(nn.Module, SentenceTransformersAPI):
    """Texts -> L2-normalised embeddings: tokenize, decoder, pooling, normalise. Training and
    `encode` share `forward` and the model's own `text_rule`: their pool masks are the same.
    sentence-transformers' encode_query, encode_document, similarity: plumbing/st_api.py."""

    def __init__(self, decoder: Mistral, pooling: nn.Module, tokenizer, pooling_name: str,
                 pooling_kwargs: dict | None = None, causal: bool = False, max_length: int = 512,
                 text_rule=None, base: str | None = None, normalize: bool = True,
                 name: str | None = None, prompts: dict[str, str] | None = None):
        super().__init__()
        self.decoder, self.pooling, self.tokenizer = decoder, pooling, tokenizer
        self.pooling_name, self.pooling_kwargs = pooling_name, dict(pooling_kwargs or {})
        self.causal, self.max_length = causal, max_length  # causal False: the paper's encoder
        self.text_rule = text_rule or TextRule()  # template, instruction mask, BOS rule, truncation
        self.normalize = normalize  # L2-normalise the output (the released `output_normalize`)
        self.base = base  # the checkpoint the decoder came from, if any (for LoRA-only saves)
        self.name = name  # what the model is called in results (train.py's --name)
        # sentence-transformers' named prompts, each a whole prefix: "query" is encode_query's.
        self.prompts = dict(prompts or {})
        if len(tokenizer) > decoder.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids but the decoder's vocab_size is "
                             f"{decoder.config.vocab_size}")

    def forward(self, batch: dict) -> torch.Tensor:
        """batch: `data.tokenize`'s dict. Returns (B, D) unit vectors (fp32)."""
        hidden = self.decoder(batch["input_ids"], batch["attention_mask"], self.causal)  # (B, T, D)
        pool_mask = check_pool_mask(hidden, batch["pool_mask"])  # (B, T) bool, a token in every row
        # A trained pooling is fp32 over a bf16 decoder (train.py): it reads hidden in its dtype.
        pooling_dtype = next((p.dtype for p in self.pooling.parameters()), hidden.dtype)
        pooled = self.pooling(hidden.to(pooling_dtype), pool_mask)  # (B, D)
        # In fp32 as the released code does: a bf16 norm leaves vectors of length 1 +- 4e-3.
        return F.normalize(pooled.float(), dim=-1) if self.normalize else pooled.float()

    def compile(self, dynamic: bool = True, backend: str = "inductor") -> "NVEmbed":
        """Mistral.compile, and a pooling with weights; parameter names unchanged."""
        self.decoder.compile(dynamic, backend)
        if any(True for _ in self.pooling.parameters()):  # mean and eos are a few cheap ops
            compile_forward(self.pooling, dynamic, backend)
        return self

    def tokenize(self, texts, instruction="", max_length=None, padding_side="right", prompt=None):
        return tokenize(self.tokenizer, texts, instruction, max_length or self.max_length,
                        self.text_rule, padding_side, prompt)

    @torch.no_grad()  # not inference_mode: FSDP2 refills its gathered buffers in place
    def encode(self, sentences: str | Sequence[str], prompt: str | None = None,
               instruction: str = "", batch_size: int = 32, show_progress_bar: bool | None = None,
               convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False, max_length: int | None = None,
               prompt_name: str | None = None):
        """sentence-transformers' `encode`: a text -> (D,), N texts -> (N, D) float32 in input
        order: numpy, a CPU tensor (convert_to_tensor) or a list of (D,) tensors. Queries pass their
        task as `instruction` (put in the model's template), the whole prefix as `prompt`, or the
        name of one of `prompts` as `prompt_name`."""
        texts, prompt = self.checked_arguments(sentences, batch_size, prompt, prompt_name)
        was_training, device = self.training, self.decoder.embed_tokens.weight.device
        self.eval()  # (below: out is (N, width), width D unless a pooling changes it)
        out, truncated = torch.empty(len(texts), self.decoder.config.hidden_size), 0
        show = len(texts) > 8 * batch_size if show_progress_bar is None else show_progress_bar
        tokens = self.token_rows(texts, instruction, max_length, prompt)  # each text tokenized once
        batches = tqdm(length_batches(tokens, batch_size), "encode", disable=not show, leave=False)
        for rows in batches:  # an empty text is embedded too: its row is BOS, the prefix and EOS
            batch = padded_rows(self.tokenizer, [tokens[i] for i in rows])
            truncated += int(batch.pop("truncated").sum())
            embeddings = self({k: v.to(device) for k, v in batch.items()}).cpu()  # (b, width) fp32
            if out.shape[1] != embeddings.shape[1]:
                out = torch.empty(len(texts), embeddings.shape[1])
            out[rows] = embeddings
        self.train(was_training)
        if truncated:
            log.warning("encode: %d of %d texts were longer than %d tokens and were truncated",
                        truncated, len(texts), max_length or self.max_length)
        # Unit length in fp32 when the model normalises (NV-Embed does), or asked to here.
        out = F.normalize(out, dim=-1) if normalize_embeddings else out
        if not convert_to_tensor:
            out = out.numpy() if convert_to_numpy else list(out)
        return out[0] if isinstance(sentences, str) else out

    def token_rows(self, texts, instruction="", max_length=None, prompt=None) -> list[tuple]:
        return token_rows(self.tokenizer, texts, instruction, max_length or self.max_length,
                          self.text_rule, prompt)  # data.token_rows: (ids, pool mask, truncated)

    def batches(self, texts: Sequence[str], batch_size: int, instruction="", max_length=None,
                prompt=None) -> list[list[int]]:  # encode's batches (data.length_batches)
        return length_batches(self.token_rows(texts, instruction, max_length, prompt), batch_size)

    def fingerprint(self) -> str:
        return weights_fingerprint(self.state_dict())  # the weights' revision, recorded by results

    @classmethod
    def load(cls, folder: str | os.PathLike, **kwargs) -> "NVEmbed":
        """What `save` wrote; kwargs: dtype, device, trainable_dtype (plumbing/loading.load)."""
        from plumbing.loading import load
        return load(folder, **kwargs)

    def save(self, folder: str | os.PathLike, **kwargs) -> None:
        """kwargs: layout (own, released, hf, peft, sentence-transformers), state_dict, overwrite,
        training (plumbing/loading.save; the loader builds NVEmbeds, so both import it late)."""
        from plumbing.loading import save
        save(self, folder, **kwargs)
