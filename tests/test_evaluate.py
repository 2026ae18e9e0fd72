"""Tests for evaluate.py: metrics against pytrec_eval (the oracle BEIR uses), search against brute
force.

Run: python -m pytest -q tests/test_evaluate.py
"""

import copy
import math
import random

import numpy as np
import pytest
import torch

from evaluate import evaluate, evaluate_per_query, search

METRICS = ("NDCG", "MAP", "Recall", "P", "MRR")


# ----------------------------------------------------------------------------
# Oracles


def beir_oracle_per_query(qrels, run, k_values, ignore_identical_ids=True):
    """Each query's metrics computed the way BEIR's EvaluateRetrieval.evaluate does, unrounded:
    {qid: {name: value}}.

    pytrec_eval gives NDCG/MAP/Recall/P for the queries it evaluates. MRR@k is taken from
    trec_eval's own recip_rank (1 / rank of the first relevant doc in trec_eval's ranking),
    zeroed when that rank is beyond k: an oracle that shares no ranking code with evaluate.py.
    """
    pytrec_eval = pytest.importorskip(
        "pytrec_eval", reason="pytrec_eval (pip install pytrec-eval-terrier) is the metrics oracle"
    )
    run = copy.deepcopy(run)
    if ignore_identical_ids:  # BEIR pops these from the results before calling pytrec_eval
        for qid, docs in run.items():
            docs.pop(qid, None)
    ks = ",".join(str(k) for k in k_values)
    measures = {f"map_cut.{ks}", f"ndcg_cut.{ks}", f"recall.{ks}", f"P.{ks}", "recip_rank"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    assert per_query, "oracle evaluated no query"
    out = {}
    for qid, s in per_query.items():
        values = out[qid] = {}
        for k in k_values:
            for name, key in (("NDCG", "ndcg_cut"), ("MAP", "map_cut"), ("Recall", "recall"),
                              ("P", "P")):
                values[f"{name}@{k}"] = s[f"{key}_{k}"]
            # recip_rank = 1/r; r <= k  <=>  1/r >= 1/k (compared with a margin against rounding)
            values[f"MRR@{k}"] = s["recip_rank"] \
                if s["recip_rank"] > 0 and 1.0 / s["recip_rank"] <= k + 0.5 else 0.0
    return out


def beir_oracle(qrels, run, k_values, ignore_identical_ids=True):
    """BEIR's averages: the mean over the queries pytrec_eval returns of `beir_oracle_per_query`."""
    per_query = beir_oracle_per_query(qrels, run, k_values, ignore_identical_ids)
    names = next(iter(per_query.values()))
    return {name: sum(values[name] for values in per_query.values()) / len(per_query)
            for name in names}


def beir_mrr_literal(qrels, run, k_values):
    """BEIR's custom_metrics.mrr, written out as a naive loop: sort by raw score only,
    loop over the qrels queries, divide by len(qrels). Valid when every qrels query is
    in the run and no two top scores tie (then its tie order does not matter)."""
    totals = {k: 0.0 for k in k_values}
    for qid, judged in qrels.items():
        relevant = {did for did, grade in judged.items() if grade > 0}
        ranked = sorted(run[qid].items(), key=lambda item: item[1], reverse=True)
        for k in k_values:
            for position, (did, _) in enumerate(ranked[:k]):
                if did in relevant:
                    totals[k] += 1.0 / (position + 1)
                    break
    return {f"MRR@{k}": total / len(qrels) for k, total in totals.items()}


def assert_metrics_close(got, expected, context):
    assert set(got) == set(expected), context
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-6), f"{name}: {context}"


# ----------------------------------------------------------------------------
# Random qrels and runs that hit every rule


