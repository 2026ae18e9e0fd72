"""Retrieval evaluation the way BEIR does it: exact dense search and trec_eval metrics.

NV-Embed's headline numbers are BEIR retrieval nDCG@10 (MTEB retrieval, paper Table 1;
PAPER.md section 6). This file has the two pieces every such number goes through:

- `search(query_emb, corpus_emb, top_k)`: exact inner-product top-k. Embeddings from
  `NVEmbed.encode` are L2-normalised, so the dot product is the cosine similarity BEIR's
  dense retriever uses. The corpus is scored chunk by chunk and merged into a running
  top-k, so memory stays (Q, chunk_size) however large the corpus is.
- `evaluate(qrels, run, k_values)`: NDCG@k, MAP@k, Recall@k and P@k exactly as
  pytrec_eval (trec_eval 9) computes them, plus MRR@k as BEIR adds it, averaged over
  queries the way BEIR's `EvaluateRetrieval.evaluate` averages them. Every trec_eval
  rule is written out in a comment where it is applied.

How it differs from BEIR (beir/retrieval/evaluation.py, beir/retrieval/custom_metrics.py):
- plain Python + numpy; pytrec_eval is only the test oracle (tests/test_evaluate.py);
- metrics are returned unrounded (BEIR rounds each to 5 decimals);
- `run` is not modified (BEIR pops identical ids out of the caller's dict);
- MRR@k ranks documents with trec_eval's rule (score as float32 descending, then doc id
  descending), the same ranking as the other metrics. BEIR's own `mrr` sorts by the raw
  score with Python's stable sort, i.e. ties keep the run dict's insertion order; both
  agree whenever the top-k scores are distinct float32 values.
- MRR@k is averaged over the same queries as the other metrics. BEIR divides by
  len(qrels) and raises KeyError for a qrels query missing from the run, so whenever BEIR
  returns a number the two agree, except for a qrels entry with no judgments at all
  (which no qrels file can produce).

Run the tests: python -m pytest -q tests/test_evaluate.py
"""

import math
import numbers

import numpy as np
import torch

# ----------------------------------------------------------------------------
# Exact search

# Shapes: Q queries, N corpus documents, D embedding size, n documents in a chunk,
# k = min(top_k, N) results per query.


def _chunk_top_k(scores, k):
    """Top k of each row of scores (Q, n), ordered by score descending, column ascending.

    torch.topk finds the right set unless columns outside it tie with the k-th best
    score: then which of the tied columns it keeps is unspecified. Asking for k + 1
    values shows those rows (the (k+1)-th best equals the k-th); they are rare with real
    embeddings, so only they pay for a full stable sort.
    """
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
    # Order ties inside the top k by column: put each row in column order, then sort
    # by score with a stable sort.
    by_column = columns.argsort(dim=1)
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)  # (Q, k)
    values, by_score = values.sort(dim=1, descending=True, stable=True)
    return values, columns.gather(1, by_score)  # (Q, k)


