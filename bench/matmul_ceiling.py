"""The quick step's decoder projections alone, at their own shapes: a floor under the step's
time on this CPU, so a ceiling on any speed-up that keeps the same products (bench/RESULTS.md,
issue 29). Left out, so the bound is loose: attention's own products (QK^T, PV) and the latent
pooling's.

SmolLM2-135M's shapes (hidden 576, 3 key/value heads of 64, MLP 1,536, 30 layers) with LoRA r16 on
all seven projections; the quick setting's rows: 32 documents x 64 tokens and 8 queries padded to
48. Per projection, with weights stored as nn.Linear stores them (out, in): the frozen product
forward and the input's gradient (no weight gradient: it is frozen; the first layer's input
gradient, which the step skips, is timed too), and LoRA's six: down and up forward, the input's
gradient through B then A, both weight gradients. bf16, at --threads.

    python bench/matmul_ceiling.py
"""

from __future__ import annotations

import argparse
import time

import torch


def seconds(a: torch.Tensor, b: torch.Tensor, repeats: int = 5) -> float:
    """Mean seconds of a @ b after one warm-up product."""
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    hidden, kv, mlp, r, bf16 = 576, 192, 1536, args.rank, torch.bfloat16
    projections = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden),  # q k v o
                   (hidden, mlp), (hidden, mlp), (mlp, hidden)]  # gate up down
    total = flops = lora_flops = 0.0
    for rows in (32 * 64, 8 * 48):  # documents, queries
        for fan_in, fan_out in projections:
            x = torch.randn(rows, fan_in, dtype=bf16)
            w = torch.randn(fan_out, fan_in, dtype=bf16)  # nn.Linear's (out, in)
            grad = torch.randn(rows, fan_out, dtype=bf16)  # (rows, out)
            a, b = torch.randn(r, fan_in, dtype=bf16), torch.randn(fan_out, r, dtype=bf16)
            down = torch.randn(rows, r, dtype=bf16)  # (rows, r)
            layer = seconds(x, w.t()) + seconds(grad, w)  # frozen: forward, input's gradient
            layer += (seconds(x, a.t()) + seconds(down, b.t())  # LoRA forward
                      + seconds(grad, b) + seconds(down, a)  # the input's gradient: B, then A
                      + seconds(grad.t().contiguous(), down)  # dB (out, r)
                      + seconds(down.t().contiguous(), x))  # dA (r, in)
            total += args.layers * layer
            flops += args.layers * 2 * (2 * rows * fan_in * fan_out)
            lora_flops += args.layers * 3 * (2 * rows * r * (fan_in + fan_out))  # 3 on each side
    square = torch.randn(2048, 2048, dtype=bf16)
    peak = 2 * 2048 ** 3 / seconds(square, square)
    print(f"{torch.get_num_threads()} threads, bf16: the decoder projections {1000 * total:,.0f} "
          f"ms a step; {flops / 1e9:,.0f} GFLOP frozen + {lora_flops / 1e9:,.0f} GFLOP LoRA, "
          f"{(flops + lora_flops) / total / 1e9:,.0f} GFLOP/s; a 2048 x 2048 product "
          f"{peak / 1e9:,.0f} GFLOP/s")


if __name__ == "__main__":
    main()