def random_case(rng):
    query_ids = [f"q{i}" for i in range(rng.randint(1, 8))]
    # Doc ids include query ids (ignore_identical_ids), numeric strings whose string
    # order differs from numeric order ("10" < "9"), and a non-ASCII id.
    doc_pool = [f"d{i}" for i in range(12)] + ["9", "10", "100", "é", "Z"] + query_ids
    # Few distinct scores -> many exact ties; values that differ only below float32
    # precision (trec_eval keeps scores as C floats) -> ties too; some fully random.
    score_set = [0.0, 0.5, 1.0, 1.0 + 1e-12, 1.0 + 2e-7, -0.25, 3.0]

    qrels = {}
    for qid in query_ids:
        if rng.random() < 0.15:
            continue  # query missing from the qrels
        if rng.random() < 0.05:
            qrels[qid] = {}  # query with no judgments
            continue
        judged = rng.sample(doc_pool, rng.randint(1, 10))
        qrels[qid] = {did: rng.choice([0, 0, 1, 1, 2, 3, -1]) for did in judged}
    if not any(qrels.values()):
        qrels[query_ids[0]] = {rng.choice(doc_pool): rng.choice([1, 2, 3])}

    run = {}
    for qid in query_ids + ["q_unjudged"]:
        if rng.random() < 0.15:
            continue  # query missing from the run
        if rng.random() < 0.05:
            run[qid] = {}  # query with an empty run
            continue
        retrieved = rng.sample(doc_pool, rng.randint(1, len(doc_pool)))
        if rng.random() < 0.3 and qid in doc_pool:
            retrieved.append(qid)  # the query retrieves itself
        if rng.random() < 0.5:
            run[qid] = {did: rng.choice(score_set) for did in retrieved}
        else:
            run[qid] = {did: rng.uniform(-1, 1) for did in retrieved}
    if not any(qid in run and qrels.get(qid) for qid in query_ids):
        qid = next(q for q in query_ids if qrels.get(q))
        run[qid] = {did: rng.choice(score_set) for did in doc_pool}
    return qrels, run


def random_k_values(rng):
    # k from 1 to 1000: most larger than the run (at most ~25 docs).
    return sorted(rng.sample([1, 2, 3, 5, 10, 20, 100, 1000], rng.randint(1, 5)))


# ----------------------------------------------------------------------------
# evaluate


@pytest.mark.parametrize("ignore_identical_ids", [True, False])
def test_evaluate_matches_pytrec_eval_on_random_cases(ignore_identical_ids):
    rng = random.Random(1234 + ignore_identical_ids)
    for case in range(200):
        qrels, run = random_case(rng)
        k_values = random_k_values(rng)
        run_before = copy.deepcopy(run)
        got = evaluate(qrels, run, k_values, ignore_identical_ids=ignore_identical_ids)
        expected = beir_oracle(qrels, run, k_values, ignore_identical_ids)
        assert_metrics_close(got, expected, f"case {case}: qrels={qrels} run={run} k={k_values}")
        assert run == run_before, "evaluate must not modify the run"


@pytest.mark.parametrize("ignore_identical_ids", [True, False])
def test_evaluate_per_query_matches_pytrec_eval_and_averages_to_evaluate(ignore_identical_ids):
    rng = random.Random(4321 + ignore_identical_ids)
    for case in range(200):
        qrels, run = random_case(rng)
        k_values = random_k_values(rng)
        got = evaluate_per_query(qrels, run, k_values, ignore_identical_ids=ignore_identical_ids)
        expected = beir_oracle_per_query(qrels, run, k_values, ignore_identical_ids)
        # the queries pytrec_eval scores, in run order
        assert list(got) == [qid for qid in run if qid in expected]
        for qid, values in expected.items():
            assert_metrics_close(got[qid], values,
                                 f"case {case} query {qid}: qrels={qrels} run={run} k={k_values}")
        means = evaluate(qrels, run, k_values, ignore_identical_ids=ignore_identical_ids)
        assert means == \
            {name: sum(v[name] for v in got.values()) / len(got) for name in means}  # exactly


def test_mrr_matches_beirs_literal_definition_without_ties():
    rng = random.Random(7)
    for case in range(100):
        doc_ids = [f"d{i}" for i in range(30)]
        qrels = {
            f"q{i}": {did: rng.choice([0, 1, 2]) for did in rng.sample(doc_ids, rng.randint(1, 6))}
            for i in range(5)
        }
        # Distinct float32 scores: no ties, so BEIR's insertion-order tie rule never applies.
        run = {qid: {did: rng.randint(0, 10**6) / 7.0 for did in rng.sample(doc_ids, 20)}
               for qid in qrels}
        k_values = [1, 3, 10, 100]
        got = evaluate(qrels, run, k_values)
        expected = beir_mrr_literal(qrels, run, k_values)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, abs=1e-12), f"case {case}"


