"""Building, saving and loading an NVEmbed: one function per format, behind NVEmbed's thin
classmethods (model.py).

- `from_base`: a fresh embedder on a base decoder: a preset (random weights, byte tokenizer),
  an HF checkpoint folder or a `.gguf` file (`Mistral.from_pretrained`).
- `load` / `save`: this project's own folders (model_folders.py writes and reads the files).
- `from_released`: NVIDIA's released NV-Embed-v1/v2, with their text rule.
- `skeleton`: the modules of a saved architecture on the meta device (loaders and FSDP ranks).
- `load_for_command`: what the commands take as --model (a saved folder, or a base decoder).
- `build_on_rank0`, `load_from_rank0`: under torchrun only rank 0 reads a checkpoint (train.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from data import QUERY_TEMPLATE, TextRule
from lora import apply_lora, lora_config
from model import PRESETS, Mistral, MistralConfig, NVEmbed
from plumbing.base_checkpoints import ByteTokenizer, load_checked, load_tokenizer, read_json
from plumbing.distributed import rank
from plumbing.errors import MissingFileError, UsageError, UserError
from plumbing.model_folders import (check_base, is_saved, read_model_folder, resolve_base,
                                    saved_config_file, write_hf_folder, write_model_folder,
                                    write_peft_folder)
from plumbing.released import (is_released, read_released, read_released_config,
                               write_released_folder)
from pooling import POOLINGS


def from_base(model: str = "tiny", pooling: str = "latent", causal: bool = False,
              max_length: int = 512, dtype: torch.dtype = torch.float32, seed: int = 0,
              pooling_kwargs: dict | None = None, **kwargs) -> NVEmbed:
    """A fresh embedder on a base decoder: a preset (random, byte tokenizer), an HF folder or a
    `.gguf`."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLINGS)}")
    torch.manual_seed(seed)
    if model in PRESETS:
        decoder, tokenizer, base = (Mistral(MistralConfig.preset(model)).to(dtype), ByteTokenizer(),
                                    None)
    else:
        decoder, tokenizer = Mistral.from_pretrained(model, dtype=dtype), load_tokenizer(model)
        # as given: write_model_folder records it relative to a run folder around it
        base = str(model)
    pool = POOLINGS[pooling](decoder.config.hidden_size, **(pooling_kwargs or {})).to(dtype)
    return NVEmbed(decoder, pool, tokenizer, pooling, pooling_kwargs, causal=causal,
                   max_length=max_length, base=base, **{"name": Path(model).name, **kwargs})


def architecture(model: NVEmbed) -> dict:
    """Everything but the weights and the tokenizer: what `skeleton` rebuilds from."""
    return dict(decoder=dataclasses.asdict(model.decoder.config), pooling=model.pooling_name,
                pooling_kwargs=model.pooling_kwargs, lora=lora_config(model.decoder),
                causal=model.causal,
                max_length=model.max_length, text_rule=dataclasses.asdict(model.text_rule),
                normalize=model.normalize, base=model.base, name=model.name, prompts=model.prompts,
                params={name: (str(p.dtype).removeprefix("torch."), p.requires_grad)
                        for name, p in model.named_parameters()})


def skeleton(architecture: dict, tokenizer) -> NVEmbed:
    """The modules of `architecture()` (or a saved config.json) on the meta device, with each
    parameter's dtype and trainable flag where recorded: loaders assign the weights to it
    (`load_checked`), and FSDP ranks other than 0 receive their shards of rank 0's (train.py)."""
    with torch.device("meta"):
        decoder = Mistral(MistralConfig(**architecture["decoder"]))
        if architecture["lora"]:
            apply_lora(decoder, **architecture["lora"])
        pooling = POOLINGS[architecture["pooling"]](decoder.config.hidden_size,
                                                    **architecture["pooling_kwargs"])
    rule = TextRule.from_dict(architecture["text_rule"], "text_rule")
    model = NVEmbed(decoder, pooling, tokenizer, architecture["pooling"],
                    architecture["pooling_kwargs"], causal=architecture["causal"],
                    max_length=architecture["max_length"], text_rule=rule,
                    normalize=architecture["normalize"], base=architecture["base"],
                    name=architecture.get("name"), prompts=architecture.get("prompts"))
    for name, (dtype, trainable) in architecture.get("params", {}).items():
        param = model.get_parameter(name)
        param.data = param.data.to(getattr(torch, dtype))
        param.requires_grad = trainable
    return model


