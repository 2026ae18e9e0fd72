"""Data files on disk, with their located errors: the reading every data file shares, BEIR folders,
TREC runs. The training file and negatives files: plumbing/training_files.py; checking files on
the command line (`python data.py check-beir` / `check-train`): plumbing/data_cli.py.

Plumbing for data.py and evaluate.py (it imports neither). PAPER.md section 6: the BEIR format
(corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv; a document is encoded as title + " " + text).

Bad input raises `DataError` (a missing file `MissingFileError`) naming file and line (or row /
field); the commands print it as one line and exit with status 2 (`UserError`). With `skip_bad=True`
the offending record is skipped instead, counted in a `SkipReport` by reason, and the counts are
printed (and merged into the `report` argument when one is given).

Tests: tests/test_data.py, tests/test_evaluate_command.py (TREC runs).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from plumbing.errors import DataError, MissingFileError

log = logging.getLogger("nvembed.datafiles")  # notices: errors.py


@dataclass
class SkipReport:
    """Counts of records skipped under `skip_bad=True`, by reason, with the first few messages kept
    verbatim."""

    source: str = ""
    counts: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    max_messages: int = 10

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(message)

    def merge(self, other: "SkipReport") -> None:
        self.counts.update(other.counts)
        self.messages.extend(other.messages[: max(0, self.max_messages - len(self.messages))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        lines = [f"[data] {self.source}: skipped {self.total} ({reasons})"]
        lines += [f"[data]   e.g. {m}" for m in self.messages[:3]]
        return "\n".join(lines)


class Problems:
    """Raise on a problem, or (skip_bad) count it; `finish` prints the counts and merges them into
    `report`."""

    def __init__(self, source: str, skip_bad: bool, report: SkipReport | None):
        self.skip_bad, self.report = skip_bad, report
        self.local = SkipReport(source)

    def __call__(self, reason: str, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.local.add(reason, message)

    def note(self, reason: str, message: str) -> None:
        """Records dropped by design (not errors), counted and reported whatever `skip_bad` says."""
        self.local.add(reason, message)

    def finish(self) -> None:
        if self.local.total:
            log.warning("%s", self.local)
        if self.report is not None:
            self.report.merge(self.local)



# ----------------------------------------------------------------------------
# Reading a text or .jsonl file, each problem located (file and line).


def text_lines(path: Path):
    """Yields (line_number, line) of a UTF-8 text file; bytes that are not UTF-8 are a DataError
    naming the file, line, byte and column (Python's own error names neither file nor line)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not UTF-8 (byte 0x{raw[error.start]:02x} at "
                                f"column {error.start + 1})") from None


def jsonl_records(path: Path, problems: Problems):
    """Yields (line_number, dict) for each non-blank line; a malformed line is a problem naming file
    and line."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    for number, line in text_lines(path):
        if not line.strip():
            continue  # blank lines hold no record
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems("malformed JSON",
                     f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            problems("malformed JSON",
                     f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            continue
        yield number, record


def id_field(record: Mapping, key: str, where: str, problems: Problems) -> str | None:
    value = record.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # some files store numeric ids; BEIR ids are strings
    if not isinstance(value, str) or not value:
        problems(f"missing or empty {key}",
                 f"{where}: field '{key}' is missing or empty (got {value!r})")
        return None
    return value


def _text_field(record: Mapping, key: str, where: str, problems: Problems,
                optional: bool = False) -> str | None:
    """A string field; required ones must be non-blank, an optional one may be absent, null or empty
    ("")."""
    value = record.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str) or not (optional or value.strip()):
        problems(f"missing or empty {key}",
                 f"{where}: field '{key}' is missing or empty (got {value!r})")
        return None
    return value


# ----------------------------------------------------------------------------
# BEIR folders (PAPER.md section 6).


def doc_text(doc: Mapping[str, str]) -> str:
    """A BEIR document as encoded: title + " " + text, stripped (PAPER.md section 6)."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


def _read_corpus(path: Path, problems: Problems) -> dict[str, dict[str, str]]:
    corpus, seen_at = {}, {}
    for number, record in jsonl_records(path, problems):
        where = f"{path}:{number}"
        doc_id = id_field(record, "_id", where, problems)
        title = _text_field(record, "title", where, problems, optional=True)
        text = record.get("text")
        # may be empty when the title is not, but must be there (BEIR's schema)
        if not isinstance(text, str):
            problems("missing or empty text",
                     f"{where}: field 'text' is missing or not a string (got {text!r})")
            continue
        if doc_id is None or title is None:
            continue
        if not (title + text).strip():
            problems("missing or empty text",
                     f"{where}: document {doc_id!r} has neither title nor text")
            continue
        if doc_id in corpus:
            problems("duplicate id",
                     f"{where}: duplicate document id {doc_id!r} (first at line {seen_at[doc_id]})")
            continue
        corpus[doc_id], seen_at[doc_id] = {"title": title, "text": text}, number
    if not corpus:
        raise DataError(f"{path}: no documents (the corpus is empty)")
    return corpus


def _read_queries(path: Path, problems: Problems) -> dict[str, str]:
    all_queries, seen_at = {}, {}
    for number, record in jsonl_records(path, problems):
        where = f"{path}:{number}"
        query_id = id_field(record, "_id", where, problems)
        text = _text_field(record, "text", where, problems)
        if query_id is None or text is None:
            continue
        if query_id in all_queries:
            problems("duplicate id",
                     f"{where}: duplicate query id {query_id!r} (first at line "
                     f"{seen_at[query_id]})")
            continue
        all_queries[query_id], seen_at[query_id] = text, number
    return all_queries


