"""The ablation table's writing and drawing (bench/ablate.py, bench/plot_ablation.py)."""

import importlib.util
import json
import re

import pytest
import torch

from bench import ablate, plot_ablation


def row(pooling, attention, trained, ndcg):
    return dict(pooling=pooling, attention=attention, trained=trained,
                train_seconds=60.0 if trained else 0.0, eval_seconds=5.0,
                **{"ndcg@10": ndcg, "recall@100": ndcg + 0.3},
                **({"loss_curve": [[5, 4.0], [10, 2.0]]} if trained else {}))


def trained_row(pooling, attention, teacher, seed, values, steps=30, lr=3e-4):
    """A measured row as bench/ablate.py writes it, with per-query nDCG@10 `values`."""
    per_query = {f"q{i}": {"NDCG@10": v, "Recall@100": v} for i, v in enumerate(values)}
    return dict(key=ablate.row_key(pooling, attention, teacher, seed), pooling=pooling,
                attention=attention, teacher=teacher, seed=seed, steps=steps, lr=lr,
                warmup_steps=steps // 10, trained=True, dtype="bf16",
                commit="abc", cpu="cpu", gpu=None, threads=2, wall_seconds=60.0,
                per_query=per_query, **{"ndcg@10": sum(values) / len(values), "recall@100": 0.5})


def test_lessons_average_seeds_per_query_then_pair_the_queries():
    """latent bidirectional (two seeds) against latent causal (two seeds): the difference is the
    mean over queries of (seed mean A - seed mean B); every query better by 0.1 gives the exact
    sign-flip p = 2 / 2^5."""
    a = [[0.6, 0.7, 0.5, 0.6, 0.6], [0.8, 0.7, 0.7, 0.6, 0.8]]
    b = [[0.5, 0.6, 0.4, 0.5, 0.5], [0.7, 0.6, 0.6, 0.5, 0.7]]
    rows = ([trained_row("latent", "bidirectional", "bm25", s, v) for s, v in enumerate(a)]
            + [trained_row("latent", "causal", "bm25", s, v) for s, v in enumerate(b)])
    config = dict(steps=30, lr=3e-4)
    [found] = ablate.lessons(dict(rows=rows, config=config))
    assert found["claim"].startswith("bidirectional > causal (latent")
    assert found["difference"] == pytest.approx(0.1) and found["p_value"] == pytest.approx(2 / 32)
    assert found["seeds_a"] == [0, 1]
    # Each seed of A is 0.1 above the same seed of B; but A's seeds differ by 0.12 on average, so
    # drawing them puts A - B anywhere from -0.02 to +0.22: the two-level CI holds 0.
    assert found["two_level_low"] < 0 < found["two_level_high"]
    assert found["ci_low"] > 0 and found["verdict"] == "within noise"
    # The teacher lesson pairs only the seeds both sides have.
    rows.append(trained_row("latent", "bidirectional", "minilm", 1, [0.9] * 5))
    teacher = [f for f in ablate.lessons(dict(rows=rows, config=config))
               if "teacher" in f["claim"]][0]
    assert teacher["seeds_b"] == [1] and teacher["difference"] == pytest.approx(0.9 - 0.72)
    assert teacher["verdict"] == "holds"  # one seed each, every query +0.1 or more


def test_rows_with_their_own_steps_or_lr_are_their_own_configurations():
    """A row's own steps and lr set its configuration: the 30-step lessons use only the setting's
    rows, and a bidirectional-causal pair at other steps or lr becomes a lesson row of its own."""
    config = dict(steps=30, lr=3e-4, warmup_steps=3)
    rows = [trained_row("latent", att, "bm25", 0, [v] * 4, steps=steps, lr=lr)
            for att, steps, lr, v in (("bidirectional", 30, 3e-4, 0.2), ("causal", 30, 3e-4, 0.3),
                                      ("bidirectional", 120, 3e-4, 0.5),
                                      ("causal", 120, 3e-4, 0.4), ("bidirectional", 30, 1e-3, 0.1))]
    found = {f["claim"]: f for f in ablate.lessons(dict(rows=rows, config=config))}
    assert set(found) == {"bidirectional > causal (latent pooling)",
                          "bidirectional > causal (latent, 120 steps, lr 0.0003)"}
    assert found["bidirectional > causal (latent pooling)"]["difference"] == pytest.approx(-0.1)
    assert found["bidirectional > causal (latent pooling)"]["verdict"] == "reversed"
    assert found["bidirectional > causal (latent, 120 steps, lr 0.0003)"]["verdict"] == "holds"
    # The plan gives each row its own schedule and key; the warm-up keeps its share of the steps.
    planned = {p.part: p for p in reversed(ablate.plan(("lr", "curve")))}  # each part's first
    curve = [p for p in ablate.plan(("curve",)) if p.steps == 480]
    assert len(curve) == 4 and {p.seed for p in curve} == {0, 1}
    assert ablate.row_schedule(curve[0], config) == dict(steps=480, lr=3e-4, warmup_steps=48)
    assert ablate.planned_key(curve[0], config) == "latent/bidirectional/bm25/seed0/steps480"
    assert ablate.row_schedule(planned["lr"], config)["lr"] in (1e-4, 1e-3)
    assert ablate.planned_key(planned["lr"], config) == "latent/bidirectional/bm25/seed0/lr0.0001"
    # A row at the setting's own steps keeps the plain key (the rows of (a) measured before).
    same = ablate.Planned("seeds", "latent", "causal", "bm25", 3, steps=30, lr=3e-4)
    assert ablate.planned_key(same, config) == "latent/causal/bm25/seed3"


