"""Weights and training state in and out: read when you need them.

- HF checkpoints (`Mistral.from_pretrained`): a folder of config.json and (sharded)
  safetensors or `pytorch_model*.bin` (read with weights_only=True), or a `.gguf` file
  dequantised by transformers. Tensors are read one at a time and assigned, never copied.
- NV-Embed folders (`NVEmbed.save` / `NVEmbed.load`): config.json, the decoder
  (or only its LoRA adapters plus a fingerprint of their base), the pooling, the tokenizer;
  written into a temporary folder and renamed, so a crash never leaves a half-saved model.
- NVIDIA's released NV-Embed-v1/v2 folders (`plumbing.loading.from_released`): only their weights
  and configs are read; their Python code is never run.
- Training state (train.py): torch.distributed.checkpoint folders holding tensors only,
  the rest as JSON beside them; the run folder and its log.

Every unreadable or mismatched file raises `errors.CheckpointError` naming it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch import Tensor
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from plumbing import tracking
from plumbing.distributed import barrier, is_distributed, print0, rank, world_size
from plumbing.errors import CheckpointError, DataError, DiskFullError, MissingFileError, UsageError
from plumbing.interrupts import deferred_signals
from plumbing.runlock import take_run_lock

log = logging.getLogger("nvembed.checkpoints")  # notices: errors.py

# ----------------------------------------------------------------------------
# Tokenizers: the byte tokenizer of the tiny runs, HF folders and .gguf files

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, then pad, bos, eos. Needs no vocabulary file or download."""

    pad_token_id, bos_token_id, eos_token_id, vocab_size = 256, 257, 258, 259
    specials = {256: "<pad>", 257: "<bos>", 258: "<eos>"}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        # As an HF Llama tokenizer does: special tokens means a leading BOS. `tokenize` never asks for them.
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out, pending = [], bytearray()
        for i in (int(i) for i in ids):
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(self.specials[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "ByteTokenizer", "vocab_size": self.vocab_size, "pad_token_id": 256,
                  "bos_token_id": 257, "eos_token_id": 258}
        (directory / BYTE_TOKENIZER_FILE).write_text(json.dumps(config, indent=1) + "\n")


def load_tokenizer(path: str | Path):
    """"bytes" -> ByteTokenizer; a folder saved by ByteTokenizer -> ByteTokenizer; any other folder -> HF
    AutoTokenizer; a .gguf file -> AutoTokenizer.from_pretrained(its folder, gguf_file=its name)."""
    if str(path) == "bytes":
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir() and (path / BYTE_TOKENIZER_FILE).is_file():
        config = json.loads((path / BYTE_TOKENIZER_FILE).read_text())
        if config.get("tokenizer_class") != "ByteTokenizer" or config.get("vocab_size") != 259:
            raise DataError(f"{path / BYTE_TOKENIZER_FILE}: not a ByteTokenizer file: {config}")
        return ByteTokenizer()
    if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
        raise MissingFileError(f"tokenizer not found: {path} (want 'bytes', a folder or a .gguf file)")
    from transformers import AutoTokenizer  # heavy, slow to import: needed only for HF tokenizers
    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------
# HF checkpoints

SUPPORTED_MODEL_TYPES = {"mistral", "llama"}


def hf_decoder_fields(hf: dict, source: str = "config") -> dict:
    """An HF `config.json` dict of a Mistral or Llama-family model, with its rope_theta and key/value heads where
    recent transformers versions or older files leave them out. Anything that would change the computation and
    that model.py does not implement is refused by name rather than silently ignored."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = hf.get("architectures")
        raise CheckpointError(
            f"{source}: unsupported architecture model_type={model_type!r} "
            f"(architectures={archs}); supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    rope_scaling = _rope_scaling(hf, source)
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: attention_bias / mlp_bias are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    fields = dict(hf)
    # HF's rope_theta moved into rope_parameters in recent versions.
    rope_parameters = hf.get("rope_parameters") or {}
    if "rope_theta" not in fields and "rope_theta" in rope_parameters:
        fields["rope_theta"] = rope_parameters["rope_theta"]
    fields["rope_scaling"] = rope_scaling
    fields.setdefault("num_key_value_heads", hf.get("num_attention_heads"))
    if model_type == "llama":
        fields["sliding_window"] = None  # Llama has full causal attention
    return fields


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling(hf: dict, source: str) -> dict | None:
    """model.py's `rope_scaling` (None or Llama 3's) from an HF config. transformers < 5 writes the
    scaling as `rope_scaling`, 5.x as `rope_parameters` (beside rope_theta): both are read, and any
    type but default and llama3, under either key, is refused by name (it would run plain RoPE)."""
    scaling = None
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "llama3":
            missing = [name for name in LLAMA3_ROPE_KEYS if name not in params]
            if missing:
                raise CheckpointError(f"{source}: {key} of type 'llama3' lacks {missing}")
            scaling = {"rope_type": "llama3", **{name: params[name] for name in LLAMA3_ROPE_KEYS}}
        elif rope_type != "default":
            raise CheckpointError(f"{source}: {key} type {rope_type!r} is not supported "
                                  "(supported: default, llama3)")
    return scaling

def read_json(file: Path) -> dict:
    """A checkpoint's JSON file (config, index) as a dict; a malformed one is named with its line."""
    try:
        content = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}:{error.lineno}: malformed JSON ({error.msg})") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(content).__name__}")
    return content


