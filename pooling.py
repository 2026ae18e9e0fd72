"""Poolings: turn the decoder's last hidden states into one vector per input.

NV-Embed (Lee et al. 2024, arXiv 2405.17428) section 3.2 introduces latent-attention
pooling; the paper's pooling ablation (PAPER.md section 5) compares it with
mean pooling, last-token (EOS) pooling and one self-attention layer before a mean.
All four live here, with one interface:

    forward(hidden (B, T, D), pool_mask (B, T) bool) -> (B, D)   # not normalised

`pool_mask` is True exactly on the tokens to pool (the text tokens and EOS; never
BOS, the instruction or padding). Positions outside it have no influence on the
output of any pooling, whatever values they hold. A row with no True position is an
error (the released code divides by zero there and returns NaN): `check_pool_mask`
(at the end) refuses it once per `NVEmbed.forward`, and the poolings assume it.

Shape legend: B batch, T tokens, D hidden, H heads, Dh head dim, L latents.

`POOLINGS`, the one registry, maps the `--pooling` names to constructors taking D as
their one positional argument; every command's parser reads its names. Their FLOPs,
for train.py's MFU: plumbing/mfu.py's `pooling_flops`. The released NV-Embed-v1/v2
weights load onto `LatentAttentionPooling` through the name map in plumbing/released.py.

Run the tests with `python -m pytest -q tests/test_pooling.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def masked_mean(hidden: Tensor, pool_mask: Tensor) -> Tensor:
    """Mean over the positions where pool_mask (B, T) is true: (B, T, D) -> (B, D)."""
    pool_mask = pool_mask.bool()
    # where(), not hidden * mask: a NaN or inf at a padded position must not leak in.
    kept = torch.where(pool_mask[..., None], hidden, 0)  # (B, T, D)
    counts = pool_mask.sum(dim=1, keepdim=True).to(hidden.dtype)  # (B, 1)
    return kept.sum(dim=1) / counts


class MeanPooling(nn.Module):
    """Average of the pooled tokens (the paper's "mean" ablation)."""

    def forward(self, hidden: Tensor, pool_mask: Tensor) -> Tensor:
        return masked_mean(hidden, pool_mask)


class LastTokenPooling(nn.Module):
    """The hidden state of the last pooled position of each row: the appended EOS.

    Taking the last True of pool_mask (rather than position T-1 or the attention
    mask's length) is what makes it right under left and right padding alike.
    """

    def forward(self, hidden: Tensor, pool_mask: Tensor) -> Tensor:
        positions = torch.arange(pool_mask.shape[1], device=pool_mask.device)  # (T,)
        last = torch.where(pool_mask.bool(), positions, -1).amax(dim=1)  # (B,)
        rows = torch.arange(hidden.shape[0], device=hidden.device)  # (B,)
        return hidden[rows, last]  # (B, D)


class LatentAttentionPooling(nn.Module):
    """Latent-attention pooling (section 3.2), computed as the released model does.

    Every token attends to a trainable latent array (L x D, shared by all inputs):
    the token is the query, the latents are keys and values, and the softmax runs
    over the L latents, so each token is transformed on its own (no token sees
    another). Then a feed-forward, then the mean over pool_mask:

        h = h + to_out(softmax(q k^T / sqrt(Dh)) v),  q = to_q(LN(h)), [k | v] = to_kv(LN'(latents))
        h = h + ff_out(x * gelu(gate)),                [x | gate] = ff_in(LN''(h))
        out = masked mean of h over pool_mask

    Where the paper's text and the released code differ, this follows the code
    (the code produced the published numbers and its weights must load here):
    - the paper writes O = softmax(Q K^T) V followed by an MLP of two linear layers with a GELU
      between them; the code wraps both in pre-LayerNorms (on the tokens and, separately, on the
      latents) with residual connections, and its MLP is a GEGLU whose first linear is D -> 2 *
      mlp_ratio * D;
    - the paper shows no scale; the code's SDPA call applies the default Dh^-0.5;
    - 8 heads each of head dim D (inner width 8 * D = 32768 at D = 4096), not D / 8,
      which is why the block has about 0.74B parameters at D = 4096;
    - the latents get no mask and no positional information; only the final mean
      uses pool_mask.
    """

    def __init__(
        self,
        hidden_size: int,
        num_latents: int = 512,
        num_heads: int = 8,
        head_dim: int | None = None,
        mlp_ratio: int = 4,
    ):
        super().__init__()
        head_dim = hidden_size if head_dim is None else head_dim  # released: Dh = D
        inner = num_heads * head_dim
        self.hidden_size, self.num_latents = hidden_size, num_latents
        self.num_heads, self.head_dim, self.mlp_ratio = num_heads, head_dim, mlp_ratio
        # Released init: latents ~ N(0, 1); norms and linears keep torch's defaults.
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.latent_norm = nn.LayerNorm(hidden_size)
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(hidden_size, 2 * inner, bias=False)  # rows: [k | v]
        self.to_out = nn.Linear(inner, hidden_size, bias=False)
        self.ff_norm = nn.LayerNorm(hidden_size)
        self.ff_in = nn.Linear(hidden_size, 2 * mlp_ratio * hidden_size)  # rows: [x | gate]
        self.ff_out = nn.Linear(mlp_ratio * hidden_size, hidden_size)

    def reset_parameters(self) -> None:
        """Re-draw every weight as __init__ does (for a module built on the meta device)."""
        nn.init.normal_(self.latents)
        for module in (self.attn_norm, self.latent_norm, self.to_q, self.to_kv,
                       self.to_out, self.ff_norm, self.ff_in, self.ff_out):
            module.reset_parameters()

    def forward(self, hidden: Tensor, pool_mask: Tensor) -> Tensor:
        B, T, _ = hidden.shape
        H, Dh, L = self.num_heads, self.head_dim, self.num_latents

        q = self.to_q(self.attn_norm(hidden)).view(B, T, H, Dh)  # (B, T, H, Dh)
        # The released code splits to_kv's output in half: keys first, then values.
        k, v = self.to_kv(self.latent_norm(self.latents)).chunk(2, dim=-1)  # 2 x (L, H*Dh)
        k, v = k.view(L, H, Dh), v.view(L, H, Dh)  # (L, H, Dh)
        scores = torch.einsum("bthd,lhd->bhtl", q, k) * Dh**-0.5  # (B, H, T, L)
        # Softmax in at least float32: under bf16 the logits over 512 latents lose too much.
        softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
        weights = scores.softmax(dim=-1, dtype=softmax_dtype).to(v.dtype)  # (B, H, T, L)
        attended = torch.einsum("bhtl,lhd->bthd", weights, v).reshape(B, T, H * Dh)  # (B, T, H*Dh)
        hidden = hidden + self.to_out(attended)

        # GEGLU, as released: the first half is the value, the second half the gate
        # (exact, erf-based GELU).
        x, gate = self.ff_in(self.ff_norm(hidden)).chunk(2, dim=-1)  # 2 x (B, T, mlp_ratio*D)
        hidden = hidden + self.ff_out(x * F.gelu(gate))
        return masked_mean(hidden, pool_mask)


class SelfAttentionPooling(nn.Module):
    """One multi-head self-attention layer over the tokens, then the masked mean.

    The paper's fourth pooling ablation ("self-attention" in its table). Pre-norm
    with a residual, like the latent block, but the keys and values are the tokens
    themselves (head dim D / H). Keys outside pool_mask are masked out so that
    padding, BOS and the instruction have no influence on the embedding, as for
    every pooling here; the paper does not say how it masked this layer.
    """

    def __init__(self, hidden_size: int, num_heads: int = 8):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # rows: [q | k | v]
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor, pool_mask: Tensor) -> Tensor:
        pool_mask = pool_mask.bool()
        B, T, D = hidden.shape
        H = self.num_heads
        # Zero the unpooled positions first: a masked key gets weight exactly 0, but
        # 0 * inf in its value would still give NaN.
        hidden = torch.where(pool_mask[..., None], hidden, 0)  # (B, T, D)
        q, k, v = self.qkv(self.norm(hidden)).chunk(3, dim=-1)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))  # 3 x (B, H, T, Dh)
        may_attend = pool_mask[:, None, None, :]  # (B, 1, 1, T): True where the key is pooled
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=may_attend)  # (B, H, T, Dh)
        attended = attended.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return masked_mean(hidden + self.out(attended), pool_mask)