def test_a_results_file_from_before_rows_held_their_schedule_is_read_with_the_settings(tmp_path):
    config = dict(steps=30, lr=3e-4, warmup_steps=3)
    header = dict(setting="quick", config=config, model="m", data="d")
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(dict(header, rows=[dict(key="k")], dtype_choice=dict(dtype="bf16"))))
    results = ablate.read_results(path, header)
    assert results["rows"] == [dict(key="k", steps=30, lr=3e-4, warmup_steps=3)]
    assert "dtype_choice" not in results and results["dtype_choices"][0]["dtype"] == "bf16"


def test_plan_puts_every_main_configuration_at_seed_0_first():
    rows = ablate.plan(("a", "b", "c"), seeds=3)
    assert len(rows) == 12 + 4 + 2  # (c)'s BM25 rows are (a)'s
    assert {r[1:3] for r in rows[:4]} == {("latent", "bidirectional"), ("latent", "causal"),
                                          ("mean", "bidirectional"), ("mean", "causal")}
    assert all(r.seed == 0 for r in rows[:4])
    assert rows[-1] == ablate.Planned("c", "latent", "bidirectional", "minilm", 1)
    every = ablate.plan(ablate.PARTS[:-1], seeds=3)  # the default: the why before (b) and (c)
    assert [r.part for r in every] == sorted([r.part for r in every], key=ablate.PARTS.index)
    assert len(every) == 12 + 4 + 4 + 10 + 4 + 2  # (c): MiniLM seeds 0, 1


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="its MiniLM teacher needs sentence-transformers (the st extra)")
def test_runner_dry_run_resumes_without_duplicates(tmp_path, monkeypatch):
    """bench/ablate.py end to end at tiny shapes (parts a and c, one seed), then again: the second
    call finds every row in the results file and measures nothing; a results file of another setting
    is refused."""
    from tests.test_teachers import make_folder

    data = small_beir(tmp_path / "data")
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open()]
    words = sorted({w for doc in corpus
                    for w in re.findall(r"[a-z]+", (doc["title"] + " " + doc["text"]).lower())})
    minilm = make_folder(tmp_path / "minilm", ["mean"], normalize=True, words=words)
    results = tmp_path / "ablation.json"
    argv = ["--dry-run", "--model", "tiny", "--data", str(data), "--minilm", str(minilm),
            "--results", str(results), "--out", str(tmp_path / "runs"), "--parts", "a", "c",
            "--seeds", "1", "--device", "cpu", "--dtype", "fp32"]
    first = ablate.main(argv)
    keys = [r["key"] for r in first["rows"]]
    assert len(keys) == 5 and len(set(keys)) == 5
    for r in first["rows"]:
        assert len(r["per_query"]) == 8 and r["dtype"] == "fp32" and r["cpu"] and r["threads"] >= 1
        assert r["commit"] and r["wall_seconds"] > 0
        assert (r["steps"], r["lr"], r["warmup_steps"]) == (2, 1e-3, 1)
        assert r["dtype_choice"]["dtype"] == "fp32"
    assert {(r["pooling"], r["attention"]) for r in first["zero_shot"]} == {
        (p, a) for p in ("eos", "mean") for a in ablate.ATTENTIONS}
    for r in first["zero_shot"]:  # the same metadata as the trained rows
        assert r["commit"] and r["cpu"] and r["threads"] >= 1 and r["dtype"] == "fp32"
        assert r["steps"] == 0 and len(r["per_query"]) == 8
    assert "| latent | bidirectional | minilm | 2 | 0.001 | 1 |" in \
        results.with_suffix(".md").read_text()

    def measure_row(*args, **kwargs):
        raise AssertionError("a row already in the results file was measured again")

    monkeypatch.setattr(ablate, "measure_row", measure_row)
    again = ablate.main(argv)
    assert [r["key"] for r in again["rows"]] == keys
    assert [r["key"] for r in json.loads(results.read_text())["rows"]] == keys
    assert len(json.loads(results.read_text())["dtype_choices"]) == 2  # each run's, kept
    other = json.loads(results.read_text()) | dict(setting="quick")
    results.write_text(json.dumps(other))
    with pytest.raises(SystemExit) as exit_info:
        ablate.main(argv)
    assert exit_info.value.code == 2


