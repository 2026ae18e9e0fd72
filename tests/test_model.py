"""model.py against transformers' MistralModel / LlamaModel (the independent reference)."""

import json

import pytest
import torch
import torch.nn as nn

from plumbing.base_checkpoints import load_checked
from model import Mistral, MistralConfig
from tests.helpers import smollm2_gguf

transformers = pytest.importorskip("transformers")


def tiny_config(family: str, seed: int) -> MistralConfig:
    g = torch.Generator().manual_seed(seed)
    kv = int(torch.randint(1, 3, (1,), generator=g))  # 1 or 2 KV heads
    heads = kv * int(torch.randint(2, 4, (1,), generator=g))  # GQA: 2-3 query heads per KV head
    return MistralConfig(
        vocab_size=97, hidden_size=heads * 8, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=[10000.0, 500.0][seed % 2],
        sliding_window=(5 if family == "mistral" else None),
    )


def hf_model(family: str, cfg: MistralConfig, causal: bool = True):
    fields = {k: v for k, v in cfg.__dict__.items() if k != "sliding_window" or family == "mistral"}
    if family == "mistral":
        hf_cfg = transformers.MistralConfig(**fields, attn_implementation="sdpa")
        model = transformers.MistralModel(hf_cfg)
    else:
        hf_cfg = transformers.LlamaConfig(**fields, attn_implementation="sdpa")
        model = transformers.LlamaModel(hf_cfg)
    if not causal:
        # Both the mask and SDPA's is_causal flag must say "bidirectional" (PAPER.md section 1).
        model.config.is_causal = False
        for layer in model.layers:
            layer.self_attn.is_causal = False
    torch.manual_seed(0)
    for p in model.parameters():  # norms start at 1: randomise them too
        nn.init.normal_(p, std=0.3)
    return model.eval()


def ours_from(hf) -> Mistral:
    cfg = MistralConfig.from_hf(hf.config.to_dict())
    model = Mistral(cfg).eval()
    model.load_state_dict(hf.state_dict(), strict=True)  # same names, no conversion
    return model


def batch(pad_side: str | None, vocab: int = 97, T: int = 12):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, T))
    mask = torch.ones_like(ids)
    if pad_side is not None:
        for row, n_pad in enumerate([0, 3, 7]):
            if n_pad:
                if pad_side == "right":
                    mask[row, -n_pad:] = 0
                else:
                    mask[row, :n_pad] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["mistral", "llama"])
@pytest.mark.parametrize("pad_side", [None, "right", "left"])
@pytest.mark.parametrize("seed", [0, 1])
def test_causal_matches_hf(family, pad_side, seed):
    hf = hf_model(family, tiny_config(family, seed))
    ours = ours_from(hf)
    ids, mask = batch(pad_side)
    # HF counts positions from the first column; give it ours (from the first real token).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        got = ours(ids, mask, causal=True)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "llama"])
@pytest.mark.parametrize("pad_side", [None, "right", "left"])
def test_bidirectional_matches_hf_is_causal_false(family, pad_side):
    cfg = tiny_config(family, 0)
    if family == "mistral":
        # Ours ignores the sliding window when bidirectional (NV-Embed attends to the whole
        # text); compare where the window covers the whole input.
        cfg.sliding_window = 32
    hf = hf_model(family, cfg, causal=False)
    ours = ours_from(hf)
    ids, mask = batch(pad_side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        got = ours(ids, mask, causal=False)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


# Llama 3.1's RoPE: head_dim 8 and theta 500 give wavelengths of about 6, 30, 140 and 660
# positions; against an original context of 16 with low / high factors 0.25 / 2, the first
# frequency is kept, the second interpolated and the last two divided by `factor`: every branch.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.25,
               "high_freq_factor": 2.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])  # transformers 5.x, 4.x
@pytest.mark.parametrize("causal", [True, False])
def test_llama3_rope_matches_hf(key, causal):
    cfg = tiny_config("llama", 1)  # rope_theta 500
    plain = ours_from(hf_model("llama", cfg, causal=causal))
    fields = {k: v for k, v in cfg.__dict__.items()
              if k not in ("sliding_window", "rope_scaling", "rope_theta")}
    hf = transformers.LlamaModel(transformers.LlamaConfig(
        **fields, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500.0}, attn_implementation="sdpa"))
    hf.load_state_dict(plain.state_dict())
    if not causal:
        hf.config.is_causal = False
        for layer in hf.layers:
            layer.self_attn.is_causal = False
    # The config.json either era writes: the scaling beside rope_theta, or under its own key.
    if key == "rope_parameters":
        config = {**fields, "model_type": "llama", key: {**LLAMA3_ROPE, "rope_theta": 500.0}}
    else:
        config = {**fields, "model_type": "llama", "rope_theta": 500.0, key: LLAMA3_ROPE}
    ours = Mistral(MistralConfig.from_hf(config)).eval()
    assert ours.config.rope_scaling == LLAMA3_ROPE and ours.config.rope_theta == 500.0
    ours.load_state_dict(plain.state_dict())
    ids, mask = batch("right", T=60)  # positions up to 59: well past the original 16
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf.eval()(input_ids=ids, attention_mask=mask, position_ids=positions)
        got, unscaled = ours(ids, mask, causal=causal), plain(ids, mask, causal=causal)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    assert (got[real] - unscaled[real]).abs().max() > 1e-2  # plain RoPE: a different model


