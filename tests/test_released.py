"""plumbing.loading.from_released against an independent re-implementation of NVIDIA's released
inference code.

The reference below is written from reading `modeling_nvembed.py` of nvidia/NV-Embed-v2 (its
`encode`, `input_transform_func`, `prepare_kwargs_from_batch` and `LatentAttentionModel.forward`):
the tokenizer is called on instruction + text + "</s>" with truncation at max_length, padding is EOS
on the right, the pool mask is the attention mask with its first
len(tokenizer.tokenize(instruction)) positions zeroed (only for an instructed text, right padding
and is_mask_instruction), the decoder is transformers' Mistral without the causal mask, and the
latent block is pre-norm cross-attention to the latents plus a GEGLU feed-forward, both residual,
then the masked mean, L2-normalised when output_normalize is set. The checkpoint is a tiny one in
the released format: sharded safetensors with an index, and a SentencePiece-style BPE tokenizer
built like Mistral's (a "▁" prepended, spaces replaced by "▁", BOS added by the post-processor).
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora import lora_config  # noqa: E402
from model import NVEmbed  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from plumbing.loading import from_base, from_released  # noqa: E402

# what a user of the released model passes
PREFIX = "Instruct: Given a claim, retrieve documents\nQuery: "
CORPUS = ["Instruct: Given a claim, retrieve documents\nQuery: vitamin D lowers the risk of "
          "fractures",
          "Vitamin D is made in the skin. Fractures heal slowly in old age.",
          "The risk of disease falls with exercise and a good diet.",
          "Claims and documents about vitamins."]
# "0 risk" and "xylophone": their first token does not absorb the prefix's final "▁", which the
# released code pools.
QUERIES = ["vitamin D lowers the risk of fractures", "exercise",
           "the risk of disease falls with a good diet " * 4, "0 risk of fractures",
           "xylophone risk"]
DOCUMENTS = ["Vitamin D is made in the skin.", "Fractures heal slowly in old age. " * 5,
             "a good diet"]
# the third query and the second document are longer: the released truncation applies
MAX_LENGTH = 24
HIDDEN, LATENTS, HEADS, HEAD_DIM = 32, 8, 2, 16


def sentencepiece_like_tokenizer(folder: Path):
    """A BPE trained on CORPUS whose merges never cross a word's "▁" (as SentencePiece's), then
    run as Mistral's tokenizer.json runs: no pre-tokenizer, a normalizer that prepends "▁" and
    replaces spaces, BOS prepended."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    core = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                  split=True)
    core.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    core.pre_tokenizer = None
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                            normalizers.Replace(" ", "▁")])
    core.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                        special_tokens=[("<s>", 1)])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                                     bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def released_checkpoint(folder: Path, **config_fields) -> Path:
    """config.json, two safetensors shards with model.safetensors.index.json, and the tokenizer, at
    tiny sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = sentencepiece_like_tokenizer(folder)
    text_config = dict(model_type="bidir_mistral", vocab_size=len(tokenizer), hidden_size=HIDDEN,
                       intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                       rope_theta=10000.0, sliding_window=4096)
    latent_config = dict(model_type="latent_attention", num_latents_value=LATENTS,
                         num_cross_heads=HEADS, cross_dim_head=HEAD_DIM, hidden_dim=HIDDEN,
                         latent_dim=HIDDEN,
                         output_normalize=config_fields.pop("output_normalize", True))
    config = dict(model_type="nvembed", text_config=text_config,
                  latent_attention_config=latent_config, padding_side="right", add_pad_token=True,
                  is_mask_instruction=True, add_eos=True, mask_type="b")
    config.update(config_fields)
    (folder / "config.json").write_text(json.dumps(config))

    generator = torch.Generator().manual_seed(0)
    fields = {k: v for k, v in text_config.items() if k != "model_type"}
    decoder = transformers.MistralModel(transformers.MistralConfig(**fields))
    state = {f"embedding_model.{k}": torch.randn(v.shape, generator=generator) * 0.3
             for k, v in decoder.state_dict().items() if "rotary" not in k}
    inner = HEADS * HEAD_DIM
    latent = {"latents": (LATENTS, HIDDEN),
              "cross_attend_blocks.0.norm.weight": (HIDDEN,),
              "cross_attend_blocks.0.norm.bias": (HIDDEN,),
              "cross_attend_blocks.0.norm_context.weight": (HIDDEN,),
              "cross_attend_blocks.0.norm_context.bias": (HIDDEN,),
              "cross_attend_blocks.0.fn.to_q.weight": (inner, HIDDEN),
              "cross_attend_blocks.0.fn.to_kv.weight": (2 * inner, HIDDEN),
              "cross_attend_blocks.0.fn.to_out.weight": (HIDDEN, inner),
              "cross_attend_blocks.1.norm.weight": (HIDDEN,),
              "cross_attend_blocks.1.norm.bias": (HIDDEN,),
              "cross_attend_blocks.1.fn.net.0.weight": (8 * HIDDEN, HIDDEN),
              "cross_attend_blocks.1.fn.net.0.bias": (8 * HIDDEN,),
              "cross_attend_blocks.1.fn.net.2.weight": (HIDDEN, 4 * HIDDEN),
              "cross_attend_blocks.1.fn.net.2.bias": (HIDDEN,)}
    state |= {f"latent_attention_model.{k}": torch.randn(shape, generator=generator) * 0.3
              for k, shape in latent.items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, folder / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                     "weight_map": weight_map}))
    return folder


# ------------------------------------------------------------------------------------ the reference


def released_features(folder: Path, prompts, instruction: str, max_length: int):
    """input_ids, attention_mask and pool_mask as the released encode() builds them."""
    config = json.loads((folder / "config.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer.pad_token = tokenizer.eos_token  # add_pad_token
    tokenizer.padding_side = config["padding_side"]
    # always_add_eos=True
    texts = [instruction + prompt + tokenizer.eos_token for prompt in prompts]
    batch = tokenizer(texts, max_length=max_length, padding=True, return_token_type_ids=False,
                      return_tensors="pt", truncation=True)
    pool_mask = batch["attention_mask"].clone()
    if config["padding_side"] == "right" and config["is_mask_instruction"] and len(instruction) > 0:
        pool_mask[:, :len(tokenizer.tokenize(instruction))] = 0
    return batch["input_ids"], batch["attention_mask"], pool_mask


def released_embed(folder: Path, prompts, instruction: str, max_length: int) -> torch.Tensor:
    config = json.loads((folder / "config.json").read_text())
    input_ids, attention_mask, pool_mask = released_features(folder, prompts, instruction,
                                                             max_length)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= load_file(file)

    # The decoder: transformers' Mistral with neither a causal mask nor SDPA's is_causal (their
    # BidirectionalMistralModel builds a padding-only 4D mask).
    fields = {k: v for k, v in config["text_config"].items() if k != "model_type"}
    decoder = \
        transformers.MistralModel(transformers.MistralConfig(**fields, attn_implementation="sdpa"))
    decoder.config.is_causal = False
    for layer in decoder.layers:
        layer.self_attn.is_causal = False
    decoder.load_state_dict({k.removeprefix("embedding_model."): v for k, v in state.items()
                             if k.startswith("embedding_model.")}, strict=False)
    hidden = decoder.eval()(input_ids=input_ids,
                            attention_mask=attention_mask).last_hidden_state  # (B, T, D)

    # LatentAttentionModel.forward: hiddens = cross_attn(LN(hiddens), LN(latents)) + hiddens; then
    # hiddens = FF(LN(hiddens)) + hiddens, FF = Linear -> x * gelu(gate) -> Linear.
    w = {k.removeprefix("latent_attention_model."): v for k, v in state.items()
         if k.startswith("latent_attention_model.")}
    latent = config["latent_attention_config"]
    heads = latent["num_cross_heads"]

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"])

    q = F.linear(layer_norm(hidden, "cross_attend_blocks.0.norm"),
                 w["cross_attend_blocks.0.fn.to_q.weight"])
    context = layer_norm(w["latents"], "cross_attend_blocks.0.norm_context")  # (L, D)
    # (L, inner) each
    k, v = F.linear(context, w["cross_attend_blocks.0.fn.to_kv.weight"]).chunk(2, dim=-1)
    B, T, inner = q.shape
    head_dim = inner // heads
    q = q.view(B, T, heads, head_dim).transpose(1, 2)  # (B, H, T, Dh)
    k = k.view(1, -1, heads, head_dim).transpose(1, 2)  # (1, H, L, Dh)
    v = v.view(1, -1, heads, head_dim).transpose(1, 2)
    attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)  # (B, H, T, L)
    out = (attention @ v).transpose(1, 2).reshape(B, T, inner)
    hidden = F.linear(out, w["cross_attend_blocks.0.fn.to_out.weight"]) + hidden
    x, gates = F.linear(layer_norm(hidden, "cross_attend_blocks.1.norm"),
                        w["cross_attend_blocks.1.fn.net.0.weight"],
                        w["cross_attend_blocks.1.fn.net.0.bias"]).chunk(2, dim=-1)
    hidden = F.linear(x * F.gelu(gates), w["cross_attend_blocks.1.fn.net.2.weight"],
                      w["cross_attend_blocks.1.fn.net.2.bias"]) + hidden
    pooled = \
        (hidden * pool_mask.unsqueeze(-1).float()).sum(1) / pool_mask.sum(1, keepdim=True).float()
    return F.normalize(pooled, p=2, dim=-1) if latent["output_normalize"] else pooled


# ---------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return released_checkpoint(tmp_path_factory.mktemp("released") / "nv-embed-tiny")


def ours(model: NVEmbed, prompts, task: str):
    batch = model.tokenize(prompts, task)
    return batch["input_ids"], batch["attention_mask"], batch["pool_mask"].long()


def test_the_checkpoint_is_mistral_like(checkpoint):
    """The cases that matter exist: the prefix alone ends in a lone "▁" that the joined text
    merges away, or, for a text whose first token cannot take it, keeps."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    assert tokenizer.tokenize(PREFIX)[-1] == "▁"
    assert "▁" not in tokenizer.tokenize(PREFIX + QUERIES[0])
    assert "▁" in tokenizer.tokenize(PREFIX + QUERIES[3]) and \
        "▁" in tokenizer.tokenize(PREFIX + QUERIES[4])
    assert tokenizer.encode("a", add_special_tokens=True)[0] == tokenizer.bos_token_id
    assert len(json.loads((checkpoint / "model.safetensors.index.json")
                          .read_text())["weight_map"]) > 0


