"""NVEmbed: encode's masking, padding and order; save / reload; released-name loading."""

import json

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import ByteTokenizer, load_tokenizer
from lora import apply_lora
from model import Mistral, MistralConfig, NVEmbed
from checkpoints import RELEASED_LATENT_NAMES
from pooling import LatentAttentionPooling
from tests.helpers import smollm2_gguf

TEXTS = ["a short one", "a much longer text that needs padding in the batch", "mid-sized text",
         "x", "the quick brown fox jumps over the lazy dog " * 3]


def tiny(pooling="latent", causal=False, **kw):
    kwargs = dict(num_latents=16) if pooling == "latent" else {}
    return NVEmbed.from_base("tiny", pooling=pooling, causal=causal, pooling_kwargs=kwargs, **kw).eval()


@pytest.mark.parametrize("pooling", ["latent", "mean", "eos", "self-attention"])
def test_same_text_same_embedding_whatever_the_batch(pooling):
    model = tiny(pooling)
    alone = torch.cat([model.encode([t]) for t in TEXTS])
    batched = model.encode(TEXTS, batch_size=len(TEXTS))
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
    full = model.encode(TEXTS, batch_size=2)
    perm = [3, 0, 4, 2, 1]
    torch.testing.assert_close(model.encode([TEXTS[i] for i in perm], batch_size=2), full[perm])
    assert not torch.allclose(full[0], full[1])


def test_instruction_changes_query_but_is_not_pooled():
    model = tiny("mean")
    with_instruction = model.encode(["what is a fox"], instruction="Given a question, find the answer")
    without = model.encode(["what is a fox"])
    assert not torch.allclose(with_instruction, without)  # attended to (bidirectional) ...
    batch = model.tokenize(["what is a fox"], instruction="Given a question, find the answer")
    pooled_ids = batch["input_ids"][batch["pool_mask"]].tolist()
    assert pooled_ids == model.tokenizer.encode("what is a fox") + [model.tokenizer.eos_token_id]  # ... not pooled


def test_pool_mask_is_exactly_text_and_eos_with_real_bpe():
    gguf = smollm2_gguf()
    tokenizer = load_tokenizer(str(gguf))
    decoder = Mistral(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model = NVEmbed(decoder, LatentAttentionPooling(32, num_latents=4), tokenizer, "latent")
    instruction, text = "Given a claim, retrieve evidence", "vitamin-D deficiency raises risk"
    batch = model.tokenize([text, "ok"], instruction=instruction)
    pooled = batch["input_ids"][0][batch["pool_mask"][0]].tolist()
    # Byte-level BPE: the text's first token carries the boundary's space ("Ġvitamin"), as in the joined string.
    assert pooled == tokenizer.encode(" " + text, add_special_tokens=False) + [tokenizer.eos_token_id]
    model.encode([text, "ok"], instruction=instruction)  # runs end to end with the real tokenizer


def test_encode_errors_name_the_callers_index():
    # encode sorts texts by length before tokenizing; the error must still name the caller's position.
    with pytest.raises(ValueError, match="text 0 is empty"):
        tiny("mean").encode(["", "beta"])


def test_embeddings_are_normalised_in_fp32():
    model = tiny("mean", dtype=torch.bfloat16)
    embeddings = model.encode(TEXTS)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pooling", ["latent", "eos"])
def test_save_and_reload_identical(tmp_path, pooling):
    model = tiny(pooling, causal=pooling == "eos")
    before = model.encode(TEXTS, instruction="find it")
    model.save(tmp_path / "m")
    loaded = NVEmbed.from_pretrained(tmp_path / "m")
    assert loaded.causal == model.causal and loaded.pooling_name == pooling
    torch.testing.assert_close(loaded.encode(TEXTS, instruction="find it"), before, atol=0, rtol=0)
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        model.save(tmp_path / "m")


def test_lora_on_a_checkpoint_saves_adapters_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = MistralConfig.preset("tiny")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in cfg.__dict__.items() if k != "sliding_window"}))
    hf.save_pretrained(tmp_path / "base")
    ByteTokenizer().save_pretrained(str(tmp_path / "base"))
    model = NVEmbed.from_base(str(tmp_path / "base"), pooling="mean")
    apply_lora(model.decoder, rank=4, alpha=8, dropout=0.0)
    for name, p in model.decoder.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    before = model.eval().encode(TEXTS)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "adapters.safetensors").is_file()
    assert not (tmp_path / "m" / "decoder.safetensors").exists()
    loaded = NVEmbed.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded.encode(TEXTS), before, atol=1e-6, rtol=1e-6)
    # The same in bf16: the fingerprint of the base does not depend on the dtype it is loaded in.
    NVEmbed.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    # Another checkpoint of the same shape in the base's place is refused, not silently used.
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(hf.config).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="holds other weights than the ones these adapters were trained on"):
        NVEmbed.from_pretrained(tmp_path / "m")


def test_from_pretrained_refuses_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        NVEmbed.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(ValueError, match="not an NV-Embed model"):
        NVEmbed.from_pretrained(tmp_path)


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
    state |= {f"latent_attention_model.{ours_to_released[k]}": v for k, v in pooling.state_dict().items()}
    if drop:
        state.pop(drop)
    if misshape:
        state[misshape] = torch.zeros(2, 2)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    text_config = {k: v for k, v in cfg.__dict__.items() if k != "sliding_window"}
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "nvembed",
        "text_config": {**text_config, "model_type": "bidir_mistral"},
        "latent_attention_config": {"num_latents_value": 8, "num_cross_heads": 2, "cross_dim_head": 16},
    }))
    ByteTokenizer().save_pretrained(str(tmp_path))
    return NVEmbed(decoder, pooling, ByteTokenizer(), "latent").eval()


def test_released_names_load(tmp_path):
    reference = released_folder(tmp_path)
    loaded = NVEmbed.from_released(tmp_path)
    torch.testing.assert_close(loaded.encode(TEXTS, instruction="q"), reference.encode(TEXTS, instruction="q"))


def test_released_names_refuse_missing_or_misshapen(tmp_path):
    released_folder(tmp_path, drop="latent_attention_model.cross_attend_blocks.0.fn.to_kv.weight")
    with pytest.raises(KeyError, match="to_kv.weight"):
        NVEmbed.from_released(tmp_path)
    released_folder(tmp_path, misshape="latent_attention_model.latents")
    with pytest.raises(ValueError, match="latents"):
        NVEmbed.from_released(tmp_path)
    released_folder(tmp_path, misshape="embedding_model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"wrongly shaped tensors.*layers.1.mlp.up_proj.weight"):
        NVEmbed.from_released(tmp_path)


def test_bf16_base_with_fp32_adapters_and_pooling_encodes():
    """What train.py builds for LoRA in bf16 (trainable weights fp32 over a bf16 base) encodes outside autocast,
    as train.py's evaluation before training does, and agrees with an all-fp32 copy."""
    model = tiny("latent", dtype=torch.bfloat16)
    apply_lora(model.decoder, rank=4, alpha=8, dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_" in name or name.startswith("pooling."):
            param.data = param.data.float()
            torch.nn.init.normal_(param, std=0.05)
    mixed = model.encode(TEXTS)
    full = model.float().encode(TEXTS)
    torch.testing.assert_close(mixed, full, atol=3e-2, rtol=0)
