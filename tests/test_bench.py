"""The ablation table's writing and drawing (bench/ablate.py, bench/plot_ablation.py)."""

import importlib.util
import json
import re

import pytest

from bench import ablate, plot_ablation


def row(pooling, attention, trained, ndcg):
    return dict(pooling=pooling, attention=attention, trained=trained, train_seconds=60.0 if trained else 0.0,
                eval_seconds=5.0, **{"ndcg@10": ndcg, "recall@100": ndcg + 0.3},
                **({"loss_curve": [[5, 4.0], [10, 2.0]]} if trained else {}))


def test_markdown_lists_only_the_rows_that_ran_in_the_papers_order():
    rows = [row("latent", "bidirectional", False, 0.09), row("eos", "causal", False, 0.001),
            row("latent", "bidirectional", True, 0.56)]  # eos causal's training has not run yet
    table = ablate.markdown(rows, "full", {"steps": 60}, 120.0, "test")
    lines = [line for line in table.splitlines() if line.startswith("| eos") or line.startswith("| latent")]
    assert lines == ["| eos | causal | 0.0010 | - | - | - | - | - |",
                     "| latent | bidirectional | 0.0900 | 0.5600 | 0.8600 | 1.0 min | best | - |"]


def with_per_query(r, values):
    return r | dict(per_query={f"q{i}": {"NDCG@10": v, "Recall@100": v} for i, v in enumerate(values)})


def test_markdown_gives_each_trained_row_its_gap_and_p_value():
    """Against the best trained row and BM25, over the same queries: the hand-computable sign-flip case (every
    query better by 0.1: p = 2 / 2^5) and identical rows (p 1)."""
    best = with_per_query(row("latent", "bidirectional", True, 0.6), [0.6, 0.7, 0.5, 0.6, 0.6])
    worse = with_per_query(row("mean", "bidirectional", True, 0.5), [0.5, 0.6, 0.4, 0.5, 0.5])
    bm25 = with_per_query({"ndcg@10": 0.5, "recall@100": 0.5}, [0.5, 0.6, 0.4, 0.5, 0.5])
    table = ablate.markdown([worse, best], "full", {}, 60.0, "test", bm25)
    lines = [line for line in table.splitlines() if line.startswith("| mean") or line.startswith("| latent")]
    assert lines == ["| mean | bidirectional | - | 0.5000 | 0.8000 | 1.0 min | -0.1000 (p 0.062) "
                     "| +0.0000 (p 1.000) |",
                     "| latent | bidirectional | - | 0.6000 | 0.9000 | 1.0 min | best | +0.1000 (p 0.062) |"]


def test_read_table_names_the_missing_field(tmp_path):
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(dict(setting="full", config={}, hardware="x", rows=[{"pooling": "eos"}])))
    with pytest.raises(ValueError, match=r"ablation.json: rows\[0\] lacks \['attention', 'ndcg@10', 'trained'\]"):
        plot_ablation.read_table(path)
    path.write_text(json.dumps(dict(rows=[])))
    with pytest.raises(ValueError, match="no 'setting' field"):
        plot_ablation.read_table(path)
    path.write_text('{"setting": ')
    with pytest.raises(ValueError, match=r"ablation.json: not JSON \(Expecting value: line 1"):
        plot_ablation.read_table(path)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed (only bench/plot_ablation.py uses it)")
