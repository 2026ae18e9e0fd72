"""Tests for evaluate.py's command and run_evaluation: end to end on the built-in dataset.

The command's outputs are checked against independent recomputations: the TREC file is
parsed with pytrec_eval's own parser and rescored, and the ranking is recomputed by
brute force from `NVEmbed.encode` (query with instruction, document as title + " " + text).

Run: python -m pytest -q tests/test_evaluate_command.py
"""

import json
import random

import pytest
import torch

from plumbing.builtin import BUILTIN_INSTRUCTION, builtin_dataset
from plumbing.datafiles import load_beir, read_trec, write_beir, write_trec
from evaluate import evaluate, main, run_evaluation
from plumbing.loading import from_base
from tests.helpers import scifact

pytrec_eval = pytest.importorskip("pytrec_eval", reason="pytrec_eval (pip install "
                                                        "pytrec-eval-terrier) parses the run")


@pytest.fixture(autouse=True)
def one_thread():
    # On a small shared CPU, two OpenMP threads make the tiny model's many small ops
    # far slower (threads wait on each other); one thread keeps this file fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_outputs(folder, stem="builtin-test"):
    metrics_json = json.loads((folder / f"{stem}.json").read_text())
    with open(folder / f"{stem}.trec") as f:
        lines = [line.split() for line in f]
    with open(folder / f"{stem}.trec") as f:
        run = pytrec_eval.parse_run(f)
    return metrics_json, lines, run


def test_command_end_to_end_on_builtin_dataset(tmp_path):
    out = tmp_path / "out"
    k_values = (1, 3, 10, 50)
    metrics = main(["--model", "tiny", "--data", "builtin", "--out", str(out), "--top-k", "50",
                    "--k-values", "10,1,3,50", "--batch-size", "64", "--run-name", "test-run"])
    saved, lines, run = read_outputs(out)
    corpus, queries, qrels = builtin_dataset().split("test")

    # The JSON holds the returned metrics, with the resolved configuration.
    assert saved["metrics"] == metrics
    assert set(metrics) == \
        {f"{m}@{k}" for m in ("NDCG", "MAP", "Recall", "P", "MRR") for k in k_values}
    assert saved["config"]["instruction"] == BUILTIN_INSTRUCTION
    assert saved["config"]["num_queries"] == len(qrels) and \
        saved["config"]["num_documents"] == len(corpus)

    # TREC lines: qid Q0 docid rank score name; ranks 1..50 per query, scores non-increasing.
    assert all(len(fields) == 6 and fields[1] == "Q0" and fields[5] == "test-run"
               for fields in lines)
    assert set(run) == set(qrels) and all(len(docs) == 50 for docs in run.values())
    for qid in run:
        rows = [fields for fields in lines if fields[0] == qid]
        assert [int(fields[3]) for fields in rows] == list(range(1, 51))
        scores = [float(fields[4]) for fields in rows]
        assert scores == sorted(scores, reverse=True)

    # Rescoring the file gives the stored metrics, and pytrec_eval agrees on nDCG@10 and Recall@50.
    assert evaluate(qrels, run, k_values) == pytest.approx(metrics, abs=1e-12)
    oracle = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.50"}).evaluate(run)
    assert metrics["NDCG@10"] == \
        pytest.approx(sum(s["ndcg_cut_10"] for s in oracle.values()) / len(oracle), abs=1e-9)
    assert metrics["Recall@50"] == \
        pytest.approx(sum(s["recall_50"] for s in oracle.values()) / len(oracle), abs=1e-9)

    # Brute force: the same fresh tiny model (from_base is seeded), queries with the
    # instruction, documents bare; every score in the file is the dot product.
    model = from_base("tiny", pooling="mean")
    query_ids, doc_ids = list(qrels), list(corpus)
    query_emb = model.encode([queries[q] for q in query_ids], instruction=BUILTIN_INSTRUCTION,
                             convert_to_tensor=True)
    doc_emb = model.encode([corpus[d]["text"] for d in doc_ids], convert_to_tensor=True)
    full = query_emb @ doc_emb.T  # (Q, N)
    for row, qid in enumerate(query_ids):
        for did, score in run[qid].items():
            assert score == pytest.approx(full[row, doc_ids.index(did)].item(), abs=1e-5)
        best = full[row].topk(50).values
        assert sorted(run[qid].values(), reverse=True) == pytest.approx(best.tolist(), abs=1e-5)