@pytest.mark.parametrize("side", ["queries", "documents"])
def test_released_ids_masks_and_embeddings(checkpoint, side):
    model = from_released(checkpoint, max_length=MAX_LENGTH)
    task = "Given a claim, retrieve documents"
    prompts, prefix, instruction = (QUERIES, PREFIX, task) if side == "queries" \
        else (DOCUMENTS, "", "")
    expected = released_features(checkpoint, prompts, prefix, MAX_LENGTH)
    got = ours(model, prompts, instruction)
    for name, e, g in zip(("input_ids", "attention_mask", "pool_mask"), expected, got):
        assert g.tolist() == e.tolist(), name
    # a row was truncated (and lost its EOS), as released
    assert expected[1].sum(1).max() == MAX_LENGTH
    if side == "documents":
        # the released rule: a text without instruction pools its BOS
        assert (got[2][:, 0] == 1).all()
    torch.testing.assert_close(model.encode(prompts, instruction=instruction, batch_size=2,
                                            convert_to_tensor=True),
                               released_embed(checkpoint, prompts, prefix, MAX_LENGTH), atol=1e-5,
                               rtol=1e-4)


def test_released_default_max_length_is_their_encodes(checkpoint):
    assert from_released(checkpoint).max_length == 4096


@pytest.mark.parametrize("fields", [dict(is_mask_instruction=False), dict(output_normalize=False)])
def test_released_config_fields(tmp_path, fields):
    folder = released_checkpoint(tmp_path / "ckpt", **dict(fields))
    model = from_released(folder, max_length=MAX_LENGTH)
    task = "Given a claim, retrieve documents"
    for prompts, prefix, instruction in ((QUERIES, PREFIX, task), (DOCUMENTS, "", "")):
        assert ours(model, prompts, instruction)[2].tolist() == \
            released_features(folder, prompts, prefix, MAX_LENGTH)[2].tolist()
        torch.testing.assert_close(model.encode(prompts, instruction=instruction,
                                                convert_to_tensor=True),
                                   released_embed(folder, prompts, prefix, MAX_LENGTH), atol=1e-5,
                                   rtol=1e-4)


