"""NVEmbed.save(layout="sentence-transformers"): a folder `SentenceTransformer(folder)` loads as
this embedder, giving NVEmbed.encode's vectors for documents and for prompted queries. Tests:
tests/test_st_layout.py.

The folder is a transformers folder (config.json with `is_causal`, model.safetensors: the decoder
with LoRA folded in, as layout="hf" writes them) with sentence-transformers' files around it:
- the tokenizer writes each row as data.tokenize does: [BOS] (where data.bos_ids has one) + prompt +
  text + [EOS], right-padded, a long text cut before EOS; max_length is the model's; no chat
  template (sentence-transformers would wrap texts in one: SmolLM2's adds a system prompt);
- modules.json: the decoder (module 0, root), the pooling (module 1), Normalize (module 2, when the
  model normalises); sentence_bert_config.json: unpadded inputs off (the pooling needs padded rows);
- config_sentence_transformers.json: `prompts` (the model's, NVEmbed.prompts: "query" at least, so
  `encode_query` prefixes the instruction; documents have none, so no default prompt), cosine
  similarity, and `requirements` that sentence-transformers checks before loading.

EOS pooling is sentence-transformers' own Pooling("lasttoken"): the last real token is EOS. The
other poolings are this project's own, in one file, nvembed_st.py (plumbing/st_module.py with
pooling.py's classes; `trust_remote_code=True`), because sentence-transformers' Pooling with
include_prompt=False cannot pool the tokens this project pools: (1) it drops a prompt's tokens only
when there is a prompt, so a bare text (every document) pools its BOS, which this project never
pools; (2) it counts the prompt encoded alone, so where the prompt's last token merges with the
text's first (SmolLM2: "Query: " ends in 'Ġ' alone, but "Query: vitamin" is ':' 'Ġvitamin'), it
drops the text's first token, and whether they merge varies from text to text (SmolLM2: not before
" spaced" or "1990s"), which its one prompt length per batch cannot say.

model_folders.sentence_transformers_guard: the files that make sentence-transformers refuse a
layout="hf" folder.
"""

from __future__ import annotations

import ast
import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from data import TextRule, bos_ids, tokenize
from plumbing.atomic_folders import replace_folder, written_whole
from plumbing.base_checkpoints import ByteTokenizer, weights_fingerprint
from plumbing.errors import CheckpointError, UsageError
from plumbing.model_folders import HF_DECODER_FILE, fold_lora, hf_config, model_card

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = "nvembed_st.py"  # the one code file of the folder
ST_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
ST_NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
ST_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
NATIVE_POOLINGS = {"eos": "lasttoken"}  # this project's pooling -> sentence-transformers' mode
BIDIRECTIONAL = {"specifier": ">=5.2", "reason": "older transformers ignore `is_causal: false` in "
                 "config.json and would run this bidirectional decoder causally"}


