"""Retrieval evaluation the way BEIR does it: exact dense search, trec_eval metrics, an embedder
scored.

Paper: BEIR retrieval nDCG@10 (MTEB retrieval, Table 1; PAPER.md section 6). `search`: exact
inner-product top-k, chunk by chunk; `evaluate`: NDCG/MAP/Recall/P@k as pytrec_eval (trec_eval 9)
computes them plus BEIR's MRR@k, averaged as BEIR's `EvaluateRetrieval.evaluate` does;
`run_evaluation` encodes, searches and scores an `NVEmbed` (train.py too). Differs from BEIR
(beir/retrieval/evaluation.py, custom_metrics.py): plain Python + numpy, pytrec_eval only the test
oracle; metrics unrounded (BEIR rounds to 5 decimals); `run` not modified (BEIR pops identical ids
out of the caller's dict); MRR@k ranks and averages as the other metrics do (see `evaluate`). Run:
    python evaluate.py          # built-in dataset; runs/stage{2,1}/model, else a fresh tiny model
    python evaluate.py --model runs/stage1/model --data path/to/scifact --split test
    python evaluate.py --model SmolLM2.gguf --pooling mean --bidirectional --data DIR  # zero-shot
The command's flags and its checks: plumbing/evaluate_cli.py. Tests: tests/test_evaluate.py,
tests/test_evaluate_command.py. Benchmark: python bench/eval_speed.py
"""

import time

import numpy as np
import torch

from plumbing import evaluate_cli
from plumbing.datafiles import doc_text
from plumbing.distributed import destroy_distributed, gather_rows_to_rank0, rank, world_size
from plumbing.errors import exits_on_user_error
from plumbing.eval_checks import (check_grades, check_k_values, check_search_inputs, check_split,
                                  check_texts, checked_scores)

# ----------------------------------------------------------------------------
# Exact search. Shapes: Q queries, N corpus documents, D embedding size, n documents in a chunk,
# k = min(top_k, N).


def _chunk_top_k(scores, k):
    """Top k of each row of scores (Q, n), ordered by score descending, column ascending. torch.topk
    keeps an unspecified one of columns tied with the k-th best; k + 1 values show those rows
    (rare), which pay a stable sort."""
    n = scores.shape[1]
    k = min(k, n)
    values, columns = scores.topk(min(k + 1, n), dim=1)  # (Q, k+1) or (Q, n), descending
    # torch ranks NaN above every number, so a NaN anywhere in a row shows up first.
    if torch.isnan(values[:, 0]).any():
        raise ValueError("search: NaN score; check the embeddings for NaN or inf")
    boundary_tie = (values[:, k - 1] == values[:, k]) if n > k else None  # (Q,)
    values, columns = values[:, :k], columns[:, :k]  # (Q, k)
    if boundary_tie is not None and boundary_tie.any():
        rows = boundary_tie.nonzero().squeeze(1)
        row_values, row_columns = scores[rows].sort(dim=1, descending=True, stable=True)
        values[rows] = row_values[:, :k]
        columns[rows] = row_columns[:, :k]
    # Order ties inside the top k by column: put each row in column order, then sort by score with a
    # stable sort.
    by_column = columns.argsort(dim=1)
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)  # (Q, k)
    values, by_score = values.sort(dim=1, descending=True, stable=True)
    return values, columns.gather(1, by_score)  # (Q, k)