def save(model: NVEmbed, folder: str | os.PathLike, state_dict: dict | None = None,
         overwrite: bool = False, layout: str = "own", training: dict | None = None) -> None:
    """In this project's layout (model_folders.py), NVIDIA's (layout="released": released.py),
    transformers' (layout="hf": the decoder with LoRA folded in, AutoModel reads it), this
    project's with PEFT's adapter files beside (layout="peft"), or sentence-transformers'
    (layout="sentence-transformers": st_layout.py); `state_dict`: e.g. FSDP's; `training`: data,
    steps and metrics for the model card (README.md). NVEmbed.load reads "own", "hf" and "peft"
    (from_released reads "released", SentenceTransformer "sentence-transformers")."""
    state_dict = state_dict or model.state_dict()
    # a loaded model saved again keeps its training facts in the card (`load` read them)
    training = training if training is not None else getattr(model, "training_record", None)
    if layout == "own":
        write_model_folder(folder, architecture(model), state_dict, model.tokenizer, overwrite,
                           training)
    elif layout == "released":
        write_released_folder(folder, architecture(model), state_dict, model.tokenizer, overwrite)
    elif layout == "hf":
        write_hf_folder(folder, architecture(model), state_dict, model.tokenizer, overwrite,
                        training)
    elif layout == "peft":
        write_peft_folder(folder, architecture(model), state_dict, model.tokenizer, overwrite,
                          training)
    elif layout == "sentence-transformers":  # st_layout.py: SentenceTransformer(folder) reads it
        from plumbing.st_layout import write_st_folder
        write_st_folder(folder, architecture(model), state_dict, model.tokenizer, overwrite,
                        training)
    else:
        raise ValueError(f"unknown layout {layout!r}; choose own, released, hf, peft or "
                         "sentence-transformers")


