"""Hard-negative mining with a teacher embedder: TopK-PercPos (NV-Embed-v2, PAPER.md section 4).

For each training query: embed it (with its instruction) and the whole corpus (bare),
take the `top_k` most similar documents, drop the query's positives, and drop every
candidate whose score exceeds `margin` x the positive's score (default 0.95). Such
near-positive candidates are most often unjudged relevant documents, and training to
push them away hurts (the "positive-aware" mining of NV-Retriever, which NV-Embed-v2
uses). What remains, hardest first, becomes the query's hard negatives.

A query with several positives uses the lowest positive score for its threshold, so a
kept negative scores at most `margin` x every one of its positives.

The rule assumes a teacher whose scores separate relevant from irrelevant documents.
An untrained decoder does not: its mean-pooled embeddings share one dominant direction,
every cosine similarity lies around 0.8-0.95, and positives rank below hundreds of
documents, so the rule drops nearly every candidate (we measured this on SciFact with
SmolLM2-135M). `--model tfidf` is a lexical teacher for such a cold start (TF-IDF
cosine, as DPR mined BM25 negatives); a trained embedder is the teacher NV-Embed uses.

Usage:
    python mine.py --model M --data DIR --split train --out train.jsonl
    python mine.py            # the built-in dataset's train split with a fresh tiny model

M is a saved NV-Embed folder or a base decoder (HF folder, .gguf, preset) with
--pooling / --causal, as in evaluate.py. The output is a training file in data.py's
schema, plus DIR-of-out/NAME.stats.json with the counts of what was dropped.
"""

from __future__ import annotations

import argparse
import json
import re
import zlib
from pathlib import Path

import torch

import data
from evaluate import INSTRUCTIONS, search


class TfidfTeacher:
    """TF-IDF vectors (lowercased words hashed into `dim` buckets), L2-normalised: the
    `encode` of an embedder, for mining. `fit` learns the IDF on the corpus."""

    def __init__(self, dim: int = 2**15):
        self.dim = dim
        self.idf = torch.ones(dim)

    def _counts(self, texts):
        rows = torch.zeros(len(texts), self.dim)  # (N, dim) term counts
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                rows[i, zlib.crc32(word.encode()) % self.dim] += 1  # crc32: the same bucket in every process
        return rows

    def fit(self, texts):
        document_frequency = (self._counts(texts) > 0).sum(0)  # (dim,)
        self.idf = torch.log((1 + len(texts)) / (1 + document_frequency)) + 1
        return self

    def encode(self, texts, instruction="", batch_size=None, max_length=None):
        vectors = torch.log1p(self._counts(texts)) * self.idf  # sublinear tf x idf, (N, dim)
        return torch.nn.functional.normalize(vectors, dim=-1)


