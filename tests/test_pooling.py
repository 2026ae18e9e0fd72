"""Tests for pooling.py: every pooling against hand-computed values or a naive loop.

The latent-attention reference below is written from the released layout
(PAPER.md section 2) with explicit per-token, per-head loops, a hand-written
LayerNorm, softmax and erf-GELU, reading weights by their *released* names, so it
checks the module and the name map at once. Run: python -m pytest -q tests/test_pooling.py
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plumbing.released import (RELEASED_LATENT_PREFIX,  # noqa: E402
                               latent_attention_state_dict_from_released)
from model import Mistral, MistralConfig, NVEmbed  # noqa: E402
from plumbing.base_checkpoints import ByteTokenizer  # noqa: E402
from pooling import (POOLINGS, LastTokenPooling, LatentAttentionPooling, MeanPooling,  # noqa: E402
                     SelfAttentionPooling, check_pool_mask)

torch.set_num_threads(1)
DTYPE = torch.float64


# ---------------------------------------------------------------- naive references

def layer_norm(vector, weight, bias, eps=1e-5):
    mean = vector.sum() / vector.numel()
    variance = ((vector - mean) ** 2).sum() / vector.numel()
    return (vector - mean) / math.sqrt(variance + eps) * weight + bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def softmax(scores):
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def naive_latent_attention(hidden, pool_mask, released, num_heads):
    """Released NV-Embed latent block + masked mean, one pooled token and one head at a time."""
    def w(name):
        return released[RELEASED_LATENT_PREFIX + name].to(DTYPE)

    latents = w("latents")
    num_latents = latents.shape[0]
    w_q = w("cross_attend_blocks.0.fn.to_q.weight")
    inner = w_q.shape[0]
    head_dim = inner // num_heads
    # k, v of every latent: to_kv's output rows are [keys | values].
    keys, values = [], []
    for l in range(num_latents):
        normed = layer_norm(latents[l], w("cross_attend_blocks.0.norm_context.weight"),
                            w("cross_attend_blocks.0.norm_context.bias"))
        kv = w("cross_attend_blocks.0.fn.to_kv.weight") @ normed
        keys.append(kv[:inner])
        values.append(kv[inner:])

    batch_size, num_tokens, hidden_size = hidden.shape
    pooled = torch.zeros(batch_size, hidden_size, dtype=DTYPE)
    for b in range(batch_size):
        count = 0
        for t in range(num_tokens):
            if not pool_mask[b, t]:
                continue
            x = hidden[b, t].to(DTYPE)
            q = w_q @ layer_norm(x, w("cross_attend_blocks.0.norm.weight"),
                                 w("cross_attend_blocks.0.norm.bias"))
            heads_out = []
            for h in range(num_heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                scores = [float(q[part] @ keys[l][part]) / math.sqrt(head_dim)
                          for l in range(num_latents)]
                probs = softmax(scores)
                heads_out.append(sum(probs[l] * values[l][part] for l in range(num_latents)))
            x = x + w("cross_attend_blocks.0.fn.to_out.weight") @ torch.cat(heads_out)
            y = (w("cross_attend_blocks.1.fn.net.0.weight")
                 @ layer_norm(x, w("cross_attend_blocks.1.norm.weight"),
                              w("cross_attend_blocks.1.norm.bias"))
                 + w("cross_attend_blocks.1.fn.net.0.bias"))
            half = y.numel() // 2
            value_half, gate_half = y[:half], y[half:]  # GEGLU: first half value, second gate
            x = x + (w("cross_attend_blocks.1.fn.net.2.weight") @ (value_half * gelu(gate_half))
                     + w("cross_attend_blocks.1.fn.net.2.bias"))
            pooled[b] += x
            count += 1
        pooled[b] /= count
    return pooled


def naive_self_attention(hidden, pool_mask, module):
    """One pre-norm multi-head self-attention over the pooled tokens only, residual, mean."""
    state = {k: v.to(DTYPE) for k, v in module.state_dict().items()}
    batch_size, num_tokens, hidden_size = hidden.shape
    num_heads = module.num_heads
    head_dim = hidden_size // num_heads
    pooled = torch.zeros(batch_size, hidden_size, dtype=DTYPE)
    for b in range(batch_size):
        kept = [t for t in range(num_tokens) if pool_mask[b, t]]
        q, k, v = {}, {}, {}
        for t in kept:
            normed = layer_norm(hidden[b, t].to(DTYPE), state["norm.weight"], state["norm.bias"])
            qkv = state["qkv.weight"] @ normed + state["qkv.bias"]
            q[t], k[t], v[t] = qkv[:hidden_size], qkv[hidden_size:2 * hidden_size], \
                qkv[2 * hidden_size:]
        for t in kept:
            heads_out = []
            for h in range(num_heads):
                part = slice(h * head_dim, (h + 1) * head_dim)
                probs = softmax([float(q[t][part] @ k[s][part]) / math.sqrt(head_dim)
                                 for s in kept])
                heads_out.append(sum(p * v[s][part] for p, s in zip(probs, kept)))
            x = hidden[b, t].to(DTYPE) + state["out.weight"] @ torch.cat(heads_out) + \
                state["out.bias"]
            pooled[b] += x / len(kept)
    return pooled


def synthetic_released(hidden_size=16, num_latents=4, num_heads=2, head_dim=None, mlp_ratio=4,
                       seed=0):
    """A state dict with the released NV-Embed names at tiny sizes, every tensor random."""
    generator = torch.Generator().manual_seed(seed)
    D = hidden_size
    inner = num_heads * (head_dim or D)
    shapes = {
        "latents": (num_latents, D),
        "cross_attend_blocks.0.norm.weight": (D,),
        "cross_attend_blocks.0.norm.bias": (D,),
        "cross_attend_blocks.0.norm_context.weight": (D,),
        "cross_attend_blocks.0.norm_context.bias": (D,),
        "cross_attend_blocks.0.fn.to_q.weight": (inner, D),
        "cross_attend_blocks.0.fn.to_kv.weight": (2 * inner, D),
        "cross_attend_blocks.0.fn.to_out.weight": (D, inner),
        "cross_attend_blocks.1.norm.weight": (D,),
        "cross_attend_blocks.1.norm.bias": (D,),
        "cross_attend_blocks.1.fn.net.0.weight": (2 * mlp_ratio * D, D),
        "cross_attend_blocks.1.fn.net.0.bias": (2 * mlp_ratio * D,),
        "cross_attend_blocks.1.fn.net.2.weight": (D, mlp_ratio * D),
        "cross_attend_blocks.1.fn.net.2.bias": (D,),
    }
    released = {RELEASED_LATENT_PREFIX + name: torch.randn(shape, generator=generator) * 0.5
                for name, shape in shapes.items()}
    # The decoder's weights sit in the same file; the mapping must ignore them.
    released["embedding_model.layers.0.self_attn.q_proj.weight"] = \
        torch.randn(D, D, generator=generator)
    return released


def example_mask():
    """Row 0 right-padded, row 1 left-padded, row 2 with BOS + instruction excluded."""
    return torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 0],
    ], dtype=torch.bool)


def build(name, hidden_size=8):
    kwargs = {"latent": {"num_latents": 5, "num_heads": 2}, "self-attention": {"num_heads": 2}}
    torch.manual_seed(0)
    return POOLINGS[name](hidden_size, **kwargs.get(name, {})).to(DTYPE)


# ---------------------------------------------------------------- hand-computed

HIDDEN = torch.tensor([
    [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
    [[7.0, 8.0], [9.0, 10.0], [11.0, 12.0]],
])
MASK = torch.tensor([[True, True, False], [False, True, True]])


def test_mean_by_hand():
    out = MeanPooling()(HIDDEN, MASK)
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [10.0, 11.0]]))


def test_mean_accepts_integer_mask():
    assert torch.equal(MeanPooling()(HIDDEN, MASK.long()), MeanPooling()(HIDDEN, MASK))


def test_eos_by_hand():
    out = LastTokenPooling()(HIDDEN, MASK)
    assert torch.equal(out, torch.tensor([[3.0, 4.0], [11.0, 12.0]]))


def test_eos_right_and_left_padding():
    # Token t of row b holds the value 10 * b + t in every feature.
    hidden = (10 * torch.arange(3)[:, None]
              + torch.arange(6)[None, :]).float()[..., None].expand(3, 6, 4)
    out = LastTokenPooling()(hidden, example_mask())
    # right padding -> position 2; left padding -> the last position 5; instruction row -> 4
    assert torch.equal(out[:, 0], torch.tensor([2.0, 15.0, 24.0]))


# ---------------------------------------------------------------- naive loops

def test_latent_attention_matches_naive_loop_through_released_names():
    released = synthetic_released(hidden_size=16, num_latents=4, num_heads=2)
    module = LatentAttentionPooling(16, num_latents=4, num_heads=2).to(DTYPE)
    module.load_state_dict(latent_attention_state_dict_from_released(released, expected=module),
                           strict=True)
    hidden = torch.randn(3, 6, 16, dtype=DTYPE)
    mask = example_mask()
    expected = naive_latent_attention(hidden, mask, released, num_heads=2)
    torch.testing.assert_close(module(hidden, mask), expected, rtol=1e-10, atol=1e-10)


def test_latent_attention_other_sizes_match_naive_loop():
    # head_dim != D and mlp_ratio != 4 catch a head/feature layout mix-up that Dh = D could hide.
    released = synthetic_released(hidden_size=6, num_latents=5, num_heads=3, head_dim=4,
                                  mlp_ratio=2, seed=1)
    module = LatentAttentionPooling(6, num_latents=5, num_heads=3, head_dim=4,
                                    mlp_ratio=2).to(DTYPE)
    module.load_state_dict(latent_attention_state_dict_from_released(released, expected=module),
                           strict=True)
    hidden = torch.randn(3, 6, 6, dtype=DTYPE)
    mask = example_mask()
    expected = naive_latent_attention(hidden, mask, released, num_heads=3)
    torch.testing.assert_close(module(hidden, mask), expected, rtol=1e-10, atol=1e-10)


def test_self_attention_matches_naive_loop():
    module = build("self-attention")
    hidden = torch.randn(3, 6, 8, dtype=DTYPE)
    mask = example_mask()
    torch.testing.assert_close(module(hidden, mask), naive_self_attention(hidden, mask, module),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- masking

@pytest.mark.parametrize("name", ["mean", "eos", "latent", "self-attention"])
@pytest.mark.parametrize("filler", ["random", "nan"])
def test_masked_positions_have_no_influence(name, filler):
    module = build(name)
    mask = example_mask()
    hidden = torch.randn(3, 6, 8, dtype=DTYPE)
    noise = torch.randn_like(hidden) * 100 if filler == "random" \
        else torch.full_like(hidden, float("nan"))
    scrambled = torch.where(mask[..., None], hidden, noise)
    reference = module(hidden, mask)
    assert torch.isfinite(reference).all()
    torch.testing.assert_close(module(scrambled, mask), reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["mean", "eos", "latent", "self-attention"])
def test_empty_row_is_an_error(name):
    # Checked once, where every pooling is called: NVEmbed.forward (check_pool_mask).
    mask = example_mask()
    mask[1] = False
    decoder = Mistral(MistralConfig(vocab_size=259, hidden_size=8, intermediate_size=16,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, sliding_window=None))
    model = NVEmbed(decoder.to(DTYPE), build(name), ByteTokenizer(), name)
    batch = dict(input_ids=torch.ones(3, 6, dtype=torch.long), attention_mask=torch.ones(3, 6),
                 pool_mask=mask)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        model(batch)


def test_mismatched_mask_shape_is_an_error():
    with pytest.raises(ValueError, match="pool_mask must be"):
        check_pool_mask(torch.randn(2, 5, 4), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("name", ["mean", "eos", "latent", "self-attention"])
def test_poolings_dict_builds_every_pooling(name):
    out = build(name)(torch.randn(3, 6, 8, dtype=DTYPE), example_mask())
    assert out.shape == (3, 8)


# ---------------------------------------------------------------- sizes and init

def test_latent_attention_parameter_count_at_4096():
    with torch.device("meta"):
        module = LatentAttentionPooling(4096)
    D, L, H, Dh, ratio = 4096, 512, 8, 4096, 4
    expected = (
        L * D                               # latents
        + 3 * 2 * D                         # three LayerNorms (weight + bias)
        + D * H * Dh + D * 2 * H * Dh       # to_q, to_kv (no bias)
        + H * Dh * D                        # to_out (no bias)
        + D * 2 * ratio * D + 2 * ratio * D  # GEGLU in
        + ratio * D * D + D                 # GEGLU out
    )
    count = sum(p.numel() for p in module.parameters())
    assert count == expected == 740_356_096
    assert 0.70e9 < count < 0.78e9


def test_latent_attention_init_and_meta_reset():
    with torch.device("meta"):
        module = LatentAttentionPooling(32, num_latents=256, num_heads=2)
    module = module.to_empty(device="cpu")
    module.reset_parameters()
    # Released init: latents ~ N(0, 1), LayerNorm at identity.
    assert abs(module.latents.mean().item()) < 0.05 and abs(module.latents.std().item() - 1) < 0.05
    assert torch.equal(module.attn_norm.weight, torch.ones(32))
    assert module.to_q.bias is None and module.ff_in.bias is not None


# ---------------------------------------------------------------- released-name mapping

def test_mapping_refuses_missing_key():
    released = synthetic_released()
    del released[RELEASED_LATENT_PREFIX + "cross_attend_blocks.0.fn.to_kv.weight"]
    with pytest.raises(KeyError,
                       match=r"latent_attention_model\.cross_attend_blocks\.0\.fn\.to_kv\.weight"):
        latent_attention_state_dict_from_released(released)


def test_mapping_refuses_unexpected_key():
    released = synthetic_released()
    released[RELEASED_LATENT_PREFIX + "cross_attend_blocks.0.fn.to_v.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"unexpected \['latent_attention_model\."
                                       r"cross_attend_blocks\.0\.fn\.to_v"):
        latent_attention_state_dict_from_released(released)


def test_mapping_refuses_misshapen_tensor():
    released = synthetic_released()
    released[RELEASED_LATENT_PREFIX + "cross_attend_blocks.1.fn.net.0.weight"] = torch.zeros(64, 16)
    module = LatentAttentionPooling(16, num_latents=4, num_heads=2)
    with pytest.raises(ValueError,
                       match=r"cross_attend_blocks\.1\.fn\.net\.0\.weight -> ff_in\.weight: "
                                         r"expected \(128, 16\), got \(64, 16\)"):
        latent_attention_state_dict_from_released(released, expected=module)
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"ff_in\.weight"):
        latent_attention_state_dict_from_released(released, expected=shapes)
