"""train.py --report-to tensorboard (plumbing/tracking.py): the records of log.jsonl as TensorBoard
scalars; without the tensorboard package, a one-line error before anything is written."""

import json
import sys

import pytest

import train


def test_report_to_tensorboard_logs_what_log_jsonl_logs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard",
                        reason="tensorboard is not installed (pip install -e .[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    run = tmp_path / "run"
    train.main(["--steps", "2", "--batch-size", "4", "--log-every", "1", "--no-progress",
                "--device", "cpu", "--report-to", "tensorboard", "--out", str(run)])
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)}
               for tag in events.Tags()["scalars"]}
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in steps] == [1, 2] and evals  # before and after training
    for record in steps:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert scalars[f"train/{key}"][record["step"]] == pytest.approx(record[key], rel=1e-6)
    for record in evals:
        assert scalars["eval/NDCG@10"][record["step"]] == pytest.approx(record["NDCG@10"], rel=1e-6)


def test_report_to_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    # as if tensorboard were not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_:
        train.main(["--steps", "1", "--report-to", "tensorboard", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("train.py: error: --report-to tensorboard needs the tensorboard "
                                "package")
    assert not (tmp_path / "run").exists()
