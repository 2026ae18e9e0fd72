"""Issue 29's block-mask observation, re-measured: one SmolLM2-135M decoder layer with LoRA r16
(dropout 0.1, bf16 autocast over a bf16 base, fp32 adapters), forward and backward, on the quick
setting's texts (SciFact queries and documents at 64 tokens, the SmolLM2 tokenizer) laid out two
ways: padded (one row per text, as training batches them) and packed (texts end to end in rows of
512 tokens, a dense block-diagonal mask keeping each text to itself, positions restarting per
text). Each layout runs with the attention code of `--against` (abc58cb: the mask as (B, 1, T, T)
with every position seeing itself, key/value heads repeated for GQA) and of this tree (enable_gqa;
a padded batch's mask as (B, 1, 1, T)); the same layer's weights, the sides alternating in one
process. Also timed: the attention call alone (SDPA and the GQA repeat) of each.

    python bench/block_mask.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.quick_step import (DEFAULT_DATA, DEFAULT_MODEL, Tree, base_folder,  # noqa: E402
                              cpu_name, load_text, unpack)


def quick_lengths(folder: Path, data: Path, texts: int = 40) -> list[int]:
    """Token counts of `texts` quick-setting rows: 8 queries (with SciFact's instruction) and 32
    documents, at 64 tokens."""
    import random

    from evaluate import INSTRUCTIONS
    from plumbing import datafiles
    from plumbing.base_checkpoints import load_tokenizer
    from data import tokenize

    tokenizer = load_tokenizer(str(folder))
    corpus, queries, _ = datafiles.load_beir(data, "train")
    rng = random.Random(0)
    query_texts = rng.sample(sorted(queries.values()), texts // 5)
    doc_texts = [datafiles.doc_text(corpus[d])
                 for d in rng.sample(sorted(corpus), texts - texts // 5)]
    lengths = []
    for batch in (tokenize(tokenizer, query_texts, INSTRUCTIONS["scifact"], 64),
                  tokenize(tokenizer, doc_texts, "", 64)):
        lengths += batch["attention_mask"].sum(1).tolist()
    return lengths


def layouts(lengths: list[int], width: int = 512) -> dict:
    """{"padded", "packed"}: (attention_mask (B, T) or None, positions (B, T), 4-D mask or None,
    slots). Packed rows are filled first-fit in the texts' order."""
    T = max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    padded = (mask, (mask.cumsum(-1) - 1).clamp(min=0), None, mask.numel())
    rows = []
    for length in lengths:
        row = next((r for r in rows if sum(r) + length <= width), None)
        if row is None:
            rows.append(row := [])
        row.append(length)
    segment = torch.full((len(rows), width), -1)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, length in enumerate(row):
            segment[r, start:start + length] = s
            positions[r, start:start + length] = torch.arange(length)
            start += length
    same = segment[:, None, :, None] == segment[:, None, None, :]  # (B, 1, T, T)
    block = (same & (segment[:, None, :, None] >= 0)) | torch.eye(width, dtype=torch.bool)
    packed = (None, positions, block, segment.numel())
    return {"padded": padded, "packed": packed}


class LayerSide:
    """One tree's DecoderLayer (with its LoRA) holding `state`, timed on a layout."""

    def __init__(self, tree: Tree, state: dict, config_fields: dict):
        with tree.active():
            self.tree, model, lora = tree, tree.modules["model"], tree.modules["lora"]
            config = model.MistralConfig(**config_fields)
            self.layer = model.DecoderLayer(config)
            lora.apply_lora(self.layer, rank=16, alpha=32.0, dropout=0.1)
            self.layer.load_state_dict(state)
            self.layer.to(torch.bfloat16)
            for name, param in self.layer.named_parameters():
                param.requires_grad = "lora_" in name
                if param.requires_grad:
                    param.data = param.data.float()
            self.config = config

    def inputs(self, layout):
        attention_mask, positions, block, _ = layout
        model = self.tree.modules["model"]
        if hasattr(model, "rotary_frequencies"):  # abc58cb: the frequencies, then cos and sin
            inv_freq = model.rotary_frequencies(self.config)
            cos, sin = model.rotary_cos_sin(positions, inv_freq, torch.bfloat16)
        else:
            cos, sin = model.rotary_cos_sin(positions, self.config, torch.bfloat16)
        if block is None:
            block = model.attention_mask_4d(attention_mask, False, None)
        return cos, sin, block

    def step(self, layout, x) -> float:
        with self.tree.active():
            cos, sin, mask = self.inputs(layout)
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self.layer(x, cos, sin, mask, False)
            y.float().square().mean().backward()
            return time.perf_counter() - start

    def attention(self, layout, x) -> float:
        """The attention call alone (after the projections and rotary), forward and backward."""
        with self.tree.active():
            attn = self.layer.self_attn
            cos, sin, mask = self.inputs(layout)
            B, T, _ = x.shape
            q = torch.randn(B, attn.num_heads, T, attn.head_dim, dtype=torch.bfloat16,
                            requires_grad=True)
            k, v = (torch.randn(B, attn.num_kv_heads, T, attn.head_dim, dtype=torch.bfloat16,
                                requires_grad=True) for _ in range(2))
            start = time.perf_counter()
            y = attention_call(self.tree.name, attn, q, k, v, mask)
            y.backward(torch.ones_like(y))
            return time.perf_counter() - start


def attention_call(tree_name, attn, q, k, v, mask):
    """What each tree's Attention.forward does between rotary and o_proj (CPU)."""
    if tree_name == "this tree":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                enable_gqa=True)
    groups = attn.num_heads // attn.num_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default="abc58cb")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nvembed-bench")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after a warm-up round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = base_folder(args.model, args.cache)
    lengths = quick_lengths(folder, args.data)
    shapes = layouts(lengths)
    from model import MistralConfig, PRESETS

    fields = PRESETS["smollm2-135m"]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        this = Tree("this tree", Path(__file__).resolve().parents[1])
        old = Tree(args.against, unpack(args.against, Path(tmp)))
        with this.active():
            reference = this.modules["model"].DecoderLayer(MistralConfig(**fields))
            this.modules["lora"].apply_lora(reference, rank=16, alpha=32.0, dropout=0.1)
            for name, param in reference.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02)
        state = reference.state_dict()
        sides = {tree.name: LayerSide(tree, state, fields) for tree in (old, this)}
        cases = [(tree, layout, kind) for kind in ("layer", "attention") for tree in sides
                 for layout in shapes]
        times = {case: [] for case in cases}
        D = fields["hidden_size"]
        print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"{len(lengths)} texts, {sum(lengths)} real tokens; slots: padded "
              f"{shapes['padded'][3]}, packed {shapes['packed'][3]}; load {load_text()}")
        for round_ in range(args.rounds + 1):
            for case in cases if round_ % 2 else cases[::-1]:
                tree, layout, kind = case
                B, T = shapes[layout][1].shape
                x = torch.randn(B, T, D, dtype=torch.bfloat16, requires_grad=True)
                side = sides[tree]
                seconds = side.step(shapes[layout], x) if kind == "layer" else \
                    side.attention(shapes[layout], x)
                if round_:
                    times[case].append(seconds)
        print(f"load after {load_text()}")
        base = {kind: statistics.median(times[(old.name, "padded", kind)])
                for kind in ("layer", "attention")}
        print(f"| what | code | layout | ms (median of {args.rounds}) | vs {old.name} padded |")
        print("|---|---|---|---|---|")
        for (tree, layout, kind), values in times.items():
            ms = statistics.median(values)
            print(f"| {kind} fwd+bwd | {tree} | {layout} | {1000 * ms:,.1f} | "
                  f"{base[kind] / ms:.2f}x |")


if __name__ == "__main__":
    main()
