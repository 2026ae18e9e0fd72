"""NVIDIA's released NV-Embed-v1/v2 folders: read (`plumbing.loading.from_released`) and written
(`NVEmbed.save(layout="released")`). Only their weights and configs are read; their Python code is
never run. Tests: tests/test_released.py (against an independent re-implementation of their code),
tests/test_pooling.py (the latent-attention names).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from torch import Tensor

from plumbing.base_checkpoints import read_checkpoint_tensors_raw, read_json
from plumbing.errors import CheckpointError, MissingFileError, UsageError
from plumbing.model_folders import fold_lora, write_folder

log = logging.getLogger("nvembed.released")  # notices: errors.py


def write_released_folder(folder: str | os.PathLike, architecture: dict,
                          state_dict: dict[str, torch.Tensor], tokenizer,
                          overwrite: bool = False) -> None:
    """NVEmbed.save(layout="released"): NVIDIA's NV-Embed layout, which `read_released` (and the
    released code) reads: config.json with `text_config` (bidir_mistral) and
    `latent_attention_config`, one model.safetensors of `embedding_model.*` and
    `latent_attention_model.*` tensors (LoRA adapters folded into their weights in fp32), and the
    tokenizer beside them. Latent pooling only. The released code reads inputs by its own rule (BOS
    of a bare text pooled, rows cut at max_length): a model of another TextRule is saved with a
    warning."""
    final = Path(folder)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass overwrite=True to "
                              "replace it")
    if architecture["pooling"] != "latent":
        raise UsageError("layout='released' holds latent-attention pooling only, not "
                         f"{architecture['pooling']!r}")
    rule = architecture["text_rule"]
    if (rule.get("pool_bos"), rule.get("truncation"), rule.get("instruction_positions")) != \
            ("without_instruction", "sequence", "tokenize"):
        log.warning("%s: the released layout's readers use the released input rule, not this "
                    "model's %s: its documents' BOS will be pooled and long texts cut without "
                    "EOS", final, rule)
    state = fold_lora(state_dict, architecture["lora"])
    released_of = {ours: released for released, ours in RELEASED_LATENT_NAMES.items()}
    tensors = {"embedding_model." + k.removeprefix("decoder."): v.contiguous()
               for k, v in state.items() if k.startswith("decoder.")}
    tensors |= {RELEASED_LATENT_PREFIX + released_of[k.removeprefix("pooling.")]: v.contiguous()
                for k, v in state.items() if k.startswith("pooling.")}
    decoder, pooling = architecture["decoder"], architecture["pooling_kwargs"]
    hidden = decoder["hidden_size"]
    config = dict(model_type="nvembed", padding_side="right", add_pad_token=True, add_eos=True,
                  mask_type="b",
                  is_mask_instruction=bool(rule.get("mask_instruction", True)),
                  text_config={**decoder, "model_type": "bidir_mistral"},
                  latent_attention_config=dict(model_type="latent_attention",
                                               num_latents_value=pooling.get("num_latents", 512),
                                               num_cross_heads=pooling.get("num_heads", 8),
                                               cross_dim_head=pooling.get("head_dim") or hidden,
                                               hidden_dim=hidden, latent_dim=hidden,
                                               output_normalize=architecture["normalize"]))
    write_folder(final, config, {"model.safetensors": tensors}, tokenizer, ".")


# Released name (after the `latent_attention_model.` prefix) -> our name. The released
# module is a Perceiver-style pair of blocks: block 0 = PreNorm(cross-attention),
# block 1 = PreNorm(feed-forward); `fn` is the wrapped layer, `net.0`/`net.2` the two
# linears of the GEGLU feed-forward (`net.1` is the parameter-free GEGLU). Beware the
# released naming: its `norm` normalises the tokens (the queries) and `norm_context`
# the latents (the keys and values).
RELEASED_LATENT_PREFIX = "latent_attention_model."


RELEASED_LATENT_NAMES = {
    "latents": "latents",
    "cross_attend_blocks.0.norm.weight": "attn_norm.weight",
    "cross_attend_blocks.0.norm.bias": "attn_norm.bias",
    "cross_attend_blocks.0.norm_context.weight": "latent_norm.weight",
    "cross_attend_blocks.0.norm_context.bias": "latent_norm.bias",
    "cross_attend_blocks.0.fn.to_q.weight": "to_q.weight",
    "cross_attend_blocks.0.fn.to_kv.weight": "to_kv.weight",
    "cross_attend_blocks.0.fn.to_out.weight": "to_out.weight",
    "cross_attend_blocks.1.norm.weight": "ff_norm.weight",
    "cross_attend_blocks.1.norm.bias": "ff_norm.bias",
    "cross_attend_blocks.1.fn.net.0.weight": "ff_in.weight",
    "cross_attend_blocks.1.fn.net.0.bias": "ff_in.bias",
    "cross_attend_blocks.1.fn.net.2.weight": "ff_out.weight",
    "cross_attend_blocks.1.fn.net.2.bias": "ff_out.bias",
}


def latent_attention_state_dict_from_released(
    released: Mapping[str, Tensor],
    expected: nn.Module | Mapping[str, torch.Size | tuple[int, ...]] | None = None,
) -> dict[str, Tensor]:
    """Rename the released `latent_attention_model.*` tensors to LatentAttentionPooling's names.

    `released` may be the whole NV-Embed state dict: keys without the prefix (the
    `embedding_model.*` decoder) are ignored. Raises KeyError naming every missing or
    unknown key under the prefix. With `expected` (a LatentAttentionPooling, or a dict
    from our names to shapes), a tensor whose shape differs raises ValueError naming
    the released key, our key and both shapes. The tensors are returned as they are
    (no copy, no dtype change), ready for `load_state_dict(..., strict=True)`.
    """
    ours_of = RELEASED_LATENT_NAMES
    found = {key[len(RELEASED_LATENT_PREFIX):]: tensor for key, tensor in released.items()
             if key.startswith(RELEASED_LATENT_PREFIX)}
    missing = [RELEASED_LATENT_PREFIX + name for name in ours_of if name not in found]
    unknown = [RELEASED_LATENT_PREFIX + name for name in found if name not in ours_of]
    if missing or unknown:
        raise KeyError(
            "released latent-attention weights do not match the expected names: "
            f"missing {missing}, unexpected {unknown}"
        )
    mapped = {ours_of[name]: tensor for name, tensor in found.items()}

    if expected is not None:
        if isinstance(expected, nn.Module):
            expected = {name: tensor.shape for name, tensor in expected.state_dict().items()}
        misshapen = [
            f"{RELEASED_LATENT_PREFIX}{name} -> {ours_of[name]}: expected "
            f"{_shape(expected.get(ours_of[name]))}, got {tuple(tensor.shape)}"
            for name, tensor in found.items()
            if tuple(tensor.shape) != _shape(expected.get(ours_of[name]))
        ]
        if misshapen:
            raise ValueError("released latent-attention tensors have the wrong shape: "
                             + "; ".join(misshapen))
    return mapped


def _shape(shape) -> tuple[int, ...] | None:
    return None if shape is None else tuple(shape)


def read_released(folder: str | os.PathLike, dtype: torch.dtype) -> tuple[dict, dict, dict, dict]:
    """(config, text_config, latent_attention_config, {NVEmbed name: tensor}) of a released NV-Embed
    folder.

    Their decoder type "bidir_mistral" (Mistral without the causal mask) reads as "mistral".
    Left padding is refused: there the released code masks no instruction and its decoder
    counts positions from the first column, which this project's decoder does not.
    """
    folder = Path(folder)
    config, text_config, latent_config = read_released_config(folder)
    released = dict(read_checkpoint_tensors_raw(folder, dtype))
    unknown = sorted(k for k in released
                     if not k.startswith(("embedding_model.", RELEASED_LATENT_PREFIX)))
    if unknown:
        raise CheckpointError(f"{folder}: unexpected tensors {unknown[:10]}")
    tensors = {"decoder." + k.removeprefix("embedding_model."): v for k, v in released.items()
               if k.startswith("embedding_model.")}
    tensors |= {"pooling." + k: v
                for k, v in latent_attention_state_dict_from_released(released).items()}
    return config, text_config, latent_config, tensors


def is_released(path: str | os.PathLike) -> bool:
    """Whether `path` is a released NV-Embed folder (NVIDIA's layout: text_config and
    latent_attention_config)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and "text_config" in config
            and "latent_attention_config" in config)


def read_released_config(folder: Path) -> tuple[dict, dict, dict]:
    """(config, text_config, latent_attention_config) of a released NV-Embed folder, without its
    weights."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{folder}: no config.json (not a released NV-Embed checkpoint)")
    config = read_json(config_file)
    text_config = dict(config.get("text_config") or {})
    if not text_config:
        raise CheckpointError(f"{config_file}: no text_config (not a released NV-Embed checkpoint)")
    if text_config.get("model_type") == "bidir_mistral":
        text_config["model_type"] = "mistral"
    if config.get("padding_side", "right") != "right":
        raise CheckpointError(f"{config_file}: padding_side {config['padding_side']!r} is not "
                              "supported (the released code then shifts rotary positions by the "
                              "padding and masks no instruction)")
    return config, text_config, config.get("latent_attention_config") or {}
