"""Model folders: what `NVEmbed.save` writes and `NVEmbed.load` reads (plumbing/loading.py calls
these), in three layouts; NVIDIA's released one is plumbing/released.py.

- layout="own": config.json (the architecture, the weights' dtype and fingerprint), the decoder
  (or only its LoRA adapters plus a fingerprint of their base), the pooling, the tokenizer in
  tokenizer/, a model card (README.md).
- layout="hf": the decoder, LoRA folded in (fp32), as a standard transformers Mistral / Llama
  folder: config.json (model_type, architectures, `is_causal`), model.safetensors under
  MistralModel's / LlamaModel's names, the tokenizer. transformers >= 5.2 builds the model without
  the causal mask from `is_causal: false` alone, so `AutoModel.from_pretrained(folder)` gives this
  decoder's hidden states with no remote code. This project's config and the pooling lie in
  nvembed/, where neither transformers nor a checkpoint reader looks; `NVEmbed.load(folder)` reads
  the whole back. Its modules.json and config_sentence_transformers.json make sentence-transformers
  refuse it, naming layout="sentence-transformers" (sentence_transformers_guard).
- layout="peft": the own layout with the LoRA adapters also in PEFT's format beside it:
  adapter_config.json and adapter_model.safetensors, keyed as PEFT keys a LoRA on transformers'
  base model (AutoModel: `base_model.model.layers.0.self_attn.q_proj.lora_A.weight`). Then
  `PeftModel.from_pretrained(AutoModel.from_pretrained(base, config=config), folder)` is the
  adapted decoder, where `config = AutoConfig.from_pretrained(base)` with `config.is_causal =
  False` set first (a bidirectional model; the base's own config says causal). A .gguf base:
  its folder, and gguf_file=NAME in both calls (from_pretrained(..., is_causal=False) fails there:
  README's recipe, tested in tests/test_export.py).

Every folder is written whole into NAME.tmp and renamed (plumbing/atomic_folders.py), so a crash
never leaves a half-saved model. Tests: tests/test_nvembed.py, tests/test_export.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from plumbing.atomic_folders import replace_folder, written_whole
from plumbing.base_checkpoints import load_safetensors, read_json, weights_fingerprint
from plumbing.errors import CheckpointError, MissingFileError, UsageError

# ----------------------------------------------------------------------------
# The own layout: what NVEmbed.save writes by default and NVEmbed.load reads


def write_model_folder(folder: str | os.PathLike, architecture: dict,
                       state_dict: dict[str, torch.Tensor], tokenizer, overwrite: bool = False,
                       training: dict | None = None,
                       extra_files: tuple[dict, dict] | None = None, layout: str = "own") -> None:
    """What NVEmbed.save writes: config.json (the architecture with the model's name, the weights'
    dtype and fingerprint: the model's identity in results), the decoder's weights (or, for LoRA on
    a checkpoint's decoder, only the adapters plus a fingerprint of the base's weights), the
    pooling's, and the tokenizer in tokenizer/. `training` (data, steps, metrics, evaluation) goes
    into config.json too: a model loaded and saved again keeps it in its card.

    Written whole into a temporary folder, then renamed: a crash never leaves a folder
    that looks saved, and no file of an older model survives beside the new.
    """
    final = Path(folder)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass overwrite=True to "
                              "replace it")
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    adapters_only = architecture["lora"] is not None and architecture["base"] is not None
    decoder_state = {k.removeprefix("decoder."): v for k, v in state.items()
                     if k.startswith("decoder.")}
    pooling_state = {k.removeprefix("pooling."): v for k, v in state.items()
                     if k.startswith("pooling.")}
    base_fingerprint = None
    if adapters_only:
        base_fingerprint = weights_fingerprint({k: v for k, v in decoder_state.items()
                                                if "lora_" not in k})
        decoder_state = {k: v for k, v in decoder_state.items() if "lora_" in k}
    config = dict(format="nv-embed",
                  **{k: v for k, v in architecture.items() if k not in ("params", "base")},
                  base=recorded_base(architecture["base"], final) if adapters_only else None,
                  base_relative=adapters_only and is_inside(architecture["base"], final.parent),
                  base_fingerprint=base_fingerprint,
                  dtype=str(state["decoder.embed_tokens.weight"].dtype).removeprefix("torch."),
                  tokenizer="tokenizer",
                  # all the weights, the base's too: NVEmbed.fingerprint
                  fingerprint=weights_fingerprint(state), training=training or None)

    decoder_file = "adapters.safetensors" if adapters_only else "decoder.safetensors"
    extra_weights, json_files = extra_files or ({}, {})  # e.g. PEFT's files (export.peft_files)
    write_folder(final, config,
                 {decoder_file: decoder_state, "pooling.safetensors": pooling_state,
                  **extra_weights},
                 tokenizer, "tokenizer",
                 model_card(config, architecture["base"], training or {}, layout), json_files)


def is_inside(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


def recorded_base(base: str, model_folder: Path) -> str:
    """How an adapters-only save names its base: relative to the model folder when the base lies in
    the run folder around it (the run folder then moves and is shared whole), else as it was
    given."""
    if is_inside(base, model_folder.parent):
        return os.path.relpath(Path(base).resolve(), model_folder.resolve())
    return base


def resolve_base(config: dict, config_file: Path) -> str:
    """The base checkpoint an adapters-only save names, found from where the save now lies."""
    recorded = config["base"]
    path = config_file.parent / recorded if config.get("base_relative") else Path(recorded)
    if not path.exists():
        where = f" (relative to {config_file.parent})" if config.get("base_relative") else ""
        raise MissingFileError(f"{config_file}: its base checkpoint {recorded!r}{where} is not "
                               "found: these are LoRA adapters only; put the base there or edit "
                               "`base` in the file")
    return os.path.normpath(path)


# The Hub's names of a layout's library and task (its card's library_name and pipeline_tag)
CARD_LIBRARY = {"own": "nv-embed", "peft": "peft", "hf": "transformers",
                "sentence-transformers": "sentence-transformers"}


def hub_name(name: object) -> str | None:
    """`name` where it can be a Hub repository id ("owner/name", not a path here): the Hub refuses
    a card whose base_model is not a model id, so local paths stay in the card's table only."""
    text = str(name)
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or Path(text).exists() or text.startswith(".") or \
            Path(text).suffix in (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".gguf"):
        return None
    return text if all(c.isalnum() or c in "-_." for c in "".join(parts)) else None


def card_metadata(config: dict, base: str | None, training: dict, layout: str) -> dict:
    """The card's YAML front matter, as huggingface_hub reads it (ModelCard.load(folder).data):
    library_name, pipeline_tag, tags, base_model and datasets where they are Hub names, and the
    final metrics as model-index (the evaluation's dataset and split, BEIR's metric names as
    MTEB's: NDCG@10 -> ndcg_at_10)."""
    data = training.get("data")
    names = [hub_name(d) for d in (data if isinstance(data, list) else [data]) if d]
    meta = dict(library_name=CARD_LIBRARY[layout],
                pipeline_tag="sentence-similarity" if layout == "sentence-transformers"
                else "feature-extraction",
                tags=["nv-embed", "sentence-similarity", "feature-extraction", "embeddings"]
                + (["sentence-transformers"] if layout == "sentence-transformers" else [])
                + (["lora"] if config.get("lora") or config.get("lora_folded") else []))
    if base is not None and hub_name(base):
        meta["base_model"] = base
    if [n for n in names if n]:
        meta["datasets"] = [n for n in names if n]
    metrics = {k: v for k, v in (training.get("metrics") or {}).items() if isinstance(v, float)}
    if metrics:
        evaluation = training.get("evaluation") or {}
        dataset = str(evaluation.get("data") or "not recorded")
        metric_names = {"p": "precision"}
        meta["model-index"] = [dict(name=config.get("name") or "nv-embed", results=[dict(
            task=dict(type="retrieval"),
            dataset=dict(type=dataset, name=dataset, split=evaluation.get("split") or "test"),
            metrics=[dict(type=metric_names.get(k.split("@")[0].lower(), k.split("@")[0].lower())
                          + (f"_at_{k.split('@')[1]}" if "@" in k else ""), value=v)
                     for k, v in metrics.items()])])]
    return meta


def yaml_lines(value: object, indent: int = 0) -> list[str]:
    """`value` (dicts, lists, JSON scalars) as block YAML; each scalar as JSON, which YAML reads."""
    pad = "  " * indent
    lines = []
    for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
        head = f"{pad}{key}:" if isinstance(value, dict) else f"{pad}-"
        if isinstance(item, (dict, list)) and item:
            inner = yaml_lines(item, indent + 1)
            if isinstance(value, list) and isinstance(item, dict):  # "- key: ..." on one line
                lines += [f"{pad}- {inner[0].lstrip()}"] + inner[1:]
            else:
                lines += [head] + inner
        else:
            lines.append(f"{head} {json.dumps(item)}")
    return lines


def model_card(config: dict, base: str | None, training: dict, layout: str = "own") -> str:
    """README.md of a saved model: the Hub's metadata (card_metadata) as YAML front matter, then
    what it is, where it came from, how well it did, how to load it."""
    metrics = training.get("metrics") or {}
    data = training.get("data")
    rows = [("name", config.get("name")), ("base", base or "random init (a preset)"),
            ("pooling", f"{config['pooling']} {config['pooling_kwargs'] or ''}".strip()),
            ("attention",
             "causal" if config["causal"] else "bidirectional (NV-Embed, section 3.1)"),
            ("LoRA", config["lora"] or "none (all weights)"),
            ("training data", ", ".join(map(str, data)) if isinstance(data, list) else data),
            ("steps", training.get("steps")),
            ("final metrics", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                        if isinstance(v, float)) or None),
            ("fingerprint", config["fingerprint"]), ("dtype", config["dtype"])]
    table = "\n".join(f"| {key} | {value if value is not None else 'not recorded'} |"
                      for key, value in rows)
    front = "\n".join(["---", *yaml_lines(card_metadata(config, base, training, layout)), "---"])
    title = config.get("name") or "NV-Embed model"
    return (f"{front}\n\n# {title}\n\nAn NV-Embed-style embedder (arXiv "
            f"2405.17428) saved by this project.\n\n| | |\n|---|---|\n{table}\n\n## Load "
            "it\n\n```python\nfrom model import NVEmbed\n\nmodel = "
            "NVEmbed.load(\"path/to/this/folder\")\nvectors = model.encode([\"a text\"], "
            "instruction=\"Given a question, retrieve passages that answer it\")\n```\n\nor on "
            "the command line: `python evaluate.py --model path/to/this/folder ...`.\n")