# The `--pooling` choices, the one registry. Each takes D as its one positional argument;
# latent and self-attention take their other sizes as keywords (mean and eos take none).
POOLINGS = {
    "mean": lambda hidden_size: MeanPooling(),  # no sizes: it has no weights
    "eos": lambda hidden_size: LastTokenPooling(),
    "latent": LatentAttentionPooling,
    "self-attention": SelfAttentionPooling,
}


def check_pool_mask(hidden: Tensor, pool_mask: Tensor) -> Tensor:
    """pool_mask (B, T) as bool, refused unless it matches hidden (B, T, D) and pools a token per
    row: every pooling's precondition, checked once per `NVEmbed.forward`."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D), got shape {tuple(hidden.shape)}")
    if pool_mask.shape != hidden.shape[:2]:
        raise ValueError(f"pool_mask must be (B, T) = {tuple(hidden.shape[:2])} to match hidden, "
                         f"got shape {tuple(pool_mask.shape)}")
    pool_mask = pool_mask.bool()
    pools_something = pool_mask.any(dim=1)  # (B,)
    if pool_mask.device.type != "cpu":
        # No host read-back on an accelerator: a device-side assert, raised when the stream runs it.
        torch._assert_async(pools_something.all(), "pool_mask selects no token in some row")
        return pool_mask
    empty_rows = (~pools_something).nonzero().flatten().tolist()
    if empty_rows:
        more = " ..." if len(empty_rows) > 10 else ""
        raise ValueError(f"pool_mask selects no token in row(s) {empty_rows[:10]}{more}; every row "
                         "needs at least one position to pool (its text tokens and EOS)")
    return pool_mask