def test_a_row_stopped_in_an_earlier_sitting_resumes_from_its_checkpoint(tmp_path, monkeypatch,
                                                                          capsys):
    """train_run on a row folder holding a checkpoint and no model (the runner stopped mid-row)
    passes --resume, and the row ends with the weights and losses of a row never stopped, its
    sittings listed; a checkpoint trained on other data starts the row again, with a notice."""
    import types

    from safetensors.torch import load_file

    import train
    from plumbing.builtin import builtin_dataset

    train_file = tmp_path / "train.jsonl"
    examples = builtin_dataset().train_examples
    train_file.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples[:24]))
    args = types.SimpleNamespace(model="tiny", device="cpu")
    schedule = dict(steps=4, lr=1e-3, warmup_steps=1)
    configure, argvs = train.configure, []

    def run(folder, *extra):
        monkeypatch.setattr(train, "configure",
                            lambda argv: (argvs.append(argv), configure(argv + list(extra)))[1])
        return ablate.train_run(args, ablate.SETTINGS["dry-run"], "fp32", tmp_path / folder,
                                train_file, "latent", "bidirectional", 0, schedule)

    _, whole_losses, earlier = run("whole")
    this = ablate.commit()
    assert earlier == dict(seconds=0.0, sittings=[dict(commit=this, from_step=0)])
    run("stopped", "--stop-after", "2")  # the runner stopped after step 2: a checkpoint, no model
    assert not (tmp_path / "stopped" / "model").exists()
    seconds, losses, earlier = run("stopped")
    assert "--resume" in argvs[-1] and "--overwrite" not in argvs[-1]
    assert earlier["sittings"] == [dict(commit=this, from_step=0), dict(commit=this, from_step=2)]
    assert earlier["seconds"] > 0
    assert [[step, dict(losses)[step]] for step, _ in whole_losses] == whole_losses
    names = sorted(path.name for path in (tmp_path / "whole" / "model").glob("*.safetensors"))
    assert "pooling.safetensors" in names
    for name in names:
        whole = load_file(tmp_path / "whole" / "model" / name)
        resumed = load_file(tmp_path / "stopped" / "model" / name)
        assert whole.keys() == resumed.keys()
        assert all(torch.equal(whole[key], resumed[key]) for key in whole)

    run("changed", "--stop-after", "2")
    train_file.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples[24:48]))
    capsys.readouterr()
    _, _, earlier = run("changed")
    assert "--overwrite" in argvs[-1] and "--resume" not in argvs[-1]
    assert earlier["sittings"] == [dict(commit=this, from_step=0)]
    assert ("notice: changed: its checkpoint was trained with another train_file: the row starts "
            "again") in capsys.readouterr().out


def test_logged_seconds_counts_each_line_over_the_steps_since_the_line_before(tmp_path):
    """Lines at steps 5 (1 s a step), 8 (a line by the clock, 2 s), 10 (3 s) and 15 (4 s): up to
    step 10, 5 + 6 + 6 s; up to step 12, a checkpoint saved by the clock between lines, the two
    steps after step 10 at the covering line's 4 s; past the last line, at its rate."""
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(dict(step=step, loss=1.0, ms_per_step=ms)) + "\n"
                           for step, ms in ((5, 1000), (8, 2000), (10, 3000), (15, 4000)))
                   + json.dumps(dict(step=15, eval="builtin-test")) + "\n")
    assert ablate.logged_seconds(log, up_to=10) == pytest.approx(17.0)
    assert ablate.logged_seconds(log, up_to=12) == pytest.approx(25.0)
    assert ablate.logged_seconds(log, up_to=17) == pytest.approx(45.0)
    assert ablate.logged_seconds(log, up_to=3) == pytest.approx(3.0)


