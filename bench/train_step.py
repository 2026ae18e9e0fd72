"""One full NV-Embed training step with our decoder against the same step on transformers'.

The step: embed queries and documents (decoder, latent-attention pooling, normalise),
the contrastive loss with in-batch and hard negatives (train.contrastive_loss), backward,
AdamW. The two runs differ only in the decoder: model.Mistral, or transformers'
MistralModel (sdpa) made bidirectional and given the same weights. They alternate in one
process, so the printed ratios (ours / HF) hold however busy the machine is.

    python bench/train_step.py        # CPU: 4 layers, hidden 512, with and without checkpointing
    python bench/train_step.py --gpu  # one GPU: Mistral-7B-shaped layers, LoRA, bf16, length 512

Memory: on GPU the allocator's peak during the step; on CPU the bytes autograd saves for
backward (bench/model_vs_hf.py explains why).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.model_vs_hf import saved_bytes  # noqa: E402
from lora import apply_lora, mark_only_lora_trainable  # noqa: E402
from model import Mistral, MistralConfig, NVEmbed  # noqa: E402
from pooling import LatentAttentionPooling  # noqa: E402
from loss import contrastive_loss  # noqa: E402
from plumbing.mfu import model_shape, peak_flops, step_flops  # noqa: E402


class HFDecoder(nn.Module):
    """transformers' MistralModel behind model.Mistral's forward signature."""

    def __init__(self, config: MistralConfig, causal: bool = False):
        super().__init__()
        import transformers

        hf_config = transformers.MistralConfig(**config.__dict__, attn_implementation="sdpa")
        self.model = transformers.MistralModel(hf_config)
        self.config = config
        if not causal:  # both the mask and SDPA's is_causal must say bidirectional
            self.model.config.is_causal = False
            for layer in self.model.layers:
                layer.self_attn.is_causal = False

    @property
    def embed_tokens(self):
        return self.model.embed_tokens

    def forward(self, input_ids, attention_mask=None, causal=False):
        # as ours: from each row's first real token
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=positions).last_hidden_state


class ByteSizedTokenizer:
    """len() is all NVEmbed asks of a tokenizer when batches are made by hand."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


def random_batch(rows, length, vocab, device, generator):
    """Right-padded random texts of 50-100% of `length` tokens, all pooled."""
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # (rows, T)
    ids = torch.randint(0, vocab, (rows, length), generator=generator) * mask
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "pool_mask": mask.bool().to(device)}


def build(decoder, hidden, lora, dtype, device, num_latents):
    pooling = LatentAttentionPooling(hidden, num_latents=num_latents)
    model = NVEmbed(decoder, pooling, ByteSizedTokenizer(decoder.config.vocab_size),
                    "latent").to(device)
    if lora:
        apply_lora(model.decoder, rank=16, alpha=32, dropout=0.1)
        mark_only_lora_trainable(model.decoder)
    model.to(dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model.train(), optimizer


def step(model, optimizer, queries, documents, is_cuda):
    if is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()

    def forward():
        doc_keys = torch.arange(len(documents["input_ids"]))  # every document distinct
        return contrastive_loss(model(queries), model(documents), doc_keys=doc_keys,
                                temperature=0.01, in_batch_negatives=True)

    loss, saved = saved_bytes(forward)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() - base if is_cuda else saved
    return seconds, memory


def compare(args, config, checkpointing, dtype, device, lora):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    hf_decoder = HFDecoder(config)
    ours_decoder = Mistral(config)
    ours_decoder.load_state_dict(hf_decoder.model.state_dict())
    ours_decoder.activation_checkpointing = checkpointing
    if checkpointing:
        hf_decoder.model.config.use_cache = False
        hf_decoder.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    runs = {"ours": build(ours_decoder, config.hidden_size, lora, dtype, device, args.latents),
            "hf": build(hf_decoder, config.hidden_size, lora, dtype, device, args.latents)}
    queries = random_batch(args.batch, args.query_length, config.vocab_size, device, generator)
    documents = random_batch(args.batch * (1 + args.hard_negatives), args.seq, config.vocab_size,
                             device, generator)
    tokens = int(queries["attention_mask"].sum() + documents["attention_mask"].sum())
    times, memory = {"ours": [], "hf": []}, {}
    for i in range(args.repeats + 1):  # round 0 is warm-up
        for name, (model, optimizer) in runs.items():
            seconds, memory[name] = step(model, optimizer, queries, documents,
                                         device.type == "cuda")
            if i:
                times[name].append(seconds)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    flops = step_flops(model_shape(runs["ours"][0]), {"queries": queries, "documents": documents})
    return tokens, seconds, memory, flops


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true",
                   help="Mistral-7B-shaped layers, LoRA, bf16 on one GPU")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (CPU 4; GPU 8)")
    p.add_argument("--batch", type=int, default=None, help="queries per step (CPU 4; GPU 8)")
    p.add_argument("--hard-negatives", type=int, default=3, help="hard negatives per query")
    p.add_argument("--seq", type=int, default=None, help="document tokens (CPU 128; GPU 512)")
    p.add_argument("--query-length", type=int, default=None, help="query tokens (CPU 32; GPU 64)")
    p.add_argument("--latents", type=int, default=None,
                   help="latent-attention latents (CPU 64; GPU 512)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            p.error("--gpu needs a CUDA device")
        device, dtype, lora = torch.device("cuda"), torch.bfloat16, True
        config = MistralConfig.preset("mistral-7b")
        config.num_hidden_layers = args.layers or 8
        defaults = dict(batch=8, seq=512, query_length=64, latents=512)
        settings = [False, True]
    else:
        device, dtype, lora = torch.device("cpu"), torch.float32, False
        config = MistralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1792,
                               num_hidden_layers=args.layers or 4, num_attention_heads=8,
                               num_key_value_heads=2, sliding_window=None)
        defaults = dict(batch=4, seq=128, query_length=32, latents=64)
        settings = [False, True]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    print(f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {args.batch} queries x "
          f"(1 + {args.hard_negatives}) documents, {args.query_length} / {args.seq} tokens, "
          f"latents {args.latents}, "
          f"{'LoRA r16, ' if lora else 'full fine-tuning, '}{str(dtype).removeprefix('torch.')}, "
          f"{device}")
    print(f"{'checkpointing':<14}{'ours tok/s':>12}{'HF tok/s':>11}{'speed ratio':>13}"
          f"{'ours MiB':>10}{'HF MiB':>9}{'mem ratio':>11}{'ours MFU':>10}")
    peak = peak_flops(device)
    for checkpointing in settings:
        tokens, seconds, memory, flops = compare(args, config, checkpointing, dtype, device, lora)
        mfu = f"{100 * flops / seconds['ours'] / peak:.1f}%" if peak else "-"
        print(f"{'on' if checkpointing else 'off':<14}{tokens / seconds['ours']:>12.0f}"
              f"{tokens / seconds['hf']:>11.0f}{seconds['hf'] / seconds['ours']:>13.2f}"
              f"{memory['ours'] / 2**20:>10.1f}{memory['hf'] / 2**20:>9.1f}"
              f"{memory['ours'] / memory['hf']:>11.2f}{mfu:>10}")


if __name__ == "__main__":
    main()
