"""A user's mistake ends every command the way argparse ends a bad flag: one last line on
stderr, `<command>: error: <culprit>: <what is wrong>`, and exit status 2, never a
traceback (a traceback is kept for bugs in the code).

Each case builds one broken input in tmp_path (from the built-in dataset and the tiny
preset, so that all of them fail within a second or two), runs the command's main(argv)
in-process as `python <command> ...` would, and checks the exit status, the last line of
stderr and that it names the culprit: the file and line, or the flag. A model that cannot
be read must stop a command before any training or encoding starts.

Run: python -m pytest -q tests/test_errors.py
"""

import contextlib
import errno
import functools
import io
import json
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plumbing import data_cli, datafiles  # noqa: E402
import evaluate  # noqa: E402
from plumbing import guards  # noqa: E402
import mine  # noqa: E402
import train  # noqa: E402
from plumbing.builtin import builtin_dataset  # noqa: E402
from model import Mistral, MistralConfig  # noqa: E402
from plumbing.loading import from_base  # noqa: E402
from tests.helpers import REPO, free_port, spawn_two_ranks  # noqa: E402

torch.set_num_threads(1)

COMMANDS = {"train.py": train.main, "evaluate.py": evaluate.main, "mine.py": mine.main,
            "data.py": data_cli.main}


@functools.lru_cache(maxsize=1)
def builtin():
    return builtin_dataset()


# ---------------------------------------------------------------- broken inputs


