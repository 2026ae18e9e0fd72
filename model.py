"""The Mistral decoder in plain PyTorch, made bidirectional, plus LoRA and the NV-Embed model.

NV-Embed (arXiv 2405.17428, section 3.1; PAPER.md sections 1-3) removes Mistral-7B's causal
mask: every token attends to every real token, only padding is masked (`causal=False`).
NVEmbed = decoder + pooling (pooling.py) + tokenizer and pool mask (data.py). Differences
from transformers' MistralModel / LlamaModel: positions count from each row's first real
token (HF's hidden states under left padding depend on the padding); no KV cache, no LM
head; parameter names are HF's without "model.", so checkpoints load as they are
(checkpoints.py reads the files). Parity tests: `python -m pytest tests/test_model.py`.

Shapes: B batch, T tokens, D hidden, H query heads, Hkv key/value heads, Dh head dim, F MLP width.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from checkpoints import (ByteTokenizer, check_base, hf_decoder_fields, is_saved, load_checked, load_tokenizer,
                         read_hf_checkpoint, read_model_folder, read_released, weights_fingerprint,
                         write_model_folder, write_released_folder)
from compiled import compile_forward
from data import QUERY_TEMPLATE, TextRule, encode_texts, tokenize
from errors import MissingFileError, UsageError
from lora import apply_lora, lora_config
from pooling import POOLINGS

log = logging.getLogger("nvembed.model")  # notices: errors.py


# ----------------------------------------------------------------------------
# Config


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

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs it)")

    @classmethod
    def preset(cls, name: str) -> "MistralConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config") -> "MistralConfig":
        """Read an HF `config.json` dict of a Mistral or Llama-family model (checkpoints.hf_decoder_fields
        refuses by name anything that would change the computation and that this file does not implement)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in hf_decoder_fields(hf, source).items() if k in known})


PRESETS = {
    # Mistral-7B-v0.1, the backbone of NV-Embed (PAPER.md section 1).
    "mistral-7b": dict(),
    # A tiny model for the default CPU run and the tests (fits the byte tokenizer).
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None),
    # SmolLM2-135M, the real Llama-family model used for the CPU experiments.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, sliding_window=None),
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
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of the rotary angles position * theta^(-2i/Dh), each (B, T, Dh), in HF's "rotate half" layout
    (the halves of the head dimension pair up; HF's q_proj / k_proj are permuted for it, so an interleaved RoPE
    would silently mismatch)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
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
        D, H, Hkv, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def forward(self, x, cos, sin, attn_mask, is_causal):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if gqa and attn_mask is not None:
            # SDPA's fused GPU kernels take a mask (memory-efficient) or GQA (flash), not both: with a
            # mask, repeat each key/value head for its group of query heads, or it falls back to math.
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T, Dh)
            gqa = False
        # enable_gqa: each group of H / Hkv query heads reads one key/value head, no repeated copies.
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
    """Boolean (B, 1, T, T), True where query i may attend to key j: every real key when bidirectional (the
    paper's encoder sees the whole text, no window); causal adds j <= i and, with a window W, i - j < W (HF's
    Mistral). Every position sees itself, or a left-padded row would see nothing and SDPA would give NaN."""
    B, T = attention_mask.shape
    real = attention_mask.bool()
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
        B, T = input_ids.shape
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Positions count from each row's first real token, so left padding does not shift the rotary
        # angles: (pad, a, b, c) -> (0, 0, 1, 2); leading pads are clamped to 0 (never attended to or pooled).
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.embed_tokens.weight.dtype)

        window_active = causal and cfg.sliding_window is not None and T > cfg.sliding_window
        if bool(attention_mask.all()) and not window_active:
            # No padding: SDPA builds the (causal or empty) mask itself, which allows its fused kernels.
            attn_mask, is_causal = None, causal
        else:
            attn_mask, is_causal = attention_mask_4d(attention_mask, causal, cfg.sliding_window), False

        x = self.embed_tokens(input_ids)  # (B, T, D)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, attn_mask, is_causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, is_causal)
        return self.norm(x)

    def compile(self, dynamic: bool = True, backend: str = "inductor") -> "Mistral":
        """torch.compile each decoder layer in place, as torchtitan does (before FSDP's fully_shard: train.py);
        the glue between layers stays eager. dynamic: symbolic batch and sequence sizes (compiled.py's bound)."""
        for layer in self.layers:
            compile_forward(layer, dynamic, backend)
        return self

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "Mistral":
        """Load an HF Mistral / Llama checkpoint folder ((sharded) safetensors or .bin) or a `.gguf` file.
        Built on the meta device and assigned tensor by tensor: about the checkpoint's size in memory."""
        hf_config, source, state = read_hf_checkpoint(Path(path), dtype)
        with torch.device("meta"):
            model = cls(MistralConfig.from_hf(hf_config, source=source))
        load_checked(model, state, source=str(path))
        return model.to(device)


