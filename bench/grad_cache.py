"""GradCache (train.py --grad-cache) against the plain step: peak memory and time of one step as the
batch grows.

One step here is train.py's forward and backward of a global batch: Q queries x (1 positive + G-1
hard negatives), the contrastive loss with in-batch negatives (the optimizer's memory does not
depend on the batch, so it is left out). Plain: `train.forward_backward`, every activation of the
batch alive at once. GradCache: `train.forward_backward_cached` with CHUNK texts per forward. The
two alternate in one process, so the time ratio holds however busy the machine is.

    python bench/grad_cache.py  # CPU: a 4-layer model, batches of 2..32 queries
    python bench/grad_cache.py --device cuda --preset mistral-7b --layers 32 --lora-rank 16 \\
        --dtype bf16 --num-latents 512 --query-length 512 --doc-length 512 --chunk 32 \\
        --find-max  # the paper's shape, one GPU

Memory: on GPU the allocator's peak during the step (torch.cuda.max_memory_allocated); on CPU the
peak bytes of the tensors autograd holds for backward, parameters excluded (`SavedActivations`):
what grows with the batch. `--find-max` doubles the batch until a step runs out of GPU memory, plain
and GradCache: the largest that fits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from plumbing.base_checkpoints import ByteTokenizer  # noqa: E402
from lora import apply_lora, mark_only_lora_trainable  # noqa: E402
from model import PRESETS, Mistral, MistralConfig, NVEmbed  # noqa: E402
from pooling import LatentAttentionPooling  # noqa: E402

CPU_SHAPE = dict(vocab_size=320, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 sliding_window=None)


class SavedActivations:
    """The bytes autograd holds for backward, now and at peak: each distinct storage once, while a
    graph keeps a tensor of it; parameters (which exist anyway) excluded."""

    def __init__(self, model):
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        # storage -> [bytes, saved tensors pointing at it]
        self.holders, self.now, self.peak = {}, 0, 0

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.tensor)

    def pack(self, tensor):
        return _Held(self, tensor)


class _Held:
    """A saved tensor; its storage counts until the graph frees the last one holding it."""

    def __init__(self, record: SavedActivations, tensor: torch.Tensor):
        self.record, self.tensor = record, tensor
        self.key = tensor.untyped_storage().data_ptr()
        if self.key in record.parameters:
            self.key = None
            return
        entry = record.holders.setdefault(self.key, [tensor.untyped_storage().nbytes(), 0])
        entry[1] += 1
        if entry[1] == 1:
            record.now += entry[0]
            record.peak = max(record.peak, record.now)

    def __del__(self):
        if self.key is None:
            return
        entry = self.record.holders[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            self.record.now -= entry[0]
            del self.record.holders[self.key]


def build_model(args, device: torch.device) -> NVEmbed:
    """On the meta device, then initialised where it runs (a 7B model is never built on the CPU
    first)."""
    config = MistralConfig(**{**(PRESETS[args.preset] if args.preset else CPU_SHAPE),
                              **({"num_hidden_layers": args.layers} if args.layers else {})})
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device("meta"):
        decoder = Mistral(config)
        pooling = LatentAttentionPooling(config.hidden_size, num_latents=args.num_latents,
                                         head_dim=args.latent_head_dim or config.hidden_size)
    model = NVEmbed(decoder, pooling, ByteTokenizer(), "latent")
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        # weights of the right scale; the values matter little
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for name, buffer in model.named_buffers():
            raise AssertionError(f"unexpected buffer {name}: initialise it here")
    model.to(dtype)
    if args.lora_rank:
        apply_lora(model.decoder, rank=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.0)
        mark_only_lora_trainable(model.decoder)
        model.decoder.to(device)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable in fp32, as train.build_model
    model.decoder.activation_checkpointing = args.activation_checkpointing
    return model.train()


def make_batch(queries: int, group: int, query_length: int, doc_length: int, vocab: int,
               seed: int) -> dict:
    """A collate-shaped batch of random tokens: every text full length, every document distinct."""
    generator = torch.Generator().manual_seed(seed)

    def texts(rows, length):
        ids = torch.randint(3, vocab, (rows, length), generator=generator)
        mask = torch.ones(rows, length, dtype=torch.long)
        return dict(input_ids=ids, attention_mask=mask, pool_mask=mask.bool())

    keys = torch.arange(queries * group, dtype=torch.long)
    return dict(queries=texts(queries, query_length), documents=texts(queries * group, doc_length),
                doc_keys=keys, known_positive_keys=keys[::group, None].clone(),
                in_batch_negatives=True)


def one_step(model, batch: dict, chunk: int | None, device: torch.device,
             autocast) -> tuple[float, float]:
    """(seconds, peak bytes) of one forward and backward, plain (chunk None) or GradCache."""
    model.zero_grad(set_to_none=True)
    record = SavedActivations(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with record.hooks():
        if chunk is None:
            train.forward_backward(model, batch, 0.01, 1.0, device, autocast)
        else:
            train.forward_backward_cached(model, batch, 0.01, chunk, device, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) - base
    return time.perf_counter() - start, record.peak


def measure(model, args, queries: int, device: torch.device, autocast) -> dict:
    """Plain and GradCache on the same batch, alternating: median seconds, peak bytes."""
    batch = make_batch(queries, args.group, args.query_length, args.doc_length,
                       model.decoder.config.vocab_size, 0)
    times, peaks = {"plain": [], "cached": []}, {}
    # warm-up: the allocator, the first kernels of these shapes
    one_step(model, batch, None, device, autocast)
    for _ in range(args.repeats):
        for name, chunk in (("plain", None), ("cached", args.chunk)):
            seconds, peak = one_step(model, batch, chunk, device, autocast)
            times[name].append(seconds)
            peaks[name] = peak
    return dict(queries=queries, texts=queries * (1 + args.group), **{f"{k}_s": statistics.median(v)
                for k, v in times.items()}, plain_bytes=peaks["plain"],
                cached_bytes=peaks["cached"])


def chunk_cost(model, args, device: torch.device, autocast) -> float:
    """One chunk's own cost: the memory of embedding CHUNK documents with their graph and
    backpropagating."""
    chunk = make_batch(args.chunk, 1, args.doc_length, args.doc_length,
                       model.decoder.config.vocab_size, 1)
    model.zero_grad(set_to_none=True)
    record = SavedActivations(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with record.hooks(), autocast or contextlib.nullcontext():
        embeddings = model(train.to_device(chunk["documents"], device))  # (CHUNK, D)
    embeddings.float().sum().backward()
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else record.peak


def find_max(model, args, device: torch.device, autocast) -> dict:
    """The largest batch (queries, doubling from 1) whose step fits in GPU memory, plain and
    GradCache."""
    largest = {}
    for name, chunk in (("plain", None), ("cached", args.chunk)):
        queries, fits = 1, 0
        while queries <= args.max_queries:
            batch = make_batch(queries, args.group, args.query_length, args.doc_length,
                               model.decoder.config.vocab_size, 0)
            try:
                one_step(model, batch, chunk, device, autocast)
                fits, queries = queries, 2 * queries
            except torch.OutOfMemoryError:
                break
            finally:
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        largest[name] = fits
    return largest


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="decoder shape (default: 4 layers, 256)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default: the preset's)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--num-latents", type=int, default=64)
    p.add_argument("--latent-head-dim", type=int, default=None,
                   help="default: the hidden size (the paper's)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                   help="queries per step")
    p.add_argument("--group", type=int, default=4,
                   help="documents per query: 1 positive + hard negatives")
    p.add_argument("--query-length", type=int, default=32)
    p.add_argument("--doc-length", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8, help="GradCache: texts per forward")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--find-max", action="store_true",
                   help="GPU: the largest batch that fits, plain and GradCache")
    p.add_argument("--max-queries", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a shared machine, threads waiting for a "
                        "descheduled sibling at every op would make the many small ops of chunks "
                        "look slower than they are)")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else None
    one_chunk = chunk_cost(model, args, device, autocast)
    print(f"{device.type} ({torch.get_num_threads()} threads), "
          f"{model.decoder.config.num_hidden_layers} layers x hidden "
          f"{model.decoder.config.hidden_size}, {args.dtype}, LoRA {args.lora_rank or 'off'}, "
          f"queries {args.query_length} tokens, {args.group} documents of {args.doc_length} tokens "
          f"per query, chunk {args.chunk}: one chunk's own cost {one_chunk / 2**20:.1f} MiB")
    print("| queries | texts | plain MiB | GradCache MiB | GradCache / one chunk | plain ms | "
          "GradCache ms | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for queries in args.batches:
        row = measure(model, args, queries, device, autocast)
        rows.append(row)
        print(f"| {queries} | {row['texts']} | {row['plain_bytes'] / 2**20:,.1f} | "
              f"{row['cached_bytes'] / 2**20:,.1f} | {row['cached_bytes'] / one_chunk:.2f} | "
              f"{1000 * row['plain_s']:,.0f} | {1000 * row['cached_s']:,.0f} | "
              f"{row['cached_s'] / row['plain_s']:.2f} |", flush=True)
    result = dict(one_chunk_bytes=one_chunk, rows=rows, args=vars(args))
    if args.find_max:
        result["largest_batch"] = find_max(model, args, device, autocast)
        print(f"largest batch that fits (queries, doubling): {result['largest_batch']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