def mine(model, corpus, queries, qrels, instruction: str, top_k: int = 30, margin: float = 0.95,
         batch_size: int = 32, max_length: int | None = None, depth: int = 100):
    """Returns ({query_id: [up to top_k negative doc ids, hardest first]}, stats).

    Candidates are the `depth` best documents (plus room for the positives); the first
    `top_k` that survive the two rules are kept."""
    query_ids = [q for q, judged in qrels.items() if any(grade > 0 for grade in judged.values())]
    missing = [q for q in query_ids if q not in queries]
    if missing:
        raise ValueError(f"mine: {len(missing)} qrels queries are not in the queries, e.g. {missing[:3]}")
    doc_ids = list(corpus)
    row_of = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    unknown = sorted({d for q in query_ids for d in qrels[q] if d not in row_of})
    if unknown:
        raise ValueError(f"mine: {len(unknown)} qrels documents are not in the corpus, e.g. {unknown[:3]}")

    doc_texts = [data.doc_text(corpus[d]) for d in doc_ids]
    if hasattr(model, "fit"):  # a lexical teacher learns its IDF on the corpus
        model.fit(doc_texts)
    corpus_emb = model.encode(doc_texts, batch_size=batch_size, max_length=max_length)  # (N, D)
    query_emb = model.encode([queries[q] for q in query_ids], instruction=instruction, batch_size=batch_size,
                             max_length=max_length)  # (Q, D)
    max_positives = max(sum(g > 0 for g in qrels[q].values()) for q in query_ids)
    # Ask for top_k plus room for the positives, which are removed from the candidates.
    scores, indices = search(query_emb, corpus_emb, top_k=max(depth, top_k) + max_positives)  # (Q, k) each

    negatives, dropped_as_positive, dropped_by_margin, short, nonpositive = {}, 0, 0, 0, 0
    for i, query_id in enumerate(query_ids):
        positives = {d for d, grade in qrels[query_id].items() if grade > 0}
        positive_rows = torch.tensor([row_of[d] for d in positives])
        positive_score = (corpus_emb[positive_rows] @ query_emb[i]).min().item()
        # With a negative positive score, margin x score would lie above it; such a
        # teacher cannot tell relevant documents apart, so those queries are counted.
        nonpositive += positive_score <= 0
        threshold = margin * positive_score
        kept = []
        for score, j in zip(scores[i].tolist(), indices[i].tolist()):
            if len(kept) == top_k:
                break
            if doc_ids[j] in positives:
                dropped_as_positive += 1
            elif score > threshold:
                dropped_by_margin += 1
            else:
                kept.append(doc_ids[j])
        short += len(kept) < top_k
        negatives[query_id] = kept
    stats = dict(queries=len(query_ids), documents=len(doc_ids), top_k=top_k, depth=depth, margin=margin,
                 dropped_as_positive=dropped_as_positive, dropped_by_margin=dropped_by_margin,
                 queries_with_fewer_than_top_k=short, queries_with_nonpositive_positive_score=nonpositive,
                 queries_with_no_negative=sum(not n for n in negatives.values()))
    return negatives, stats


@data.exits_on_user_error
def main(argv=None):
    from model import NVEmbed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="teacher: saved NV-Embed folder, HF folder, .gguf, preset, or 'tfidf' (lexical)")
    p.add_argument("--pooling", default=None, choices=("mean", "eos", "latent", "self-attention"),
                   help="base models only (default mean)")
    p.add_argument("--causal", action="store_true", default=None, help="base models only: keep the causal mask")
    p.add_argument("--data", default="builtin", help="a BEIR folder, or 'builtin' (default)")
    p.add_argument("--split", default="train", help="qrels split whose queries get negatives (default train)")
    p.add_argument("--instruction", default=None, help="query instruction (default: the dataset's known one)")
    p.add_argument("--out", default="runs/mined/train.jsonl", help="training file to write (.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--top-k", type=int, default=30, help="negatives kept per query, hardest first (default 30)")
    p.add_argument("--margin", type=float, default=0.95, help="drop candidates above margin x positive score")
    p.add_argument("--depth", type=int, default=100, help="candidates searched per query (default 100)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args(argv)

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} already exists; pass --overwrite to replace it")
    if args.data == "builtin":
        corpus, queries, qrels = data.builtin_dataset().split(args.split)
        instruction = data.BUILTIN_INSTRUCTION
    else:
        corpus, queries, qrels = data.load_beir(args.data, args.split)
        instruction = INSTRUCTIONS.get(Path(args.data).resolve().name.lower(), "")
    if args.instruction is not None:
        instruction = args.instruction
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "tfidf":
        model = TfidfTeacher()
    else:
        model = NVEmbed.load(args.model, pooling=args.pooling, causal=args.causal, max_length=args.max_length or 512,
                             dtype=getattr(torch, args.dtype) if args.dtype else None, device=device)

    negatives, stats = mine(model, corpus, queries, qrels, instruction, top_k=args.top_k, margin=args.margin,
                            batch_size=args.batch_size, max_length=args.max_length, depth=args.depth)
    report = data.SkipReport()
    examples = data.beir_training_examples(corpus, queries, qrels, negatives, instruction, report=report)
    data.write_training_file(out, examples)
    stats |= dict(examples=len(examples), model=args.model, data=args.data, split=args.split,
                  instruction=instruction, not_made_into_examples=report.total)
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    print(f"wrote {len(examples)} examples to {out}")
    return out, stats


if __name__ == "__main__":
    main()