def test_read_table_names_the_missing_field(tmp_path):
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(dict(setting="full", config={}, hardware="x",
                                    rows=[{"pooling": "eos"}])))
    with pytest.raises(ValueError,
                       match=r"ablation.json: rows\[0\] lacks \['attention', 'ndcg@10', "
                             r"'trained'\]"):
        plot_ablation.read_table(path)
    path.write_text(json.dumps(dict(rows=[])))
    with pytest.raises(ValueError, match="no 'setting' field"):
        plot_ablation.read_table(path)
    path.write_text('{"setting": ')
    with pytest.raises(ValueError, match=r"ablation.json: not JSON \(Expecting value: line 1"):
        plot_ablation.read_table(path)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed (the plots extra: pip install -e "
                           "'.[plots]')")
def test_plot_writes_both_pictures(tmp_path):
    table = dict(setting="quick", hardware="test",
                 config=dict(steps=10, batch_size=8, hard_negatives=3, max_length=64, lr=3e-4),
                 rows=[row(p, a, t, 0.1 + 0.3 * t) for p in ablate.POOLING_ORDER
                       for a in ablate.ATTENTIONS
                       for t in (False, True)])
    path = tmp_path / "ablation.json"
    path.write_text(json.dumps(table))
    plot_ablation.main([str(path), "--out", str(tmp_path / "pictures")])
    for name in ("ablation-quick.png", "loss-quick.png"):
        assert (tmp_path / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A partial table (a run stopped early, or --attentions bidirectional) draws what ran.
    table["rows"] = [r for r in table["rows"]
                     if r["attention"] == "bidirectional" and r["pooling"] != "eos"]
    path.write_text(json.dumps(table))
    plot_ablation.main([str(path), "--out", str(tmp_path / "partial")])
    assert (tmp_path / "partial" / "ablation-quick.png").is_file()


def test_plot_and_ablate_agree_on_the_pooling_order():
    # plot_ablation.py does not import torch
    assert plot_ablation.POOLING_ORDER == ablate.POOLING_ORDER


def test_gpu_benchmark_dry_run_writes_every_row(tmp_path):
    """bench/gpu_step.py end to end at tiny shapes on the CPU, so that its first GPU run does not
    fail on a typo."""
    from bench import gpu_step

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nan earlier section\n")
    gpu_step.main(["--dry-run", "--results", str(results)])
    text = results.read_text()
    # appended, nothing lost
    assert text.startswith("# Benchmark results\n\nan earlier section\n\n## DRY RUN")
    assert "`python bench/gpu_step.py --dry-run --results" in text and "Hardware: CPU" in text
    rows = [line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| fine-tuning")
            and not line.startswith("| ours |")]
    # (a) LoRA and full x eager/compiled x checkpointing off/on; (b); (c)
    assert len(rows) == 8 + 2 + 2
    assert not [row for row in rows if "skipped" in row or "out of memory" in row]


def small_beir(folder):
    """The built-in dataset cut down to a BEIR folder: 12 train and 8 test queries, their documents
    and 20 others."""
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
    queries = {q: t for q, t in (queries | test_queries).items()
               if any(q in qrels for qrels in splits.values())}
    write_beir(folder, corpus, queries, splits)
    return folder


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="its MiniLM teacher needs sentence-transformers (the st extra)")
def test_teachers_dry_run_runs_every_teacher_and_compares_with_bm25(tmp_path):
    """bench/teachers.py --dry-run: the GPU experiment's whole path at tiny shapes (the tiny preset,
    2 steps, a hand-made sentence-transformers folder for MiniLM), one text length."""
    from bench import teachers
    from tests.test_teachers import make_folder

    data = small_beir(tmp_path / "data")
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open()]
    words = sorted({w for doc in corpus
                    for w in re.findall(r"[a-z]+", (doc["title"] + " " + doc["text"]).lower())})
    # knows the corpus's words
    minilm = make_folder(tmp_path / "minilm", ["mean"], normalize=True, words=words)
    # --margin 10: the random teachers' scores are all alike, and 0.95 would drop every candidate.
    rows = teachers.main(["--dry-run", "--model", "tiny", "--data", str(data), "--minilm",
                          str(minilm), "--out", str(tmp_path / "out"), "--lengths", "128",
                          "--device", "cpu", "--dev-fraction", "0.25", "--margin", "10"])
    assert [r["teacher"] for r in rows] == ["bm25", "minilm", "self"]
    saved = json.loads((tmp_path / "out" / "teachers-128.json").read_text())
    assert saved["config"]["dev_queries"] == 3 and saved["config"]["fit_queries"] == 9
    for r in rows:
        gap = r["vs_bm25"]["NDCG@10"]
        assert gap["queries"] == 8 and 0 < gap["p_value"] <= 1 and \
            gap["ci_low"] <= gap["difference"] <= gap["ci_high"]
        assert gap["difference"] == pytest.approx(r["test_ndcg10"] - saved["bm25"]["NDCG@10"])
    # The held-out queries are never mined: every training file holds only the fit queries.
    mined_queries = {line["query"]
                     for line in map(json.loads, (tmp_path / "out" / "bm25.jsonl").open())}
    assert len(mined_queries) <= 9
    assert "| self | 128 |" in (tmp_path / "out" / "teachers-128.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed (the plots extra: pip install -e "
                           "'.[plots]')")