def training_file(tmp_path, second_line=None):
    """Three built-in training examples in train.jsonl, line 2 replaced by `second_line` (a dict or
    raw text)."""
    lines = [json.dumps(example.to_json()) for example in builtin().train_examples[:3]]
    if second_line is not None:
        lines[1] = second_line if isinstance(second_line, str) else json.dumps(second_line)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def non_retrieval_data_in_stage_1(tmp_path):
    path = training_file(tmp_path)
    rows = [dict(json.loads(line), task_type="classification")
            for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return "train.py", ["--data", str(path), "--out", str(tmp_path / "run")], \
        f"{path}: stage 1 trains on retrieval data only"


def training_row(**changes):
    """The second built-in example as a training-file row, with `changes` (a value None removes the
    field)."""
    row = {**builtin().train_examples[1].to_json(), **changes}
    return {key: value for key, value in row.items() if value is not None}


def beir_folder(tmp_path):
    """The built-in dataset as a BEIR folder (train and test qrels)."""
    folder = tmp_path / "beir"
    datafiles.write_beir(folder, builtin().corpus, builtin().queries, builtin().qrels)
    return folder


def append_line(path, line):
    """Append `line` to a file; returns its line number."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return len(path.read_text(encoding="utf-8").splitlines())


def hf_checkpoint(tmp_path, model_type="mistral", truncate=False):
    """An HF checkpoint folder of the tiny preset: config.json and model.safetensors (cut in half if
    `truncate`)."""
    from safetensors.torch import save_file

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    config = MistralConfig.preset("tiny")
    hf = dict(model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size,
              num_hidden_layers=config.num_hidden_layers,
              num_attention_heads=config.num_attention_heads,
              num_key_value_heads=config.num_key_value_heads)
    (folder / "config.json").write_text(json.dumps(hf))
    weights = folder / "model.safetensors"
    save_file({f"model.{k}": v for k, v in Mistral(config).state_dict().items()}, weights)
    if truncate:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


# ---------------------------------------------------------------- the cases
# Each returns (command, argv, culprit): `culprit` (a string, or several) must appear in the last
# stderr line.


def malformed_json_line(tmp_path):
    path = training_file(tmp_path, '{"query": "which river", "positive": ')
    return "data.py", ["check-train", str(path)], f"{path}:2: malformed JSON"


def missing_field(tmp_path):
    path = training_file(tmp_path, training_row(positive=None))
    return "train.py", ["--data", str(path), "--out", str(tmp_path / "run")], \
        f"{path}:2: field 'positive'"


def empty_query(tmp_path):
    path = training_file(tmp_path, training_row(query=""))
    return "data.py", ["check-train", str(path)], f"{path}:2: field 'query'"


def negatives_not_a_list(tmp_path):
    path = training_file(tmp_path, training_row(negatives="a river in the north"))
    return "train.py", ["--data", str(path), "--out", str(tmp_path / "run")], \
        f"{path}:2: field 'negatives'"


def unknown_task_type(tmp_path):
    path = training_file(tmp_path, training_row(task_type="ranking"))
    return "data.py", ["check-train", str(path)], f"{path}:2: task_type 'ranking'"


def empty_training_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    return "train.py", ["--data", str(path), "--out", str(tmp_path / "run")], \
        f"{path}: no training examples"


def example_without_negatives(tmp_path):
    path = training_file(tmp_path, training_row(negatives=[], negative_ids=[]))
    return "train.py", ["--data", str(path), "--out", str(tmp_path / "run")], \
        (f"{path}:2: example (query_id='q000-1'", "has no hard negative")


def qrels_unknown_id(tmp_path):
    folder = beir_folder(tmp_path)
    line = append_line(folder / "qrels" / "test.tsv", "q-unknown\tdoc000\t1")
    return ("evaluate.py", ["--model", "tiny", "--data", str(folder), "--instruction", "", "--out",
                            str(tmp_path / "eval")],
            f"{folder / 'qrels' / 'test.tsv'}:{line}: query id 'q-unknown'")


def qrels_non_integer_grade(tmp_path):
    folder = beir_folder(tmp_path)
    line = append_line(folder / "qrels" / "train.tsv", "q000-0\tdoc000\thigh")
    return ("mine.py", ["--data", str(folder), "--instruction", "", "--out",
                        str(tmp_path / "mined.jsonl")],
            f"{folder / 'qrels' / 'train.tsv'}:{line}: score 'high'")


def duplicate_corpus_id(tmp_path):
    folder = beir_folder(tmp_path)
    corpus = folder / "corpus.jsonl"
    line = append_line(corpus, corpus.read_text().splitlines()[0])
    return "data.py", ["check-beir", str(folder), "test"], f"{corpus}:{line}: duplicate document id"


def missing_split(tmp_path):
    folder = beir_folder(tmp_path)
    return ("evaluate.py",
            ["--model", "tiny", "--data", str(folder), "--instruction", "", "--split", "dev",
             "--out", str(tmp_path)], str(folder / "qrels" / "dev.tsv"))


def unknown_dataset_without_instruction(tmp_path):
    # A renamed SciFact would otherwise be encoded without its instruction, silently scoring lower.
    folder = beir_folder(tmp_path)
    return ("evaluate.py",
            ["--model", "tiny", "--data", str(folder), "--out", str(tmp_path / "eval")],
            (f"no instruction known for a folder named {folder.name!r}",
             "known: arguana, fiqa, nfcorpus, scifact", "--instruction ''"))


def missing_model_path(tmp_path):
    return "train.py", ["--model", str(tmp_path / "no-such-model"), "--out",
                        str(tmp_path / "run")], \
        f"--model {tmp_path / 'no-such-model'}"


def missing_model_path_to_evaluate(tmp_path):
    return "evaluate.py", ["--model", str(tmp_path / "no-such-model"), "--out",
                           str(tmp_path / "eval")], \
        f"--model {tmp_path / 'no-such-model'}: not found"


def missing_model_path_to_mine(tmp_path):
    return "mine.py", ["--model", str(tmp_path / "no-such-model"), "--out",
                       str(tmp_path / "mined.jsonl")], \
        str(tmp_path / "no-such-model")


def not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"<html>this download failed</html>")
    return "evaluate.py", ["--model", str(path), "--out", str(tmp_path / "eval")], \
        f"{path}: not a GGUF file"


def unsupported_architecture(tmp_path):
    folder = hf_checkpoint(tmp_path, model_type="gpt2")
    return "mine.py", ["--model", str(folder), "--out", str(tmp_path / "mined.jsonl")], \
        f"{folder / 'config.json'}: unsupported architecture model_type='gpt2'"


def truncated_safetensors(tmp_path):
    folder = hf_checkpoint(tmp_path, truncate=True)
    return "train.py", ["--model", str(folder), "--out", str(tmp_path / "run"), "--device",
                        "cpu"], \
        str(folder / "model.safetensors")


def batch_size_does_not_divide(tmp_path):
    return "train.py", ["--batch-size", "10", "--grad-accum", "4", "--out",
                        str(tmp_path / "run")], \
        "--batch-size 10 must be divisible by --grad-accum 4"


def negative_temperature(tmp_path):
    return "train.py", ["--temperature", "-0.05", "--out", str(tmp_path / "run")], "--temperature"


def mining_an_unknown_dataset_without_instruction(tmp_path):
    # Every mined row would carry an empty instruction, and evaluate.py would refuse the folder.
    folder = beir_folder(tmp_path)
    return ("mine.py",
            ["--model", "bm25", "--data", str(folder), "--out", str(tmp_path / "m.jsonl")],
            (f"no instruction known for a folder named {folder.name!r}", "--instruction ''"))


def resume_without_checkpoint(tmp_path):
    return "train.py", ["--resume", "--out", str(tmp_path / "run")], \
        f"--resume: no checkpoint in {tmp_path / 'run' / 'checkpoints'}"


def mining_a_missing_folder(tmp_path):
    return "mine.py", ["--data", str(tmp_path / "no-such-folder"), "--out",
                       str(tmp_path / "mined.jsonl")], \
        str(tmp_path / "no-such-folder")


def data_folder_misspelt(tmp_path):
    # A typo in the folder's name is said first, not as a folder whose name has no known
    # instruction.
    folder = tmp_path / "scifactt"
    return "evaluate.py", ["--model", "tiny", "--data", str(folder), "--out",
                           str(tmp_path / "eval")], \
        f"error: --data {folder}: no such folder"


def training_file_missing(tmp_path):
    path = tmp_path / "trian.jsonl"
    return "train.py", ["--data", str(path), "--out", str(tmp_path / "run")], \
        f"error: --data {path}: no such file"


def run_folder_given_as_model(tmp_path):
    run = tmp_path / "runs" / "stage1"
    from_base("tiny", pooling="mean").save(run / "model")
    # the run's configuration, as train.py writes it
    (run / "config.json").write_text(json.dumps(dict(stage=1)))
    return "evaluate.py", ["--model", str(run), "--out", str(tmp_path / "eval")], \
        f"did you mean {run / 'model'}?"


def run_folder_given_as_teacher(tmp_path):
    command, argv, culprit = run_folder_given_as_model(tmp_path)
    return "mine.py", argv[:2] + ["--out", str(tmp_path / "mined.jsonl")], culprit


def beir_folder_given_as_training_data(tmp_path):
    folder = beir_folder(tmp_path)
    return "train.py", ["--data", str(folder), "--out", str(tmp_path / "run")], \
        (f"--data {folder}: a BEIR folder", f"python mine.py --data {folder}")


def lr_not_a_number(tmp_path):
    return "train.py", ["--lr", "nan", "--out", str(tmp_path / "run")], \
        "argument --lr: nan is not a finite float32 number"


def lr_negative(tmp_path):
    return "train.py", ["--lr", "-1", "--out", str(tmp_path / "run")], \
        "--lr must be a finite number > 0, got -1.0"


def warmup_negative(tmp_path):
    return "train.py", ["--warmup-steps", "-5", "--out", str(tmp_path / "run")], \
        "--warmup-steps must be >= 0, got -5"


def grad_clip_not_a_number(tmp_path):
    return "train.py", ["--grad-clip", "nan", "--out", str(tmp_path / "run")], \
        "argument --grad-clip: nan is not a finite float32 number"


def max_length_shorter_than_the_instruction(tmp_path):
    # The built-in queries' instruction in its template is 73 byte tokens (the byte tokenizer adds
    # no BOS); with EOS and one token of text, 75 is the least that works.
    return "train.py", ["--max-length", "32", "--out", str(tmp_path / "run"), "--device", "cpu"], \
        ("--max-length 32 leaves no room for text: the instruction", "takes 73 tokens",
         "--max-length >= 75")


def training_line_not_utf8(tmp_path):
    path = training_file(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[1] = b'{"query": "caf\xe9"' + lines[1][1:]
    path.write_bytes(b"\n".join(lines))
    return "train.py", ["--data", str(path), "--out", str(tmp_path / "run")], \
        f"{path}:2: not UTF-8 (byte 0xe9 at column 15)"


def out_is_a_file(tmp_path):
    (tmp_path / "run").write_text("notes\n")
    return "train.py", ["--out", str(tmp_path / "run")], \
        f"--out {tmp_path / 'run'}: a file, not a folder"


def evaluate_out_is_a_file(tmp_path):
    (tmp_path / "eval").write_text("notes\n")
    return "evaluate.py", ["--model", "tiny", "--out", str(tmp_path / "eval")], \
        f"--out {tmp_path / 'eval'}: a file, not a folder"


def evaluate_out_inside_a_file(tmp_path):
    (tmp_path / "eval").write_text("notes\n")
    return "evaluate.py", ["--model", "tiny", "--out", str(tmp_path / "eval" / "sub")], \
        f"--out {tmp_path / 'eval' / 'sub'}: {tmp_path / 'eval'} is a file, not a folder"


def out_not_writable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder: this case needs an ordinary user")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    return "train.py", ["--out", str(folder / "run")], \
        f"--out {folder / 'run'}: cannot write there (Permission denied)"


def empty_corpus(tmp_path):
    folder = beir_folder(tmp_path)
    (folder / "corpus.jsonl").write_text("\n\n  \n")
    return "evaluate.py", ["--model", "tiny", "--data", str(folder), "--instruction", "", "--out",
                           str(tmp_path / "eval")], \
        f"{folder / 'corpus.jsonl'}: no documents (the corpus is empty)"


VALUE_CASES = [lr_not_a_number, lr_negative, warmup_negative, grad_clip_not_a_number,
               max_length_shorter_than_the_instruction, training_line_not_utf8, out_is_a_file,
               out_not_writable, evaluate_out_is_a_file, evaluate_out_inside_a_file,
               empty_corpus]


CASES = VALUE_CASES + [unknown_dataset_without_instruction,
                       mining_an_unknown_dataset_without_instruction, data_folder_misspelt,
                       training_file_missing, run_folder_given_as_model,
                       run_folder_given_as_teacher, beir_folder_given_as_training_data,
                       malformed_json_line, missing_field, empty_query, negatives_not_a_list,
                       unknown_task_type, empty_training_file, example_without_negatives,
                       qrels_unknown_id, qrels_non_integer_grade, duplicate_corpus_id,
                       missing_split, missing_model_path, missing_model_path_to_evaluate,
                       missing_model_path_to_mine, not_a_gguf_file, unsupported_architecture,
                       truncated_safetensors, batch_size_does_not_divide, negative_temperature,
                       resume_without_checkpoint, mining_a_missing_folder,
                       non_retrieval_data_in_stage_1]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_a_users_mistake_is_one_line_and_exit_status_2(case, tmp_path, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would land here
    command, argv, culprit = case(tmp_path)
    # `python <command> ...`: argparse names it from argv[0]
    monkeypatch.setattr(sys, "argv", [command])
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[command](argv)
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert re.match(rf"^{re.escape(command)}: error: ", last_line), last_line
    for part in [culprit] if isinstance(culprit, str) else culprit:
        assert part in last_line, last_line
    assert not (tmp_path / "run" / "model").exists() and \
        not (tmp_path / "run" / "checkpoints").exists()


def test_no_negatives_names_the_example_and_check_train_counts_it(tmp_path, capsys):
    """The example with no negative is refused by training (naming its line, above); checking the
    file passes (with --hard-negatives 0 it can train on in-batch negatives) and says how many have
    none."""
    path = training_file(tmp_path, training_row(negatives=[], negative_ids=[]))
    data_cli.main(["check-train", str(path)])
    assert f"1 example has no hard negative (first: {path}:2)" in capsys.readouterr().out


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only user mistakes are turned into one line: any other exception propagates as it is."""
    def broken(*args, **kwargs):
        raise ValueError("a bug in the code")

    monkeypatch.setattr(data_cli, "read_training_file", broken)
    with pytest.raises(ValueError, match="a bug in the code"):
        data_cli.main(["check-train", str(training_file(tmp_path))])


# ---------------------------------------------------------------- two ranks


def two_rank_worker(rank, checkpoint, training_data, out_dir):
    """Rank `rank` of 2 runs train.py on a checkpoint that only rank 0 reads (and finds
    truncated)."""
    sys.argv = ["train.py"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            train.main(["--model", checkpoint, "--data", training_data, "--batch-size", "2",
                        "--device", "cpu", "--no-progress", "--out", os.path.join(out_dir, "run")])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(code=code, stderr=stderr.getvalue()), f)


def test_under_two_ranks_rank_0s_mistake_stops_both_and_is_said_once(tmp_path):
    checkpoint, training_data = hf_checkpoint(tmp_path, truncate=True), training_file(tmp_path)
    spawn_two_ranks(two_rank_worker, str(checkpoint), str(training_data), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [2, 2], ranks
    assert "Traceback" not in ranks[0]["stderr"] + ranks[1]["stderr"]
    last_line = ranks[0]["stderr"].strip().splitlines()[-1]
    assert last_line.startswith("train.py: error: ") and \
        str(checkpoint / "model.safetensors") in last_line
    assert ": error: " not in ranks[1]["stderr"]  # said once, by rank 0


def test_skipped_records_are_a_notice_on_stderr_that_quiet_silences(tmp_path, capsys):
    # Notices go through logging (errors.configure_logging): on stderr by default, gone with
    # --quiet, while the command's own output (the counts) stays on stdout.
    folder = beir_folder(tmp_path)
    append_line(folder / "queries.jsonl", '{"_id": "q-empty", "text": " "}')
    data_cli.main(["check-beir", str(folder), "test", "--skip-bad"])
    said = capsys.readouterr()
    assert "skipped 1 (1 missing or empty text)" in said.err and "skipped 1" not in said.out
    assert "documents" in said.out
    data_cli.main(["check-beir", str(folder), "test", "--skip-bad", "--quiet"])
    said = capsys.readouterr()
    assert "skipped 1" not in said.err and "documents" in said.out


# ---------------------------------------------------------------- nothing lost, nothing left behind


def run_command(command, argv, capsys):
    """`python <command> argv` in-process: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[command](argv)
    return exit_.value.code, capsys.readouterr().err


def test_a_beir_folder_given_to_train_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    code, stderr = run_command("train.py",
                               ["--data", str(beir_folder(tmp_path)), "--out",
                                str(tmp_path / "run")], capsys)
    assert code == 2 and "mine.py" in stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_existing_run_and_leaves_its_model_intact(tmp_path, monkeypatch, capsys):
    """A second run into the same --out, without --overwrite or --resume, stops before it touches
    anything: the first run's files are byte for byte what they were."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    out = tmp_path / "run"
    job = ["--steps", "2", "--batch-size", "4", "--no-eval", "--no-progress", "--quiet",
           "--device", "cpu", "--out", str(out)]
    train.main(job)
    before = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    assert out / "model" / "decoder.safetensors" in before and out / "log.jsonl" in before
    code, stderr = run_command("train.py", job + ["--pooling", "mean"], capsys)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"train.py: error: --out {out} already holds "
                                                      "a run")
    assert "--overwrite" in stderr and "--resume" in stderr
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == before
    train.main(job + ["--overwrite", "--pooling", "mean"])  # said so: replaced
    assert json.loads((out / "model" / "config.json").read_text())["pooling"] == "mean"


def test_a_bad_flag_under_torchrun_is_said_once_by_rank_0(tmp_path):
    """`torchrun --nproc_per_node=2 train.py --bogus`: the usage and our line once, from rank 0,
    which exits first with status 2 (torchrun's report names it the root cause); torchrun prints
    that report after our line and exits with its own status, 1."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "train.py", "--bogus"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("train.py: error: ")]
    assert len(said) == 1 and "unrecognized arguments: --bogus" in lines[said[0]], \
        result.stderr[-3000:]
    assert sum(line.startswith("usage: train.py") for line in lines) == 1
    assert result.returncode == 1 and result.stdout == ""
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 2" in root_cause, \
        root_cause
    # After our line: torchrun's own lines only (its logger's, then its traceback and report).
    assert all("usage:" not in line and ": error: " not in line for line in lines[said[0] + 1:])


def test_a_run_folder_in_use_is_refused_once_on_two_ranks(tmp_path):
    """`torchrun --nproc_per_node=2 train.py --out X` while a live process (this one) holds X's
    lock: rank 0 alone takes the lock and tells every rank its outcome, so rank 1 does not wait in
    a collective for a rank 0 that has exited (a gloo traceback, "[rank1]: Traceback"): our one
    line, rank 0 the root cause, then torchrun's own report."""
    import subprocess

    out = tmp_path / "run"
    lock_naming(out, os.getpid())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "train.py", "--steps", "1",
                             "--batch-size", "4", "--no-eval", "--no-progress", "--device", "cpu",
                             "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    lines = result.stderr.splitlines()
    said = [line for line in lines if line.startswith("train.py: error: ")]
    assert said == [f"train.py: error: --out {out} is in use by process {os.getpid()} (lock file "
                    f"{out / 'train.lock'})"], result.stderr[-3000:]
    assert not any(line.startswith("[rank") for line in lines), result.stderr[-3000:]
    assert "Connection closed" not in result.stderr and result.returncode == 1
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 2" in root_cause
    assert sorted(p.name for p in out.iterdir()) == ["train.lock"]


def _agree(rank, folder, failing):
    """every_rank_agrees where the ranks in `failing` meet a mistake (rank 1: a missing file;
    rank 0: a bad flag) or a bug ("bug"), and then with none: each rank records what it raised."""
    import datetime
    import socket

    import torch.distributed as dist

    from plumbing.distributed import every_rank_agrees
    from plumbing.errors import MissingFileError, UsageError

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a hang fails

    def read():
        if rank == 1 and "missing" in failing:
            raise MissingFileError("--data /only/on/node0.jsonl does not exist")
        if rank == 0 and "flag" in failing:
            raise UsageError("--lr: a mistake rank 0 found")
        if rank == 1 and "bug" in failing:
            raise KeyError("a bug")
        return "read"
    try:
        every_rank_agrees(read)
        outcome = "no error"
    except Exception as error:
        outcome = f"{type(error).__name__}: {error}".replace(socket.gethostname(), "HOST")
    outcome += f" | then {every_rank_agrees(lambda: rank)}"  # no mistake: each rank's own result
    (folder / f"rank{rank}").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("failing, rank0, rank1", [
    (("missing",), "UserError: rank 1 on HOST: --data /only/on/node0.jsonl does not exist",
     "MissingFileError: --data /only/on/node0.jsonl does not exist"),
    (("flag",), "UsageError: --lr: a mistake rank 0 found",
     "UserError: rank 0 on HOST: --lr: a mistake rank 0 found"),
    (("flag", "missing"), "UsageError: --lr: a mistake rank 0 found",
     "MissingFileError: --data /only/on/node0.jsonl does not exist"),
    (("bug",), "RuntimeError: rank 1 on HOST: 'a bug'", "KeyError: 'a bug'")])
def test_a_mistake_found_on_one_rank_alone_stops_every_rank(tmp_path, failing, rank0, rank1):
    """A file missing on one node's disk (rank 1 finds it, rank 0 reads fine), a mistake rank 0
    alone finds, both, a bug on one rank: every rank stops, the one that met it with its own
    error, the others with one naming its rank and host (a UserError, which rank 0 prints as the
    one line, for a mistake; a RuntimeError for a bug), none left waiting in a collective; with no
    mistake each rank gets its own result."""
    spawn_two_ranks(_agree, tmp_path, failing)
    assert (tmp_path / "rank0").read_text() == rank0 + " | then 0"
    assert (tmp_path / "rank1").read_text() == rank1 + " | then 1"


def _setup_with_data_missing_on_rank_1(rank, folder):
    """train.setup on 2 ranks where reading the training data fails on rank 1 alone."""
    import datetime

    import torch.distributed as dist

    from plumbing.errors import MissingFileError, UserError

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    read = train.training_data

    def training_data(config, **kwargs):
        if rank == 1:
            raise MissingFileError("--data x.jsonl does not exist")
        return read(config, **kwargs)
    train.training_data = training_data
    config = train.configure(["--steps", "1", "--out", str(folder / "run")] + TINY_JOB)
    try:
        train.setup(config)
        outcome = "set up"
    except UserError as error:
        outcome = f"{type(error).__name__}: {error}"
    (folder / f"rank{rank}").write_text(outcome.split(" on ")[0] + " | " + outcome.split(": ")[-1])


def test_train_stops_every_rank_when_one_rank_cannot_read_the_data(tmp_path):
    """train.setup reads the data through every_rank_agrees: rank 0, which read it, stops with a
    UserError naming rank 1 (its one line), before anything is written into --out."""
    spawn_two_ranks(_setup_with_data_missing_on_rank_1, tmp_path)
    assert (tmp_path / "rank0").read_text() == "UserError: rank 1 | --data x.jsonl does not exist"
    assert (tmp_path / "rank1").read_text() == (
        "MissingFileError: --data x.jsonl does not exist | --data x.jsonl does not exist")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_non_finite_stop_on_two_ranks_is_said_once_by_rank_0(tmp_path):
    """`torchrun --nproc_per_node=2 train.py --lr 1e30`: the loss turns non-finite on both ranks
    (all-reduced); rank 1 waits for rank 0 as on user errors, so rank 0 alone says it, exits first
    with status 1, and torchrun names it the root cause; nothing of the run's model is saved."""
    import subprocess

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "train.py", "--steps", "4",
                             "--lr", "1e30", "--warmup-steps", "0", "--out", str(out)] + TINY_JOB,
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.splitlines()
    said = [line for line in lines if line.startswith("train.py: error: ")]
    assert len(said) == 1 and "--lr 1e+30" in said[0], result.stderr[-3000:]
    assert not any(line.startswith("[rank") for line in lines), result.stderr[-3000:]
    root_cause = result.stderr[result.stderr.index("Root Cause"):]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 1" in root_cause
    assert not (out / "model").exists()