def test_plot_writes_both_pictures(tmp_path):
    table = dict(setting="quick", hardware="test", config=dict(steps=10, batch_size=8, hard_negatives=3,
                                                               max_length=64, lr=3e-4),
                 rows=[row(p, a, t, 0.1 + 0.3 * t) for p in ablate.POOLING_ORDER for a in ablate.ATTENTIONS
                       for t in (False, True)])
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(table))
    plot_ablation.main([str(path), "--out", str(tmp_path / "pictures")])
    for name in ("ablation-quick.png", "loss-quick.png"):
        assert (tmp_path / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A partial table (a run stopped early, or --attentions bidirectional) draws what ran.
    table["rows"] = [r for r in table["rows"] if r["attention"] == "bidirectional" and r["pooling"] != "eos"]
    path.write_text(json.dumps(table))
    plot_ablation.main([str(path), "--out", str(tmp_path / "partial")])
    assert (tmp_path / "partial" / "ablation-quick.png").is_file()


def test_plot_and_ablate_agree_on_the_pooling_order():
    assert plot_ablation.POOLING_ORDER == ablate.POOLING_ORDER  # plot_ablation.py does not import torch


def test_gpu_benchmark_dry_run_writes_every_row(tmp_path):
    """bench/gpu_step.py end to end at tiny shapes on the CPU, so that its first GPU run does not fail on a typo."""
    from bench import gpu_step

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nan earlier section\n")
    gpu_step.main(["--dry-run", "--results", str(results)])
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nan earlier section\n\n## DRY RUN")  # appended, nothing lost
    assert "`python bench/gpu_step.py --dry-run --results" in text and "Hardware: CPU" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| fine-tuning")
            and not line.startswith("| ours |")]
    assert len(rows) == 8 + 2 + 2  # (a) LoRA and full x eager/compiled x checkpointing off/on; (b); (c)
    assert not [row for row in rows if "skipped" in row or "out of memory" in row]


def small_beir(folder):
    """The built-in dataset cut down to a BEIR folder: 12 train and 8 test queries, their documents and 20 others."""
    from plumbing.builtin import builtin_dataset
    from plumbing.datafiles import write_beir

    data = builtin_dataset()
    splits = {}
    for split, count in (("train", 12), ("test", 8)):
        _, _, qrels = data.split(split)
        splits[split] = dict(list(qrels.items())[:count])
    corpus, queries, _ = data.split("train")
    _, test_queries, _ = data.split("test")
    judged = {d for qrels in splits.values() for judgments in qrels.values() for d in judgments}
    corpus = {d: doc for i, (d, doc) in enumerate(corpus.items()) if d in judged or i < 20}
    queries = {q: t for q, t in (queries | test_queries).items() if any(q in qrels for qrels in splits.values())}
    write_beir(folder, corpus, queries, splits)
    return folder


def test_teachers_dry_run_runs_every_teacher_and_compares_with_bm25(tmp_path):
    """bench/teachers.py --dry-run: the GPU experiment's whole path at tiny shapes (the tiny preset, 2 steps, a
    hand-made sentence-transformers folder for MiniLM), one text length."""
    from bench import teachers
    from tests.test_teachers import make_folder

    data = small_beir(tmp_path / "data")
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open()]
    words = sorted({w for doc in corpus for w in re.findall(r"[a-z]+", (doc["title"] + " " + doc["text"]).lower())})
    minilm = make_folder(tmp_path / "minilm", ["mean"], normalize=True, words=words)  # knows the corpus's words
    # --margin 10: the random teachers' scores are all alike, and 0.95 would drop every candidate.
    rows = teachers.main(["--dry-run", "--model", "tiny", "--data", str(data), "--minilm", str(minilm),
                          "--out", str(tmp_path / "out"), "--lengths", "128", "--device", "cpu", "--dev-fraction",
                          "0.25", "--margin", "10"])
    assert [r["teacher"] for r in rows] == ["bm25", "minilm", "self"]
    saved = json.loads((tmp_path / "out" / "teachers-128.json").read_text())
    assert saved["config"]["dev_queries"] == 3 and saved["config"]["fit_queries"] == 9
    for r in rows:
        gap = r["vs_bm25"]["NDCG@10"]
        assert gap["queries"] == 8 and 0 < gap["p_value"] <= 1 and gap["ci_low"] <= gap["difference"] <= gap["ci_high"]
        assert gap["difference"] == pytest.approx(r["test_ndcg10"] - saved["bm25"]["NDCG@10"])
    # The held-out queries are never mined: every training file holds only the fit queries.
    mined_queries = {line["query"] for line in map(json.loads, (tmp_path / "out" / "bm25.jsonl").open())}
    assert len(mined_queries) <= 9
    assert "| self | 128 |" in (tmp_path / "out" / "teachers-128.md").read_text()