def search(query_emb, corpus_emb, top_k=1000, chunk_size=50_000, query_chunk_size=4096):
    """Exact dot-product top-k: query_emb (Q, D), corpus_emb (N, D) -> scores (Q, k) and indices
    (Q, k), k = min(top_k, N), by score descending, ties to the lower corpus index: equal to
    `(query_emb @ corpus_emb.T).topk(k)`. Results come back on the queries' device."""
    check_search_inputs(query_emb, corpus_emb, top_k, chunk_size, query_chunk_size)
    num_queries, num_docs = query_emb.shape[0], corpus_emb.shape[0]
    k = min(top_k, num_docs)
    device = query_emb.device
    # Scores in float32 (float64 if an input is): bf16 would collapse near scores into ties.
    wide = torch.float64 in (query_emb.dtype, corpus_emb.dtype)
    score_dtype = torch.float64 if wide else torch.float32
    queries = query_emb.to(score_dtype)  # (Q, D)
    query_starts = range(0, num_queries, query_chunk_size)
    # Running top-k per query chunk; starts empty, grows to k columns after enough chunks. Memory
    # stays (query_chunk_size, chunk_size): the corpus can stay in CPU memory, moved a chunk at a
    # time.
    sizes = [min(query_chunk_size, num_queries - q0) for q0 in query_starts]
    best = [(torch.empty(n, 0, dtype=score_dtype, device=device),
             torch.empty(n, 0, dtype=torch.long, device=device)) for n in sizes]
    for start in range(0, num_docs, chunk_size):
        docs = corpus_emb[start : start + chunk_size].to(device=device, dtype=score_dtype)  # (n, D)
        for slot, q0 in enumerate(query_starts):
            scores = queries[q0 : q0 + query_chunk_size] @ docs.T  # (Qc, n)
            chunk_scores, chunk_columns = _chunk_top_k(scores, k)  # (Qc, kc)
            best_scores, best_indices = best[slot]
            # Both lists are ordered (score desc., index asc.) and this chunk's indices exceed all
            # earlier ones, so equal scores already sit in ascending index order: a stable sort by
            # score keeps the rule.
            merged_scores, order = torch.cat([best_scores, chunk_scores], dim=1).sort(
                dim=1, descending=True, stable=True)  # (Qc, k + kc)
            merged_indices = torch.cat([best_indices, chunk_columns + start], dim=1)
            merged_indices = merged_indices.gather(1, order)  # (Qc, k + kc)
            best[slot] = (merged_scores[:, :k], merged_indices[:, :k])
    if not best:  # no queries
        return (torch.empty(0, k, dtype=score_dtype, device=device),
                torch.empty(0, k, dtype=torch.long, device=device))
    return torch.cat([s for s, _ in best]), torch.cat([i for _, i in best])


# ----------------------------------------------------------------------------
# Metrics (trec_eval 9 via pytrec_eval, as BEIR calls it)


def _ranking(qid, doc_scores, ignore_identical_ids):
    """Doc ids of run[qid] in trec_eval's order."""
    doc_ids, scores = checked_scores(qid, doc_scores)  # (n,) float64
    # trec_eval stores scores as C floats (form_res_rels.c: `float sim`): equal in float32 is a tie
    # (1.0, 1.0 + 1e-12).
    with np.errstate(over="ignore"):
        scores32 = scores.astype(np.float32).tolist()
    # trec_eval ignores the order in the run and sorts by score descending, ties by doc id
    # descending as strcmp compares them (comp_sim_docno). Python compares str by code point, the
    # same order as strcmp on UTF-8 bytes.
    ranked = sorted(zip(scores32, doc_ids), reverse=True)
    # BEIR pops a retrieved doc whose id is the query's: a corpus holding the queries would return
    # each as its answer.
    if ignore_identical_ids and qid in doc_scores:
        return [did for _, did in ranked if did != qid]
    return [did for _, did in ranked]