def search(query_emb, corpus_emb, top_k=1000, chunk_size=50_000, query_chunk_size=4096):
    """Exact dot-product top-k of every query over the corpus.

    query_emb (Q, D), corpus_emb (N, D) -> scores (Q, k), indices (Q, k) with
    k = min(top_k, N); row q lists corpus rows by score descending. Equals a brute-force
    `(query_emb @ corpus_emb.T).topk(k)`, with ties broken deterministically: among equal
    scores the lower corpus index ranks first (torch.topk leaves that unspecified).

    Scores are computed in float32 (float64 if either input is float64) whatever the
    input dtype, so bf16 embeddings do not collapse nearby scores into ties. The corpus
    is scored `chunk_size` documents at a time and queries `query_chunk_size` at a time,
    so the largest score block is (query_chunk_size, chunk_size). Corpus chunks are
    moved to the queries' device, so a large corpus can stay in CPU memory while the
    queries are on the GPU; results come back on the queries' device.
    """
    if query_emb.ndim != 2 or corpus_emb.ndim != 2:
        raise ValueError(
            f"search: query_emb and corpus_emb must be 2-D (Q, D) and (N, D), "
            f"got {tuple(query_emb.shape)} and {tuple(corpus_emb.shape)}"
        )
    if query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(
            f"search: embedding sizes differ: queries D={query_emb.shape[1]}, corpus D={corpus_emb.shape[1]}"
        )
    for name, value in (("top_k", top_k), ("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"search: {name} must be a positive integer, got {value!r}")
    for name, emb in (("query_emb", query_emb), ("corpus_emb", corpus_emb)):
        if not emb.is_floating_point():
            raise TypeError(f"search: {name} must be a floating-point tensor, got {emb.dtype}")

    num_queries, num_docs = query_emb.shape[0], corpus_emb.shape[0]
    k = min(top_k, num_docs)
    device = query_emb.device
    score_dtype = torch.float64 if torch.float64 in (query_emb.dtype, corpus_emb.dtype) else torch.float32
    queries = query_emb.to(score_dtype)  # (Q, D)
    query_starts = range(0, num_queries, query_chunk_size)
    # Running top-k per query chunk; starts empty, grows to k columns after enough chunks.
    best = [
        (
            torch.empty(min(query_chunk_size, num_queries - q0), 0, dtype=score_dtype, device=device),
            torch.empty(min(query_chunk_size, num_queries - q0), 0, dtype=torch.long, device=device),
        )
        for q0 in query_starts
    ]
    for start in range(0, num_docs, chunk_size):
        docs = corpus_emb[start : start + chunk_size].to(device=device, dtype=score_dtype)  # (n, D)
        for slot, q0 in enumerate(query_starts):
            scores = queries[q0 : q0 + query_chunk_size] @ docs.T  # (Qc, n)
            chunk_scores, chunk_columns = _chunk_top_k(scores, k)  # (Qc, kc)
            best_scores, best_indices = best[slot]
            # Both lists are ordered (score descending, index ascending) and every index in
            # this chunk exceeds every earlier one, so in the concatenation equal scores
            # already sit in ascending index order: a stable sort by score keeps the rule.
            merged_scores, order = torch.cat([best_scores, chunk_scores], dim=1).sort(
                dim=1, descending=True, stable=True
            )  # (Qc, k + kc)
            merged_indices = torch.cat([best_indices, chunk_columns + start], dim=1).gather(1, order)
            best[slot] = (merged_scores[:, :k], merged_indices[:, :k])
    if not best:  # no queries
        return (torch.empty(0, k, dtype=score_dtype, device=device),
                torch.empty(0, k, dtype=torch.long, device=device))
    return torch.cat([s for s, _ in best]), torch.cat([i for _, i in best])


# ----------------------------------------------------------------------------
# Metrics (trec_eval 9 via pytrec_eval, as BEIR calls it)


def _check_k_values(k_values):
    k_values = list(k_values)
    if not k_values:
        raise ValueError("evaluate: k_values is empty")
    for k in k_values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"evaluate: every k in k_values must be a positive integer, got {k!r}")
    return sorted(set(int(k) for k in k_values))


def _check_grades(qid, judgments):
    """qrels[qid] -> {doc_id: int grade}; pytrec_eval only accepts int grades."""
    grades = {}
    for did, grade in judgments.items():
        if not isinstance(did, str):
            raise TypeError(f"evaluate: qrels[{qid!r}] has a non-string doc id {did!r}")
        if not isinstance(grade, numbers.Integral):
            raise TypeError(f"evaluate: qrels[{qid!r}][{did!r}] = {grade!r}: a grade must be an integer")
        grades[did] = int(grade)
    return grades


def _ranking(qid, doc_scores, ignore_identical_ids):
    """Doc ids of run[qid] in trec_eval's order."""
    doc_ids, scores = [], []
    for did, score in doc_scores.items():
        if not isinstance(did, str):
            raise TypeError(f"evaluate: run[{qid!r}] has a non-string doc id {did!r}")
        if not isinstance(score, numbers.Real) or math.isnan(score):
            raise ValueError(f"evaluate: run[{qid!r}][{did!r}] = {score!r}: a score must be a real number, not NaN")
        # BEIR pops a retrieved doc whose id equals the query id (a corpus that
        # contains the queries would otherwise retrieve each query as its own answer).
        if ignore_identical_ids and did == qid:
            continue
        doc_ids.append(did)
        scores.append(float(score))
    # trec_eval stores each score as a C float (form_res_rels.c: `float sim`), so scores
    # equal after rounding to float32 tie: 1.0 and 1.0 + 1e-12 rank as equals.
    with np.errstate(over="ignore"):
        scores32 = np.asarray(scores, dtype=np.float64).astype(np.float32).tolist()
    # trec_eval ignores the order in the run and sorts by score descending, ties by doc
    # id descending as strcmp compares them (comp_sim_docno). Python compares str by
    # code point, which is the same order as strcmp on their UTF-8 bytes.
    ranked = sorted(zip(scores32, doc_ids), reverse=True)
    return [did for _, did in ranked]


def evaluate(qrels, run, k_values=(1, 3, 5, 10, 100, 1000), ignore_identical_ids=True):
    """BEIR's NDCG@k, MAP@k, Recall@k, P@k and MRR@k of a run, averaged over queries.

    qrels: {query_id: {doc_id: grade (int)}}; run: {query_id: {doc_id: score}}.
    Returns {"NDCG@k": float, "MAP@k": ..., "Recall@k": ..., "P@k": ..., "MRR@k": ...}
    for every k, unrounded. The input dicts are not modified.
    """
    k_values = _check_k_values(k_values)
    k_max = k_values[-1]

    # Which queries count: pytrec_eval evaluates a query only if it is in the run (even
    # with no retrieved docs: it scores 0) and has at least one judgment in the qrels
    # (even if every grade is 0: it scores 0); BEIR averages over exactly the queries
    # pytrec_eval returns. Run queries without qrels, and qrels queries not in the run,
    # are ignored.
    query_ids = [qid for qid in run if qrels.get(qid)]
    if not query_ids:
        raise ValueError("evaluate: no query id is in both the run and the qrels (with at least one judgment)")

    # trec_eval's rank-r discount for nDCG is log2(r + 1), r = 1, 2, ...
    discount = 1.0 / np.log2(np.arange(2, k_max + 2, dtype=np.float64))  # (k_max,)
    totals = {f"{name}@{k}": 0.0 for name in ("NDCG", "MAP", "Recall", "P", "MRR") for k in k_values}
    for qid in query_ids:
        if not isinstance(qid, str):
            raise TypeError(f"evaluate: query id {qid!r} is not a string")
        grades = _check_grades(qid, qrels[qid])
        ranked = _ranking(qid, run[qid], ignore_identical_ids)[:k_max]
        num_retrieved = len(ranked)
        # A retrieved doc missing from the qrels is unjudged: not relevant, gain 0.
        ranked_grades = np.array([grades.get(did, 0) for did in ranked], dtype=np.float64)  # (n,)
        # Relevant means grade >= 1 (trec_eval's default relevance_level 1; BEIR's MRR
        # uses grade > 0, the same for integers). Grades 0 and negative are not relevant.
        relevant = ranked_grades >= 1  # (n,)
        num_relevant = sum(1 for grade in grades.values() if grade >= 1)  # from qrels, not the run
        hits = np.cumsum(relevant)  # (n,) relevant docs in the top r
        # MAP: precision at the rank of each relevant retrieved doc, summed within the
        # cutoff, divided by ALL relevant docs in the qrels (not min(k, num_relevant)).
        precision_sum = np.cumsum(np.where(relevant, hits / np.arange(1, num_retrieved + 1), 0.0))  # (n,)
        # nDCG: gain = grade, negative grades count 0; the ideal ranking sorts every
        # positive grade in the qrels, retrieved or not.
        dcg = np.cumsum(np.maximum(ranked_grades, 0.0) * discount[:num_retrieved])  # (n,)
        ideal_grades = np.sort(np.array([g for g in grades.values() if g > 0], dtype=np.float64))[::-1]
        ideal_dcg = np.cumsum(ideal_grades[:k_max] * discount[: min(len(ideal_grades), k_max)])
        first_relevant = int(np.argmax(relevant)) + 1 if relevant.any() else None  # rank, 1-based

        for k in k_values:
            cut = min(k, num_retrieved)  # a run shorter than k is scored as if padded with non-relevant docs
            hits_k = float(hits[cut - 1]) if cut else 0.0
            ideal_k = float(ideal_dcg[min(k, len(ideal_dcg)) - 1]) if len(ideal_dcg) else 0.0
            totals[f"NDCG@{k}"] += float(dcg[cut - 1]) / ideal_k if cut and ideal_k > 0 else 0.0
            totals[f"MAP@{k}"] += float(precision_sum[cut - 1]) / num_relevant if cut and num_relevant else 0.0
            totals[f"Recall@{k}"] += hits_k / num_relevant if num_relevant else 0.0
            totals[f"P@{k}"] += hits_k / k  # divides by k even when fewer than k were retrieved
            # MRR (BEIR custom_metrics.mrr): 1 / rank of the first relevant doc in the top k, else 0.
            totals[f"MRR@{k}"] += 1.0 / first_relevant if first_relevant is not None and first_relevant <= k else 0.0

    return {name: total / len(query_ids) for name, total in totals.items()}


# ----------------------------------------------------------------------------
# Command (phase 2): `python evaluate.py --model DIR --data DIR ...` (issue 5, item 3)
# goes here once model.NVEmbed and data.load_beir exist.