def test_no_flags_uses_builtin_data_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default outputs go under ./runs
    main([])
    said = capsys.readouterr().out
    assert "fresh tiny model" in said
    out = tmp_path / "runs" / "eval" / "tiny-mean-bidirectional"
    first = (out / "builtin-test.json").read_text(), (out / "builtin-test.trec").read_text()

    with pytest.raises(SystemExit) as refused:
        main([])
    assert refused.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert ((out / "builtin-test.json").read_text(), (out / "builtin-test.trec").read_text()) == \
        first

    main(["--overwrite"])  # same model, same data: same run
    assert (out / "builtin-test.trec").read_text() == first[1]


def test_no_flags_prefers_the_model_train_py_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trained = from_base("tiny", pooling="latent", pooling_kwargs=dict(num_latents=8), seed=3)
    trained.save(tmp_path / "runs" / "stage1" / "model")
    metrics = main(["--k-values", "1,10", "--top-k", "10"])
    assert "runs/stage1/model (trained by train.py)" in capsys.readouterr().out
    saved, _, run = read_outputs(tmp_path / "runs" / "stage1" / "model" / "eval")
    assert saved["config"]["pooling"] == "latent" and saved["metrics"] == metrics
    corpus, queries, qrels = builtin_dataset().split("test")
    expected, expected_run = run_evaluation(trained, corpus, queries, qrels, BUILTIN_INSTRUCTION,
                                            top_k=10, k_values=(1, 10))
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert run.keys() == expected_run.keys()

    # A saved model keeps its pooling and attention: the base-only flags are refused.
    with pytest.raises(SystemExit):
        main(["--model", "runs/stage1/model", "--pooling", "mean", "--out", str(tmp_path / "x")])


def test_beir_folder_with_titles(tmp_path):
    """A BEIR folder read by load_beir: documents are encoded as title + " " + text."""
    corpus = {"d1": {"title": "Foxes", "text": "The fox is quick."},
              "d2": {"title": "", "text": "Dogs are lazy."},
              "d3": {"title": "Cats", "text": "Cats sleep all day."}}
    queries = {"q1": "which animal is quick", "q2": "who sleeps", "q3": "unjudged query"}
    write_beir_folder = tmp_path / "toy"
    write_beir(write_beir_folder, corpus, queries,
               {"test": {"q1": {"d1": 1}, "q2": {"d3": 2, "d2": 0}}})
    out = tmp_path / "out"
    metrics = main(["--model", "tiny", "--pooling", "eos", "--causal", "--data",
                    str(write_beir_folder), "--instruction", "Find the animal", "--out", str(out),
                    "--k-values", "1,2,3"])
    saved, _, run = read_outputs(out, "toy-test")
    assert saved["config"]["causal"] is True and saved["config"]["pooling"] == "eos"
    assert set(run) == {"q1", "q2"}  # only judged queries are encoded

    model = from_base("tiny", pooling="eos", causal=True)
    texts = ["Foxes The fox is quick.", "Dogs are lazy.", "Cats Cats sleep all day."]
    doc_emb = model.encode(texts, convert_to_tensor=True)
    for qid in ("q1", "q2"):
        query_emb = model.encode([queries[qid]], instruction="Find the animal",
                                 convert_to_tensor=True)
        for j, did in enumerate(corpus):
            assert run[qid][did] == pytest.approx((query_emb[0] @ doc_emb[j]).item(), abs=1e-5)
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 2, "d2": 0}}
    assert metrics == pytest.approx(evaluate(qrels, run, (1, 2, 3)), abs=1e-12)