def evaluate_per_query(qrels, run, k_values=(1, 3, 5, 10, 100, 1000), ignore_identical_ids=True):
    """BEIR's NDCG@k, MAP@k, Recall@k, P@k and MRR@k of each query of a run, unrounded: qrels
    {query_id: {doc_id: int grade}}, run {query_id: {doc_id: score}} (neither modified) ->
    {query_id: {"NDCG@k": float, ...}} in the run's order (significance.py compares them)."""
    k_values = check_k_values(k_values)
    k_max = k_values[-1]
    # Which queries count: pytrec_eval evaluates a query only if it is in the run (even with no
    # retrieved docs: it scores 0) and has a judgment in the qrels (even if all grades are 0: it
    # scores 0); BEIR averages over exactly those. MRR@k too: BEIR's own divides by len(qrels) and
    # raises KeyError for a qrels query not in the run, so the two agree whenever BEIR returns a
    # number, except for a qrels entry with no judgments (no qrels file has one).
    query_ids = [qid for qid in run if qrels.get(qid)]
    if not query_ids:
        raise ValueError("evaluate: no query id is in both the run and the qrels "
                         "(with at least one judgment)")
    # trec_eval's rank-r discount for nDCG is log2(r + 1), r = 1, 2, ...
    discount = 1.0 / np.log2(np.arange(2, k_max + 2, dtype=np.float64))  # (k_max,)
    names = [f"{name}@{k}" for name in ("NDCG", "MAP", "Recall", "P", "MRR") for k in k_values]
    per_query = {}
    for qid in query_ids:
        grades = check_grades(qid, qrels[qid])  # and the query id's type
        ranked = _ranking(qid, run[qid], ignore_identical_ids)[:k_max]
        num_retrieved = len(ranked)
        # A retrieved doc missing from the qrels is unjudged: not relevant, gain 0.
        ranked_grades = np.array([grades.get(did, 0) for did in ranked], dtype=np.float64)  # (n,)
        # Relevant: grade >= 1 (trec_eval's default relevance_level 1; BEIR's MRR uses > 0, the same
        # for integers).
        relevant = ranked_grades >= 1  # (n,)
        num_relevant = sum(1 for grade in grades.values() if grade >= 1)  # from qrels, not the run
        hits = np.cumsum(relevant)  # (n,) relevant docs in the top r
        # MAP: precision at each relevant retrieved doc's rank, summed within the cutoff, / ALL
        # relevant docs in the qrels (not min(k, num_relevant)).
        precision = np.where(relevant, hits / np.arange(1, num_retrieved + 1), 0.0)  # (n,)
        precision_sum = np.cumsum(precision)  # (n,)
        # nDCG: gain = grade, negative grades count 0; the ideal ranking sorts every positive grade
        # in the qrels.
        dcg = np.cumsum(np.maximum(ranked_grades, 0.0) * discount[:num_retrieved])  # (n,)
        positive_grades = np.array([g for g in grades.values() if g > 0], dtype=np.float64)
        ideal_grades = np.sort(positive_grades)[::-1]
        ideal_dcg = np.cumsum(ideal_grades[:k_max] * discount[: min(len(ideal_grades), k_max)])
        first_relevant = int(np.argmax(relevant)) + 1 if relevant.any() else None  # rank, 1-based
        values = {}
        for k in k_values:
            cut = min(k, num_retrieved)  # a shorter run: as if padded with non-relevant docs
            hits_k = float(hits[cut - 1]) if cut else 0.0
            ideal_k = float(ideal_dcg[min(k, len(ideal_dcg)) - 1]) if len(ideal_dcg) else 0.0
            values[f"NDCG@{k}"] = float(dcg[cut - 1]) / ideal_k if cut and ideal_k > 0 else 0.0
            values[f"MAP@{k}"] = \
                float(precision_sum[cut - 1]) / num_relevant if cut and num_relevant else 0.0
            values[f"Recall@{k}"] = hits_k / num_relevant if num_relevant else 0.0
            values[f"P@{k}"] = hits_k / k  # divides by k even when fewer than k were retrieved
            # MRR (BEIR custom_metrics.mrr): 1 / rank of the first relevant doc in the top k, else
            # 0, by trec_eval's rank; BEIR's sorts raw scores stably (ties in run order): the same
            # when top-k float32 scores differ.
            found = first_relevant is not None and first_relevant <= k
            values[f"MRR@{k}"] = 1.0 / first_relevant if found else 0.0
        per_query[qid] = {name: values[name] for name in names}  # NDCG@k for every k, then MAP@k...
    return per_query


def evaluate(qrels, run, k_values=(1, 3, 5, 10, 100, 1000), ignore_identical_ids=True):
    """BEIR's NDCG@k, MAP@k, Recall@k, P@k and MRR@k of a run, averaged over queries: qrels
    {query_id: {doc_id: int grade}}, run {query_id: {doc_id: score}} (neither modified) ->
    {"NDCG@k": float, ...} for every k, unrounded: the mean of `evaluate_per_query`'s values (summed
    in the run's order, as BEIR does)."""
    per_query = evaluate_per_query(qrels, run, k_values, ignore_identical_ids)
    names = next(iter(per_query.values()))
    return {name: sum(values[name] for values in per_query.values()) / len(per_query)
            for name in names}


# ----------------------------------------------------------------------------
# Evaluating an embedder: encode, search, score (BEIR's dense retrieval, PAPER.md section 6)

DEFAULT_K_VALUES = (1, 3, 5, 10, 100, 1000)

# Query instructions of the released NV-Embed-v2 (PAPER.md section 3), by BEIR folder name.
INSTRUCTIONS = {
    "scifact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "nfcorpus": "Given a question, retrieve relevant documents that answer the question",
    "arguana": "Given a claim, retrieve documents that support or refute the claim",
    "fiqa": "Given a financial question, retrieve relevant passages that answer the query",
}