def _checkpoint_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise MissingFileError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    return files


# Checkpoint tensors that belong to the causal LM but not to the encoder.
UNUSED_CHECKPOINT_KEYS = ("lm_head.weight",)


def _read_checkpoint_tensors(folder: Path, dtype: torch.dtype):
    """Yield (name without "model.", tensor cast to dtype), one tensor at a time."""
    for name, tensor in read_checkpoint_tensors_raw(folder, dtype):
        if name in UNUSED_CHECKPOINT_KEYS or name.endswith("rotary_emb.inv_freq"):
            continue
        yield name.removeprefix("model."), tensor


def read_checkpoint_tensors_raw(folder: Path, dtype: torch.dtype):
    """Yield every (name, tensor cast to dtype) of a checkpoint directory, one at a time."""
    for file in _checkpoint_files(folder):
        if file.suffix == ".safetensors":
            try:  # the header is checked against the file's size here: a truncated file fails at once
                opened = safe_open(str(file), framework="pt")
            except SafetensorError as error:  # its message does not name the file
                raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from error
            with opened as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        else:
            # mmap + weights_only: no unpickling of arbitrary objects, no full read.
            try:
                shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # a truncated or foreign file
                raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({error})") from error
            for name in list(shard):
                yield name, shard.pop(name).to(dtype)


def read_hf_checkpoint(path: Path, dtype: torch.dtype):
    """(config.json as a dict, the file it came from, (name, tensor) pairs) of an HF checkpoint folder or a .gguf
    file. Names lose HF's leading "model."; the LM head is left out (an embedder has none)."""
    if path.suffix == ".gguf":
        return _read_gguf(path, dtype)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{path}: no config.json (expected an HF checkpoint directory or a .gguf file)")
    return read_json(config_file), str(config_file), _read_checkpoint_tensors(path, dtype)


