"""mfu.step_flops (the MFU numerator) against a hand count and against torch's FlopCounterMode, an
independent count of every matrix product a forward + backward actually runs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from plumbing import mfu
from data import TextRule
from lora import apply_lora, mark_only_lora_trainable
from model import Mistral, MistralConfig, NVEmbed
from pooling import POOLINGS


class Vocab:
    def __len__(self):
        return 11


def small_model(pooling: str, lora: bool = False, causal: bool = False, layers: int = 1) -> NVEmbed:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=11, hidden_size=8, intermediate_size=12,
                           num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=4, sliding_window=None)
    decoder = Mistral(config)
    sizes = {"latent": dict(num_latents=3, num_heads=2, head_dim=4, mlp_ratio=1),
             "self-attention": dict(num_heads=2)}
    pool = POOLINGS[pooling](8, **sizes.get(pooling, {}))
    model = NVEmbed(decoder, pool, Vocab(), pooling, causal=causal, text_rule=TextRule())
    if lora:
        apply_lora(decoder, rank=2, alpha=4, dropout=0.0)
        mark_only_lora_trainable(decoder)
    return model.train()


def batch(lengths, T=None):
    """Right-padded random ids; every real token is pooled."""
    T = T or max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (rows, T)
    ids = torch.randint(0, 11, (len(lengths), T)) * mask
    return dict(input_ids=ids, attention_mask=mask, pool_mask=mask.bool())


def counted(model, parts) -> int:
    """FlopCounterMode's FLOPs of embedding every part and backpropagating through all of them (math
    SDPA, which runs as matrix products the counter sees)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        total = sum((model(part) * torch.linspace(-1, 1, 8)).sum() for part in parts)
        total.backward()
    return counter.get_total_flops()


def test_hand_count_of_a_tiny_config():
    """One layer, D 8, F 12, 2 query heads / 1 KV head of dim 4; a query of 5 tokens and a document
    of 3 real ones (padded to 5). N = q 64 + k 32 + v 32 + o 64 + gate 96 + up 96 + down 96 = 480
    matmul weights."""
    N, tokens, pairs = 480, 5 + 3, 5 * 5 + 3 * 3
    parts = dict(queries=batch([5]), documents=batch([3], T=5))
    full = mfu.step_flops(mfu.model_shape(small_model("mean")), parts)
    assert full == 6 * N * tokens + 12 * 1 * 8 * pairs
    causal = mfu.step_flops(mfu.model_shape(small_model("mean", causal=True)), parts)
    assert causal == 6 * N * tokens + 12 * 8 * (5 * 6 / 2 + 3 * 4 / 2)
    # LoRA r 2 on all 7 projections: A is r x in, B is out x r. Layer 0's q/k/v (the only layer
    # here) get no input gradient: 2 x (their 128 weights + their lora_A's 3 x 2 x 8).
    adapters = 2 * (8 + 8) + 2 * (8 + 4) * 2 + 2 * (8 + 8) + 2 * (8 + 12) * 2 + 2 * (12 + 8)
    lora = mfu.step_flops(mfu.model_shape(small_model("mean", lora=True)), parts)
    assert lora == (4 * N + 6 * adapters - 2 * (128 + 3 * 16)) * tokens + 12 * 8 * pairs
    # Latent pooling, 3 latents x 2 heads x dim 4 (width 8), MLP ratio 1: per pooled token to_q
    # 2*8*8, scores and values 4*3*8, to_out 2*8*8, GEGLU 6*8*8; to_kv 2*3*8*16 once per part; all
    # of it x 3.
    latent = mfu.step_flops(mfu.model_shape(small_model("latent")), parts)
    assert latent == full + 3 * ((128 + 96 + 128 + 384) * tokens + 2 * 768)


@pytest.mark.parametrize("pooling", ["mean", "latent", "self-attention"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_equals_flop_counter_on_unpadded_batches(pooling, lora):
    model = small_model(pooling, lora=lora, layers=2)
    parts = dict(queries=batch([4, 4]), documents=batch([6, 6, 6, 6]))
    assert mfu.step_flops(mfu.model_shape(model), parts) == counted(model, parts.values())


def test_padding_is_not_counted():
    """A padded batch counts what its rows cost run one by one without padding."""
    model = small_model("mean", lora=True, layers=2)
    lengths = dict(queries=[2, 5], documents=[7, 3, 1, 4])
    parts = {name: batch(rows) for name, rows in lengths.items()}
    one_by_one = sum(counted(model, [batch([n])]) for rows in lengths.values() for n in rows)
    assert mfu.step_flops(mfu.model_shape(model), parts) == one_by_one
    assert counted(model, parts.values()) > one_by_one  # what the padded batch really runs


def forward_counted(model, parts) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        for part in parts:
            model(part)
    return counter.get_total_flops()


@pytest.mark.parametrize("pooling", ["mean", "latent"])
def test_forward_flops_equal_the_flop_counter(pooling):
    """An unpadded batch's one forward, as counted; a padded batch (mean pooling: nothing computed
    once per forward) as its rows one by one."""
    model = small_model(pooling, lora=True, layers=2).eval()
    shape = mfu.model_shape(model)
    assert mfu.forward_flops(shape, batch([5, 5, 5])) == forward_counted(model, [batch([5, 5, 5])])
    if pooling == "mean":
        one_by_one = forward_counted(model, [batch([n]) for n in (2, 7, 4)])
        assert mfu.forward_flops(shape, batch([2, 7, 4])) == one_by_one


def test_logged_mfu_weights_each_record_by_its_steps_time(tmp_path):
    """Two records: steps 1-4 at 100 ms and 20% MFU, step 5-6 at 400 ms and 10%: (0.4 x 20% + 0.8 x
    10%) / 1.2 s."""
    import json

    records = [dict(step=4, ms_per_step=100.0, mfu=0.2), dict(event="eval", step=4),
               dict(step=6, ms_per_step=400.0, mfu=0.1)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert mfu.logged_mfu(tmp_path / "log.jsonl") == pytest.approx((0.4 * 0.2 + 0.8 * 0.1) / 1.2)