def test_released_left_padding_is_refused(tmp_path):
    folder = released_checkpoint(tmp_path / "ckpt", padding_side="left")
    with pytest.raises(ValueError, match="padding_side 'left' is not supported"):
        from_released(folder)


def test_released_rule_is_saved_with_the_model(checkpoint, tmp_path):
    model = from_released(checkpoint, max_length=MAX_LENGTH)
    model.save(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["text_rule"]["pool_bos"] == "without_instruction" and \
        config["text_rule"]["truncation"] == "sequence"
    again = NVEmbed.load(tmp_path / "saved")
    assert again.text_rule == model.text_rule
    torch.testing.assert_close(again.encode(DOCUMENTS, convert_to_tensor=True),
                               model.encode(DOCUMENTS, convert_to_tensor=True))


def test_released_layout_round_trip(checkpoint, tmp_path):
    """save(layout="released") writes what from_released, and the released code's computation, read
    back."""
    model = from_released(checkpoint, max_length=MAX_LENGTH)
    model.save(tmp_path / "again", layout="released")
    again = from_released(tmp_path / "again", max_length=MAX_LENGTH)
    task = "Given a claim, retrieve documents"
    for prompts, prefix, instruction in ((QUERIES, PREFIX, task), (DOCUMENTS, "", "")):
        expected = model.encode(prompts, instruction=instruction, convert_to_tensor=True)
        assert torch.equal(again.encode(prompts, instruction=instruction, convert_to_tensor=True),
                           expected)
        torch.testing.assert_close(released_embed(tmp_path / "again", prompts, prefix, MAX_LENGTH),
                                   expected, atol=1e-5, rtol=1e-4)


def test_released_layout_folds_lora_and_warns_of_the_input_rule(tmp_path, caplog):
    from lora import apply_lora

    model = from_base("tiny", pooling="latent",
                      pooling_kwargs=dict(num_latents=8, head_dim=8)).eval()
    apply_lora(model.decoder, rank=4, alpha=8, dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    with caplog.at_level("WARNING"):
        model.save(tmp_path / "released", layout="released")
    assert "released input rule" in caplog.text
    loaded = from_released(tmp_path / "released", max_length=model.max_length)
    assert lora_config(loaded.decoder) is None
    # the same inputs; the weights differ only by the fold's rounding
    model.text_rule = loaded.text_rule
    torch.testing.assert_close(loaded.encode(DOCUMENTS, convert_to_tensor=True),
                               model.encode(DOCUMENTS, convert_to_tensor=True), atol=1e-5,
                               rtol=1e-4)
    with pytest.raises(Exception, match="latent-attention pooling only"):
        from_base("tiny", pooling="mean").save(tmp_path / "mean", layout="released")


def test_every_command_takes_a_released_folder(checkpoint, tmp_path):
    """evaluate.py --model, mine.py --model (also on a copy with NV-Embed-v2's modules.json) and
    train.py --init-from read NVIDIA's layout as from_released does."""
    import shutil

    import mine
    import train
    import evaluate

    metrics = evaluate.main(["--model", str(checkpoint), "--out", str(tmp_path / "eval"),
                             "--max-length", "96"])
    assert 0.0 <= metrics["NDCG@10"] <= 1.0
    copy = tmp_path / "NV-Embed-v2"
    shutil.copytree(checkpoint, copy)
    (copy / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    for model in (checkpoint, copy):
        out = tmp_path / f"mined-{model.name}.jsonl"
        _, stats = mine.main(["--model", str(model), "--out", str(out), "--top-k", "3",
                              "--max-length", "96"])
        # a random teacher may keep no negative
        assert stats["model"] == str(model) and out.is_file()
    summary = train.main(["--stage", "2", "--init-from", str(checkpoint), "--steps", "2",
                          "--batch-size", "4", "--warmup-steps", "1", "--lora-rank", "4",
                          "--max-length", "96", "--hard-negatives", "1", "--out",
                          str(tmp_path / "stage2"), "--no-eval", "--no-progress"])
    trained = NVEmbed.load(summary["model"])
    assert trained.pooling_name == "latent" and not trained.causal
    assert lora_config(trained.decoder)["rank"] == 4
    with pytest.raises(SystemExit):  # a released model keeps its pooling
        evaluate.main(["--model", str(checkpoint), "--pooling", "mean", "--out",
                       str(tmp_path / "e2")])