def _read_gguf(file: Path, dtype: torch.dtype):
    """Dequantise a .gguf through transformers; returns what read_hf_checkpoint does."""
    if not file.is_file():
        raise MissingFileError(f"{file}: no such .gguf file")
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":  # what transformers would refuse, with a traceback
            raise CheckpointError(f"{file}: not a GGUF file (it does not start with the bytes 'GGUF')")
    from transformers import AutoModelForCausalLM  # slow to import: only for .gguf files

    # transformers dequantises to float32; we cast tensor by tensor.
    hf = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    state = ((k.removeprefix("model."), v.to(dtype)) for k, v in hf.state_dict().items()
             if k not in UNUSED_CHECKPOINT_KEYS)
    return hf.config.to_dict(), str(file), state


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file, naming the file when it is missing or unreadable (truncated, say)."""
    if not file.is_file():
        raise MissingFileError(f"{file}: no such file")
    try:
        return load_file(file)
    except SafetensorError as error:
        raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from error


def load_checked(model: nn.Module, tensors, source: str):
    """Assign named tensors to `model` (which may live on the meta device).

    Refuses, naming them, tensors the model does not have, tensors of the wrong shape,
    and parameters the checkpoint lacks. Tensors are assigned, not copied, so there
    is never a second copy of the weights.
    """
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state, unexpected, misshapen = {}, [], []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            misshapen.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}")
        else:
            state[name] = tensor
    missing = sorted(set(expected) - set(state) - {m.split(":")[0] for m in misshapen})
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {sorted(unexpected)}")
    if misshapen:
        problems.append(f"wrongly shaped tensors: {misshapen}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model config; " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)


def weights_fingerprint(tensors: dict[str, torch.Tensor], samples: int = 4096) -> str:
    """A short hash of a decoder's weights: up to `samples` values of each tensor taken at a
    fixed stride, rounded to bf16 (so the same checkpoint loaded in fp32 or bf16 hashes alike).

    Adapter-only saves record it for their base checkpoint: loading them on another
    checkpoint of the same shape (another fine-tune of the same model, say) is refused
    instead of silently computing something else.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        stride = max(1, flat.numel() // samples)
        values = flat[::stride][:samples].to("cpu", torch.bfloat16).view(torch.int16)
        digest.update(name.encode() + values.numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------
# NV-Embed folders: what NVEmbed.save writes and NVEmbed.load reads


def write_model_folder(folder: str | os.PathLike, architecture: dict, state_dict: dict[str, torch.Tensor],
                       tokenizer, overwrite: bool = False, training: dict | None = None,
                       extra_files: tuple[dict, dict] | None = None) -> None:
    """What NVEmbed.save writes: config.json (the architecture with the model's name, the weights' dtype and
    fingerprint: the model's identity in results), the decoder's weights (or, for LoRA on a checkpoint's
    decoder, only the adapters plus a fingerprint of the base's weights), the pooling's, and the tokenizer
    in tokenizer/.

    Written whole into a temporary folder, then renamed: a crash never leaves a folder
    that looks saved, and no file of an older model survives beside the new.
    """
    final = Path(folder)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass overwrite=True to replace it")
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    adapters_only = architecture["lora"] is not None and architecture["base"] is not None
    decoder_state = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    pooling_state = {k.removeprefix("pooling."): v for k, v in state.items() if k.startswith("pooling.")}
    base_fingerprint = None
    if adapters_only:
        base_fingerprint = weights_fingerprint({k: v for k, v in decoder_state.items() if "lora_" not in k})
        decoder_state = {k: v for k, v in decoder_state.items() if "lora_" in k}
    config = dict(format="nv-embed", **{k: v for k, v in architecture.items() if k not in ("params", "base")},
                  base=recorded_base(architecture["base"], final) if adapters_only else None,
                  base_relative=adapters_only and is_inside(architecture["base"], final.parent),
                  base_fingerprint=base_fingerprint,
                  dtype=str(state["decoder.embed_tokens.weight"].dtype).removeprefix("torch."), tokenizer="tokenizer",
                  fingerprint=weights_fingerprint(state))  # all the weights, the base's too: NVEmbed.fingerprint

    decoder_file = "adapters.safetensors" if adapters_only else "decoder.safetensors"
    extra_weights, json_files = extra_files or ({}, {})  # e.g. PEFT's files (export.peft_files)
    _write_folder(final, config, {decoder_file: decoder_state, "pooling.safetensors": pooling_state, **extra_weights},
                  tokenizer, "tokenizer", model_card(config, architecture["base"], training or {}), json_files)


def is_inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


def recorded_base(base: str, model_folder: Path) -> str:
    """How an adapters-only save names its base: relative to the model folder when the base lies in the run
    folder around it (the run folder then moves and is shared whole), else as it was given."""
    if is_inside(base, model_folder.parent):
        return os.path.relpath(Path(base).resolve(), model_folder.resolve())
    return base


def resolve_base(config: dict, config_file: Path) -> str:
    """The base checkpoint an adapters-only save names, found from where the save now lies."""
    recorded = config["base"]
    path = config_file.parent / recorded if config.get("base_relative") else Path(recorded)
    if not path.exists():
        where = f" (relative to {config_file.parent})" if config.get("base_relative") else ""
        raise MissingFileError(f"{config_file}: its base checkpoint {recorded!r}{where} is not found: these are "
                               "LoRA adapters only; put the base there or edit `base` in the file")
    return os.path.normpath(path)


def model_card(config: dict, base: str | None, training: dict) -> str:
    """README.md of a saved model: what it is, where it came from, how well it did, how to load it."""
    metrics = training.get("metrics") or {}
    data = training.get("data")
    rows = [("name", config.get("name")), ("base", base or "random init (a preset)"),
            ("pooling", f"{config['pooling']} {config['pooling_kwargs'] or ''}".strip()),
            ("attention", "causal" if config["causal"] else "bidirectional (NV-Embed, section 3.1)"),
            ("LoRA", config["lora"] or "none (all weights)"),
            ("training data", ", ".join(map(str, data)) if isinstance(data, list) else data),
            ("steps", training.get("steps")),
            ("final metrics", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                        if isinstance(v, float)) or None),
            ("fingerprint", config["fingerprint"]), ("dtype", config["dtype"])]
    table = "\n".join(f"| {key} | {value if value is not None else 'not recorded'} |" for key, value in rows)
    return (f"# {config.get('name') or 'NV-Embed model'}\n\nAn NV-Embed-style embedder (arXiv 2405.17428) saved "
            f"by this project.\n\n| | |\n|---|---|\n{table}\n\n## Load it\n\n```python\nfrom model import "
            "NVEmbed\n\nmodel = NVEmbed.load(\"path/to/this/folder\")\nvectors = model.encode([\"a text\"], "
            "instruction=\"Given a question, retrieve passages that answer it\")\n```\n\nor on the command "
            "line: `python evaluate.py --model path/to/this/folder ...`.\n")


def _write_folder(final: Path, config: dict, weights: dict[str, dict], tokenizer, tokenizer_folder: str,
                  card: str | None = None, json_files: dict[str, dict] | None = None) -> None:
    """config.json, the `weights` ({file: tensors}, with transformers' {"format": "pt"} metadata), the
    tokenizer, README.md and further `json_files` ({file: dict}); file names may hold a subfolder."""
    temporary = final.with_name(final.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    with written_whole(temporary, final):
        temporary.mkdir(parents=True)
        for file, tensors in weights.items():
            (temporary / file).parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, temporary / file, metadata={"format": "pt"})
        tokenizer.save_pretrained(str(temporary / tokenizer_folder))
        for file, content in {"config.json": config, **(json_files or {})}.items():
            (temporary / file).parent.mkdir(parents=True, exist_ok=True)
            (temporary / file).write_text(json.dumps(content, indent=2) + "\n")
        if card is not None:
            (temporary / "README.md").write_text(card)
    replace_folder(temporary, final)


# ----------------------------------------------------------------------------
# Writing whole or not at all: a folder is written under NAME.tmp, flushed to disk, and renamed over
# NAME only then. Whatever fails on the way (a full disk, Ctrl-C) leaves NAME as it was.


@contextlib.contextmanager
def written_whole(temporary: Path, final: Path):
    """Around the writing of `temporary`: on any failure it is removed (on rank 0), and a full disk is
    said as such (DiskFullError) instead of the writer's own words (torch's zip writer says
    "unexpected pos 704 vs 598")."""
    try:
        yield
    except BaseException as error:
        if rank() == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        if _disk_full(error):
            kept = f"; the previous {final} is kept" if final.exists() else ""
            free = shutil.disk_usage(final.parent if final.parent.exists() else ".").free
            raise DiskFullError(f"{final}: no space left on device while writing it ({free / 2**20:,.0f} MiB "
                                f"free; the partial {temporary.name} was removed{kept})") from error
        raise


def _disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain, or the message of a writer that swallowed it (torch's zip
    writer, dcp's wrapped exceptions from the ranks)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if any(words in str(error) for words in ("No space left on device", "unexpected pos",
                                                  "file write failed")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _fsync(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_folder(temporary: Path, final: Path):
    """Rename the complete `temporary` over `final`. Its files are flushed to disk first (a rename
    that reaches the disk before the data would leave a complete-looking folder of empty files after
    a power cut); an older `final` is renamed aside, then deleted only once the new one is in place."""
    for path in temporary.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(temporary)
    old = final.with_name(final.name + ".old")
    with deferred_signals():  # Ctrl-C or SIGTERM here: acted on once the new folder is in place
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(temporary, final)
        _fsync(final.parent)  # the rename itself
        shutil.rmtree(old, ignore_errors=True)


def fold_lora(state_dict: dict[str, torch.Tensor], lora: dict | None) -> dict[str, torch.Tensor]:
    """A state dict on the CPU with each LoRA adapter folded into its weight: W + (alpha / r) B A, computed
    in fp32 and rounded once to W's dtype; no `lora_` tensor is left. The released and HF layouts save this."""
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    for key in [k for k in state if k.endswith(".lora_A")]:
        base = key.removesuffix(".lora_A")
        update = (lora["alpha"] / lora["rank"]) * (state.pop(base + ".lora_B").float() @ state.pop(key).float())
        state[base + ".weight"] = (state[base + ".weight"].float() + update).to(state[base + ".weight"].dtype)
    return state


def write_released_folder(folder: str | os.PathLike, architecture: dict, state_dict: dict[str, torch.Tensor],
                          tokenizer, overwrite: bool = False) -> None:
    """NVEmbed.save(layout="released"): NVIDIA's NV-Embed layout, which `read_released` (and the released code)
    reads: config.json with `text_config` (bidir_mistral) and `latent_attention_config`, one model.safetensors of
    `embedding_model.*` and `latent_attention_model.*` tensors (LoRA adapters folded into their weights in fp32),
    and the tokenizer beside them. Latent pooling only. The released code reads inputs by its own rule (BOS of a
    bare text pooled, rows cut at max_length): a model of another TextRule is saved with a warning."""
    final = Path(folder)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass overwrite=True to replace it")
    if architecture["pooling"] != "latent":
        raise UsageError(f"layout='released' holds latent-attention pooling only, not {architecture['pooling']!r}")
    rule = architecture["text_rule"]
    if (rule.get("pool_bos"), rule.get("truncation"), rule.get("instruction_positions")) != \
            ("without_instruction", "sequence", "tokenize"):
        log.warning("%s: the released layout's readers use the released input rule, not this model's %s: its "
                    "documents' BOS will be pooled and long texts cut without EOS", final, rule)
    state = fold_lora(state_dict, architecture["lora"])
    released_of = {ours: released for released, ours in RELEASED_LATENT_NAMES.items()}
    tensors = {"embedding_model." + k.removeprefix("decoder."): v.contiguous() for k, v in state.items()
               if k.startswith("decoder.")}
    tensors |= {RELEASED_LATENT_PREFIX + released_of[k.removeprefix("pooling.")]: v.contiguous()
                for k, v in state.items() if k.startswith("pooling.")}
    decoder, pooling = architecture["decoder"], architecture["pooling_kwargs"]
    hidden = decoder["hidden_size"]
    config = dict(model_type="nvembed", padding_side="right", add_pad_token=True, add_eos=True, mask_type="b",
                  is_mask_instruction=bool(rule.get("mask_instruction", True)),
                  text_config={**decoder, "model_type": "bidir_mistral"},
                  latent_attention_config=dict(model_type="latent_attention",
                                               num_latents_value=pooling.get("num_latents", 512),
                                               num_cross_heads=pooling.get("num_heads", 8),
                                               cross_dim_head=pooling.get("head_dim") or hidden, hidden_dim=hidden,
                                               latent_dim=hidden, output_normalize=architecture["normalize"]))
    _write_folder(final, config, {"model.safetensors": tensors}, tokenizer, ".")


def read_model_folder(folder: str | os.PathLike) -> tuple[dict, Path, dict[str, torch.Tensor]]:
    """(config, its file, {"decoder.*" / "pooling.*": tensor}) of a folder NVEmbed.save wrote, the tensors as
    saved (an adapters-only save holds only the adapters of its decoder). Any other folder is refused by name."""
    folder = Path(folder)
    config_file = saved_config_file(folder) or folder / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{folder}: no config.json (not a saved NV-Embed model)")
    config = read_json(config_file)
    if config.get("format") != "nv-embed":
        raise CheckpointError(f"{config_file}: not an NV-Embed model saved by this project "
                              "(for a base checkpoint use plumbing.loading.from_base, for released weights from_released)")
    # Saves from before the text rule was recorded hold only its template; the rest was the project's rule (their
    # queries were then tokenized prefix and text apart, which the rule's joined encoding no longer does).
    config.setdefault("text_rule", {"template": config.get("query_template")})
    config.setdefault("normalize", True)
    config.setdefault("name", None)  # saves from before models had names
    config["decoder"].setdefault("rope_scaling", None)  # saves from before Llama 3's RoPE
    if config.get("layout") == "hf":  # NVEmbed.save(layout="hf"): HF's decoder file, the pooling in nvembed/
        decoder_file, pooling_file = HF_DECODER_FILE, HF_LAYOUT_POOLING
    else:
        decoder_file = "adapters.safetensors" if config["base"] is not None else "decoder.safetensors"
        pooling_file = "pooling.safetensors"
    tensors = {f"decoder.{k}": v for k, v in load_safetensors(folder / decoder_file).items()}
    tensors |= {f"pooling.{k}": v for k, v in load_safetensors(folder / pooling_file).items()}
    return config, config_file, tensors


def check_base(config: dict, config_file: Path, decoder_config: dict, base_state: dict[str, torch.Tensor]) -> None:
    """Refuse an adapters-only save whose base checkpoint is not the one it was trained on: another config, or
    (the fingerprint) other weights of the same shape, such as another fine-tune of the same model."""
    if decoder_config != config["decoder"]:
        raise CheckpointError(f"{config_file}: base checkpoint {config['base']} has another config "
                              "than the one these adapters were trained on")
    expected = config.get("base_fingerprint")  # absent in saves from before it existed
    found = weights_fingerprint(base_state)
    if expected and found != expected:
        raise CheckpointError(f"{config_file}: base checkpoint {config['base']} holds other weights "
                              f"than the ones these adapters were trained on (fingerprint {found}, "
                              f"expected {expected})")


# NVEmbed.save(layout="hf"): a transformers folder (config.json, model.safetensors, the tokenizer) with this
# project's config and the pooling in a subfolder, where transformers and HF checkpoint readers do not look.
HF_DECODER_FILE = "model.safetensors"
HF_LAYOUT_CONFIG = "nvembed/config.json"
HF_LAYOUT_POOLING = "nvembed/pooling.safetensors"


def saved_config_file(path: str | os.PathLike) -> Path | None:
    """The NV-Embed config.json of a folder `NVEmbed.save` wrote (in either layout), or None."""
    for config_file in (Path(path) / "config.json", Path(path) / HF_LAYOUT_CONFIG):
        try:
            if json.loads(config_file.read_text()).get("format") == "nv-embed":
                return config_file
        except (OSError, ValueError, AttributeError):
            pass
    return None


def is_saved(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `NVEmbed.save`."""
    return saved_config_file(path) is not None


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
    """(config, text_config, latent_attention_config, {NVEmbed name: tensor}) of a released NV-Embed folder.

    Their decoder type "bidir_mistral" (Mistral without the causal mask) reads as "mistral".
    Left padding is refused: there the released code masks no instruction and its decoder
    counts positions from the first column, which this project's decoder does not.
    """
    folder = Path(folder)
    config, text_config, latent_config = read_released_config(folder)
    released = dict(read_checkpoint_tensors_raw(folder, dtype))
    unknown = sorted(k for k in released if not k.startswith(("embedding_model.", RELEASED_LATENT_PREFIX)))
    if unknown:
        raise CheckpointError(f"{folder}: unexpected tensors {unknown[:10]}")
    tensors = {"decoder." + k.removeprefix("embedding_model."): v for k, v in released.items()
               if k.startswith("embedding_model.")}
    tensors |= {"pooling." + k: v for k, v in latent_attention_state_dict_from_released(released).items()}
    return config, text_config, latent_config, tensors


def is_released(path: str | os.PathLike) -> bool:
    """Whether `path` is a released NV-Embed folder (NVIDIA's layout: text_config and latent_attention_config)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "text_config" in config and "latent_attention_config" in config


def read_released_config(folder: Path) -> tuple[dict, dict, dict]:
    """(config, text_config, latent_attention_config) of a released NV-Embed folder, without its weights."""
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
        raise CheckpointError(f"{config_file}: padding_side {config['padding_side']!r} is not supported (the "
                              "released code then shifts rotary positions by the padding and masks no instruction)")
    return config, text_config, config.get("latent_attention_config") or {}


# ----------------------------------------------------------------------------
# Training state (torch.distributed.checkpoint: each rank writes its own shards) and the run folder


def model_folder(path: str | os.PathLike) -> Path:
    """A saved model: a run folder's `model/`, or the model folder itself."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if is_saved(path):
        return path
    if is_released(path):
        return path
    raise MissingFileError(f"{path}: neither a run folder with model/, a saved NV-Embed model nor a released one "
                           "(run stage 1 first, or pass --init-from a stage-1 output)")


def _rng_state() -> dict:
    """The RNG states training draws from: torch's (dropout). The data order needs none:
    plumbing.sampler.BatchSampler is a pure function of (seed, step), and nothing here uses Python's
    or numpy's global generators. Tensors only, as everything dcp saves (`_training_state`)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dict_options(model):

    # Under LoRA the frozen base is not saved: resuming rebuilds it from the same
    # --model / --init-from and seed (the config check at resume makes sure of that).
    # Loading is then not strict about the frozen keys; dcp.load still fails on any
    # trainable key the checkpoint lacks.
    lora = any("lora_" in name for name, _ in model.named_parameters())
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _training_state(model, optimizer, with_rng: bool = True) -> tuple[dict, list]:
    """(what dcp saves and loads: tensors only, the optimizer's param groups).

    dcp writes any entry that is not a tensor with torch.save, and loads it back with
    torch.load(weights_only=False), which unpickles arbitrary objects. So the non-tensor
    state (the step, the schedule, the param groups: lr, betas, eps...) stays out of it and
    goes to trainer_state.json (`save_checkpoint`)."""

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options(model))
    state = {"model": model_state, "optimizer": optimizer_state["state"]}  # per parameter: exp_avg, step...
    if with_rng:
        # One key per rank: dcp would keep only one copy of a key that every rank writes.
        state[f"rng_rank{rank()}"] = _rng_state()

    def check_tensors(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                check_tensors(item, f"{where}.{key}")
        elif not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint: {where} is a {type(value).__name__}, not a tensor (dcp would pickle it)")

    check_tensors(state, "state")
    return state, optimizer_state["param_groups"]


@contextlib.contextmanager
def _single_process_dcp():
    """dcp works without a process group (no_dist=True), but warns each time that it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_folder(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (`step_N`; an unfinished save is `step_N.tmp`)."""
    found = [p for p in checkpoint_folder(out).glob("step_*") if p.name[len("step_"):].isdigit()]
    return max(found, key=lambda p: int(p.name[len("step_"):])) if found else None


MANIFEST = "manifest.json"  # a checkpoint's files and their sizes at save time


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint `folder` cannot be resumed from, or None when its files are all there at the
    sizes they were saved with and its trainer_state.json reads."""
    manifest = folder / MANIFEST
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        return f"{manifest} is unreadable ({error})"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} when saved"
    try:
        json.loads((folder / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError) as error:
        return f"{folder / 'trainer_state.json'} is unreadable ({error})"
    return None


def save_checkpoint(out, model, optimizer, scheduler, step: int, config: dict, keep: int = 2) -> Path:
    """Write the training state after `step` optimizer steps to out/checkpoints/step_N.

    Every rank writes its shards into step_N.tmp; only when all have finished (dcp.save
    returns after the coordinator wrote the metadata) does rank 0 rename the folder to
    step_N. A rename is atomic, so a crash mid-save leaves a .tmp folder that nothing
    mistakes for a checkpoint (it is deleted by the next save). The dcp files hold tensors
    only (model, optimizer moments, RNG); step_N/trainer_state.json holds the rest: the
    step (also the sampler's position: plumbing.sampler.BatchSampler is a pure function of (seed,
    step)), the schedule's state_dict, the optimizer's param groups, the configuration.
    """

    final = checkpoint_folder(out) / f"step_{step:08d}"
    temporary = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    tensors, param_groups = _training_state(model, optimizer)
    with written_whole(temporary, final):
        with _single_process_dcp():
            dcp.save(tensors, checkpoint_id=temporary, no_dist=not is_distributed())
        if rank() == 0:
            # Param groups name their parameters by FQN and are the same on every rank; so is the
            # schedule. JSON writes floats exactly (shortest repr that reads back the same).
            trainer_state = {"step": step, "world_size": world_size(), "config": config,
                             "scheduler": scheduler.state_dict(), "optimizer_param_groups": param_groups}
            (temporary / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
            # Every file's size, written last: --resume checks them before it loads (a cut or
            # lost shard is found by name, and the checkpoint before it is used instead).
            sizes = {str(path.relative_to(temporary)): path.stat().st_size
                     for path in sorted(temporary.rglob("*")) if path.is_file()}
            (temporary / MANIFEST).write_text(json.dumps(sizes, indent=1) + "\n")
    if rank() == 0:
        with deferred_signals():  # the new checkpoint in place and the old ones gone, or neither
            replace_folder(temporary, final)
            older = sorted((p for p in checkpoint_folder(out).glob("step_*") if p.name[len("step_"):].isdigit()),
                           key=lambda p: int(p.name[len("step_"):]))
            for stale in older[:-keep] if keep > 0 else []:
                shutil.rmtree(stale)
    barrier()
    return final


def load_checkpoint(folder: Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer, schedule and RNG from `folder` in place; return its step.

    RNG states are per rank; on another world size they are not restored (the run then
    continues correctly, but dropout masks differ from an uninterrupted run's).

    What is unpickled: dcp reads its own step_N/.metadata file with pickle.load (its file
    format has no other), so a checkpoint folder must be trusted as far as that file goes;
    the tensors it reads with torch.load(weights_only=True), which unpickles tensors and
    nothing else; everything else comes from trainer_state.json.
    """
    saved = json.loads((folder / "trainer_state.json").read_text())
    missing = [key for key in ("scheduler", "optimizer_param_groups") if key not in saved]
    if missing:
        raise CheckpointError(f"{folder / 'trainer_state.json'} has no {' or '.join(missing)}: the checkpoint was "
                              "written by an older train.py (which pickled them into the dcp files); it cannot be "
                              "resumed")
    same_world = saved["world_size"] == world_size()
    if not same_world:
        print0(f"resume: {folder} was written by {saved['world_size']} ranks, this run has {world_size()}; "
               "RNG states are not restored (dropout masks will differ from an uninterrupted run)")
    state, _ = _training_state(model, optimizer, with_rng=same_world)
    with _single_process_dcp():
        dcp.load(state, checkpoint_id=folder, no_dist=not is_distributed())
    # JSON has lists where the optimizer had tuples (AdamW's betas): give back the live groups' types.
    param_groups = [{key: tuple(value) if isinstance(live.get(key), tuple) else value for key, value in group.items()}
                    for group, live in zip(saved["optimizer_param_groups"], optimizer.param_groups)]
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optimizer"], "param_groups": param_groups},
                   options=_state_dict_options(model))
    scheduler.load_state_dict(saved["scheduler"])
    if same_world:
        _set_rng_state(state[f"rng_rank{rank()}"])
    return int(saved["step"])


def prepare_run_folder(config: dict):
    """Create --out and take its lock (runlock.py; released as the command ends); refuse to mix a fresh
    run into an old one unless --overwrite."""
    out = Path(config["out"])
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file, not a folder (the run folder is made there)")
    if rank() == 0:
        try:  # a read-only file system or a folder of someone else's: said before anything runs
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise UsageError(f"--out {out}: cannot write there ({error.strerror})") from None
        take_run_lock(out)  # one run per --out: refused while another live process holds it (runlock.py)
    if not config["resume"]:
        # Every rank looks, not rank 0 alone, so that all of them stop on this mistake.
        old = [out / name for name in ("checkpoints", "model", "log.jsonl", "config.json") if (out / name).exists()]
        if old and not config["overwrite"]:
            raise UsageError(f"--out {out} already holds a run ({', '.join(p.name for p in old)}); pass --resume "
                             "to continue it, --overwrite to replace it, or another --out")
        if rank() == 0 and old:
            set_aside_previous_run(out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()


PREVIOUS_RUN = "previous"  # --overwrite: the replaced run's log, config and checkpoints, until done


def set_aside_previous_run(out: Path):
    """--overwrite deletes nothing before its replacement exists: the old run's checkpoints, log and
    config move to out/previous/ (the new run must not count them as its own), and its model/ stays
    where it is until the new model/ is renamed over it (`_write_folder`). `discard_previous_run`
    deletes out/previous/ once the new model is saved; a run that fails leaves both behind."""
    previous = out / PREVIOUS_RUN
    shutil.rmtree(previous, ignore_errors=True)  # an older generation's, still beside a model/
    previous.mkdir()
    for name in ("checkpoints", "log.jsonl", "config.json"):
        if (out / name).exists():
            os.replace(out / name, previous / name)


def discard_previous_run(out: Path):
    if rank() == 0:
        shutil.rmtree(Path(out) / PREVIOUS_RUN, ignore_errors=True)


# Config keys that may change between a run and its resumption.
RESUMABLE_CHANGES = {"resume", "overwrite", "log_every", "save_every", "keep_checkpoints", "stop_after", "eval",
                     "eval_every", "eval_batch_size", "device", "progress", "compile", "report_to"}  # compile: same step, faster
# How often a run logs and saves, and --dtype auto's timings (the dtype they chose must match).
RESUMABLE_CHANGES |= {"log_seconds", "save_every_minutes", "dtype_choice"}


# Config keys added since runs were first saved, and the value an older run had without them.
ADDED_KEYS = {"data_split": "train", "data_weights": None}


def check_resume_config(folder: Path, config: dict):
    saved = ADDED_KEYS | json.loads((folder / "trainer_state.json").read_text())["config"]
    differ = sorted(k for k in set(saved) | set(config)
                    if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
    if differ:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {config.get(k)!r}" for k in differ)
        raise UsageError(f"--resume: {folder} was written with another configuration ({details})")


def logged_eval(out: Path, when: str) -> dict | None:
    """The record of an evaluation already written to out/log.jsonl."""
    log_file = out / "log.jsonl"
    records = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    return next((r for r in records if r.get("event") == "eval" and r["when"] == when), None)


def logged_ndcg(out: Path, when: str) -> float | None:
    """nDCG@10 of an evaluation already recorded in out/log.jsonl."""
    record = logged_eval(out, when)
    return None if record is None else record["NDCG@10"]


def open_run(config: dict) -> Path | None:
    """Make the run folder --out ready (`prepare_run_folder`); with --resume, the checkpoint to resume from, after
    checking that it was written with the same configuration and cutting the log back to its step (the steps
    logged after it were lost with the crash and will run again)."""
    out = Path(config["out"])
    prepare_run_folder(config)
    if not config["resume"]:
        return None
    found = sorted((p for p in checkpoint_folder(out).glob("step_*") if p.name[len("step_"):].isdigit()),
                   key=lambda p: int(p.name[len("step_"):]), reverse=True)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {checkpoint_folder(out)}")
    resume_from, skipped = None, []
    for folder in found:  # the newest complete one; a corrupt newer one is named and passed over
        problem = checkpoint_problem(folder)
        if problem is None:
            resume_from = folder
            break
        skipped.append(problem)
        print0(f"notice: --resume skips {folder.name}: {problem}")
    if resume_from is None:
        raise CheckpointError(f"--resume: no complete checkpoint in {checkpoint_folder(out)} "
                              f"({'; '.join(skipped)})")
    check_resume_config(resume_from, config)
    if rank() == 0:
        resumed_step = json.loads((resume_from / "trainer_state.json").read_text())["step"]
        log_file = out / "log.jsonl"
        records = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
        kept = [r for r in records if r.get("step", 0) <= resumed_step]
        log_file.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return resume_from


def append_log(out: Path, record: dict) -> None:
    """One JSON record appended to out/log.jsonl, by rank 0."""
    if rank() == 0:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        tracking.record(out, record)  # --report-to tensorboard: the same record as scalars
