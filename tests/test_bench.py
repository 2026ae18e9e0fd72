"""The ablation table's writing and drawing (bench/ablate.py, bench/plot_ablation.py)."""

import importlib.util
import json

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
    assert lines == ["| eos | causal | 0.0010 | - | - | - |",
                     "| latent | bidirectional | 0.0900 | 0.5600 | 0.8600 | 1.0 min |"]


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
