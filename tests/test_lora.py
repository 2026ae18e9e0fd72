"""Tests for lora.py: a fresh adapter changes nothing, merging folds it in exactly, only the
adapters train; LoRADropout's fast CPU mask against nn.Dropout's contract.

Run: python -m pytest -q tests/test_lora.py
"""

import pytest
import torch
import torch.nn as nn

from lora import LoRADropout, apply_lora, lora_state_dict, mark_only_lora_trainable, merge_lora
from model import Mistral, MistralConfig


def test_lora_fresh_merged_and_trainable():
    torch.manual_seed(0)
    model = Mistral(MistralConfig.preset("tiny")).eval()
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        before = model(ids)
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    model.eval()  # dropout off for the comparisons
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)  # B = 0: nothing changes
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 7 * model.config.num_hidden_layers
    for name, p in model.named_parameters():  # give the adapters a real effect
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        unmerged = model(ids)
    assert not torch.allclose(unmerged, before)
    assert len(lora_state_dict(model)) == 2 * 7 * model.config.num_hidden_layers
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert set(model.state_dict()) == set(Mistral(model.config).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lora_dropout_drops_p_and_keeps_the_mean(p):
    torch.manual_seed(0)
    dropout = LoRADropout(p).train()
    x = torch.ones(2000, 1000)  # 2M elements: the dropped share has standard error < 0.0004
    y = dropout(x)
    dropped = (y == 0).float()
    assert abs(dropped.mean().item() - p) < 0.002
    assert abs(y.mean().item() - 1.0) < 0.004  # kept elements are scaled by 1 / (1 - p)
    assert y.unique().tolist() == [0.0, pytest.approx(1 / (1 - p), rel=1e-4)]
    # Four elements share each 64-bit draw: neighbours must still be independent, and
    # every position of the four drop at the same rate.
    flat = dropped.flatten()
    assert abs((flat[:-1] * flat[1:]).mean().item() - p * p) < 0.002
    for position in range(4):
        assert abs(flat[position::4].mean().item() - p) < 0.004


def test_lora_dropout_gradient_is_its_mask_and_eval_is_identity():
    x = torch.randn(3, 5, 7, requires_grad=True)
    dropout = LoRADropout(0.1).train()
    torch.manual_seed(0)
    y = dropout(x)
    y.backward(torch.ones_like(y))
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - round(0.1 * 2**16) / 2**16))
    torch.testing.assert_close(x.grad, kept.float() / (1 - round(0.1 * 2**16) / 2**16))
    torch.manual_seed(0)
    assert torch.equal(LoRADropout(0.1).train()(x), y)  # the seed fixes the mask
    assert torch.equal(dropout.eval()(x), x)
    for p in (0.0, 1e-6):  # p rounds to 0: nn.Dropout's own draws, not a silent no-op
        torch.manual_seed(1)
        ours = LoRADropout(p).train()(x)
        torch.manual_seed(1)
        assert torch.equal(ours, torch.nn.functional.dropout(x, p))
    assert torch.equal(LoRADropout(1.0).train()(x), torch.zeros_like(x))  # nn.Dropout's p = 1


def test_lora_dropout_keeps_bf16_and_saves_only_a_bool_mask():
    x = torch.randn(4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = LoRADropout(0.1).train()(x)
    assert y.dtype == torch.bfloat16
    assert [t.dtype for t in saved] == [torch.bool]  # nn.Dropout saves a mask of x's dtype