def run_evaluation(model, corpus, queries, qrels, instruction="", batch_size=32, max_length=None,
                   top_k=1000, k_values=DEFAULT_K_VALUES, ignore_identical_ids=True,
                   lockstep=False):
    """Encode, search and score one BEIR split (`datafiles.load_beir`'s) with an `NVEmbed`:
    (metrics, run), run = {query_id: {doc_id: score}} of each query's `top_k` best; (None, None) on
    ranks but 0. max_length None: the model's own; lockstep: the model is FSDP-sharded."""
    check_split(corpus, queries, qrels)
    query_ids = [qid for qid in queries if qid in qrels]
    doc_ids = list(corpus)
    query_texts = [queries[qid] for qid in query_ids]
    doc_texts = [doc_text(corpus[did]) for did in doc_ids]
    check_texts("query", query_ids, query_texts)
    check_texts("document", doc_ids, doc_texts)
    # Only judged queries are encoded, with the instruction; documents bare (PAPER.md sections 3,
    # 6). Under torchrun every rank encodes a share, and rank 0 alone searches and scores.
    query_emb = encode_sharded(model, query_texts, instruction, batch_size, max_length, lockstep)
    # (N, D) CPU
    corpus_emb = encode_sharded(model, doc_texts, "", batch_size, max_length, lockstep)
    if rank() != 0:
        return None, None
    # Score on the model's device; search moves the CPU corpus there chunk by chunk.
    device = model.decoder.embed_tokens.weight.device
    # One more than kept, as BEIR's exact search: with ignore_identical_ids (BEIR's default) the
    # query's own document is skipped, and such a query still gets top_k others (ArguAna and Quora
    # have queries that are corpus documents).
    scores, indices = search(query_emb.to(device), corpus_emb,
                             top_k=top_k + 1 if ignore_identical_ids else top_k)  # (Q, k) each
    run = {}
    for qid, row_indices, row_scores in zip(query_ids, indices.tolist(), scores.tolist()):
        ranked = [(doc_ids[j], score) for j, score in zip(row_indices, row_scores)]
        if ignore_identical_ids:
            ranked = [(did, score) for did, score in ranked if did != qid]
        run[qid] = dict(ranked[:top_k])
    return evaluate(qrels, run, k_values, ignore_identical_ids=ignore_identical_ids), run


def encode_sharded(model, texts, instruction="", batch_size=32, max_length=None, lockstep=False):
    """`model.encode(texts)` as a (N, D) CPU tensor on rank 0 (None on the others), torchrun's ranks
    sharing the work: the same numbers, bit for bit, as one process. lockstep: FSDP-sharded
    model."""
    if world_size() == 1 or not texts:  # no texts: no forward on any rank, nothing to gather
        if rank() != 0:
            return None
        return model.encode(texts, instruction=instruction, batch_size=batch_size,
                            max_length=max_length, convert_to_tensor=True)
    # Rank r embeds encode's batches r, r + W, r + 2W, ... (`NVEmbed.batches`). model.encode, given
    # those rows, makes exactly those batches again (they are full and in the stable sort's order),
    # so every text is embedded in the batch, and with the padding, that one process gives it.
    W, batches = world_size(), model.batches(texts, batch_size, instruction, max_length)
    rows_per_rank = [[i for batch in batches[r::W] for i in batch] for r in range(W)]
    mine = rows_per_rank[rank()]
    local = model.encode([texts[i] for i in mine], instruction=instruction, batch_size=batch_size,
                         # (n_r, D)
                         max_length=max_length, convert_to_tensor=True) if mine else None
    # FSDP-sharded, each forward gathers layers from every rank: ranks with a batch fewer run one
    # more forward (an empty text) to keep the collectives in step.
    if lockstep and len(batches[rank()::W]) < -(-len(batches) // W):
        model.encode([""], batch_size=1, max_length=max_length)
    return gather_rows_to_rank0(local, rows_per_rank, len(texts))


@exits_on_user_error  # a mistake in the input: one line, exit status 2 (errors.py)
def main(argv: list[str] | None = None) -> dict | None:
    """`python evaluate.py`: flags, model, data and output files in plumbing/evaluate_cli.py. Under
    torchrun every rank encodes a share; rank 0 alone searches, writes and returns the metrics."""
    try:
        job = evaluate_cli.prepare(argv, INSTRUCTIONS, DEFAULT_K_VALUES)
        args, start = job.args, time.perf_counter()
        metrics, run = run_evaluation(
            job.model, job.corpus, job.queries, job.qrels, job.instruction, top_k=args.top_k,
            batch_size=args.batch_size, max_length=job.max_length, k_values=args.k_values,
            ignore_identical_ids=args.ignore_identical_ids)
        if rank() != 0:
            return None  # rank 0 scores and writes, once
        evaluate_cli.write_results(job, metrics, run, time.perf_counter() - start)
        if args.per_query:  # the same metrics query by query (the ones above are their means)
            evaluate_cli.write_per_query(job, evaluate_per_query(
                job.qrels, run, args.k_values, ignore_identical_ids=args.ignore_identical_ids))
        return metrics
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