def test_plot_reads_the_runners_table_and_draws_the_steps_curve(tmp_path):
    """A table as bench/ablate.py writes it now (zero-shot rows apart, each row its steps and lr):
    the bars use the setting's rows, the steps picture latent pooling at every length."""
    config = dict(steps=30, lr=3e-4, warmup_steps=3, batch_size=8, hard_negatives=3, max_length=64)
    rows = [dict(trained_row("latent", att, "bm25", s, [0.2 + 0.01 * s] * 3, steps=steps),
                 loss_curve=[[5, 2.0]])
            for att in ablate.ATTENTIONS for steps in (30, 120, 480) for s in range(2)]
    zero_shot = [dict(row("mean", att, False, 0.1), cpu="cpu", gpu=None)
                 for att in ablate.ATTENTIONS]
    path = tmp_path / "ablation-quick.json"
    path.write_text(json.dumps(dict(setting="quick", config=config, rows=rows,
                                    zero_shot=zero_shot)))
    table = plot_ablation.read_table(path)
    assert len(plot_ablation.at_setting(table)) == 4 + 2 and table["hardware"] == "cpu"
    plot_ablation.main([str(path), "--out", str(tmp_path / "pictures")])
    for name in ("ablation-quick.png", "loss-quick.png", "steps-quick.png"):
        assert (tmp_path / "pictures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One length only: no steps picture.
    path.write_text(json.dumps(dict(setting="quick", config=config, zero_shot=zero_shot,
                                    rows=[r for r in rows if r["steps"] == 30])))
    plot_ablation.main([str(path), "--out", str(tmp_path / "one")])
    assert not (tmp_path / "one" / "steps-quick.png").exists()


def test_quick_step_bench_runs_both_trees_on_the_same_batch(tmp_path, capsys, monkeypatch):
    """bench/quick_step.py at tiny shapes against abc58cb: each side runs its own tree's code (the
    baseline's modules from the unpacked commit), both build the quick setting from the same flags
    and take the same first batch, so their losses before any update agree."""
    import math
    import subprocess

    import torch

    from bench import quick_step

    if subprocess.run(["git", "-C", str(quick_step.REPO), "cat-file", "-e", "abc58cb^{commit}"],
                      capture_output=True).returncode != 0:
        pytest.skip("commit abc58cb is not in this clone's history (a shallow clone)")
    trees = []
    monkeypatch.setattr(quick_step.Side, "__init__", record(quick_step.Side.__init__, trees))
    threads = torch.get_num_threads()
    data = small_beir(tmp_path / "data")
    try:
        quick_step.main(["--model", "tiny", "--data", str(data), "--rounds", "1",
                         "--threads", "1", "--max-length", "160"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    first = re.search(r"round 0 \(warm-up\): abc58cb [\d,]+ ms loss ([\d.]+); this tree [\d,]+ ms "
                      r"loss ([\d.]+)", out)
    assert first and math.isclose(float(first.group(1)), float(first.group(2)), rel_tol=1e-4), out
    assert "layers 2;" in out
    baseline, this = (tree.train.__file__ for tree in trees)
    assert str(quick_step.REPO) not in baseline and this == str(quick_step.REPO / "train.py")


def record(init, trees):
    """Side.__init__ that also keeps each side's tree."""
    def recording(self, tree, *args, **kwargs):
        trees.append(tree)
        init(self, tree, *args, **kwargs)
    return recording