def test_hand_computed_example():
    # q1 ranks: d3 (grade 0), d1 (grade 2), d9 (unjudged), d2 (grade 1); qrels also hold d4 (grade
    # 3), never retrieved.
    qrels = {"q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 3}}
    run = {"q1": {"d1": 0.8, "d2": 0.1, "d3": 0.9, "d9": 0.5}}
    got = evaluate(qrels, run, k_values=(1, 2, 4, 10))
    dcg4 = 2 / math.log2(3) + 1 / math.log2(5)
    ideal4 = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    expected = {
        "P@1": 0.0, "P@2": 0.5, "P@4": 0.5, "P@10": 0.2,
        "Recall@1": 0.0, "Recall@2": 1 / 3, "Recall@4": 2 / 3, "Recall@10": 2 / 3,
        "MAP@1": 0.0, "MAP@2": (1 / 2) / 3, "MAP@4": (1 / 2 + 2 / 4) / 3,
        "MAP@10": (1 / 2 + 2 / 4) / 3, "NDCG@1": 0.0,
        "NDCG@2": (2 / math.log2(3)) / (3 + 2 / math.log2(3)), "NDCG@4": dcg4 / ideal4,
        "NDCG@10": dcg4 / ideal4, "MRR@1": 0.0, "MRR@2": 0.5, "MRR@4": 0.5, "MRR@10": 0.5,
    }
    assert_metrics_close(got, expected, "hand example")


def test_tie_order_and_identical_ids_by_hand():
    # Equal scores rank by doc id descending as strings: "9" before "10"; 1.0 + 1e-12
    # equals 1.0 as a float32, so it ties too. The query's own id is dropped by default.
    qrels = {"q": {"10": 1}}
    run = {"q": {"10": 1.0 + 1e-12, "9": 1.0, "q": 5.0}}
    assert evaluate(qrels, run, k_values=(1,))["P@1"] == 0.0
    assert evaluate(qrels, run, k_values=(2,))["MRR@2"] == 0.5
    assert evaluate(qrels, run, k_values=(3,), ignore_identical_ids=False)["MRR@3"] == \
        pytest.approx(1 / 3)


def test_averaging_set():
    qrels = {"a": {"x": 1}, "b": {"x": 1}, "c": {"x": 0}, "d": {}}
    run = {"a": {"x": 1.0}, "c": {"x": 1.0}, "d": {"x": 1.0}, "e": {"x": 1.0}}
    # "b" is not in the run, "d" has no judgments, "e" no qrels: only a (1.0) and c (0.0) count.
    got = evaluate(qrels, run, k_values=(1,))
    assert got["P@1"] == 0.5 and got["MRR@1"] == 0.5 and got["NDCG@1"] == 0.5


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"run\['q'\]\['d'\]"):
        evaluate({"q": {"d": 1}}, {"q": {"d": float("nan")}})
    with pytest.raises(TypeError, match=r"qrels\['q'\]\['d'\]"):
        evaluate({"q": {"d": 1.5}}, {"q": {"d": 1.0}})
    with pytest.raises(ValueError, match=r"run\['q'\]\['d'\] = '0.5'"):
        evaluate({"q": {"d": 1}}, {"q": {"e": 1.0, "d": "0.5"}})
    with pytest.raises(TypeError, match=r"run\['q'\] has a non-string doc id 7"):
        evaluate({"q": {"d": 1}}, {"q": {"d": 1.0, 7: 0.5}})
    with pytest.raises(ValueError, match="no query"):
        evaluate({"q": {"d": 1}}, {"other": {"d": 1.0}})
    with pytest.raises(ValueError, match="k_values"):
        evaluate({"q": {"d": 1}}, {"q": {"d": 1.0}}, k_values=(0,))


# ----------------------------------------------------------------------------
# search