def write_folder(final: Path, config: dict, weights: dict[str, dict], tokenizer,
                 tokenizer_folder: str, card: str | None = None,
                 json_files: dict[str, dict] | None = None) -> None:
    """config.json, the `weights` ({file: tensors}, with transformers' {"format": "pt"} metadata),
    the tokenizer, README.md and further `json_files` ({file: dict}); file names may hold a
    subfolder."""
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


def fold_lora(state_dict: dict[str, torch.Tensor], lora: dict | None) -> dict[str, torch.Tensor]:
    """A state dict on the CPU with each LoRA adapter folded into its weight: W + (alpha / r) B A,
    computed in fp32 and rounded once to W's dtype; no `lora_` tensor is left. The released and HF
    layouts save this."""
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    for key in [k for k in state if k.endswith(".lora_A")]:
        base = key.removesuffix(".lora_A")
        # (out, r) and (r, in)
        lora_B, lora_A = state.pop(base + ".lora_B").float(), state.pop(key).float()
        weight = state[base + ".weight"]
        update = (lora["alpha"] / lora["rank"]) * (lora_B @ lora_A)  # (out, in)
        state[base + ".weight"] = (weight.float() + update).to(weight.dtype)
    return state


def read_model_folder(folder: str | os.PathLike) -> tuple[dict, Path, dict[str, torch.Tensor]]:
    """(config, its file, {"decoder.*" / "pooling.*": tensor}) of a folder NVEmbed.save wrote, the
    tensors as saved (an adapters-only save holds only the adapters of its decoder). Any other
    folder is refused by name."""
    folder = Path(folder)
    config_file = saved_config_file(folder) or folder / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{folder}: no config.json (not a saved NV-Embed model)")
    config = read_json(config_file)
    if config.get("format") != "nv-embed":
        raise CheckpointError(f"{config_file}: not an NV-Embed model saved by this project (for a "
                              "base checkpoint use plumbing.loading.from_base, for released "
                              "weights from_released)")
    # Saves from before the text rule was recorded hold only its template; the rest was the
    # project's rule (their queries were then tokenized prefix and text apart, which the rule's
    # joined encoding no longer does).
    config.setdefault("text_rule", {"template": config.get("query_template")})
    config.setdefault("normalize", True)
    config.setdefault("name", None)  # saves from before models had names
    config["decoder"].setdefault("rope_scaling", None)  # saves from before Llama 3's RoPE
    # NVEmbed.save(layout="hf"): HF's decoder file, the pooling in nvembed/
    if config.get("layout") == "hf":
        decoder_file, pooling_file = HF_DECODER_FILE, HF_LAYOUT_POOLING
    else:
        decoder_file = ("adapters.safetensors" if config["base"] is not None
                        else "decoder.safetensors")
        pooling_file = "pooling.safetensors"
    tensors = {f"decoder.{k}": v for k, v in load_safetensors(folder / decoder_file).items()}
    tensors |= {f"pooling.{k}": v for k, v in load_safetensors(folder / pooling_file).items()}
    return config, config_file, tensors


