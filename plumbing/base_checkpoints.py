"""The base checkpoints a model starts from, read tensor by tensor: HF folders, .gguf files, and
their tokenizers.

- HF checkpoints (`Mistral.from_pretrained`): a folder of config.json and (sharded)
  safetensors or `pytorch_model*.bin` (read with weights_only=True), or a `.gguf` file
  dequantised by transformers. Tensors are read one at a time and assigned, never copied
  (`load_checked`).
- Tokenizers: an HF folder's, a .gguf file's, or the byte tokenizer of the tiny runs.
- `weights_fingerprint`: the short hash that names a model's weights in results and ties LoRA
  adapters to their base.

Every unreadable or mismatched file raises `errors.CheckpointError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from plumbing.errors import CheckpointError, DataError, MissingFileError

# ----------------------------------------------------------------------------
# Tokenizers: the byte tokenizer of the tiny runs, HF folders and .gguf files

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, then pad, bos, eos. Needs no vocabulary file
    or download."""

    pad_token_id, bos_token_id, eos_token_id, vocab_size = 256, 257, 258, 259
    specials = {256: "<pad>", 257: "<bos>", 258: "<eos>"}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        # As an HF Llama tokenizer does: special tokens means a leading BOS. `tokenize` never asks
        # for them.
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
        config = {"tokenizer_class": "ByteTokenizer", "vocab_size": self.vocab_size,
                  "pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}
        (directory / BYTE_TOKENIZER_FILE).write_text(json.dumps(config, indent=1) + "\n")


def load_tokenizer(path: str | Path):
    """"bytes" -> ByteTokenizer; a folder saved by ByteTokenizer -> ByteTokenizer; any other folder
    -> HF AutoTokenizer; a .gguf file -> AutoTokenizer.from_pretrained(its folder, gguf_file=its
    name)."""
    if str(path) == "bytes":
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir() and (path / BYTE_TOKENIZER_FILE).is_file():
        config = json.loads((path / BYTE_TOKENIZER_FILE).read_text())
        if config.get("tokenizer_class") != "ByteTokenizer" or config.get("vocab_size") != 259:
            raise DataError(f"{path / BYTE_TOKENIZER_FILE}: not a ByteTokenizer file: {config}")
        return ByteTokenizer()
    if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
        raise MissingFileError(f"tokenizer not found: {path} (want 'bytes', a folder or a .gguf "
                               "file)")
    from transformers import AutoTokenizer  # heavy, slow to import: needed only for HF tokenizers
    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------
# HF checkpoints

SUPPORTED_MODEL_TYPES = {"mistral", "llama"}


def hf_decoder_fields(hf: dict, source: str = "config") -> dict:
    """An HF `config.json` dict of a Mistral or Llama-family model, with its rope_theta and
    key/value heads where recent transformers versions or older files leave them out. Anything that
    would change the computation and that model.py does not implement is refused by name rather than
    silently ignored."""
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
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU "
                              "needs silu)")
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


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")


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
    """A checkpoint's JSON file (config, index) as a dict; a malformed one is named with its
    line."""
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
            # the header is checked against the file's size here: a truncated file fails at once
            try:
                opened = safe_open(str(file), framework="pt")
            except SafetensorError as error:  # its message does not name the file
                raise CheckpointError(f"{file}: not a readable safetensors file "
                                      f"({error})") from error
            with opened as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        else:
            # mmap + weights_only: no unpickling of arbitrary objects, no full read.
            try:
                shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
                # a truncated or foreign file
                raise CheckpointError(f"{file}: not a readable PyTorch checkpoint "
                                      f"({error})") from error
            for name in list(shard):
                yield name, shard.pop(name).to(dtype)


def read_hf_checkpoint(path: Path, dtype: torch.dtype):
    """(config.json as a dict, the file it came from, (name, tensor) pairs) of an HF checkpoint
    folder or a .gguf file. Names lose HF's leading "model."; the LM head is left out (an embedder
    has none)."""
    if path.suffix == ".gguf":
        return _read_gguf(path, dtype)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{path}: no config.json (expected an HF checkpoint directory or a "
                               ".gguf file)")
    return read_json(config_file), str(config_file), _read_checkpoint_tensors(path, dtype)


def _read_gguf(file: Path, dtype: torch.dtype):
    """Dequantise a .gguf through transformers; returns what read_hf_checkpoint does."""
    if not file.is_file():
        raise MissingFileError(f"{file}: no such .gguf file")
    with open(file, "rb") as f:
        if f.read(4) != b"GGUF":  # what transformers would refuse, with a traceback
            raise CheckpointError(f"{file}: not a GGUF file (it does not start with the bytes "
                                  "'GGUF')")
    from transformers import AutoModelForCausalLM  # slow to import: only for .gguf files

    # transformers dequantises to float32; we cast tensor by tensor.
    hf = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                              dtype=torch.float32)
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
            misshapen.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model "
                             f"{tuple(expected[name].shape)}")
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
        raise CheckpointError(f"{source}: checkpoint does not match the model config; "
                              + "; ".join(problems))
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