def _read_qrels(path: Path, corpus: Mapping, all_queries: Mapping,
                problems: Problems) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for number, line in text_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip() or (number == 1 and line.split("\t")[0] == "query-id"):
            continue  # blank line, or BEIR's header "query-id corpus-id score"
        where = f"{path}:{number}"
        fields = line.split("\t")
        if len(fields) != 3:
            problems("bad qrels row", f"{where}: expected 3 tab-separated fields "
                                      f"(query-id, corpus-id, score), got {len(fields)}: {line!r}")
            continue
        query_id, doc_id, grade = fields
        try:
            grade = int(grade)
        except ValueError:
            problems("bad qrels row", f"{where}: score {grade!r} is not an integer")
            continue
        if query_id not in all_queries:
            problems("unknown id", f"{where}: query id {query_id!r} is not in queries.jsonl")
            continue
        if doc_id not in corpus:
            problems("unknown id", f"{where}: corpus id {doc_id!r} is not in corpus.jsonl")
            continue
        if doc_id in qrels.get(query_id, {}):
            problems("duplicate judgement",
                     f"{where}: query {query_id!r} judges document {doc_id!r} twice")
            continue
        qrels.setdefault(query_id, {})[doc_id] = grade
    return qrels


def load_beir(folder: str | Path, split: str, skip_bad: bool = False,
              report: SkipReport | None = None):
    """Reads corpus.jsonl, queries.jsonl and qrels/{split}.tsv of a BEIR folder.

    Returns corpus {doc_id: {"title", "text"}}, queries {query_id: text} (only the queries the split
    judges) and qrels {query_id: {doc_id: grade}}. Errors (DataError naming file and line):
    malformed JSON, a missing or empty id or text (a document may lack a title, not both title and
    text), a duplicate id, a qrels row without three tab-separated fields or with a non-integer
    grade, a duplicate judgement, a qrels id absent from the corpus or the queries. skip_bad=True
    skips such records instead and reports the counts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such folder (want a BEIR folder: corpus.jsonl, "
                               "queries.jsonl, qrels/SPLIT.tsv)")
    problems = Problems(f"{folder} ({split})", skip_bad, report)
    corpus = _read_corpus(folder / "corpus.jsonl", problems)
    all_queries = _read_queries(folder / "queries.jsonl", problems)
    path = folder / "qrels" / f"{split}.tsv"
    if not path.is_file():
        splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise MissingFileError(f"{path}: no such file: the folder has no split {split!r} "
                               f"(its splits: {', '.join(splits) or 'none'})")
    qrels = _read_qrels(path, corpus, all_queries, problems)
    problems.finish()
    queries = {query_id: all_queries[query_id] for query_id in qrels}
    return corpus, queries, qrels


def write_beir(folder: str | Path, corpus: Mapping[str, Mapping[str, str]],
               queries: Mapping[str, str],
               qrels_by_split: Mapping[str, Mapping[str, Mapping[str, int]]]) -> None:
    """Writes a BEIR folder: corpus.jsonl, queries.jsonl (every query given) and qrels/{split}.tsv
    per split."""
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id, doc in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": doc.get("title", ""),
                                "text": doc["text"]}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for query_id, text in queries.items():
            f.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    for split, qrels in qrels_by_split.items():
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for query_id, docs in qrels.items():
                for doc_id, grade in docs.items():
                    f.write(f"{query_id}\t{doc_id}\t{grade}\n")


# ----------------------------------------------------------------------------
# TREC run files (trec_eval's input; evaluate.py writes one per evaluation).


def write_trec(run, path, run_name):
    """Write a run in TREC format, one line per document: `query_id Q0 doc_id rank score run_name`.

    Lines are in trec_eval's order (score as float32 descending, ties by doc id
    descending), so the rank column is the rank the metrics used. Scores are written with
    9 significant digits, enough to give back the same float32 (trec_eval reads a float).
    """
    if not run_name or any(c.isspace() for c in run_name):
        raise ValueError(f"write_trec: run name {run_name!r} must be non-empty without whitespace")
    with open(path, "w", encoding="utf-8") as f:
        for qid, docs in run.items():
            # A space in an id would shift every later column of the line.
            for item_id in (qid, *docs):
                if not item_id or any(c.isspace() for c in item_id):
                    raise ValueError(f"write_trec: id {item_id!r} (query {qid!r}) is empty or has "
                                     "whitespace, which the TREC format cannot hold")
            ranked = sorted(docs.items(), key=lambda item: (float(np.float32(item[1])), item[0]),
                            reverse=True)
            for rank, (did, score) in enumerate(ranked, start=1):
                f.write(f"{qid} Q0 {did} {rank} {score:.9g} {run_name}\n")


def read_trec(path):
    """Read a TREC run file back into {query_id: {doc_id: score}}; bad lines name file and line."""
    run = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise ValueError(f"{path}:{number}: expected 6 fields (query_id Q0 doc_id rank "
                                 f"score run_name), got {len(fields)}")
            qid, _, did, _, score, _ = fields
            try:
                run.setdefault(qid, {})[did] = float(score)
            except ValueError:
                raise ValueError(f"{path}:{number}: score {score!r} is not a number") from None
    return run


# The metrics of BEIR's summary table, in its column order.
METRIC_NAMES = ("NDCG", "MAP", "Recall", "P", "MRR")


def format_table(metrics):
    """BEIR's summary: one row per cutoff k, one column per metric, 5 decimals as BEIR rounds."""
    k_values = sorted({int(name.split("@")[1]) for name in metrics})
    lines = [f"{'k':>6}" + "".join(f"{name:>10}" for name in METRIC_NAMES)]
    for k in k_values:
        lines.append(f"{k:>6}" + "".join(f"{metrics[f'{name}@{k}']:>10.5f}"
                                         for name in METRIC_NAMES))
    return "\n".join(lines)