def check_base(config: dict, config_file: Path, decoder_config: dict,
               base_state: dict[str, torch.Tensor]) -> None:
    """Refuse an adapters-only save whose base checkpoint is not the one it was trained on: another
    config, or (the fingerprint) other weights of the same shape, such as another fine-tune of the
    same model."""
    if decoder_config != config["decoder"]:
        raise CheckpointError(f"{config_file}: base checkpoint {config['base']} has another config "
                              "than the one these adapters were trained on")
    expected = config.get("base_fingerprint")  # absent in saves from before it existed
    found = weights_fingerprint(base_state)
    if expected and found != expected:
        raise CheckpointError(f"{config_file}: base checkpoint {config['base']} holds other "
                              "weights than the ones these adapters were trained on (fingerprint "
                              f"{found}, expected {expected})")


# NVEmbed.save(layout="hf"): a transformers folder (config.json, model.safetensors, the tokenizer)
# with this project's config and the pooling in a subfolder, where transformers and HF checkpoint
# readers do not look.
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


# ----------------------------------------------------------------------------
# The ecosystem's layouts: "hf" (transformers) and "peft"


def hf_config(decoder: dict, causal: bool, tokenizer, dtype: torch.dtype) -> dict:
    """transformers' config.json of this project's decoder config (model.MistralConfig as a dict). A
    decoder with a sliding window is a Mistral, one without a Llama (the architecture is otherwise
    the same). The window is written only for a causal model: this project's bidirectional attention
    has none."""
    model_type = "mistral" if decoder["sliding_window"] is not None else "llama"
    rope = {"rope_type": "default", "rope_theta": decoder["rope_theta"],
            **(decoder["rope_scaling"] or {})}
    config = dict(
        architectures=[{"mistral": "MistralModel", "llama": "LlamaModel"}[model_type]],
        model_type=model_type,
        is_causal=bool(causal), vocab_size=decoder["vocab_size"],
        hidden_size=decoder["hidden_size"],
        intermediate_size=decoder["intermediate_size"],
        num_hidden_layers=decoder["num_hidden_layers"],
        num_attention_heads=decoder["num_attention_heads"],
        num_key_value_heads=decoder["num_key_value_heads"],
        head_dim=decoder["head_dim"], max_position_embeddings=decoder["max_position_embeddings"],
        rms_norm_eps=decoder["rms_norm_eps"], hidden_act="silu", rope_theta=decoder["rope_theta"],
        rope_parameters=rope, tie_word_embeddings=False, use_cache=False, attention_dropout=0.0,
        dtype=str(dtype).removeprefix("torch."),
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None))
    if model_type == "mistral":
        config["sliding_window"] = decoder["sliding_window"] if causal else None
    else:
        config |= dict(attention_bias=False, mlp_bias=False)
    return config