def brute_force(query_emb, corpus_emb, k):
    """Full score matrix, ranked by score descending then corpus index ascending (numpy lexsort)."""
    scores = query_emb.double().numpy() @ corpus_emb.double().numpy().T  # (Q, N)
    columns = np.arange(scores.shape[1])
    order = np.stack([np.lexsort((columns, -row))[:k] for row in scores])  # (Q, k)
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize(
    "num_docs,chunk_size,top_k,query_chunk_size",
    [
        (100, 25, 10, 4096),  # chunks divide N
        (103, 25, 10, 7),  # they do not; queries chunked too
        (103, 1, 5, 3),  # one doc per chunk
        (50, 64, 80, 4096),  # top_k > N, one chunk
        (50, 7, 80, 5),  # top_k > N, chunked
        (97, 10, 30, 4096),  # top_k > chunk_size
    ],
)
def test_search_matches_brute_force_with_ties(num_docs, chunk_size, top_k, query_chunk_size):
    # Small-integer embeddings: every dot product is exact in float32 whatever the
    # summation order, and many scores tie exactly, so the tie rule is tested too.
    generator = torch.Generator().manual_seed(num_docs + chunk_size)
    queries = torch.randint(-2, 3, (13, 8), generator=generator).float()
    corpus = torch.randint(-2, 3, (num_docs, 8), generator=generator).float()
    scores, indices = search(queries, corpus, top_k=top_k, chunk_size=chunk_size,
                             query_chunk_size=query_chunk_size)
    k = min(top_k, num_docs)
    expected_scores, expected_indices = brute_force(queries, corpus, k)
    assert scores.shape == indices.shape == (13, k)
    assert indices.dtype == torch.long and scores.dtype == torch.float32
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_array_equal(scores.double().numpy(), expected_scores)
    # Same values as a plain torch topk (whose tie choice is unspecified).
    np.testing.assert_array_equal(scores.numpy(),
                                  (queries @ corpus.T).topk(k, dim=1).values.numpy())


def test_search_all_scores_tied():
    corpus = torch.ones(40, 4)
    corpus[17] = 2.0
    scores, indices = search(torch.ones(2, 4), corpus, top_k=5, chunk_size=9)
    assert indices.tolist() == [[17, 0, 1, 2, 3]] * 2


def test_search_random_normalised_embeddings():
    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(20, 32, generator=generator), dim=-1)
    corpus = torch.nn.functional.normalize(torch.randn(1000, 32, generator=generator), dim=-1)
    scores, indices = search(queries, corpus, top_k=100, chunk_size=128)
    full = queries @ corpus.T  # (Q, N)
    expected_scores, expected_indices = full.topk(100, dim=1)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)
    # The returned scores are the scores of the returned indices.
    torch.testing.assert_close(full.gather(1, indices), scores, rtol=0, atol=1e-6)
    assert (indices == expected_indices).float().mean() > 0.99  # only near-ties may swap


def test_search_bfloat16_scores_in_float32():
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 16, generator=generator).bfloat16()
    corpus = torch.randn(30, 16, generator=generator).bfloat16()
    scores, indices = search(queries, corpus, top_k=4, chunk_size=8)
    assert scores.dtype == torch.float32
    expected_scores, expected_indices = brute_force(queries.float(), corpus.float(), 4)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(indices.numpy(), expected_indices)


def test_search_bad_input():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        search(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="top_k"):
        search(torch.zeros(2, 3), torch.zeros(4, 3), top_k=0)
    with pytest.raises(ValueError, match="NaN"):
        search(torch.full((2, 3), float("nan")), torch.zeros(4, 3))
    corpus = torch.ones(40, 3)
    corpus[33, 1] = float("nan")  # one NaN doc, in the last chunk, never in the top k otherwise
    with pytest.raises(ValueError, match="NaN"):
        search(torch.ones(2, 3), corpus, top_k=2, chunk_size=16)


def test_search_empty_inputs():
    scores, indices = search(torch.ones(0, 3), torch.ones(5, 3), top_k=2)
    assert scores.shape == indices.shape == (0, 2)
    scores, indices = search(torch.ones(4, 3), torch.ones(0, 3), top_k=2)
    assert scores.shape == indices.shape == (4, 0)