def load(folder: str | os.PathLike, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu", trainable_dtype: torch.dtype | None = None) -> NVEmbed:
    """Load what `save` wrote. dtype: the decoder's (default: as saved); trainable_dtype: the
    adapters' and pooling's (default: dtype). Stage 2 asks for fp32: stage 1's fp32 weights then
    arrive bit for bit."""
    config, config_file, tensors = read_model_folder(folder)  # {"decoder.*", "pooling.*": tensor}
    dtype = dtype or getattr(torch, config["dtype"])
    trainable_dtype = trainable_dtype or dtype
    base_path = None
    if config["base"] is not None:  # an adapters-only save: the frozen weights come from the base
        base_path = resolve_base(config, config_file)
        base = Mistral.from_pretrained(base_path, dtype=dtype)
        check_base(config, config_file, dataclasses.asdict(base.config), base.state_dict())
        tensors |= {f"decoder.{k}": v for k, v in base.state_dict().items()}
    model = skeleton(config, load_tokenizer(str(Path(folder) / config["tokenizer"])))
    # where the base is from here, for a save of this model elsewhere
    model.base = base_path or model.base
    model.training_record = config.get("training")  # the card's training facts, for `save`
    # what training updates
    trainable = {k for k in tensors if "lora_" in k or k.startswith("pooling.")}
    load_checked(model, ((k, v.to(trainable_dtype if k in trainable else dtype))
                         for k, v in tensors.items()), str(folder))
    return model.to(device).eval()


def from_released(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  max_length: int = 4096) -> NVEmbed:
    """NVIDIA's released NV-Embed-v1/v2 (a local copy of the HF repository), embedding exactly as
    their `encode(prompts, instruction, max_length=4096)` does (tests/test_released.py): a row is
    the tokenizer's encoding of BOS + instruction + text + "</s>", cut at max_length (a long text
    loses its EOS: TextRule.truncation "sequence"); they zero the first len(tokenize(instruction))
    positions of the pool mask (right padding, `is_mask_instruction`, an instruction given:
    TextRule.instruction_positions "tokenize"), so a bare text (every document) pools its BOS
    (TextRule.pool_bos "without_instruction"); padding is EOS (`add_pad_token`); EOS is appended
    whatever `add_eos` says (always_add_eos); the mean is L2-normalised if `output_normalize`."""
    config, text_config, latent_config, tensors = read_released(folder, dtype)
    arch = released_architecture(folder, config, text_config, latent_config, max_length)
    tokenizer = load_tokenizer(str(folder))
    if config.get("add_pad_token", True) and hasattr(tokenizer, "eos_token"):  # an HF tokenizer
        tokenizer.pad_token = tokenizer.eos_token
    model = skeleton(arch, tokenizer)
    load_checked(model, tensors.items(), str(folder))
    return model.eval()


def released_architecture(folder: str | os.PathLike, config: dict, text_config: dict,
                          latent_config: dict, max_length: int = 4096) -> dict:
    """`architecture()` of a released NV-Embed folder, from its configs (read_released_config)."""
    decoder = MistralConfig.from_hf(text_config, source=str(Path(folder) / "config.json"))
    rule = TextRule(template=QUERY_TEMPLATE,
                    mask_instruction=bool(config.get("is_mask_instruction", True)),
                    pool_bos="without_instruction", truncation="sequence",
                    instruction_positions="tokenize")
    pooling_kwargs = dict(num_latents=latent_config.get("num_latents_value", 512),
                          num_heads=latent_config.get("num_cross_heads", 8),
                          head_dim=latent_config.get("cross_dim_head", decoder.hidden_size))
    arch = dict(decoder=dataclasses.asdict(decoder), lora=None, pooling="latent",
                pooling_kwargs=pooling_kwargs, causal=False, max_length=max_length,
                text_rule=dataclasses.asdict(rule), base=None,
                normalize=bool(latent_config.get("output_normalize", True)), name=Path(folder).name)
    return arch


def model_folder(path: str | os.PathLike) -> Path:
    """A saved model: a run folder's `model/`, or the model folder itself."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if is_saved(path):
        return path
    if is_released(path):
        return path
    raise MissingFileError(f"{path}: neither a run folder with model/, a saved NV-Embed model nor "
                           "a released one (run stage 1 first, or pass --init-from a stage-1 "
                           "output)")



def saved_architecture(path: str | os.PathLike) -> dict:
    """The architecture of what --init-from names: a run folder, its model/, or a released NV-Embed
    folder."""
    folder = model_folder(path)
    if is_released(folder):
        return released_architecture(folder, *read_released_config(Path(folder)))
    return read_json(saved_config_file(folder))


def load_any(path: str | os.PathLike, dtype: torch.dtype | None = None,
             trainable_dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> NVEmbed:
    """A run folder, a saved model or a released NV-Embed folder (train.py's --init-from)."""
    folder = model_folder(path)
    if is_released(folder):
        return from_released(folder, dtype=dtype or torch.float32).to(device)
    return load(folder, dtype=dtype, device=device, trainable_dtype=trainable_dtype)


def load_for_command(spec: str, pooling: str | None = None, causal: bool | None = None,
                     max_length: int | None = None, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> NVEmbed:
    """What the commands take as --model: a folder `save` wrote (its pooling and attention are
    kept), a released NV-Embed folder (from_released; max_length default 4096, theirs), or a base
    decoder (preset, HF folder, .gguf) with a fresh `pooling` (default mean) and max_length (default
    512) for zero-shot use."""
    if is_saved(spec):
        if pooling is not None or causal is not None:
            raise UsageError(f"--model {spec} is a saved NV-Embed model: it keeps the pooling and "
                             "attention it was trained with, so --pooling / --causal / "
                             "--bidirectional do not apply")
        return load(spec, dtype=dtype, device=device)
    if is_released(spec):  # NVIDIA's layout: latent pooling, bidirectional, its own text rule
        if pooling is not None or causal is not None:
            raise UsageError(f"--model {spec} is a released NV-Embed model: it keeps its latent "
                             "pooling and bidirectional attention, so --pooling / --causal / "
                             "--bidirectional do not apply")
        return from_released(spec, dtype=dtype or torch.float32,
                             max_length=max_length or 4096).to(device)
    if is_saved(Path(spec) / "model"):  # a run folder of train.py: config.json there is the run's
        raise UsageError(f"--model {spec} is a train.py run folder, not a model: did you mean "
                         f"{Path(spec) / 'model'}?")
    if spec not in PRESETS and not Path(spec).exists():
        raise MissingFileError(f"--model {spec}: not found (want a saved NV-Embed folder, an HF "
                               "checkpoint folder, a .gguf file or a preset: "
                               f"{', '.join(sorted(PRESETS))})")
    model = from_base(spec, pooling=pooling or "mean", causal=bool(causal),
                      max_length=max_length or 512, dtype=dtype or torch.float32)
    return model.to(device).eval()


# ----------------------------------------------------------------------------
# Under torchrun (train.py): one process reads the checkpoint, every rank gets its shards


def build_on_rank0(build, config: dict) -> NVEmbed:
    """`build(config)` on rank 0 only, so that one process, not each of 8, reads and holds a 7B
    checkpoint. The others build the modules on the meta device (`skeleton`) from rank 0's broadcast
    architecture and tokenizer (pickled by rank 0 of this job), or stop on rank 0's error, and get
    their shards in `load_from_rank0`."""
    model, error = None, None
    # architecture, tokenizer, rank 0's error, whether it is the user's
    message = [None, None, None, False]
    if rank() == 0:
        try:
            model = build(config)
            message[:2] = architecture(model), model.tokenizer
        except Exception as e:
            error, message[2], message[3] = e, f"{type(e).__name__}: {e}", isinstance(e, UserError)
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[3]:  # a mistake in the user's input, which rank 0 reports (train.main)
        raise UserError(f"rank 0 could not build the model: {message[2]}")
    if message[2] is not None:
        raise RuntimeError(f"rank 0 could not build the model: {message[2]}")
    return model if model is not None else skeleton(*message[:2]).train()


def load_from_rank0(model, full_state: dict | None, device: torch.device) -> None:
    """After train.parallelize: every rank's shards from rank 0's full state dict (None
    elsewhere)."""
    if rank() != 0:
        model.to_empty(device=device)  # memory for the meta-device shards, filled just below
    set_model_state_dict(model, full_state if rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