def test_a_mistake_rank_0_did_not_stop_on_is_said_by_the_rank_that_found_it(monkeypatch, capsys):
    """Under torchrun a rank other than 0 waits for rank 0 to stop (torchrun then ends it); if it is
    still alive, rank 0 never met the mistake, so this rank says it, naming itself. Spawned ranks
    (no torchrun) stay silent."""
    from plumbing import errors

    monkeypatch.setattr(errors, "RANK0_FIRST_S", 0.0)
    monkeypatch.setenv("RANK", "1")
    for under_torchrun, said in ((False, ""),
                                 (True, "train.py: error: (rank 1) --out x: a mistake\n")):
        if under_torchrun:
            monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
        with pytest.raises(SystemExit) as exit_:
            errors.stop_on_user_error("train.py", errors.UsageError("--out x: a mistake"))
        assert exit_.value.code == 2 and capsys.readouterr().err == said


# ------------------------------------------------------- a run never ends in a broken or lost model

TINY_JOB = ["--batch-size", "4", "--hard-negatives", "1", "--max-length", "96", "--no-eval",
            "--no-progress", "--device", "cpu", "--log-every", "1"]


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["train.py"])


def files_of(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("lr, code, said", [
    ("inf", 2, "train.py: error: argument --lr: inf is not a finite float32 number (|x| <= "
               "3.4e38)"),
    ("1e30", 1,
     "train.py: error: step 2: the loss is nan (--lr 1e+30, --grad-clip 1); nothing from this step "
                "is saved; last good checkpoint: none; the previous model/ is kept")])
def test_a_diverging_lr_stops_and_keeps_the_previous_model(lr, code, said, tmp_path, single_process,
                                                           capsys):
    """--lr inf is refused as a flag. --lr 1e30 (no warm-up): step 1's update overflows the weights,
    step 2's loss is NaN; the run stops with exit status 1 and one line naming the step, --lr,
    --grad-clip and the last good checkpoint. Either way --overwrite has deleted nothing: the
    previous model/ is byte for byte what it was."""
    out = tmp_path / "run"
    train.main(TINY_JOB + ["--steps", "1", "--out", str(out)])
    before = files_of(out / "model")
    stopped, stderr = run_command("train.py",
                                  TINY_JOB + ["--steps", "3", "--lr", lr, "--warmup-steps", "0",
                                              "--overwrite", "--out", str(out)], capsys)
    assert stopped == code and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == said
    assert files_of(out / "model") == before


@pytest.mark.parametrize("flags, said", [
    (["--lr", "1e39"], "argument --lr: 1e39 is not a finite float32 number (|x| <= 3.4e38)"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--weight-decay", "nan"], "argument --weight-decay: nan is not a finite float32 number"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--grad-clip", "3e38"], "--grad-clip 3e38"),  # finite in float32: accepted by the flag check
    (["--temperature", "x"], "argument --temperature: expected a number, got 'x'")])