def write_hf_folder(folder: str | os.PathLike, architecture: dict,
                    state_dict: dict[str, torch.Tensor], tokenizer, overwrite: bool = False,
                    training: dict | None = None) -> None:
    """NVEmbed.save(layout="hf"): see the module's docstring. Written whole or not at all, as the
    other layouts."""
    final = Path(folder)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass overwrite=True to "
                              "replace it")
    state = {k: v.contiguous() for k, v in fold_lora(state_dict, architecture["lora"]).items()}
    decoder_state = {k.removeprefix("decoder."): v for k, v in state.items()
                     if k.startswith("decoder.")}
    pooling_state = {k.removeprefix("pooling."): v for k, v in state.items()
                     if k.startswith("pooling.")}
    dtype = decoder_state["embed_tokens.weight"].dtype
    # The folded decoder is a plain one: no adapters, no base to fetch. `lora_folded` says what was
    # folded in.
    config = dict(format="nv-embed", layout="hf",
                  **{k: v for k, v in architecture.items() if k not in ("params", "base", "lora")},
                  lora=None, lora_folded=architecture["lora"], base=None, base_relative=False,
                  base_fingerprint=None, dtype=str(dtype).removeprefix("torch."), tokenizer=".",
                  fingerprint=weights_fingerprint(state), training=training or None)
    card = model_card(config, architecture["base"], training or {}, "hf") + (
        "\nThe decoder alone (hidden states, no pooling) loads in transformers >= 5.2, "
        "bidirectional as trained: "
        "`transformers.AutoModel.from_pretrained(\"path/to/this/folder\")`.\n")
    write_folder(final,
                 hf_config(architecture["decoder"], architecture["causal"], tokenizer, dtype),
                 {HF_DECODER_FILE: decoder_state, HF_LAYOUT_POOLING: pooling_state}, tokenizer, ".",
                 card, {HF_LAYOUT_CONFIG: config, **sentence_transformers_guard()})


