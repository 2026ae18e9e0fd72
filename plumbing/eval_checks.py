"""evaluate.py's input checks: a wrong argument to `search`, `evaluate` or `run_evaluation` is
refused here with a message naming it, so that the method stays readable. Tests:
tests/test_evaluate.py."""

from __future__ import annotations

import numbers

import numpy as np

_PLAIN_SCORE_TYPES = {float, int, np.float32, np.float64}


def check_search_inputs(query_emb, corpus_emb, top_k, chunk_size, query_chunk_size) -> None:
    if query_emb.ndim != 2 or corpus_emb.ndim != 2:
        raise ValueError(f"search: query_emb and corpus_emb must be 2-D (Q, D) and (N, D), "
                         f"got {tuple(query_emb.shape)} and {tuple(corpus_emb.shape)}")
    if query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(f"search: embedding sizes differ: queries D={query_emb.shape[1]}, "
                         f"corpus D={corpus_emb.shape[1]}")
    for name, value in (("top_k", top_k), ("chunk_size", chunk_size),
                        ("query_chunk_size", query_chunk_size)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"search: {name} must be a positive integer, got {value!r}")
    for name, emb in (("query_emb", query_emb), ("corpus_emb", corpus_emb)):
        if not emb.is_floating_point():
            raise TypeError(f"search: {name} must be a floating-point tensor, got {emb.dtype}")


def check_k_values(k_values) -> list[int]:
    """The cutoffs, sorted and each once; refused unless positive integers."""
    k_values = list(k_values)
    if not k_values:
        raise ValueError("evaluate: k_values is empty")
    for k in k_values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"evaluate: every k in k_values must be a positive integer, got {k!r}")
    return sorted(set(int(k) for k in k_values))


def check_grades(qid, judgments) -> dict[str, int]:
    """qrels[qid] -> {doc_id: int grade}; pytrec_eval only accepts int grades."""
    if not isinstance(qid, str):
        raise TypeError(f"evaluate: query id {qid!r} is not a string")
    grades = {}
    for did, grade in judgments.items():
        if not isinstance(did, str):
            raise TypeError(f"evaluate: qrels[{qid!r}] has a non-string doc id {did!r}")
        if not isinstance(grade, numbers.Integral):
            raise TypeError(f"evaluate: qrels[{qid!r}][{did!r}] = {grade!r}: a grade must be an "
                            "integer")
        grades[did] = int(grade)
    return grades


def checked_scores(qid, doc_scores) -> tuple[list[str], np.ndarray]:
    """(doc ids, float64 scores) of run[qid], refused unless string ids and real, non-NaN scores."""
    # Checks per query, not per document, where they can: evaluate's time is mostly here (1,000 x
    # 1,000).
    if {type(did) for did in doc_scores} - {str}:
        for did in doc_scores:
            if not isinstance(did, str):
                raise TypeError(f"evaluate: run[{qid!r}] has a non-string doc id {did!r}")
    doc_ids, values = list(doc_scores), list(doc_scores.values())
    if not {type(score) for score in values} <= _PLAIN_SCORE_TYPES:
        for did, score in doc_scores.items():
            if not isinstance(score, numbers.Real):
                raise ValueError(f"evaluate: run[{qid!r}][{did!r}] = {score!r}: a score must be a "
                                 "real number")
        values = [float(score) for score in values]
    scores = np.array(values, dtype=np.float64)  # (n,)
    if np.isnan(scores).any():
        did = doc_ids[int(np.argmax(np.isnan(scores)))]
        raise ValueError(f"evaluate: run[{qid!r}][{did!r}] is NaN: a score must be a real number, "
                         "not NaN")
    return doc_ids, scores


def check_split(corpus, queries, qrels) -> None:
    """run_evaluation's BEIR split: every judged query has a text, and the corpus is not empty."""
    missing = [qid for qid in qrels if qid not in queries]
    if missing:
        raise ValueError(f"run_evaluation: {len(missing)} qrels queries have no text in `queries`, "
                         f"e.g. {missing[:3]}")
    if not corpus:
        raise ValueError("run_evaluation: the corpus is empty")


def check_texts(kind: str, ids, texts) -> None:
    for item_id, text in zip(ids, texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"run_evaluation: {kind} {item_id!r} has no text")