def test_bidirectional_is_real():
    torch.manual_seed(0)
    model = Mistral(MistralConfig.preset("tiny")).eval()
    ids = torch.randint(0, 300, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 300
    with torch.no_grad():
        first_bi = model(ids, causal=False)[0, 0], model(changed, causal=False)[0, 0]
        first_causal = model(ids, causal=True)[0, 0], model(changed, causal=True)[0, 0]
    assert not torch.allclose(*first_bi)
    torch.testing.assert_close(*first_causal, atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_padding_does_not_change_real_tokens(causal, pad_side):
    torch.manual_seed(0)
    model = Mistral(MistralConfig.preset("tiny")).eval()
    ids = torch.randint(0, 300, (1, 7))
    pad = torch.zeros(1, 5, dtype=torch.long)
    padded = torch.cat([ids, pad], 1) if pad_side == "right" else torch.cat([pad, ids], 1)
    mask = (torch.arange(12) < 7) if pad_side == "right" else (torch.arange(12) >= 5)
    with torch.no_grad():
        alone = model(ids, causal=causal)[0]
        in_padding = model(padded, mask[None].long(), causal=causal)[0, mask]
    torch.testing.assert_close(in_padding, alone, atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_causal_context():
    cfg = MistralConfig.preset("tiny")
    cfg.sliding_window = 3
    torch.manual_seed(0)
    model = Mistral(cfg).eval()
    ids = torch.randint(0, 300, (1, 8))
    changed = ids.clone()
    changed[0, 0] += 1
    with torch.no_grad():
        a, b = model(ids, causal=True)[0], model(changed, causal=True)[0]
    # Token 0 reaches token i directly only if i - 0 < 3; through 2 layers, up to i = 4.
    assert not torch.allclose(a[4], b[4])
    torch.testing.assert_close(a[5:], b[5:], atol=0, rtol=0)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = Mistral(MistralConfig.preset("tiny"))
    ids = torch.randint(0, 300, (2, 9))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(ids).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


# --- loading checkpoints -----------------------------------------------------


def save_hf_checkpoint(hf_causal_lm, folder, max_shard_size=None):
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf_causal_lm.save_pretrained(folder, safe_serialization=True, **kwargs)


@pytest.mark.parametrize("sharded", [False, True])
def test_from_pretrained_directory(tmp_path, sharded):
    cfg = tiny_config("mistral", 0)
    hf_cfg = transformers.MistralConfig(**cfg.__dict__)
    torch.manual_seed(0)
    lm = transformers.MistralForCausalLM(hf_cfg).eval()
    save_hf_checkpoint(lm, tmp_path, "20KB" if sharded else None)
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Mistral.from_pretrained(tmp_path)
    ids, mask = batch("right")
    with torch.no_grad():
        expected = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask, causal=True)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_from_pretrained_refuses_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_config("llama", 0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in cfg.__dict__.items() if k != "sliding_window"}))
    lm.save_pretrained(tmp_path, safe_serialization=True)
    weights = load_file(tmp_path / "model.safetensors")

    def write(state):
        save_file(state, tmp_path / "model.safetensors")

    write({k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensors: \['layers.1.mlp.up_proj.weight'\]"):
        Mistral.from_pretrained(tmp_path)

    write({**weights, "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError,
                       match=r"wrongly shaped.*layers.0.self_attn.q_proj.weight: "
                             r"checkpoint \(3, 3\)"):
        Mistral.from_pretrained(tmp_path)

    write({**weights, "model.layers.9.mlp.up_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"unexpected tensors: \['layers.9.mlp.up_proj.weight'\]"):
        Mistral.from_pretrained(tmp_path)

    # A config that does not match the weights (more layers than stored).
    write(weights)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"missing tensors: \['layers.2"):
        Mistral.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        Mistral.from_pretrained(tmp_path)

    # Every RoPE scaling but llama3 is refused by name, under the key of either transformers era.
    for key in ("rope_scaling", "rope_parameters"):
        scaling = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
        (tmp_path / "config.json").write_text(json.dumps({**config, key: scaling}))
        with pytest.raises(ValueError, match=f"{key} type 'yarn' is not supported"):
            Mistral.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config,
                                                      "rope_scaling": {"type": "linear"}}))
    with pytest.raises(ValueError, match="rope_scaling type 'linear' is not supported"):
        Mistral.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {**config, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(ValueError, match="lacks.*low_freq_factor"):
        Mistral.from_pretrained(tmp_path)


def test_load_checked_names_every_problem():
    model = Mistral(MistralConfig.preset("tiny"))
    state = dict(model.state_dict())
    state.pop("norm.weight")
    with pytest.raises(ValueError, match=r"missing tensors: \['norm.weight'\]"):
        load_checked(model, state.items(), source="unit")


def test_real_smollm2_matches_transformers():
    gguf = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).model.eval()
    ours = Mistral.from_pretrained(gguf).eval()
    sentences = ["The capital of France is",
                 "Bidirectional attention turns a decoder into an encoder."]
    for text in sentences:
        ids = torch.tensor([tokenizer.encode(text)])
        with torch.no_grad():
            expected = hf(input_ids=ids).last_hidden_state
            got = ours(ids, causal=True)
        rel = (got - expected).norm() / expected.norm()
        assert rel < 1e-4, f"{text!r}: relative error {rel:.2e}"
