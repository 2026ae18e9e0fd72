"""LoRA (Hu et al. 2021) in plain PyTorch, as NV-Embed trains it: rank 16, alpha 32, dropout 0.1 on
every projection of the decoder (PAPER.md section 4), the base frozen. apply_lora / merge_lora /
mark_only_lora_trainable / lora_config. Tests: tests/test_lora.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    """y = x W^T + (alpha / r) * dropout(x) A^T B^T, W frozen. `weight` keeps its name, so the
    checkpoint's names are unchanged and only lora_A / lora_B are added; B starts at zero, so a
    fresh adapter changes nothing."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # down: (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # up: (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = LoRADropout(dropout)

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)  # (..., out)
        dropped, dropout_scale = self.lora_dropout.drop(x)  # (..., in), zeros where dropped
        if not torch.is_autocast_enabled(x.device.type):
            # fp32 adapters over a bf16 base without autocast: the update in the adapters' dtype.
            # (Under autocast a cast here would be undone by the product's own cast to bf16.)
            dropped = dropped.to(self.lora_A.dtype)
        # Both scales on the r columns of the down-projection, not on a full-width tensor.
        down = F.linear(dropped, self.lora_A) * (self.scaling * dropout_scale)  # (..., r)
        if down.dtype != base.dtype and not torch.is_autocast_enabled(x.device.type):
            return base + F.linear(down, self.lora_B).to(base.dtype)
        # base + down B^T in one product that adds into its output: no separate sum pass
        update = torch.addmm(base.reshape(-1, base.shape[-1]), down.reshape(-1, down.shape[-1]),
                             self.lora_B.t())  # (N, out)
        return update.view(base.shape)


class LoRADropout(nn.Dropout):
    """nn.Dropout whose CPU mask is drawn 2-3x faster: PyTorch's CPU generator makes one draw per
    element, 42% of a SmolLM2 LoRA step (bench/lora_dropout.py). Each 64-bit draw gives four 16-bit
    numbers, dropped below p * 2^16 (p rounded to a multiple of 1/65536). On GPU, in place, or for p
    rounding to 0 or 1: nn.Dropout."""

    def forward(self, x):
        dropped, scale = self.drop(x)
        return dropped if scale == 1.0 else dropped * scale

    def drop(self, x):
        """(x with the dropped elements zeroed, the factor 1 / (1 - p) still to apply): LoRALinear
        applies the factor to its rank-r product, not to the full-width input. Where nn.Dropout
        draws (or out of training): (nn.Dropout's output, 1.0)."""
        drop_below = round(self.p * 2**16)  # of the 2^16 values a 16-bit number can take
        drawn_here = x.device.type == "cpu" and not self.inplace and 0 < drop_below < 2**16
        if not self.training or not drawn_here:
            return super().forward(x), 1.0
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64)
        draws = draws.random_(-2**63, None)  # all 64 bits random
        numbers = draws.view(torch.int16)[:x.numel()].view(x.shape)  # uniform on [-2^15, 2^15)
        keep = numbers >= drop_below - 2**15
        # where, not x * keep: one pass in x's dtype, and only the bool mask saved for backward
        return torch.where(keep, x, 0), 1 / (1 - drop_below / 2**16)


def apply_lora(module: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.1,
               targets=LORA_TARGETS) -> nn.Module:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"apply_lora: no nn.Linear named one of {targets} found")
    return module


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold each adapter into its weight (W += scaling * B A) and restore plain nn.Linear."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                merged = nn.Linear(child.in_features, child.out_features,
                                   bias=child.bias is not None, device="meta")
                # Fold in fp32 so that a bf16 weight is rounded once, not twice.
                update = child.scaling * (child.lora_B.float() @ child.lora_A.float())
                weight = child.weight.float() + update
                merged.weight = nn.Parameter(weight.to(child.weight.dtype),
                                             requires_grad=child.weight.requires_grad)
                merged.bias = child.bias
                setattr(parent, name, merged)
    return module


def mark_only_lora_trainable(module: nn.Module) -> nn.Module:
    for name, param in module.named_parameters():
        param.requires_grad = "lora_" in name
    return module


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if "lora_" in k}


def lora_config(module: nn.Module) -> dict | None:
    """apply_lora's arguments that made `module`'s adapters (what a saved model records), or None
    without any."""
    adapted = {name.rsplit(".", 1)[-1]: m for name, m in module.named_modules()
               if isinstance(m, LoRALinear)}
    if not adapted:
        return None
    first = next(iter(adapted.values()))
    rank = first.lora_A.shape[0]
    return dict(rank=rank, alpha=first.scaling * rank, dropout=first.lora_dropout.p,
                targets=sorted(adapted))
