"""Forward+backward speed and memory of model.Mistral against transformers' MistralModel.

Both models get the same config, weights and inputs, and run alternately in one
process, so the printed ratio (ours / HF) is robust to how busy the machine is.

Memory: on GPU, the peak of torch.cuda.max_memory_allocated during the step. On CPU
there is no allocator peak to read, so we count what autograd saves for backward
(unique tensor storages seen by saved_tensors_hooks), which is what dominates the
training-step memory of a transformer.

    python bench/model_vs_hf.py                      # 4 layers, hidden 512, 8 x 256 tokens
    python bench/model_vs_hf.py --layers 2 --repeats 3
    python bench/model_vs_hf.py --compile --dtypes float32
        # adds ours compiled (Mistral.compile), alternating too
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import Mistral, MistralConfig  # noqa: E402


def saved_bytes(fn):
    """Run fn() and return the bytes of distinct storages autograd saved for backward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def step(model, ids, mask, is_ours):
    def forward():
        if is_ours:
            return model(ids, mask, causal=True)
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    if ids.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out, saved = saved_bytes(forward)
    out.float().pow(2).mean().backward()
    memory = torch.cuda.max_memory_allocated() - base if ids.is_cuda else saved
    model.zero_grad(set_to_none=True)
    return memory


def bench(args, dtype, compile_ours=False):
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = MistralConfig(vocab_size=32000, hidden_size=args.hidden,
                        intermediate_size=args.hidden * 7 // 2, num_hidden_layers=args.layers,
                        num_attention_heads=args.hidden // 64,
                        num_key_value_heads=args.hidden // 256, sliding_window=None)
    hf_cfg = transformers.MistralConfig(**{k: v for k, v in cfg.__dict__.items()},
                                        attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.MistralModel(hf_cfg).to(device, dtype)
    ours = Mistral(cfg).to(device, dtype)
    ours.load_state_dict(hf.state_dict())
    models = {"ours": ours, "hf": hf}
    # the same weights again, each layer compiled (the first round, a warm-up, compiles)
    if compile_ours:
        models["compiled"] = Mistral(cfg).to(device, dtype)
        models["compiled"].load_state_dict(hf.state_dict())
        models["compiled"].compile()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    mask = torch.ones_like(ids)
    tokens = ids.numel()
    times = {name: [] for name in models}
    memory = {}
    for i in range(args.repeats + 1):  # first round is warm-up
        for name, model in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            memory[name] = step(model, ids, mask, name != "hf")
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times[name].append(time.perf_counter() - t0)
    speed = {k: tokens / statistics.median(v) for k, v in times.items()}
    return speed, memory


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true",
                   help="also time our decoder compiled (Mistral.compile)")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                   default=["float32", "bfloat16"])
    args = p.parse_args()
    print(f"config: {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq} "
          f"tokens, device {'cuda' if torch.cuda.is_available() else 'cpu'}, torch "
          f"{torch.__version__}")
    print(f"{'dtype':<9}{'ours tok/s':>12}{'HF tok/s':>12}{'speed ratio':>13}{'ours MiB':>10}"
          f"{'HF MiB':>9}{'mem ratio':>11}"
          + (f"{'compiled tok/s':>16}{'compiled / HF':>15}" if args.compile else ""))
    for dtype in (getattr(torch, name) for name in args.dtypes):
        speed, memory = bench(args, dtype, args.compile)
        compiled = (f"{speed['compiled']:>16.0f}{speed['compiled'] / speed['hf']:>15.2f}"
                    if args.compile else "")
        print(f"{str(dtype).removeprefix('torch.'):<9}{speed['ours']:>12.0f}{speed['hf']:>12.0f}"
              f"{speed['ours'] / speed['hf']:>13.2f}{memory['ours'] / 2**20:>10.1f}"
              f"{memory['hf'] / 2**20:>9.1f}"
              f"{memory['ours'] / memory['hf']:>11.2f}{compiled}")


if __name__ == "__main__":
    main()
