"""One prepared GPU benchmark (issue 14): a 7B-shaped NV-Embed training step, our decoder against
transformers', our encoding against an HF AutoModel loop. One command, at most 8 minutes on one
H200; it appends its rows to bench/RESULTS.md as each is measured, so a run stopped early keeps what
it had.

    python bench/gpu_step.py                  # one GPU: Mistral-7B layer shapes, bf16, sequence 512
    python bench/gpu_step.py --dry-run
        # the same code at tiny shapes on the CPU (tests/test_bench.py)

(a) The training step as train.py runs it on one GPU (bf16 autocast, trainable weights fp32, AdamW,
    gradient clipping): Mistral-7B layers (32, or --layers), latent pooling of 512 latents x 8 heads
    x head dim 4096, queries of --query-length tokens with 1 + 7 documents of --seq tokens each, no
    padding; in-batch and hard negatives. LoRA r16 on a frozen bf16 base, then full fine-tuning on
    as many layers as leave room for the fp32 weights, gradients and AdamW state (the row says how
    many). Each: eager and --compile (NVEmbed.compile), without and with activation checkpointing,
    at the largest batch that fits (doubling the queries until out of memory). Tokens/s, MFU
    (plumbing.mfu.step_flops: useful work only) and the allocator's peak memory.
(b) Decoder forward + backward, model.Mistral (eager and compiled) against transformers'
    MistralModel (sdpa), same weights, bf16, causal, --hf-layers layers.
(c) Corpus encoding: NVEmbed.encode (mean pooling) against an HF AutoModel + mean pooling loop over
    batches sorted by token count, the same decoder weights, bidirectional both, random texts of 32
    to --seq tokens.

Every model is built on the meta device and materialised on the GPU (`to_empty`, then initialised
there): nothing is built on the CPU first. The time budget (--budget, default 400 s) is checked
before each measurement: what does not fit is written as "skipped: time budget".
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plumbing.base_checkpoints import ByteTokenizer  # noqa: E402
from data import TextRule  # noqa: E402
from model import Mistral, MistralConfig, NVEmbed  # noqa: E402
from plumbing.loading import skeleton  # noqa: E402
from pooling import MeanPooling  # noqa: E402
from loss import contrastive_loss  # noqa: E402
from plumbing.mfu import model_shape, peak_flops, step_flops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
COMMAND = "python bench/gpu_step.py"


@dataclasses.dataclass
class Setting:
    """The shapes of one run: the GPU's, or --dry-run's tiny ones."""
    decoder: MistralConfig
    latent: dict
    seq: int
    query_length: int
    documents: int  # per query: 1 positive + hard negatives
    max_queries: int  # the batch search stops here
    hf_layers: int
    hf_batch: int
    texts: int
    backend: str  # torch.compile's
    dtype: torch.dtype  # the frozen base's and autocast's
    lora_dropout: float
    repeats: int  # timed steps / rounds after the warm-up


def setting(args) -> Setting:
    if args.dry_run:
        decoder = MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=192,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                sliding_window=None)
        # Backend "eager": dynamo traces and guards as on the GPU, without inductor's minutes of CPU
        # code generation. fp32: a CPU without bf16 instructions multiplies bf16 matrices ~8x
        # slower. LoRA dropout 0 takes nn.Dropout, as on the GPU, rather than lora.LoRADropout's CPU
        # mask.
        return Setting(decoder, dict(num_latents=8, num_heads=2, head_dim=16), seq=32,
                       query_length=8, documents=8, max_queries=2, hf_layers=2, hf_batch=2,
                       texts=16, backend="eager", dtype=torch.float32, lora_dropout=0.0, repeats=1)
    decoder = dataclasses.replace(MistralConfig.preset("mistral-7b"), num_hidden_layers=args.layers)
    return Setting(decoder, dict(num_latents=512, num_heads=8, head_dim=4096), seq=args.seq,
                   query_length=args.query_length, documents=8, max_queries=256,
                   hf_layers=args.hf_layers, hf_batch=16, texts=args.texts, backend="inductor",
                   dtype=torch.bfloat16, lora_dropout=0.1, repeats=2)


class Results:
    """This run's section of RESULTS.md: the header, then tables (each row goes to the end of its
    own table) and notes in the order they first appear, rewritten whole after every row (a run cut
    short keeps its rows)."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.before = path, path.read_text() if path.exists() \
            else "# Benchmark results\n"
        self.header, self.blocks = list(header), []  # blocks: [lines] each, a table or a note

    def note(self, text: str) -> None:
        self.blocks.append([text])
        self._write()

    def row(self, table: str, columns: list[str], cells: list) -> None:
        block = next((b for b in self.blocks if b[0] == table), None)
        if block is None:  # a table's title and header before its first row
            block = [table, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            self.blocks.append(block)
        block.append("| " + " | ".join(str(c) for c in cells) + " |")
        print(block[-1], flush=True)
        self._write()

    def _write(self) -> None:
        lines = self.header + [line for block in self.blocks for line in ["", *block]]
        self.path.write_text(self.before.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")


def seconds_left(deadline: float) -> float:
    return deadline - time.monotonic()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def init_on_device(module: torch.nn.Module) -> None:
    """Weights for a speed measurement, drawn where the module lives: matrices N(0, 0.02), norms 1,
    biases 0, LoRA's B 0 (as a fresh adapter)."""
    for name, param in module.named_parameters():
        if "lora_B" in name or name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02)


def build_embedder(s: Setting, device, lora: bool, layers: int | None = None,
                   pooling: str = "latent"):
    """An NVEmbed materialised on `device` from the meta device (plumbing.loading.skeleton), set up
    as train.build_model does: with LoRA (r16, alpha 32, dropout 0.1) the base is bf16 and frozen,
    else everything trains; trainable in fp32."""
    decoder = dataclasses.replace(s.decoder,
                                  num_hidden_layers=layers or s.decoder.num_hidden_layers)
    architecture = dict(decoder=dataclasses.asdict(decoder), pooling=pooling,
                        pooling_kwargs=s.latent if pooling == "latent" else {},
                        lora=dict(rank=16, alpha=32.0, dropout=s.lora_dropout) if lora else None,
                        causal=False, max_length=s.seq, text_rule=dataclasses.asdict(TextRule()),
                        normalize=True, base=None)
    model = skeleton(architecture, ByteTokenizer())  # every parameter on the meta device
    for name, param in model.named_parameters():
        param.requires_grad = not lora or "lora_" in name or name.startswith("pooling.")
        param.data = param.data.to(torch.float32 if param.requires_grad else s.dtype)
    model.to_empty(device=device)
    init_on_device(model)
    return model.train()


def random_rows(rows: int, length: int, vocab: int, device) -> dict:
    ids = torch.randint(0, vocab, (rows, length), device=device)
    mask = torch.ones_like(ids)
    return dict(input_ids=ids, attention_mask=mask, pool_mask=mask.bool())


def train_batch(s: Setting, queries: int, device) -> dict:
    vocab = s.decoder.vocab_size
    return dict(queries=random_rows(queries, s.query_length, vocab, device),
                documents=random_rows(queries * s.documents, s.seq, vocab, device),
                # every document distinct
                doc_keys=torch.arange(queries * s.documents, device=device))


def train_step(model, optimizer, batch: dict, device, bf16: bool = True) -> None:
    """train.py's step on one GPU: bf16 autocast, InfoNCE with in-batch and hard negatives,
    clipping, AdamW."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        query_emb, doc_emb = model(batch["queries"]), model(batch["documents"])  # (B, D), (B*G, D)
    loss = contrastive_loss(query_emb, doc_emb, batch["doc_keys"], temperature=0.01,
                            in_batch_negatives=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fits(model, optimizer, s: Setting, queries: int, device) -> bool:
    """One step at `queries` queries; False on running out of GPU memory (its memory freed
    again)."""
    try:
        train_step(model, optimizer, train_batch(s, queries, device), device,
                   s.dtype == torch.bfloat16)
        synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        pass  # freed below, once the exception's frames (which hold the step's tensors) are gone
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return False


def largest_batch(model, optimizer, s: Setting, device, deadline: float) -> int:
    """The largest power of two of queries (up to s.max_queries) whose step fits in memory; 0 if
    none does."""
    queries = 0
    while queries < s.max_queries and seconds_left(deadline) > 60:
        start = time.perf_counter()
        if not fits(model, optimizer, s, max(1, 2 * queries), device):
            break
        queries = max(1, 2 * queries)
        if time.perf_counter() - start > 15:  # the next doubling would take ~30 s: large enough
            break
    return queries


def measure_step(model, optimizer, s: Setting, queries: int, device) -> dict:
    """A warm-up step, then s.repeats timed steps: tokens/s, MFU, peak memory."""
    batch = train_batch(s, queries, device)
    start = time.perf_counter()
    train_step(model, optimizer, batch, device, s.dtype == torch.bfloat16)  # warm-up
    synchronize(device)
    warmup = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(s.repeats):
        start = time.perf_counter()
        train_step(model, optimizer, batch, device, s.dtype == torch.bfloat16)
        synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = int(batch["queries"]["attention_mask"].sum()
                 + batch["documents"]["attention_mask"].sum())
    peak = peak_flops(device)
    mfu = step_flops(model_shape(model), batch) / seconds / peak if peak else None
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(seconds=seconds, warmup=warmup, tokens_per_s=tokens / seconds, mfu=mfu,
                memory_gib=memory)


STEP_COLUMNS = ["fine-tuning", "layers", "compile", "activation checkpointing",
                "queries (x 1+7 docs)", "tokens/s", "MFU", "peak GiB", "s/step", "first step s"]


def step_rows(results: Results, s: Setting, device, lora: bool, layers: int,
              deadline: float) -> None:
    """(a) for one kind of fine-tuning: eager then compiled (the same model, compiled in place),
    each without and with activation checkpointing, each at its largest batch."""
    kind = f"LoRA r16, frozen {str(s.dtype).removeprefix('torch.')} base" if lora \
        else "full (fp32 weights, AdamW)"
    c = s.decoder
    title = (f"(a) training step: layers of hidden {c.hidden_size}, MLP {c.intermediate_size}, "
             f"{c.num_attention_heads} / {c.num_key_value_heads} heads (Mistral-7B's on a GPU), "
             f"latent pooling {s.latent['num_latents']} x {s.latent['num_heads']} x "
             f"{s.latent['head_dim']}, queries {s.query_length} / documents {s.seq} tokens, "
             f"{str(s.dtype).removeprefix('torch.')} autocast")
    model = build_embedder(s, device, lora, layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = {}
    for compiled in (False, True):
        if compiled:
            model.compile(backend=s.backend)
        for checkpointing in (False, True):
            cells = [kind, layers, "yes" if compiled else "no", "on" if checkpointing else "off"]
            if seconds_left(deadline) < (150 if compiled else 45):
                results.row(title, STEP_COLUMNS, cells + ["skipped: time budget"] + [""] * 5)
                continue
            model.decoder.activation_checkpointing = checkpointing
            measured = measured_cells(model, optimizer, s, device, deadline, batches, checkpointing,
                                      compiled)
            results.row(title, STEP_COLUMNS, cells + measured)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measured_cells(model, optimizer, s: Setting, device, deadline: float, batches: dict,
                   checkpointing: bool, compiled: bool) -> list:
    """One (a) row's measured cells. The batch: the largest that fits, searched eagerly once per
    checkpointing setting; the compiled model takes it too, halved if it runs out of memory. An
    error fills the row and the run goes on to the next (its traceback on stderr)."""
    try:
        first_step = None
        if checkpointing not in batches:
            batches[checkpointing] = largest_batch(model, optimizer, s, device, deadline)
        queries = batches[checkpointing]
        if queries and compiled:
            start = time.perf_counter()
            # the first step compiles
            while queries and not fits(model, optimizer, s, queries, device):
                queries //= 2
            first_step = time.perf_counter() - start
        if queries == 0:
            return ["out of memory at 1 query"] + [""] * 5
        m = measure_step(model, optimizer, s, queries, device)
        m["warmup"] = first_step or m["warmup"]
    except Exception as error:  # noqa: BLE001 (one failed variant must not cost the others their
                                # GPU time)
        traceback.print_exc()
        return [f"failed: {type(error).__name__}: {str(error)[:120]}"] + [""] * 5
    return [queries, f"{m['tokens_per_s']:,.0f}",
            "-" if m["mfu"] is None else f"{100 * m['mfu']:.1f}%",
            "-" if m["memory_gib"] is None else f"{m['memory_gib']:.1f}", f"{m['seconds']:.2f}",
            f"{m['warmup']:.1f}"]


def full_fine_tuning_layers(s: Setting, device) -> int:
    """Layers whose fp32 weights, gradients and two AdamW moments (16 bytes a parameter), with the
    embedding's and the pooling's, take at most half the GPU's memory: the rest is for
    activations."""
    if device.type != "cuda":
        return s.decoder.num_hidden_layers
    c, latent = s.decoder, s.latent
    per_layer = (2 * c.hidden_size * (c.num_attention_heads + c.num_key_value_heads) * c.head_dim
                 + 3 * c.hidden_size * c.intermediate_size)
    width = latent["num_heads"] * latent["head_dim"]
    fixed = c.vocab_size * c.hidden_size + 4 * c.hidden_size * width + 12 * c.hidden_size ** 2
    memory = torch.cuda.get_device_properties(device).total_memory
    return max(1, min(c.num_hidden_layers, int((memory / 2 / 16 - fixed) // per_layer)))


def build_decoders(s: Setting, device):
    """transformers' MistralModel (sdpa, via AutoModel) and model.Mistral with its weights, both
    bf16 on `device`."""
    import transformers  # only (b) and (c) compare against transformers

    config = dataclasses.replace(s.decoder, num_hidden_layers=s.hf_layers)
    hf_config = transformers.MistralConfig(**dataclasses.asdict(config), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = transformers.AutoModel.from_config(hf_config, dtype=s.dtype)
        ours = Mistral(config).to(s.dtype)
    hf.to_empty(device=device)
    init_on_device(hf)
    with torch.device(device):  # its rotary table is a buffer, which to_empty leaves unset
        hf.rotary_emb = type(hf.rotary_emb)(config=hf.config)
    ours.to_empty(device=device)
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def median_seconds(functions: dict, device, repeats: int) -> dict:
    """{name: median seconds of fn()}, the functions alternating round by round; round 0 is a
    warm-up."""
    times = {name: [] for name in functions}
    for round_ in range(repeats + 1):
        for name, fn in functions.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def random_texts(count: int, longest: int) -> list[str]:
    """ASCII texts of `longest` / 16 to `longest` bytes (the byte tokenizer's tokens), in words of a
    few letters."""
    g = torch.Generator().manual_seed(0)
    texts = []
    for n in torch.randint(max(2, longest // 16), longest + 1, (count,), generator=g).tolist():
        letters = "".join(chr(97 + c) for c in torch.randint(0, 26, (n,), generator=g).tolist())
        cuts = sorted(set(torch.randint(1, n, (n // 6,), generator=g).tolist()))
        texts.append(" ".join(letters[a:b] for a, b in zip([0] + cuts, cuts + [n]))[:n - 1])
    return texts


@torch.inference_mode()
def hf_encode(hf, tokenizer, texts: list[str], batch_size: int, device) -> torch.Tensor:
    """What a user writes around AutoModel: token ids + EOS, batches sorted by length, masked mean,
    L2 norm."""
    ids = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = torch.empty(len(texts), hf.config.hidden_size)  # (N, D)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        # (b, T), longest first
        input_ids = torch.full((len(rows), len(ids[rows[0]])), tokenizer.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(rows):
            input_ids[row, :len(ids[i])], mask[row, :len(ids[i])] = torch.tensor(ids[i]), 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        hidden = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (b, T, D)
        weights = mask[..., None].to(hidden.dtype)  # (b, T, 1)
        out[rows] = F.normalize(((hidden * weights).sum(1) / weights.sum(1)).float(), dim=-1).cpu()
    return out


def decoder_and_encoding_rows(results: Results, s: Setting, device, deadline: float) -> None:
    """(b) and (c), eager, then with our layers compiled in place."""
    hf, ours = build_decoders(s, device)
    ids = torch.randint(0, s.decoder.vocab_size, (s.hf_batch, s.seq), device=device)
    tokens = ids.numel()
    dtype = str(s.dtype).removeprefix("torch.")
    title_b = (f"(b) decoder forward + backward, {s.hf_layers} layers of the (a) shapes, {dtype}, "
               f"causal, {s.hf_batch} x {s.seq} tokens")
    batch = 64 if device.type == "cuda" else 8
    title_c = (f"(c) encoding {s.texts} random texts of {max(2, s.seq // 16)}-{s.seq} tokens, "
               f"{s.hf_layers} layers, {dtype}, bidirectional, mean pooling, batches of {batch} "
               "sorted by token count")
    # + BOS and EOS
    encoder = NVEmbed(ours, MeanPooling(), ByteTokenizer(), "mean", max_length=s.seq + 2)
    texts, tokenizer = random_texts(s.texts, s.seq), ByteTokenizer()
    for compiled in (False, True):
        if seconds_left(deadline) < (150 if compiled else 40):
            for title in (title_b, title_c):
                results.row(title, ["ours", "speed ours", "speed HF", "ours / HF"],
                            ["compiled" if compiled else "eager", "skipped: time budget", "", ""])
            continue
        if compiled:
            ours.compile(backend=s.backend)
        hf.config.is_causal = True  # (b): causal, as bench/model_vs_hf.py
        for layer in hf.layers:
            layer.self_attn.is_causal = True
        seconds = median_seconds({
            "ours": lambda: ours(ids, None, causal=True).float().pow(2).mean().backward(),
            "hf": lambda: hf(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()},
                                 device, s.repeats)
        ours.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)
        results.row(title_b, ["ours", "speed ours", "speed HF", "ours / HF"],
                    ["compiled" if compiled else "eager", f"{tokens / seconds['ours']:,.0f} tok/s",
                     f"{tokens / seconds['hf']:,.0f} tok/s",
                     f"{seconds['hf'] / seconds['ours']:.2f}"])
        hf.config.is_causal = False  # (c): bidirectional, as NV-Embed
        for layer in hf.layers:
            layer.self_attn.is_causal = False
        seconds = median_seconds({
            "ours": lambda: encoder.encode(texts, batch_size=batch),
            "hf": lambda: hf_encode(hf, tokenizer, texts, batch, device)}, device, s.repeats)
        results.row(title_c, ["ours", "speed ours", "speed HF", "ours / HF"],
                    ["compiled" if compiled else "eager",
                     f"{len(texts) / seconds['ours']:,.1f} texts/s",
                     f"{len(texts) / seconds['hf']:,.1f} texts/s",
                     f"{seconds['hf'] / seconds['ours']:.2f}"])


def header(args, argv: list[str], device) -> list[str]:
    import transformers  # the version goes into the hardware line

    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        hardware = (f"{torch.cuda.get_device_name(device)} ({memory:.0f} GiB), CUDA "
                    f"{torch.version.cuda}")
    else:
        hardware = (f"CPU ({platform.processor() or platform.machine()}), "
                    f"{torch.get_num_threads()} threads")
    command = " ".join([COMMAND] + argv)
    lines = [f"## {'DRY RUN, tiny shapes, not a measurement: ' if args.dry_run else ''}`{command}` "
             f"({time.strftime('%Y-%m-%d')})", "",
             f"Hardware: {hardware}; torch {torch.__version__}, transformers "
             f"{transformers.__version__}. Time budget {args.budget:.0f} s. MFU: "
             "plumbing.mfu.step_flops (useful matrix products of real tokens, no recomputation) "
             "against the GPU's dense bf16 peak (plumbing.mfu.PEAK_BF16_FLOPS)."]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU (a test of the script)")
    p.add_argument("--results", type=Path, default=RESULTS,
                   help="the file the rows are appended to")
    p.add_argument("--budget", type=float, default=400.0,
                   help="seconds to measure in (default %(default)s: with start-up and the last "
                        "measurement's overrun, at most 8 minutes)")
    p.add_argument("--layers", type=int, default=32,
                   help="decoder layers of (a) (default %(default)s)")
    p.add_argument("--seq", type=int, default=512, help="document tokens (default %(default)s)")
    p.add_argument("--query-length", type=int, default=64,
                   help="query tokens (default %(default)s)")
    p.add_argument("--hf-layers", type=int, default=8,
                   help="decoder layers of (b) and (c) (default %(default)s)")
    p.add_argument("--texts", type=int, default=1024,
                   help="texts encoded in (c) (default %(default)s)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("needs a CUDA device (or --dry-run)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    s = setting(args)
    start = time.monotonic()
    deadline = start + args.budget  # each measurement starts only if its time is left
    torch.manual_seed(0)
    results = Results(args.results, header(args, sys.argv[1:] if argv is None else argv, device))
    parts = {"(a) LoRA": lambda: step_rows(results, s, device, True, s.decoder.num_hidden_layers,
                                           deadline),
             "(b), (c)": lambda: decoder_and_encoding_rows(results, s, device, deadline),
             "(a) full": lambda: step_rows(results, s, device, False,
                                           full_fine_tuning_layers(s, device), deadline)}
    for name, part in parts.items():
        try:
            part()
        except Exception as error:  # noqa: BLE001 (the next part still gets its GPU time)
            traceback.print_exc()
            results.note(f"{name} stopped: {type(error).__name__}: {str(error)[:200]}")
            gc.collect()
    print(f"wrote {args.results} in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