def test_float_flags_are_finite_float32_numbers_in_range(flags, said, tmp_path, single_process,
                                                         capsys):
    """Values that AdamW or the model would refuse mid-run, with a traceback from every rank, are
    refused before the run starts: one line, exit status 2, nothing written."""
    out = tmp_path / "run"
    if flags[0] == "--grad-clip":  # the one value here that passes: the run starts
        train.main(TINY_JOB + ["--steps", "1", "--out", str(out)] + flags)
        assert (out / "model").is_dir()
        return
    code, stderr = run_command("train.py", TINY_JOB + ["--steps", "1", "--out", str(out)] + flags,
                               capsys)
    assert code == 2 and "Traceback" not in stderr and not out.exists()
    assert stderr.strip().splitlines()[-1].startswith("train.py: error: " + said)


def test_non_finite_weights_are_never_saved(tmp_path, single_process, monkeypatch, capsys):
    """The last step's update breaks the weights: no loss after it would tell, the check before
    saving does."""
    real_step, steps = torch.optim.AdamW.step, []

    def step_that_breaks(self, *args, **kwargs):
        steps.append(1)
        result = real_step(self, *args, **kwargs)
        if len(steps) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_breaks)
    out = tmp_path / "run"
    code, stderr = run_command("train.py", TINY_JOB + ["--steps", "2", "--out", str(out)], capsys)
    assert code == 1
    assert "step 2: 1 trainable weight tensor(s) hold NaN or inf" in stderr.strip().splitlines()[-1]
    assert not (out / "model").exists()