def test_per_query_file_holds_each_querys_metrics(tmp_path):
    """--per-query: OUT/DATASET-SPLIT.per_query.json, each query's metrics as pytrec_eval computes
    them on the written run; their means are the metrics file's. An existing one is not
    overwritten."""
    corpus = {f"d{i}": {"title": "", "text": text} for i, text in enumerate(
        ["The fox is quick.", "Dogs are lazy.", "Cats sleep all day.", "Birds sing at dawn.",
         "Fish swim."])}
    queries = {"q1": "which animal is quick", "q2": "who sleeps", "q3": "who sings"}
    qrels = {"q1": {"d0": 1}, "q2": {"d2": 2, "d1": 0}, "q3": {"d3": 1, "d4": 1}}
    write_beir(tmp_path / "toy", corpus, queries, {"test": qrels})
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--data", str(tmp_path / "toy"), "--instruction", "", "--out",
            str(out), "--k-values", "1,3", "--per-query"]
    metrics = main(argv)
    saved, _, run = read_outputs(out, "toy-test")
    per_query = json.loads((out / "toy-test.per_query.json").read_text())["per_query"]
    oracle = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.1,3", "recall.1,3"}).evaluate(run)
    assert set(per_query) == set(oracle) == set(qrels)
    for qid, values in oracle.items():
        assert per_query[qid]["NDCG@3"] == pytest.approx(values["ndcg_cut_3"], abs=1e-6)
        assert per_query[qid]["Recall@1"] == pytest.approx(values["recall_1"], abs=1e-6)
    assert {name: sum(v[name] for v in per_query.values()) / 3 for name in metrics} == \
        pytest.approx(metrics, abs=1e-12)
    (out / "toy-test.json").unlink()
    (out / "toy-test.trec").unlink()
    with pytest.raises(SystemExit):  # only the per-query file is left, and it is not replaced
        main(argv)


def test_trec_format_errors(tmp_path):
    run = {"q1": {"d1": 0.5, "d2": 0.5, "d3": 0.25}}
    write_trec(run, tmp_path / "run.trec", "r")
    # trec_eval's order: equal scores by doc id descending.
    assert [line.split()[2] for line in (tmp_path / "run.trec").read_text().splitlines()] == \
        ["d2", "d1", "d3"]
    assert read_trec(tmp_path / "run.trec") == run
    with pytest.raises(ValueError, match="whitespace"):
        write_trec({"q1": {"doc 1": 1.0}}, tmp_path / "bad.trec", "r")
    (tmp_path / "broken.trec").write_text("q1 Q0 d1 1 0.5 r\nq1 Q0 d2 2\n")
    with pytest.raises(ValueError, match=r"broken.trec:2"):
        read_trec(tmp_path / "broken.trec")


def test_run_evaluation_on_a_scifact_subset():
    corpus, queries, qrels = load_beir(scifact(), "test")
    rng = random.Random(0)
    qids = rng.sample(sorted(qrels), 10)
    relevant = {did for qid in qids for did in qrels[qid]}
    others = rng.sample(sorted(set(corpus) - relevant), 60)
    sub_corpus = {did: corpus[did] for did in sorted(relevant) + others}
    sub_qrels = {qid: qrels[qid] for qid in qids}
    model = from_base("tiny", pooling="mean")
    metrics, run = run_evaluation(model, sub_corpus, queries, sub_qrels,
                                  "Given a scientific claim, retrieve documents that support or "
                                  "refute the claim",
                                  batch_size=16, max_length=160, top_k=20, k_values=(1, 10, 20))
    assert set(run) == set(qids) and all(len(docs) == 20 for docs in run.values())
    assert metrics == pytest.approx(evaluate(sub_qrels, run, (1, 10, 20)), abs=1e-12)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


