"""Saving an NVEmbed where the rest of the ecosystem reads it (NVEmbed.save's layouts "hf" and "peft").

- layout="hf": the decoder, LoRA folded in (fp32), as a standard transformers Mistral / Llama folder:
  config.json (model_type, architectures, `is_causal`), model.safetensors under MistralModel's / LlamaModel's
  names, the tokenizer. transformers >= 5.2 builds the model without the causal mask from `is_causal: false`
  alone, so `AutoModel.from_pretrained(folder)` gives this decoder's hidden states with no remote code. This
  project's config and the pooling lie in nvembed/, where neither transformers nor a checkpoint reader looks;
  `NVEmbed.load(folder)` reads the whole back. Its modules.json and config_sentence_transformers.json make
  sentence-transformers refuse it, naming layout="sentence-transformers" (st_layout.sentence_transformers_guard).
- layout="peft": this project's own folder (NVEmbed.load reads it) with the LoRA adapters also in PEFT's
  format beside it: adapter_config.json and adapter_model.safetensors, keyed as PEFT keys a LoRA on
  transformers' base model (AutoModel: `base_model.model.layers.0.self_attn.q_proj.lora_A.weight`). Then
  `PeftModel.from_pretrained(AutoModel.from_pretrained(base, is_causal=False), folder)` is the adapted decoder
  (is_causal=False for a bidirectional model; the base's own config says causal).

Tests: tests/test_export.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from plumbing.checkpoints import (HF_DECODER_FILE, HF_LAYOUT_CONFIG, HF_LAYOUT_POOLING, _write_folder, fold_lora,
                                  model_card, weights_fingerprint, write_model_folder)
from plumbing.errors import UsageError


def hf_config(decoder: dict, causal: bool, tokenizer, dtype: torch.dtype) -> dict:
    """transformers' config.json of this project's decoder config (model.MistralConfig as a dict). A decoder
    with a sliding window is a Mistral, one without a Llama (the architecture is otherwise the same). The window
    is written only for a causal model: this project's bidirectional attention has none."""
    model_type = "mistral" if decoder["sliding_window"] is not None else "llama"
    rope = {"rope_type": "default", "rope_theta": decoder["rope_theta"], **(decoder["rope_scaling"] or {})}
    config = dict(
        architectures=[{"mistral": "MistralModel", "llama": "LlamaModel"}[model_type]], model_type=model_type,
        is_causal=bool(causal), vocab_size=decoder["vocab_size"], hidden_size=decoder["hidden_size"],
        intermediate_size=decoder["intermediate_size"], num_hidden_layers=decoder["num_hidden_layers"],
        num_attention_heads=decoder["num_attention_heads"], num_key_value_heads=decoder["num_key_value_heads"],
        head_dim=decoder["head_dim"], max_position_embeddings=decoder["max_position_embeddings"],
        rms_norm_eps=decoder["rms_norm_eps"], hidden_act="silu", rope_theta=decoder["rope_theta"],
        rope_parameters=rope, tie_word_embeddings=False, use_cache=False, attention_dropout=0.0,
        dtype=str(dtype).removeprefix("torch."),
        bos_token_id=getattr(tokenizer, "bos_token_id", None), eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None))
    if model_type == "mistral":
        config["sliding_window"] = decoder["sliding_window"] if causal else None
    else:
        config |= dict(attention_bias=False, mlp_bias=False)
    return config


def write_hf_folder(folder: str | os.PathLike, architecture: dict, state_dict: dict[str, torch.Tensor],
                    tokenizer, overwrite: bool = False, training: dict | None = None) -> None:
    """NVEmbed.save(layout="hf"): see the module's docstring. Written whole or not at all, as the other layouts."""
    final = Path(folder)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass overwrite=True to replace it")
    state = {k: v.contiguous() for k, v in fold_lora(state_dict, architecture["lora"]).items()}
    decoder_state = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    pooling_state = {k.removeprefix("pooling."): v for k, v in state.items() if k.startswith("pooling.")}
    dtype = decoder_state["embed_tokens.weight"].dtype
    # The folded decoder is a plain one: no adapters, no base to fetch. `lora_folded` says what was folded in.
    config = dict(format="nv-embed", layout="hf",
                  **{k: v for k, v in architecture.items() if k not in ("params", "base", "lora")},
                  lora=None, lora_folded=architecture["lora"], base=None, base_relative=False,
                  base_fingerprint=None, dtype=str(dtype).removeprefix("torch."), tokenizer=".",
                  fingerprint=weights_fingerprint(state))
    card = model_card(config, architecture["base"], training or {}) + (
        "\nThe decoder alone (hidden states, no pooling) loads in transformers >= 5.2, bidirectional as trained: "
        "`transformers.AutoModel.from_pretrained(\"path/to/this/folder\")`.\n")
    from plumbing.st_layout import sentence_transformers_guard  # imports this file
    _write_folder(final, hf_config(architecture["decoder"], architecture["causal"], tokenizer, dtype),
                  {HF_DECODER_FILE: decoder_state, HF_LAYOUT_POOLING: pooling_state}, tokenizer, ".", card,
                  {HF_LAYOUT_CONFIG: config, **sentence_transformers_guard()})  # SentenceTransformer refuses it


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def peft_files(architecture: dict, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """({PEFT_WEIGHTS: tensors}, {PEFT_CONFIG: config}): the model's LoRA adapters in PEFT's format, for a LoRA on
    transformers' base model (AutoModel). Our `decoder.M.lora_A` (r, in) is PEFT's `base_model.model.M.lora_A.weight`
    (its lora_A is an nn.Linear(in, r)), lora_B likewise; PEFT's scaling lora_alpha / r is ours."""
    lora = architecture["lora"]
    if lora is None:
        raise UsageError("layout='peft' saves LoRA adapters, and this model has none (train with --lora-rank)")
    tensors = {f"base_model.model.{k.removeprefix('decoder.')}.weight": v.detach().cpu().contiguous()
               for k, v in state_dict.items() if k.startswith("decoder.") and k.endswith((".lora_A", ".lora_B"))}
    config = dict(peft_type="LORA", task_type=None, base_model_name_or_path=architecture["base"],
                  r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                  target_modules=sorted(lora["targets"]), bias="none", fan_in_fan_out=False,
                  use_rslora=False, use_dora=False, init_lora_weights=True, inference_mode=True,
                  modules_to_save=None, layers_to_transform=None, layers_pattern=None,
                  rank_pattern={}, alpha_pattern={})
    return {PEFT_WEIGHTS: tensors}, {PEFT_CONFIG: config}


def write_peft_folder(folder: str | os.PathLike, architecture: dict, state_dict: dict[str, torch.Tensor],
                      tokenizer, overwrite: bool = False, training: dict | None = None) -> None:
    """NVEmbed.save(layout="peft"): this project's folder with PEFT's adapter files beside its own."""
    extra = peft_files(architecture, state_dict)  # refuses a model without adapters before anything is written
    write_model_folder(folder, architecture, state_dict, tokenizer, overwrite, training, extra_files=extra)