def byte_tokenizer():
    """checkpoints.ByteTokenizer as a transformers tokenizer: ids 0..255 the UTF-8 bytes (through
    byte-level BPE's byte alphabet, with no merges), 256 <pad>, 257 <bos>, 258 <eos>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    alphabet = bytes_to_unicode()  # byte -> the printable character byte-level BPE names it by
    tokens = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tokens.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokens.decoder = decoders.ByteLevel()
    specials = [ByteTokenizer.specials[i] for i in sorted(ByteTokenizer.specials)]
    tokens.add_special_tokens([AddedToken(s, special=True) for s in specials])  # ids 256, 257, 258
    return PreTrainedTokenizerFast(tokenizer_object=tokens, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def row_tokenizer(tokenizer, max_length: int):
    """A transformers tokenizer whose encoding of a text is data.tokenize's row of it: [BOS] where
    data.bos_ids has one, the text, EOS; right-padded (the decoder's positions count from the left);
    cut at max_length before EOS (transformers cuts the text and keeps the special tokens)."""
    rows = byte_tokenizer() if isinstance(tokenizer, ByteTokenizer) else copy.deepcopy(tokenizer)
    if rows.pad_token is None:
        rows.pad_token = rows.eos_token  # what data.tokenize pads with then (padding is masked)
    # transformers >= 5 rebuilds the post-processor from these two (tokenizer.json keeps it).
    rows.add_bos_token, rows.add_eos_token = bool(bos_ids(tokenizer)), True
    # Rows are plain text: sentence-transformers would put inputs into a chat template it finds.
    rows.chat_template = None
    # no token_type_ids: the decoder takes none
    for key, value in dict(padding_side="right", model_max_length=max_length,
                           model_input_names=["input_ids", "attention_mask"]).items():
        setattr(rows, key, value)
        rows.init_kwargs[key] = value  # what save_pretrained writes to tokenizer_config.json
    return rows


PROBES = ["a", "Hello, world!", " a leading space", "naïve café, 1990s\nnew line", ""]


def check_rows(saved, tokenizer, folder: Path) -> None:
    """Refuse a written tokenizer (`saved`, read back) whose padded batch differs from
    data.tokenize's."""
    ours = tokenize(tokenizer, PROBES, max_length=None)
    theirs = saved(PROBES, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask"):
        if not torch.equal(theirs[key], ours[key]):
            raise CheckpointError(f"{folder}: cannot write a tokenizer that gives this model's "
                                  f"rows: {key} {theirs[key].tolist()} there, "
                                  f"{ours[key].tolist()} here")


def module_source() -> str:
    """nvembed_st.py: pooling.py's classes, then plumbing/st_module.py's, under their imports less
    this project's (st_module's `from pooling import POOLINGS` is the POOLINGS just above it)."""
    project = {p.stem for p in REPO.glob("*.py")} | {"plumbing"}
    imports, bodies = ["from __future__ import annotations"], []
    glue = (REPO / "plumbing" / "st_module.py").read_text()
    header = ('"""nv-embed\'s pooling for sentence-transformers, written by nv-embed\'s '
              'plumbing/st_layout.py\nfrom its pooling.py and plumbing/st_module.py.\n\n'
              f'{ast.get_docstring(ast.parse(glue))}\n"""\n')
    for source in ((REPO / "pooling.py").read_text(), glue):
        for node in ast.parse(source).body[1:]:  # [0]: the module's docstring
            text = ast.get_source_segment(source, node)
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else \
                    [alias.name for alias in node.names]
                if names[0].split(".")[0] not in project and text not in imports:
                    imports.append(text)
            else:
                bodies.append(text)
    return header + "\n" + "\n".join(imports) + "\n\n\n" + "\n\n\n".join(bodies) + "\n"


def st_files(architecture: dict, rule: TextRule, hidden_size: int) -> tuple[dict, dict]:
    """({file: JSON}, {file: text}): sentence-transformers' configs, and the module file if any."""
    pooling, native = architecture["pooling"], architecture["pooling"] in NATIVE_POOLINGS
    include_prompt = not rule.mask_instruction
    requirements = {} if architecture["causal"] else {"transformers": BIDIRECTIONAL}
    if native:
        pooling_module = dict(path="1_Pooling", type=ST_POOLING)
        pooling_config = dict(embedding_dimension=hidden_size, include_prompt=include_prompt,
                              pooling_mode=NATIVE_POOLINGS[pooling])
        code = {}
    else:
        stem = MODULE_FILE.removesuffix(".py")
        pooling_module = dict(path="1_NVEmbedPooling", type=f"{stem}.NVEmbedPooling")
        pooling_config = dict(pooling=pooling, embedding_dimension=hidden_size,
                              pooling_kwargs=architecture["pooling_kwargs"],
                              include_prompt=include_prompt)
        code = {MODULE_FILE: module_source()}
        requirements["sentence-transformers"] = {
            "specifier": ">=6.0", "reason": f"{MODULE_FILE} uses its Transformer.preprocess"}
    modules = [dict(path="", type=ST_TRANSFORMER if native else f"{stem}.NVEmbedTransformer"),
               pooling_module] + ([dict(path="2_Normalize", type=ST_NORMALIZE)]
                                  if architecture["normalize"] else [])
    files = {
        "modules.json": [dict(idx=i, name=str(i), **m) for i, m in enumerate(modules)],
        "sentence_bert_config.json": dict(
            transformer_task="feature-extraction", module_output_name="token_embeddings",
            modality_config={"text": {"method": "forward",
                                      "method_output_name": "last_hidden_state"}},
            unpad_inputs=False),
        "config_sentence_transformers.json": dict(
            model_type="SentenceTransformer", prompts=architecture["prompts"],
            default_prompt_name=None, similarity_fn_name="cosine", requirements=requirements),
        f"{pooling_module['path']}/config.json": pooling_config,
    }
    if architecture["normalize"]:
        files["2_Normalize/config.json"] = dict(module_input_name="sentence_embedding",
                                                module_output_name="sentence_embedding")
    return files, code


def check_savable(architecture: dict) -> TextRule:
    """The model's text rule, if this layout can carry it and the model has a query prompt."""
    rule = TextRule.from_dict(architecture["text_rule"], "text_rule")
    if rule.released:
        raise UsageError("layout='sentence-transformers' writes this project's text rule; this "
                         "model has NVIDIA's released one (save it with layout='released')")
    if "query" not in (architecture.get("prompts") or {}):
        raise UsageError(
            "layout='sentence-transformers' carries the query prompt, and this model has none: set "
            "model.prompts['query'] = model.text_rule.template.format(instruction='...') first "
            "(or '' for a model whose queries take no instruction)")
    return rule


def write_st_folder(folder: str | os.PathLike, architecture: dict,
                    state_dict: dict[str, torch.Tensor], tokenizer, overwrite: bool = False,
                    training: dict | None = None) -> None:
    """NVEmbed.save(layout="sentence-transformers"): see the module's docstring. Written whole or
    not at all, as the other layouts."""
    rule = check_savable(architecture)
    final = Path(folder)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} already exists and is not empty; pass overwrite=True to "
                              "replace it")
    state = {k: v.contiguous() for k, v in fold_lora(state_dict, architecture["lora"]).items()}
    decoder = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    pooling = {f"pool.{k.removeprefix('pooling.')}": v for k, v in state.items()
               if k.startswith("pooling.")}  # NVEmbedPooling.pool
    dtype = decoder["embed_tokens.weight"].dtype
    files, code = st_files(architecture, rule, architecture["decoder"]["hidden_size"])
    files["config.json"] = hf_config(architecture["decoder"], architecture["causal"], tokenizer,
                                     dtype)
    card_config = dict(architecture, lora=None, lora_folded=architecture["lora"],
                       fingerprint=weights_fingerprint(state),
                       dtype=str(dtype).removeprefix("torch."))
    # The card's table, then how to load this folder (the card's own "Load it" is NVEmbed.load's).
    card = model_card(card_config, architecture["base"], training or {},
                      "sentence-transformers").split("\n## Load it")[0]
    card += "\n" + load_section(bool(code), sorted(architecture["prompts"]))
    temporary = final.with_name(final.name + ".tmp")
    with written_whole(temporary, final):
        temporary.mkdir(parents=True)
        save_file(decoder, temporary / HF_DECODER_FILE, metadata={"format": "pt"})
        if pooling and code:
            (temporary / "1_NVEmbedPooling").mkdir()
            save_file(pooling, temporary / "1_NVEmbedPooling" / "model.safetensors",
                      metadata={"format": "pt"})
        row_tokenizer(tokenizer, architecture["max_length"]).save_pretrained(str(temporary))
        from transformers import AutoTokenizer
        check_rows(AutoTokenizer.from_pretrained(str(temporary)), tokenizer, final)
        for file, content in files.items():
            (temporary / file).parent.mkdir(parents=True, exist_ok=True)
            (temporary / file).write_text(json.dumps(content, indent=2) + "\n")
        for file, text in {**code, "README.md": card}.items():
            (temporary / file).write_text(text)
    replace_folder(temporary, final)


def load_section(remote_code: bool, prompts: list[str]) -> str:
    """The card's "Load it" for this folder."""
    trust = ", trust_remote_code=True" if remote_code else ""
    why = (f" (trust_remote_code: the pooling is this project's, in {MODULE_FILE}, which imports "
           "torch and sentence-transformers only)") if remote_code else ""
    return (f"## Load it\n\nIn sentence-transformers{why}; its prompts: {', '.join(prompts)}."
            "\n\n```python\nfrom sentence_transformers import SentenceTransformer\n\n"
            f"model = SentenceTransformer(\"path/to/this/folder\"{trust})\n"
            "queries = model.encode_query([\"a question\"])\n"
            "documents = model.encode_document([\"a passage\"])\n"
            "scores = model.similarity(queries, documents)\n```\n\n"
            "The decoder alone (hidden states) loads in transformers >= 5.2: "
            "`AutoModel.from_pretrained(\"path/to/this/folder\")`.\n")