def test_a_collapsed_loss_is_warned_about(tmp_path, single_process, monkeypatch, capsys):
    """--lr 1e4 without warm-up: after one step every embedding is the same and the loss sits at the
    mean of ln(each query's candidates) (4 queries x (1 positive + 1 hard negative), in-batch
    negatives on, copies masked) with a zero gradient."""
    monkeypatch.setattr(guards, "COLLAPSE_STEPS", 3)
    train.main(TINY_JOB + ["--steps", "5", "--lr", "1e4", "--warmup-steps", "0", "--out",
                           str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    assert "the loss has been a collapsed model's" in stderr and "for 3 steps" in stderr


def test_the_built_in_job_collapsing_at_lr_1e4_is_warned_about(tmp_path, single_process, capsys):
    """The default job at --lr 1e4: the loss sits at ln 6, ln 9 or ln 10 as duplicates shrink each
    row's candidates, below ln of the softmax's width; the warning comes all the same."""
    train.main(["--stage", "1", "--steps", "20", "--lr", "1e4", "--no-eval", "--no-progress",
                "--out", str(tmp_path / "run")])
    assert "the loss has been a collapsed model's" in capsys.readouterr().err


def no_space_left(path, *args, **kwargs):
    """A writer on a full disk: it gets part of the way, then the OS refuses."""
    with open(path, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_while_saving_the_model_keeps_the_previous_one(tmp_path, single_process,
                                                                   monkeypatch, capsys):
    from plumbing import model_folders

    out = tmp_path / "run"
    train.main(TINY_JOB + ["--steps", "1", "--out", str(out)])
    before = files_of(out / "model")
    monkeypatch.setattr(model_folders, "save_file",
                        lambda tensors, path, **kwargs: no_space_left(path))
    code, stderr = run_command("train.py",
                               TINY_JOB + ["--steps", "1", "--overwrite", "--out", str(out)],
                               capsys)
    last_line = stderr.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in stderr
    assert last_line.startswith(f"train.py: error: {out / 'model'}: no space left on device"), \
        last_line
    assert f"the previous {out / 'model'} is kept" in last_line
    assert files_of(out / "model") == before and not (out / "model.tmp").exists()


def test_a_full_disk_while_saving_a_checkpoint_leaves_no_tmp(tmp_path, single_process, monkeypatch,
                                                             capsys):
    from plumbing import run_folder

    def dcp_save_on_a_full_disk(state, checkpoint_id, **kwargs):
        no_space_left(checkpoint_id / "__0_0.distcp")

    monkeypatch.setattr(run_folder.dcp, "save", dcp_save_on_a_full_disk)
    out = tmp_path / "run"
    code, stderr = run_command("train.py",
                               TINY_JOB + ["--steps", "2", "--save-every", "1", "--out", str(out)],
                               capsys)
    last_line = stderr.strip().splitlines()[-1]
    step_1 = out / "checkpoints" / "step_00000001"
    assert code == 2 and \
        last_line.startswith(f"train.py: error: {step_1}: no space left on device"), last_line
    assert list((out / "checkpoints").iterdir()) == []


def test_a_retry_after_a_bad_data_line_succeeds_with_the_same_command(tmp_path, single_process,
                                                                     capsys):
    """The data is checked before anything is written into --out: after the user fixes the line,
    the very same command trains (no "already holds a run", no --resume needed)."""
    path = training_file(tmp_path, training_row(positive=None))
    out = tmp_path / "run"
    job = TINY_JOB + ["--steps", "1", "--batch-size", "2", "--data", str(path), "--out", str(out)]
    code, stderr = run_command("train.py", job, capsys)
    assert code == 2 and f"{path}:2: field 'positive'" in stderr.strip().splitlines()[-1]
    assert not out.exists() or list(out.iterdir()) == []
    training_file(tmp_path)  # fixed
    assert train.main(job)["step"] == 1 and (out / "model" / "config.json").is_file()


def test_a_retry_after_a_crash_before_the_first_checkpoint_starts_again(tmp_path, single_process,
                                                                         monkeypatch, capsys):
    """A start that got as far as config.json, then died before any checkpoint or
    model: the same command starts again, says so in one line, and keeps the old files aside in
    previous/ until its model is saved; --resume there says why it cannot continue."""
    out = tmp_path / "run"
    job = TINY_JOB + ["--steps", "2", "--out", str(out)]
    real_loop = train.loop

    def crash(run):
        raise MemoryError("out of memory at step 1")

    monkeypatch.setattr(train, "loop", crash)
    with pytest.raises(MemoryError):  # a crash, not a user's mistake: its traceback kept
        train.main(job)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # --no-eval: no log yet
    code, stderr = run_command("train.py", job + ["--resume"], capsys)
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"train.py: error: --resume: no checkpoint in {out / 'checkpoints'} (the run saved none: "
        "run it without --resume to start again)")
    monkeypatch.setattr(train, "loop", real_loop)
    assert train.main(job)["step"] == 2 and (out / "model" / "config.json").is_file()
    assert (f"notice: --out {out} holds a run that saved no checkpoint and no model "
            "(config.json): starting it again") in capsys.readouterr().out
    assert not (out / "previous").exists()
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]  # the new run's log alone


def test_overwrite_sets_the_old_run_aside_until_the_new_model_is_saved(tmp_path, single_process,
                                                                       capsys):
    out = tmp_path / "run"
    train.main(TINY_JOB + ["--steps", "2", "--save-every", "1", "--stop-after", "1", "--out",
                           str(out)])
    old_checkpoint = files_of(out / "checkpoints")
    train.main(TINY_JOB + ["--steps", "2", "--save-every", "1", "--stop-after", "1", "--overwrite",
                           "--out", str(out)])
    # Not finished: the old run's checkpoints are in previous/, not mistaken for the new run's.
    assert {p.relative_to(out / "previous"): b
            for p, b in files_of(out / "previous" / "checkpoints").items()} \
        == {p.relative_to(out): b for p, b in old_checkpoint.items()}
    train.main(TINY_JOB + ["--steps", "1", "--overwrite", "--out", str(out)])
    assert (out / "model" / "config.json").is_file() and not (out / "previous").exists()


@pytest.mark.parametrize("batch_size", [0, -1])
def test_encode_refuses_a_batch_size_below_1(batch_size):
    model = from_base("tiny", pooling="mean")
    with pytest.raises(ValueError,
                       match=f"encode: batch_size must be an integer >= 1, got {batch_size}"):
        model.encode(["a text"], batch_size=batch_size)


def test_an_out_on_a_read_only_file_system_is_one_line(tmp_path, single_process, monkeypatch,
                                                       capsys):
    """The read-only file system, injected (root writes anywhere on a writable one)."""
    import pathlib

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(pathlib.Path, "touch", read_only)
    code, stderr = run_command("train.py", TINY_JOB + ["--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == \
        f"train.py: error: --out {tmp_path / 'run'}: cannot write there (Read-only file system)"


def test_training_counts_what_it_truncates(tmp_path, single_process, capsys):
    """--max-length 80 leaves the built-in texts 7 tokens after their 73-token instruction: most are
    cut. Each log line and record counts them since the last one, and the end says the total."""
    out = tmp_path / "run"
    train.main(TINY_JOB + ["--steps", "2", "--max-length", "80", "--out", str(out)])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    counts = [r["truncated"] for r in records if "loss" in r]
    assert len(counts) == 2 and all(count > 0 for count in counts)
    stderr = capsys.readouterr().err
    assert f"training truncated {sum(counts)} texts longer than --max-length 80" in stderr


def cut_a_shard_in_half(step):
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    return shard


def truncate_the_metadata(step):
    (step / ".metadata").write_bytes((step / ".metadata").read_bytes()[:20])
    return step / ".metadata"


def garble_the_trainer_state(step):
    (step / "trainer_state.json").write_text("{garbage")
    return step / "trainer_state.json"


def delete_a_shard(step):
    shard = next(step.glob("*.distcp"))
    shard.unlink()
    return shard


def overwrite_bytes_inside_a_shard(step):
    """4 KiB (or the middle half of a smaller shard) overwritten in place: the size is unchanged,
    so only the manifest's checksum can tell."""
    shard = next(step.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    start, length = len(data) // 4, min(4096, len(data) // 2)
    data[start:start + length] = bytes(b ^ 0xFF for b in data[start:start + length])
    shard.write_bytes(bytes(data))
    return shard


CORRUPTIONS = [cut_a_shard_in_half, truncate_the_metadata, garble_the_trainer_state, delete_a_shard,
               overwrite_bytes_inside_a_shard]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__ for c in CORRUPTIONS])
def test_resume_skips_a_corrupt_newest_checkpoint(corrupt, tmp_path, single_process, capsys):
    """The newest checkpoint is damaged after it was saved: --resume names the file, passes over it
    and continues from the one before; with that one damaged too, it stops with one line."""
    out = tmp_path / "run"
    job = TINY_JOB + ["--steps", "3", "--save-every", "1", "--out", str(out)]
    train.main(job + ["--stop-after", "2"])
    damaged = corrupt(out / "checkpoints" / "step_00000002")
    capsys.readouterr()
    summary = train.main(job + ["--resume"])
    said = capsys.readouterr().out
    assert f"notice: --resume skips step_00000002: {damaged}" in said
    assert f"resumed from {out / 'checkpoints' / 'step_00000001'} at step 1" in said
    assert summary["step"] == 3 and (out / "model" / "config.json").is_file()


def test_resume_skips_a_checkpoint_whose_load_raises(tmp_path, single_process, monkeypatch,
                                                      capsys):
    """A checkpoint that passes its checks but whose load raises (dcp's CheckpointException, a
    BaseException) is named and passed over like a damaged one; the run completes."""
    from plumbing import run_folder

    out = tmp_path / "run"
    job = TINY_JOB + ["--steps", "3", "--save-every", "1", "--out", str(out)]
    train.main(job + ["--stop-after", "2"])
    real_load, newest = run_folder.load_checkpoint, out / "checkpoints" / "step_00000002"

    def load_failing_on_the_newest(folder, *args):
        if folder == newest:
            api = run_folder.dcp.api
            raise api.CheckpointException("load", {0: api._wrap_exception(ValueError("bad"))})
        return real_load(folder, *args)

    monkeypatch.setattr(run_folder, "load_checkpoint", load_failing_on_the_newest)
    capsys.readouterr()
    summary = train.main(job + ["--resume"])
    said = capsys.readouterr().out
    assert f"notice: --resume skips step_00000002: {newest} does not load (CheckpointException: " \
        "bad)" in said
    assert f"resumed from {out / 'checkpoints' / 'step_00000001'} at step 1" in said
    assert summary["step"] == 3


def test_the_manifest_holds_each_files_size_and_checksum(tmp_path, single_process):
    """Checked against hashlib directly, file by file."""
    import hashlib

    out = tmp_path / "run"
    train.main(TINY_JOB + ["--steps", "1", "--save-every", "1", "--stop-after", "1", "--out",
                           str(out)])
    step = out / "checkpoints" / "step_00000001"
    manifest = json.loads((step / "manifest.json").read_text())
    files = sorted(p.name for p in step.iterdir() if p.name != "manifest.json")
    assert sorted(manifest) == files and any(name.endswith(".distcp") for name in files)
    for name in files:
        data = (step / name).read_bytes()
        assert manifest[name] == dict(size=len(data),
                                      blake2b=hashlib.blake2b(data, digest_size=16).hexdigest())


def test_resume_with_no_complete_checkpoint_is_one_line(tmp_path, single_process, capsys):
    out = tmp_path / "run"
    job = TINY_JOB + ["--steps", "2", "--save-every", "1", "--out", str(out)]
    train.main(job + ["--stop-after", "1"])
    damaged = delete_a_shard(out / "checkpoints" / "step_00000001")
    capsys.readouterr()
    code, stderr = run_command("train.py", job + ["--resume"], capsys)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == \
        (f"train.py: error: --resume: no complete checkpoint in "
         f"{out / 'checkpoints'} ({damaged} is missing)")


# ---------------------------------------------------------------- one run per --out at a time


def lock_naming(out, pid):
    import socket

    out.mkdir(parents=True, exist_ok=True)
    (out / "train.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}) + "\n")


def test_a_run_folder_in_use_by_a_live_process_is_refused(tmp_path, single_process, capsys):
    """The lock names this very process (alive): the run is refused before it touches the folder,
    and the lock is left as it was."""
    out = tmp_path / "run"
    lock_naming(out, os.getpid())
    before = (out / "train.lock").read_text()
    code, stderr = run_command("train.py", TINY_JOB + ["--steps", "1", "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == \
        (f"train.py: error: --out {out} is in use by process {os.getpid()} (lock file "
         f"{out / 'train.lock'})")
    assert sorted(p.name for p in out.iterdir()) == ["train.lock"] and \
        (out / "train.lock").read_text() == before


def test_a_run_holding_the_lock_refuses_another_until_it_dies(tmp_path, single_process, capsys):
    """A real holder, another process, takes the lock and sleeps: a run on its --out is refused;
    once it is killed its lock is stale, taken over with a notice, and the run's own lock is gone
    when it ends."""
    import subprocess

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from plumbing.run_folder import take_run_lock; "
                               "take_run_lock(sys.argv[1]); print('held', flush=True); "
                               "time.sleep(120)", str(out)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, stderr = run_command("train.py", TINY_JOB + ["--steps", "1", "--out", str(out)],
                                   capsys)
        assert code == 2 and stderr.strip().splitlines()[-1] == \
            (f"train.py: error: --out {out} is in use by process {holder.pid} (lock file "
             f"{out / 'train.lock'})")
    finally:
        holder.kill()
        holder.wait()
    summary = train.main(TINY_JOB + ["--steps", "1", "--out", str(out)])
    assert summary["step"] == 1
    assert (f"notice: --out {out}: taking over the lock of process {holder.pid}, which is no "
            f"longer running (lock file {out / 'train.lock'})") in capsys.readouterr().out
    assert not (out / "train.lock").exists()


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, single_process, capsys):
    """The lock names a process that does not exist (a PID above the kernel's pid_max)."""
    out = tmp_path / "run"
    dead = int(open("/proc/sys/kernel/pid_max").read()) + 1 \
        if os.path.exists("/proc/sys/kernel/pid_max") else 2**22 + 1
    lock_naming(out, dead)
    summary = train.main(TINY_JOB + ["--steps", "1", "--out", str(out)])
    assert summary["step"] == 1 and (out / "model" / "config.json").is_file()
    assert (f"notice: --out {out}: taking over the lock of process {dead}, which is no longer "
            f"running (lock file {out / 'train.lock'})") in capsys.readouterr().out
    assert not (out / "train.lock").exists()  # released at exit


# ---------------------------------------------------------------- interrupted cleanly


def temporaries(out):
    return [path for path in out.rglob("*") if path.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_stops_in_one_line_and_resume_completes(signum, code, tmp_path,
                                                                 single_process, capsys):
    """train.py in its own process gets Ctrl-C (SIGINT) or SIGTERM once its first checkpoint is
    saved: one line saying where --resume continues, no traceback, no .tmp, the lock released, the
    shell's exit status for the signal; --resume then finishes the run."""
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    job = TINY_JOB + ["--steps", "6", "--save-every", "2", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    process = subprocess.Popen([sys.executable, "train.py", *job], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoints" / "step_00000002"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signum)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == code and "Traceback" not in stderr, stderr
    name = signal.Signals(signum).name
    last_line = stderr.strip().splitlines()[-1]
    said = re.fullmatch(rf"train\.py: interrupted at step (\d+) \({name}\); continue with --resume "
                        rf"\(last checkpoint: {re.escape(str(out))}/checkpoints/step_(\d+), step "
                        r"(\d+)\)", last_line)
    assert said, last_line
    assert int(said.group(3)) == int(said.group(2)) >= 2 and \
        int(said.group(1)) >= int(said.group(3))
    assert temporaries(out) == [] and not (out / "train.lock").exists() and \
        not (out / "model").exists()
    summary = train.main(job + ["--resume"])
    assert summary["step"] == 6 and (out / "model" / "config.json").is_file()
    assert f"resumed from {out / 'checkpoints' / f'step_{int(said.group(2)):08d}'}" in \
        capsys.readouterr().out


def test_ctrl_c_while_a_checkpoint_is_written_abandons_it(tmp_path, single_process, monkeypatch,
                                                          capsys):
    """Ctrl-C arrives midway through writing step 2's checkpoint: the partial step_00000002.tmp is
    removed, step 1's checkpoint is the one --resume will use, and the line says so."""
    import signal
    from plumbing import run_folder

    real_save, saves = run_folder.dcp.save, []

    def save_cut_by_ctrl_c(state, checkpoint_id, **kwargs):
        saves.append(checkpoint_id)
        if len(saves) == 2:
            (checkpoint_id / "__0_0.distcp").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    monkeypatch.setattr(run_folder.dcp, "save", save_cut_by_ctrl_c)
    out = tmp_path / "run"
    # The handler before the run: Python's default, or SIG_IGN where the suite runs in the
    # background.
    handler = signal.getsignal(signal.SIGINT)
    code, stderr = run_command("train.py",
                               TINY_JOB + ["--steps", "3", "--save-every", "1", "--out", str(out)],
                               capsys)
    step_1 = out / "checkpoints" / "step_00000001"
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == \
        (f"train.py: interrupted at step 2 (SIGINT); continue with --resume "
         f"(last checkpoint: {step_1}, step 1)")
    assert sorted((out / "checkpoints").iterdir()) == [step_1] and temporaries(out) == []
    assert not (out / "train.lock").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # the handlers are given back