def test_run_evaluation_keeps_top_k_results_besides_a_query_that_is_its_own_document():
    """A query whose id is also a corpus id (ArguAna, Quora) retrieves itself first. BEIR's
    exact search asks for top_k + 1, skips the self-match and keeps top_k others; a naive
    reference: rank every document by brute force, drop the self-match, cut at top_k."""
    top_k = 5
    full_corpus, _, _ = builtin_dataset().split("test")
    doc_ids = list(full_corpus)[:40]
    corpus = {did: full_corpus[did] for did in doc_ids}
    self_ids = doc_ids[:6]  # these queries are corpus documents, with the same id and text
    queries = {did: corpus[did]["text"] for did in self_ids}
    model = from_base("tiny", pooling="mean")
    # (6, D), no instruction
    query_emb = model.encode([queries[q] for q in self_ids], convert_to_tensor=True)
    doc_emb = model.encode([corpus[d]["text"] for d in doc_ids], convert_to_tensor=True)  # (40, D)
    full = (query_emb @ doc_emb.T).tolist()  # (6, 40)
    expected_run = {}
    for row, qid in enumerate(self_ids):
        ranked = sorted(range(len(doc_ids)), key=lambda j: (-full[row][j], j))
        # the same text, bare on both sides: the self-match ranks first
        assert doc_ids[ranked[0]] == qid
        others = [doc_ids[j] for j in ranked if doc_ids[j] != qid]
        expected_run[qid] = {did: full[row][doc_ids.index(did)] for did in others[:top_k]}
    # Each query's one relevant document is the last one the reference keeps: Recall@top_k
    # is 1 only if the run holds top_k documents besides the query itself.
    qrels = {qid: {list(docs)[-1]: 1} for qid, docs in expected_run.items()}

    metrics, run = run_evaluation(model, corpus, queries, qrels, "", top_k=top_k,
                                  k_values=(1, top_k))
    assert run.keys() == expected_run.keys()
    for qid in self_ids:
        assert set(run[qid]) == set(expected_run[qid])
        assert run[qid] == pytest.approx(expected_run[qid], abs=1e-5)
    assert metrics == pytest.approx(evaluate(qrels, expected_run, (1, top_k)), abs=1e-12)
    assert metrics[f"Recall@{top_k}"] == 1.0


def test_results_name_the_model_and_its_weights_and_identical_ids_are_a_flag(tmp_path, capsys):
    model = from_base("tiny", pooling="mean", name="my-model")
    model.save(tmp_path / "run" / "model")
    saved_config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved_config["name"] == "my-model" and saved_config["fingerprint"] == model.fingerprint()
    other = from_base("tiny", pooling="mean", seed=1)
    assert other.fingerprint() != model.fingerprint()  # other weights, another revision

    # Query "d1" is also a corpus document, with the same text: BEIR drops it from its ranking,
    # mteb's default keeps it.
    corpus = {"d1": {"title": "", "text": "The fox is quick."},
              "d2": {"title": "", "text": "Dogs are lazy."}}
    folder = tmp_path / "selfmatch"
    write_beir(folder, corpus, {"d1": "The fox is quick."}, {"test": {"d1": {"d2": 1}}})
    common = ["--model", str(tmp_path / "run" / "model"), "--data", str(folder), "--instruction",
              "", "--k-values", "1"]
    main(common + ["--out", str(tmp_path / "beir")])
    printed = capsys.readouterr().out
    assert "  name: my-model" in printed and f"  fingerprint: {model.fingerprint()}" in printed
    beir, _, run = read_outputs(tmp_path / "beir", "selfmatch-test")
    assert beir["config"]["name"] == "my-model" and \
        beir["config"]["fingerprint"] == model.fingerprint()
    assert beir["config"]["ignore_identical_ids"] is True and set(run["d1"]) == {"d2"}
    assert beir["metrics"]["NDCG@1"] == 1
    main(common + ["--out", str(tmp_path / "mteb"), "--keep-identical-ids"])
    kept, _, run = read_outputs(tmp_path / "mteb", "selfmatch-test")
    assert kept["config"]["ignore_identical_ids"] is False and set(run["d1"]) == {"d1", "d2"}
    assert kept["metrics"]["NDCG@1"] == 0  # the self-match ranks first and is not relevant