def sentence_transformers_guard() -> dict[str, object]:
    """{file: JSON} for a layout="hf" folder: without them sentence-transformers loads any
    transformers folder as mean pooling over every token, the wrong embedder. With them it stops
    before loading anything, on a requirement no Python meets, saying why and which layout to
    save."""
    reason = ("This folder is NVEmbed.save(layout=\"hf\"): the decoder alone, without this model's "
              "pooling, text rule and prompts. Save the model with NVEmbed.save(folder, "
              "layout=\"sentence-transformers\") and load that folder.")
    return {"config_sentence_transformers.json": dict(
                model_type="SentenceTransformer",
                requirements={"python": {"specifier": "<0", "reason": reason}}),
            # Older sentence-transformers do not check requirements: a module they cannot import.
            "modules.json": [dict(idx=0, name="0", path="",
                                  type="save_with_layout_sentence_transformers.NotThisFolder")]}


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def peft_files(architecture: dict, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """({PEFT_WEIGHTS: tensors}, {PEFT_CONFIG: config}): the model's LoRA adapters in PEFT's format,
    for a LoRA on transformers' base model (AutoModel). Our `decoder.M.lora_A` (r, in) is PEFT's
    `base_model.model.M.lora_A.weight` (its lora_A is an nn.Linear(in, r)), lora_B likewise; PEFT's
    scaling lora_alpha / r is ours."""
    lora = architecture["lora"]
    if lora is None:
        raise UsageError("layout='peft' saves LoRA adapters, and this model has none (train with "
                         "--lora-rank)")
    tensors = {f"base_model.model.{k.removeprefix('decoder.')}.weight":
                   v.detach().cpu().contiguous()
               for k, v in state_dict.items()
               if k.startswith("decoder.") and k.endswith((".lora_A", ".lora_B"))}
    config = dict(peft_type="LORA", task_type=None, base_model_name_or_path=architecture["base"],
                  r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                  target_modules=sorted(lora["targets"]), bias="none", fan_in_fan_out=False,
                  use_rslora=False, use_dora=False, init_lora_weights=True, inference_mode=True,
                  modules_to_save=None, layers_to_transform=None, layers_pattern=None,
                  rank_pattern={}, alpha_pattern={})
    return {PEFT_WEIGHTS: tensors}, {PEFT_CONFIG: config}


def write_peft_folder(folder: str | os.PathLike, architecture: dict,
                      state_dict: dict[str, torch.Tensor], tokenizer, overwrite: bool = False,
                      training: dict | None = None) -> None:
    """NVEmbed.save(layout="peft"): this project's folder with PEFT's adapter files beside its
    own."""
    # refuses a model without adapters before anything is written
    extra = peft_files(architecture, state_dict)
    write_model_folder(folder, architecture, state_dict, tokenizer, overwrite, training,
                       extra_files=extra, layout="peft")