# ----------------------------------------------------------------------------
# NV-Embed: decoder + pooling + tokenizer


class NVEmbed(nn.Module):
    """Texts -> L2-normalised embeddings: tokenize, run the decoder, pool, normalise. Training (train.py) and
    `encode` share `forward` and tokenize with the model's own `text_rule`, so their pool masks are the same."""

    def __init__(self, decoder: Mistral, pooling: nn.Module, tokenizer, pooling_name: str,
                 pooling_kwargs: dict | None = None, causal: bool = False, max_length: int = 512,
                 text_rule=None, base: str | None = None, normalize: bool = True, name: str | None = None):
        super().__init__()
        self.decoder = decoder
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.pooling_name = pooling_name
        self.pooling_kwargs = dict(pooling_kwargs or {})
        self.causal = causal  # False: the paper's bidirectional encoder
        self.max_length = max_length
        self.text_rule = text_rule or TextRule()  # template, instruction mask, BOS rule, truncation
        self.normalize = normalize  # L2-normalise the output (the released `output_normalize`)
        self.base = base  # the checkpoint the decoder came from, if any (for LoRA-only saves)
        self.name = name  # what the model is called in results: a saved one's records it (train.py's --name)
        if len(tokenizer) > decoder.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids but the decoder's vocab_size is "
                             f"{decoder.config.vocab_size}")

    def forward(self, batch: dict) -> torch.Tensor:
        """batch: `data.tokenize`'s dict. Returns (B, D) unit vectors (fp32)."""
        hidden = self.decoder(batch["input_ids"], batch["attention_mask"], causal=self.causal)  # (B, T, D)
        # A trained pooling is fp32 over a bf16 decoder (train.py): it reads the hidden states in its own dtype.
        pooling_dtype = next((p.dtype for p in self.pooling.parameters()), hidden.dtype)
        pooled = self.pooling(hidden.to(pooling_dtype), batch["pool_mask"])  # (B, D)
        # In fp32 as the released code does: a bf16 norm leaves vectors of length 1 +- 4e-3.
        return F.normalize(pooled.float(), dim=-1) if self.normalize else pooled.float()

    def compile(self, dynamic: bool = True, backend: str = "inductor") -> "NVEmbed":
        """Mistral.compile, and a pooling with weights (its pool-mask check: a graph break); names unchanged."""
        self.decoder.compile(dynamic, backend)
        if any(True for _ in self.pooling.parameters()):  # mean and eos are a few cheap ops
            compile_forward(self.pooling, dynamic, backend)
        return self

    # -- inference -------------------------------------------------------------

    def tokenize(self, texts, instruction="", max_length=None, padding_side="right", prompt=None):
        return tokenize(self.tokenizer, texts, instruction, max_length=max_length or self.max_length,
                        rule=self.text_rule, padding_side=padding_side, prompt=prompt)

    @torch.no_grad()  # not inference_mode: FSDP2 refills its gathered buffers in place, forward after forward
    def encode(self, sentences: str | Sequence[str], prompt: str | None = None, instruction: str = "",
               batch_size: int = 32, show_progress_bar: bool | None = None, convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, normalize_embeddings: bool = False, max_length: int | None = None):
        """sentence-transformers' `encode`: a text -> (D,), N texts -> (N, D), float32, in the input order; numpy (the
        default), a CPU tensor (convert_to_tensor) or a list of (D,) tensors (both False). Queries pass their task as
        `instruction` (put in the model's template) or the whole prefix as `prompt` (NV-Embed-v2's card: "Instruct:
        ...\nQuery: "); documents neither. An empty text is embedded (BOS, EOS). Unit length in fp32 when the model
        normalises (NV-Embed does) or with normalize_embeddings. Batches hold texts of similar token count."""
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode expects a string or a list of strings")
        was_training = self.training
        self.eval()
        device = self.decoder.embed_tokens.weight.device
        out, truncated = torch.empty(len(texts), self.decoder.config.hidden_size), 0  # (N, width): width D ...
        show = len(texts) > 8 * batch_size if show_progress_bar is None else show_progress_bar
        for rows in tqdm(self.batches(texts, batch_size), desc="encode", disable=not show, leave=False):
            batch = self.tokenize([texts[i] for i in rows], instruction, max_length, prompt=prompt)
            truncated += int(batch.pop("truncated").sum())
            embeddings = self({k: v.to(device) for k, v in batch.items()}).float().cpu()  # (b, width)
            out = out if out.shape[1] == embeddings.shape[1] else torch.empty(len(texts), embeddings.shape[1])
            out[rows] = embeddings  # ... unless a pooling changes it (bench/ablate.py concatenates four)
        self.train(was_training)
        if truncated:
            log.warning("encode: %d of %d texts were longer than %d tokens and were truncated", truncated,
                        len(texts), max_length or self.max_length)
        out = F.normalize(out, dim=-1) if normalize_embeddings else out  # fp32, as forward's
        if not convert_to_tensor:
            out = out.numpy() if convert_to_numpy else list(out)
        return out[0] if isinstance(sentences, str) else out

    def batches(self, texts: Sequence[str], batch_size: int) -> list[list[int]]:
        """encode's batches (rows of `texts`): similar token counts together, longest first (memory peaks at once).
        Every batch but the last is full, and the sort is stable (evaluate.encode_sharded relies on both)."""
        lengths = [len(ids) for ids in encode_texts(self.tokenizer, texts)]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        return [order[start:start + batch_size] for start in range(0, len(texts), batch_size)]

    # -- building, saving, loading ----------------------------------------------

    @classmethod
    def from_base(cls, model: str = "tiny", pooling: str = "latent", causal: bool = False,
                  max_length: int = 512, dtype: torch.dtype = torch.float32, seed: int = 0,
                  pooling_kwargs: dict | None = None, **kwargs) -> "NVEmbed":
        """A fresh embedder on a base decoder: a preset (random, byte tokenizer), an HF folder or a `.gguf`."""
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLINGS)}")
        torch.manual_seed(seed)
        if model in PRESETS:
            decoder, tokenizer, base = Mistral(MistralConfig.preset(model)).to(dtype), ByteTokenizer(), None
        else:
            decoder, tokenizer = Mistral.from_pretrained(model, dtype=dtype), load_tokenizer(model)
            base = str(Path(model).resolve())
        pool = POOLINGS[pooling](decoder.config.hidden_size, **(pooling_kwargs or {})).to(dtype)
        return cls(decoder, pool, tokenizer, pooling, pooling_kwargs, causal=causal, max_length=max_length,
                   base=base, **{"name": Path(model).name, **kwargs})

    def lora_config(self) -> dict | None:
        return lora_config(self.decoder)

    def fingerprint(self) -> str:
        """A hash of the weights as they are now (checkpoints.weights_fingerprint): the model's revision."""
        return weights_fingerprint(self.state_dict())

    def architecture(self) -> dict:
        """Everything but the weights and the tokenizer: what `skeleton` rebuilds from."""
        return dict(decoder=asdict(self.decoder.config), pooling=self.pooling_name,
                    pooling_kwargs=self.pooling_kwargs, lora=self.lora_config(), causal=self.causal,
                    max_length=self.max_length, text_rule=dataclasses.asdict(self.text_rule),
                    normalize=self.normalize, base=self.base, name=self.name,
                    params={name: (str(p.dtype).removeprefix("torch."), p.requires_grad)
                            for name, p in self.named_parameters()})

    @classmethod
    def skeleton(cls, architecture: dict, tokenizer) -> "NVEmbed":
        """The modules of `architecture()` (or a saved config.json) on the meta device, with each parameter's
        dtype and trainable flag where recorded: loaders assign the weights to it (`load_checked`), and FSDP
        ranks other than 0 receive their shards of rank 0's (train.py)."""
        with torch.device("meta"):
            decoder = Mistral(MistralConfig(**architecture["decoder"]))
            if architecture["lora"]:
                apply_lora(decoder, **architecture["lora"])
            pooling = POOLINGS[architecture["pooling"]](decoder.config.hidden_size, **architecture["pooling_kwargs"])
        rule = TextRule.from_dict(architecture["text_rule"], "text_rule")
        model = cls(decoder, pooling, tokenizer, architecture["pooling"], architecture["pooling_kwargs"],
                    causal=architecture["causal"], max_length=architecture["max_length"], text_rule=rule,
                    normalize=architecture["normalize"], base=architecture["base"], name=architecture.get("name"))
        for name, (dtype, trainable) in architecture.get("params", {}).items():
            param = model.get_parameter(name)
            param.data = param.data.to(getattr(torch, dtype))
            param.requires_grad = trainable
        return model

    def save(self, folder: str | os.PathLike, state_dict: dict | None = None, overwrite: bool = False, layout="own"):
        """In this project's layout (checkpoints.py), or NVIDIA's (layout="released"); `state_dict`: e.g. FSDP's."""
        write = {"own": write_model_folder, "released": write_released_folder}[layout]  # KeyError: no such layout
        write(folder, self.architecture(), state_dict or self.state_dict(), self.tokenizer, overwrite)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu",
                        trainable_dtype: torch.dtype | None = None) -> "NVEmbed":
        """Load what `save` wrote. dtype: the decoder's (default: as saved); trainable_dtype: the adapters' and
        pooling's (default: dtype). Stage 2 asks for fp32: stage 1's fp32 weights then arrive bit for bit."""
        config, config_file, tensors = read_model_folder(folder)  # {"decoder.*", "pooling.*": tensor}
        dtype = dtype or getattr(torch, config["dtype"])
        trainable_dtype = trainable_dtype or dtype
        if config["base"] is not None:  # an adapters-only save: the frozen weights come from the base
            base = Mistral.from_pretrained(config["base"], dtype=dtype)
            check_base(config, config_file, asdict(base.config), base.state_dict())
            tensors |= {f"decoder.{k}": v for k, v in base.state_dict().items()}
        model = cls.skeleton(config, load_tokenizer(str(Path(folder) / config["tokenizer"])))
        trainable = {k for k in tensors if "lora_" in k or k.startswith("pooling.")}  # what training updates
        load_checked(model, ((k, v.to(trainable_dtype if k in trainable else dtype)) for k, v in tensors.items()),
                     str(folder))
        return model.to(device).eval()

    @classmethod
    def load(cls, spec: str, pooling: str | None = None, causal: bool | None = None, max_length: int = 512,
             dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "NVEmbed":
        """What the commands take as --model: a folder `save` wrote (its pooling and attention are kept), or a
        base decoder (preset, HF folder, .gguf) with a fresh `pooling` (default mean) for zero-shot use."""
        if is_saved(spec):
            if pooling is not None or causal is not None:
                raise UsageError(f"--model {spec} is a saved NV-Embed model: it keeps the pooling and attention it "
                                 "was trained with, so --pooling / --causal / --bidirectional do not apply")
            return cls.from_pretrained(spec, dtype=dtype, device=device)
        if is_saved(Path(spec) / "model"):  # a run folder of train.py: config.json there is the run's
            raise UsageError(f"--model {spec} is a train.py run folder, not a model: did you mean "
                             f"{Path(spec) / 'model'}?")
        if spec not in PRESETS and not Path(spec).exists():
            raise MissingFileError(f"--model {spec}: not found (want a saved NV-Embed folder, an HF checkpoint folder, "
                                   f"a .gguf file or a preset: {', '.join(sorted(PRESETS))})")
        model = cls.from_base(spec, pooling=pooling or "mean", causal=bool(causal), max_length=max_length,
                              dtype=dtype or torch.float32)
        return model.to(device).eval()

    @classmethod
    def from_released(cls, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      max_length: int = 4096) -> "NVEmbed":
        """NVIDIA's released NV-Embed-v1/v2 (a local copy of the HF repository), embedding exactly as their
        `encode(prompts, instruction, max_length=4096)` does (tests/test_released.py): a row is the tokenizer's encoding
        of BOS + instruction + text + "</s>", cut at max_length (a long text loses its EOS: TextRule.truncation
        "sequence"); they zero the first len(tokenize(instruction)) positions of the pool mask (right padding,
        `is_mask_instruction`, an instruction given: TextRule.instruction_positions "tokenize"), so a bare text
        (every document) pools its BOS (TextRule.pool_bos "without_instruction"); padding is EOS (`add_pad_token`);
        EOS is appended whatever `add_eos` says (always_add_eos); the mean is L2-normalised if `output_normalize`."""
        config, text_config, latent_config, tensors = read_released(folder, dtype)
        decoder = MistralConfig.from_hf(text_config, source=str(Path(folder) / "config.json"))
        rule = TextRule(template=QUERY_TEMPLATE, mask_instruction=bool(config.get("is_mask_instruction", True)),
                        pool_bos="without_instruction", truncation="sequence", instruction_positions="tokenize")
        pooling_kwargs = dict(num_latents=latent_config.get("num_latents_value", 512),
                              num_heads=latent_config.get("num_cross_heads", 8),
                              head_dim=latent_config.get("cross_dim_head", decoder.hidden_size))
        architecture = dict(decoder=asdict(decoder), lora=None, pooling="latent", pooling_kwargs=pooling_kwargs,
                            causal=False, max_length=max_length, text_rule=dataclasses.asdict(rule), base=None,
                            normalize=bool(latent_config.get("output_normalize", True)), name=Path(folder).name)
        tokenizer = load_tokenizer(str(folder))
        if config.get("add_pad_token", True) and hasattr(tokenizer, "eos_token"):  # an HF tokenizer
            tokenizer.pad_token = tokenizer.eos_token
        model = cls.skeleton(architecture, tokenizer)
        load_checked(model, tensors.items(), str(folder))
        return model.eval()
