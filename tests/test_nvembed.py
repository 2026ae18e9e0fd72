"""NVEmbed: encode's masking, padding and order; save / reload; released-name loading."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from plumbing.base_checkpoints import ByteTokenizer, load_tokenizer
from lora import apply_lora
from model import Mistral, MistralConfig, NVEmbed
from plumbing.released import RELEASED_LATENT_NAMES
from pooling import LatentAttentionPooling
from tests.helpers import smollm2_gguf
from plumbing.loading import from_base, from_released

TEXTS = ["a short one", "a much longer text that needs padding in the batch", "mid-sized text",
         "x", "the quick brown fox jumps over the lazy dog " * 3]


def tiny(pooling="latent", causal=False, **kw):
    kwargs = dict(num_latents=16) if pooling == "latent" else {}
    return from_base("tiny", pooling=pooling, causal=causal, pooling_kwargs=kwargs, **kw).eval()


@pytest.mark.parametrize("pooling", ["latent", "mean", "eos", "self-attention"])
def test_same_text_same_embedding_whatever_the_batch(pooling):
    model = tiny(pooling)
    alone = torch.cat([model.encode([t], convert_to_tensor=True) for t in TEXTS])
    batched = model.encode(TEXTS, batch_size=len(TEXTS), convert_to_tensor=True)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(TEXTS)))
    # Left padding gives the same embeddings as right padding.
    with torch.no_grad():
        right = model(model.tokenize(TEXTS, padding_side="right"))
        left = model(model.tokenize(TEXTS, padding_side="left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


def test_encode_keeps_input_order_and_batches_by_length():
    model = tiny("mean")
    full = model.encode(TEXTS, batch_size=2, convert_to_tensor=True)
    perm = [3, 0, 4, 2, 1]
    torch.testing.assert_close(model.encode([TEXTS[i] for i in perm], batch_size=2,
                                            convert_to_tensor=True), full[perm])
    assert not torch.allclose(full[0], full[1])


@pytest.mark.parametrize("instruction", ["", "Find the passage"])
def test_encode_tokenizes_each_text_once(monkeypatch, instruction):
    """Every text goes through the tokenizer once, alone or after its prefix: sorting by length and
    embedding use the same ids (issue 29: encode tokenized twice)."""
    model = tiny("mean")
    calls, encode = [], model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode",
                        lambda text, add_special_tokens=False: calls.append(text)
                        or encode(text, add_special_tokens))
    prefix = model.text_rule.template.format(instruction=instruction) if instruction else ""
    model.encode(TEXTS, instruction=instruction, batch_size=2)
    assert sorted(c for c in calls if c.endswith(tuple(TEXTS))) == sorted(prefix + t for t in TEXTS)
    assert model.batches(TEXTS, 2, instruction) == [[4, 1], [2, 0], [3]]  # longest first, full


def test_instruction_changes_query_but_is_not_pooled():
    model = tiny("mean")
    with_instruction = model.encode(["what is a fox"],
                                    instruction="Given a question, find the answer",
                                    convert_to_tensor=True)
    without = model.encode(["what is a fox"], convert_to_tensor=True)
    assert not torch.allclose(with_instruction, without)  # attended to (bidirectional) ...
    batch = model.tokenize(["what is a fox"], instruction="Given a question, find the answer")
    pooled_ids = batch["input_ids"][batch["pool_mask"]].tolist()
    # ... not pooled
    assert pooled_ids == model.tokenizer.encode("what is a fox") + [model.tokenizer.eos_token_id]


def test_pool_mask_is_exactly_text_and_eos_with_real_bpe():
    gguf = smollm2_gguf()
    tokenizer = load_tokenizer(str(gguf))
    decoder = Mistral(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1))
    model = NVEmbed(decoder, LatentAttentionPooling(32, num_latents=4), tokenizer, "latent")
    instruction, text = "Given a claim, retrieve evidence", "vitamin-D deficiency raises risk"
    batch = model.tokenize([text, "ok"], instruction=instruction)
    pooled = batch["input_ids"][0][batch["pool_mask"][0]].tolist()
    # Byte-level BPE: the text's first token carries the boundary's space ("Ġvitamin"), as in the
    # joined string.
    assert pooled == \
        tokenizer.encode(" " + text, add_special_tokens=False) + [tokenizer.eos_token_id]
    model.encode([text, "ok"], instruction=instruction)  # runs end to end with the real tokenizer


def test_sentence_transformers_style_script_runs_unchanged():
    # As NV-Embed-v2's model card calls sentence-transformers: the whole query prefix as `prompt`,
    # numpy out.
    model = tiny("mean")
    query_prefix = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
    queries = ["are judo throws allowed in wrestling?", "how to become a radiology technician?"]
    passages = ["Judo throws are allowed in freestyle wrestling.",
                "Radiology technicians need a degree.", ""]
    query_embeddings = model.encode(queries, prompt=query_prefix, batch_size=1,
                                    normalize_embeddings=True)
    passage_embeddings = model.encode(passages, batch_size=2, normalize_embeddings=True,
                                      show_progress_bar=False)
    scores = (query_embeddings @ passage_embeddings.T) * 100
    assert isinstance(scores, np.ndarray) and scores.shape == (2, 3) and \
        query_embeddings.dtype == np.float32
    one = model.encode(queries[0], prompt=query_prefix)  # a single string -> (D,)
    assert isinstance(one, np.ndarray) and one.shape == (model.decoder.config.hidden_size,)
    np.testing.assert_allclose(one, query_embeddings[0], atol=1e-6, rtol=0)

    # prompt= is the template filled in: the same ids, so exactly the same vectors as instruction=.
    task = "Given a question, retrieve passages that answer the question"
    np.testing.assert_array_equal(model.encode(queries, instruction=task),
                                  model.encode(queries, prompt=query_prefix))
    # Any other prefix is read as given and kept out of the pool like an instruction.
    batch = model.tokenize(["ab"], prompt="query: ")
    assert batch["input_ids"][0][batch["pool_mask"][0]].tolist() == \
        [97, 98, model.tokenizer.eos_token_id]

    # An empty text is embedded: by hand, the mean pooling of BOS EOS pools EOS alone.
    bos, eos = model.tokenizer.bos_token_id, model.tokenizer.eos_token_id
    hidden = model.decoder(torch.tensor([[bos, eos]]))  # (1, 2, D)
    by_hand = F.normalize(hidden[0, 1], dim=-1)
    torch.testing.assert_close(model.encode("", convert_to_tensor=True), by_hand.detach(),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(passage_embeddings[2], by_hand.detach().numpy(), atol=1e-6, rtol=0)

    # Neither numpy nor tensor: a list of (D,) tensors, as sentence-transformers gives.
    as_list = model.encode(queries, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 2 and as_list[0].shape == one.shape
    with pytest.raises(ValueError, match="not both"):
        model.encode(queries, prompt=query_prefix, instruction=task)
    with pytest.raises(TypeError, match="string or a list of strings"):
        model.encode(["a", None])


def test_truncation_is_a_logged_warning(caplog):
    model = tiny("mean")
    with caplog.at_level(logging.WARNING, logger="nvembed"):
        model.encode(["a" * 40, "b"], max_length=10)
    assert [r.getMessage() for r in caplog.records] == [
        "encode: 1 of 2 texts were longer than 10 tokens and were truncated"]
    assert caplog.records[0].name == "nvembed.model" and caplog.records[0].levelname == "WARNING"


def test_normalize_embeddings_normalises_an_unnormalised_model():
    model = from_base("tiny", pooling="mean", normalize=False).eval()
    raw = model.encode(TEXTS, convert_to_tensor=True)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(TEXTS)))
    unit = model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True))


def test_embeddings_are_normalised_in_fp32():
    model = tiny("mean", dtype=torch.bfloat16)
    embeddings = model.encode(TEXTS, convert_to_tensor=True)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling", ["latent", "eos"])
def test_save_and_reload_identical(tmp_path, pooling):
    model = tiny(pooling, causal=pooling == "eos")
    before = model.encode(TEXTS, instruction="find it", convert_to_tensor=True)
    model.save(tmp_path / "m")
    loaded = NVEmbed.load(tmp_path / "m")
    assert loaded.causal == model.causal and loaded.pooling_name == pooling
    torch.testing.assert_close(loaded.encode(TEXTS, instruction="find it", convert_to_tensor=True),
                               before, atol=0, rtol=0)
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        model.save(tmp_path / "m")


def test_lora_on_a_checkpoint_saves_adapters_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = MistralConfig.preset("tiny")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in cfg.__dict__.items() if k != "sliding_window"}))
    hf.save_pretrained(tmp_path / "base")
    ByteTokenizer().save_pretrained(str(tmp_path / "base"))
    model = from_base(str(tmp_path / "base"), pooling="mean")
    apply_lora(model.decoder, rank=4, alpha=8, dropout=0.0)
    for name, p in model.decoder.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    before = model.eval().encode(TEXTS, convert_to_tensor=True)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "adapters.safetensors").is_file()
    assert not (tmp_path / "m" / "decoder.safetensors").exists()
    loaded = NVEmbed.load(tmp_path / "m")
    torch.testing.assert_close(loaded.encode(TEXTS, convert_to_tensor=True), before, atol=1e-6,
                               rtol=1e-6)
    # The same in bf16: the fingerprint of the base does not depend on the dtype it is loaded in.
    NVEmbed.load(tmp_path / "m", dtype=torch.bfloat16)
    # Another checkpoint of the same shape in the base's place is refused, not silently used.
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(hf.config).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError,
                       match="holds other weights than the ones these adapters were trained on"):
        NVEmbed.load(tmp_path / "m")


def test_run_folder_with_its_base_moves_whole(tmp_path):
    """A base inside the run folder is recorded relative to the model: the whole run folder can
    move. A base outside it is recorded as given; a missing base is one error naming the recorded
    path."""
    transformers = pytest.importorskip("transformers")
    cfg = MistralConfig.preset("tiny")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in cfg.__dict__.items() if k not in ("sliding_window", "rope_scaling")}))
    run = tmp_path / "run"
    hf.save_pretrained(run / "base")
    ByteTokenizer().save_pretrained(str(run / "base"))
    model = from_base(str(run / "base"), pooling="mean")
    apply_lora(model.decoder, rank=4, alpha=8, dropout=0.0)
    before = model.eval().encode(TEXTS, convert_to_tensor=True)
    model.save(run / "model",
               training=dict(data=["train.jsonl"], steps=7, metrics={"NDCG@10": 0.5}))
    config = json.loads((run / "model" / "config.json").read_text())
    assert (config["base"], config["base_relative"]) == ("../base", True)
    card = (run / "model" / "README.md").read_text()
    for expected in ("| base |", "| pooling | mean", "bidirectional", "train.jsonl",
                     "| steps | 7 |", "NDCG@10 0.5000", config["fingerprint"], "NVEmbed.load("):
        assert expected in card, expected
    (run).rename(tmp_path / "moved")
    loaded = NVEmbed.load(tmp_path / "moved" / "model")
    torch.testing.assert_close(loaded.encode(TEXTS, convert_to_tensor=True), before)

    # A base outside the run folder: recorded as given; once gone, named in a one-line error.
    outside = tmp_path / "moved" / "base"
    model = from_base(str(outside), pooling="mean")
    apply_lora(model.decoder, rank=4, alpha=8, dropout=0.0)
    model.save(tmp_path / "other" / "model")
    assert json.loads((tmp_path / "other" / "model" / "config.json").read_text())["base"] == \
        str(outside)
    outside.rename(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=f"base checkpoint '{outside}' is not found"):
        NVEmbed.load(tmp_path / "other" / "model")


def test_from_pretrained_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        NVEmbed.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="not an NV-Embed model"):
        NVEmbed.load(tmp_path)


# --- released NV-Embed-v1/v2 names ------------------------------------------------


def released_folder(tmp_path, drop=None, misshape=None):
    """A synthetic NVIDIA-style checkpoint folder at tiny sizes, with the released names."""
    cfg = MistralConfig.preset("tiny")
    torch.manual_seed(0)
    decoder = Mistral(cfg)
    pooling = LatentAttentionPooling(cfg.hidden_size, num_latents=8, num_heads=2, head_dim=16)
    for p in pooling.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours_to_released = {v: k for k, v in RELEASED_LATENT_NAMES.items()}
    state = {f"embedding_model.{k}": v for k, v in decoder.state_dict().items()}
    state |= {f"latent_attention_model.{ours_to_released[k]}": v
              for k, v in pooling.state_dict().items()}
    if drop:
        state.pop(drop)
    if misshape:
        state[misshape] = torch.zeros(2, 2)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    text_config = {k: v for k, v in cfg.__dict__.items() if k != "sliding_window"}
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "nvembed",
        "text_config": {**text_config, "model_type": "bidir_mistral"},
        "latent_attention_config": {"num_latents_value": 8, "num_cross_heads": 2,
                                    "cross_dim_head": 16},
    }))
    ByteTokenizer().save_pretrained(str(tmp_path))
    return NVEmbed(decoder, pooling, ByteTokenizer(), "latent").eval()


def test_released_names_load(tmp_path):
    reference = released_folder(tmp_path)
    loaded = from_released(tmp_path)
    # the released input rule (tests/test_released.py); here: the names
    reference.text_rule = loaded.text_rule
    torch.testing.assert_close(loaded.encode(TEXTS, instruction="q", convert_to_tensor=True),
                               reference.encode(TEXTS, instruction="q", convert_to_tensor=True))


def test_released_names_refuse_missing_or_misshapen(tmp_path):
    released_folder(tmp_path, drop="latent_attention_model.cross_attend_blocks.0.fn.to_kv.weight")
    with pytest.raises(KeyError, match="to_kv.weight"):
        from_released(tmp_path)
    released_folder(tmp_path, misshape="latent_attention_model.latents")
    with pytest.raises(ValueError, match="latents"):
        from_released(tmp_path)
    released_folder(tmp_path, misshape="embedding_model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"wrongly shaped tensors.*layers.1.mlp.up_proj.weight"):
        from_released(tmp_path)


def test_bf16_base_with_fp32_adapters_and_pooling_encodes():
    """What train.py builds for LoRA in bf16 (trainable weights fp32 over a bf16 base) encodes
    outside autocast, as train.py's evaluation before training does, and agrees with an all-fp32
    copy."""
    model = tiny("latent", dtype=torch.bfloat16)
    apply_lora(model.decoder, rank=4, alpha=8, dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_" in name or name.startswith("pooling."):
            param.data = param.data.float()
            torch.nn.init.normal_(param, std=0.05)
    mixed = model.encode(TEXTS, convert_to_tensor=True)
    full = model.float().encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(mixed, full, atol=3e-2, rtol=0)


def test_encode_keeps_a_pooling_of_another_width():
    """bench/ablate.py pools four ways at once and concatenates them: encode must keep that
    width."""
    class TwoMeans(torch.nn.Module):
        def forward(self, hidden, pool_mask):
            mean = (hidden * pool_mask[..., None]).sum(1) / pool_mask.sum(1, keepdim=True)
            return torch.cat([mean, -mean], dim=-1)  # (B, 2D)

    model = tiny("mean")
    model.pooling = TwoMeans()
    embeddings = model.encode(TEXTS, batch_size=2, convert_to_tensor=True)
    assert embeddings.shape == (len(TEXTS), 2 * model.decoder.config.hidden_size)
