"""Data files on disk, with their located errors: BEIR folders, the training file, negatives files, TREC runs.

Plumbing for data.py and evaluate.py (it imports neither). PAPER.md section 6: the BEIR format
(corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv; a document is encoded as title + " " + text).

Training-file schema (one JSON object per line in a .jsonl file; any other format or hub name that
`datasets.load_dataset` reads, with the same columns):
    query         str, non-empty     the query text, without its instruction
    instruction   str                the task instruction ("" for none); formatted with the query template
    positive      str, non-empty     the positive document's text (BEIR documents: doc_text(doc))
    negatives     list[str]          hard negatives, hardest first; each non-empty and different from `positive`
    task_type     str                "retrieval" | "classification" | "clustering" | "sts"
    query_id      str, optional      ids where the source has them (provenance; mining writes them)
    positive_id   str, optional
    negative_ids  list[str], optional, same length as `negatives`
Extra columns are ignored. Documents get the instruction only for symmetric tasks: task_type "sts" means the
positive and the negatives are tokenized with the same instruction and template as the query (PAPER.md section 3);
every other task type tokenizes documents bare.

Bad input raises `DataError` (a missing file `MissingFileError`) naming file and line (or row / field); the
commands print it as one line and exit with status 2 (`UserError`). With `skip_bad=True` the offending record is
skipped instead, counted in a `SkipReport` by reason, and the counts are printed (and merged into the `report`
argument when one is given).

Run: `python data.py check-beir FOLDER SPLIT [--skip-bad]` and `python data.py check-train FILE [--skip-bad]`
(`check_beir`, `check_training_file`). Tests: tests/test_data.py, tests/test_evaluate_command.py (TREC runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from plumbing.errors import (DataError, MissingFileError, add_verbosity_flags, configure_logging,
                             exits_on_user_error)

log = logging.getLogger("nvembed.datafiles")  # notices: errors.py

TASK_TYPES = ("retrieval", "classification", "clustering", "sts")


@dataclass
class SkipReport:
    """Counts of records skipped under `skip_bad=True`, by reason, with the first few messages kept verbatim."""

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


class _Problems:
    """Raise on a problem, or (skip_bad) count it; `finish` prints the counts and merges them into `report`."""

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



# ----------------------------------------------------------------------------------------------------------------
# BEIR folders (PAPER.md section 6).


def text_lines(path: Path):
    """Yields (line_number, line) of a UTF-8 text file; bytes that are not UTF-8 are a DataError
    naming the file, line, byte and column (Python's own error names neither file nor line)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not UTF-8 (byte 0x{raw[error.start]:02x} at column "
                                f"{error.start + 1})") from None


def _jsonl_records(path: Path, problems: _Problems):
    """Yields (line_number, dict) for each non-blank line; a malformed line is a problem naming file and line."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    for number, line in text_lines(path):
        if not line.strip():
            continue  # blank lines hold no record
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems("malformed JSON", f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            problems("malformed JSON", f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            continue
        yield number, record


def _id_field(record: Mapping, key: str, where: str, problems: _Problems) -> str | None:
    value = record.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # some files store numeric ids; BEIR ids are strings
    if not isinstance(value, str) or not value:
        problems(f"missing or empty {key}", f"{where}: field '{key}' is missing or empty (got {value!r})")
        return None
    return value


def _text_field(record: Mapping, key: str, where: str, problems: _Problems, optional: bool = False) -> str | None:
    """A string field; required ones must be non-blank, an optional one may be absent, null or empty ("")."""
    value = record.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str) or not (optional or value.strip()):
        problems(f"missing or empty {key}", f"{where}: field '{key}' is missing or empty (got {value!r})")
        return None
    return value


def doc_text(doc: Mapping[str, str]) -> str:
    """A BEIR document as encoded: title + " " + text, stripped (PAPER.md section 6)."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


def _read_corpus(path: Path, problems: _Problems) -> dict[str, dict[str, str]]:
    corpus, seen_at = {}, {}
    for number, record in _jsonl_records(path, problems):
        where = f"{path}:{number}"
        doc_id = _id_field(record, "_id", where, problems)
        title = _text_field(record, "title", where, problems, optional=True)
        text = record.get("text")
        if not isinstance(text, str):  # may be empty when the title is not, but must be there (BEIR's schema)
            problems("missing or empty text", f"{where}: field 'text' is missing or not a string (got {text!r})")
            continue
        if doc_id is None or title is None:
            continue
        if not (title + text).strip():
            problems("missing or empty text", f"{where}: document {doc_id!r} has neither title nor text")
            continue
        if doc_id in corpus:
            problems("duplicate id", f"{where}: duplicate document id {doc_id!r} (first at line {seen_at[doc_id]})")
            continue
        corpus[doc_id], seen_at[doc_id] = {"title": title, "text": text}, number
    if not corpus:
        raise DataError(f"{path}: no documents (the corpus is empty)")
    return corpus


def _read_queries(path: Path, problems: _Problems) -> dict[str, str]:
    all_queries, seen_at = {}, {}
    for number, record in _jsonl_records(path, problems):
        where = f"{path}:{number}"
        query_id = _id_field(record, "_id", where, problems)
        text = _text_field(record, "text", where, problems)
        if query_id is None or text is None:
            continue
        if query_id in all_queries:
            problems("duplicate id", f"{where}: duplicate query id {query_id!r} (first at line {seen_at[query_id]})")
            continue
        all_queries[query_id], seen_at[query_id] = text, number
    return all_queries


def _read_qrels(path: Path, corpus: Mapping, all_queries: Mapping, problems: _Problems) -> dict[str, dict[str, int]]:
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
            problems("duplicate judgement", f"{where}: query {query_id!r} judges document {doc_id!r} twice")
            continue
        qrels.setdefault(query_id, {})[doc_id] = grade
    return qrels


def load_beir(folder: str | Path, split: str, skip_bad: bool = False, report: SkipReport | None = None):
    """Reads corpus.jsonl, queries.jsonl and qrels/{split}.tsv of a BEIR folder.

    Returns corpus {doc_id: {"title", "text"}}, queries {query_id: text} (only the queries the split judges) and
    qrels {query_id: {doc_id: grade}}. Errors (DataError naming file and line): malformed JSON, a missing or empty
    id or text (a document may lack a title, not both title and text), a duplicate id, a qrels row without three
    tab-separated fields or with a non-integer grade, a duplicate judgement, a qrels id absent from the corpus or
    the queries. skip_bad=True skips such records instead and reports the counts."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such folder (want a BEIR folder: corpus.jsonl, queries.jsonl, "
                               "qrels/SPLIT.tsv)")
    problems = _Problems(f"{folder} ({split})", skip_bad, report)
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


def write_beir(folder: str | Path, corpus: Mapping[str, Mapping[str, str]], queries: Mapping[str, str],
               qrels_by_split: Mapping[str, Mapping[str, Mapping[str, int]]]) -> None:
    """Writes a BEIR folder: corpus.jsonl, queries.jsonl (every query given) and qrels/{split}.tsv per split."""
    folder = Path(folder)
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id, doc in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": doc.get("title", ""), "text": doc["text"]}) + "\n")
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        for query_id, text in queries.items():
            f.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    for split, qrels in qrels_by_split.items():
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for query_id, docs in qrels.items():
                for doc_id, grade in docs.items():
                    f.write(f"{query_id}\t{doc_id}\t{grade}\n")


# ----------------------------------------------------------------------------------------------------------------
# The training file (the schema above), negatives files, BEIR train splits as examples.


@dataclass
class Example:
    """One training example; see the training-file schema in the module docstring."""

    query: str
    instruction: str
    positive: str
    negatives: list[str]
    task_type: str
    query_id: str | None = None
    positive_id: str | None = None
    negative_ids: list[str] | None = None
    location: str | None = field(default=None, compare=False)  # "file:line" it was read from, for errors

    @property
    def document_instruction(self) -> str:
        """Symmetric tasks (STS) put the instruction on documents too (PAPER.md section 3); others leave them bare."""
        return self.instruction if self.task_type == "sts" else ""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "location"}


def _example_from_row(row: Mapping[str, Any], where: str, problems: _Problems) -> Example | None:
    def bad(message: str) -> None:
        problems("bad training row", f"{where}: {message}")

    for key in ("query", "positive"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return bad(f"field '{key}' is missing or empty (got {row.get(key)!r})")
    if not isinstance(row.get("instruction"), str):
        return bad(f"field 'instruction' is missing or not a string (got {row.get('instruction')!r}); "
                   f"use \"\" for none")
    if row.get("task_type") not in TASK_TYPES:
        return bad(f"task_type {row.get('task_type')!r} is not one of {', '.join(TASK_TYPES)}")
    negatives = row.get("negatives")
    if not isinstance(negatives, (list, tuple)):
        return bad(f"field 'negatives' must be a list of strings (got {negatives!r})")
    for k, negative in enumerate(negatives):
        if not isinstance(negative, str) or not negative.strip():
            return bad(f"negatives[{k}] is empty or not a string (got {negative!r})")
        if negative == row["positive"]:
            return bad(f"negatives[{k}] is the positive itself")
    ids = {}
    for key in ("query_id", "positive_id"):
        value = row.get(key)
        if value is not None and not isinstance(value, (str, int)):
            return bad(f"field '{key}' must be a string (got {value!r})")
        ids[key] = None if value is None else str(value)
    negative_ids = row.get("negative_ids")
    if negative_ids is not None:
        if not isinstance(negative_ids, (list, tuple)) or len(negative_ids) != len(negatives):
            return bad(f"'negative_ids' must be a list as long as 'negatives' ({len(negatives)}), "
                       f"got {negative_ids!r}")
        negative_ids = [str(i) for i in negative_ids]
    return Example(row["query"], row["instruction"], row["positive"], list(negatives), row["task_type"],
                   ids["query_id"], ids["positive_id"], negative_ids, location=where)


# Other projects' training layouts, recognised by a column only they have. Their rows are retrieval pairs without
# an instruction: each becomes one example per positive, instruction "", task_type "retrieval".
LAYOUTS = {
    "sentence-transformers": "anchor -> query, positive -> positive, negative / negative_1..n -> negatives",
    "FlagEmbedding": "query -> query, each of pos -> positive, neg -> negatives, prompt -> instruction",
    "tevatron": "query -> query, each of positive_passages -> positive, negative_passages -> negatives "
                "(a passage: title + ' ' + text)",
}


def training_layout(columns: Sequence[str]) -> str:
    """Which layout a training table's columns are in: "nv-embed" (the schema above) or one of LAYOUTS."""
    if "anchor" in columns:
        return "sentence-transformers"
    if "positive_passages" in columns:
        return "tevatron"
    if "pos" in columns and "positive" not in columns:
        return "FlagEmbedding"
    return "nv-embed"


def _negative_columns(row: Mapping) -> list[str]:
    """sentence-transformers' negative columns in order: negative, negative_1, negative_2, ..."""
    numbered = [c for c in row if c.startswith("negative_") and c.removeprefix("negative_").isdigit()]
    return (["negative"] if "negative" in row else []) + sorted(numbered, key=lambda c: int(c.split("_")[1]))


def _passage_text(passage: Any) -> Any:
    return doc_text(passage) if isinstance(passage, Mapping) else passage


def rows_as_schema(layout: str, row: Mapping) -> list[Mapping]:
    """One row of `layout` as rows of this project's schema (missing values stay missing: the row check names
    them at the row's location)."""
    if layout == "nv-embed":
        return [row]
    if layout == "sentence-transformers":
        positives = [row.get("positive")]
        negatives = [row.get(c) for c in _negative_columns(row)]
        query, instruction = row.get("anchor"), ""
    elif layout == "FlagEmbedding":
        positives, negatives = row.get("pos") or [None], row.get("neg") or []
        query, instruction = row.get("query"), row.get("prompt") or ""
    else:  # tevatron
        positives = [_passage_text(p) for p in row.get("positive_passages") or [None]]
        negatives = [_passage_text(p) for p in row.get("negative_passages") or []]
        query, instruction = row.get("query"), ""
    return [dict(query=query, positive=positive, negatives=list(negatives), instruction=instruction,
                 task_type="retrieval") for positive in positives]


def is_dataset_folder(path: str | Path) -> bool:
    """Whether `path` is a folder `datasets`' save_to_disk wrote (a Dataset or a DatasetDict)."""
    return any((Path(path) / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def read_training_file(path: str | Path, skip_bad: bool = False, report: SkipReport | None = None,
                       split: str = "train") -> list[Example]:
    """Reads and validates a training file, row by row (errors name file and line/row).

    A local .jsonl file is parsed line by line here, so that a malformed line is named (datasets' JSON reader
    reports only "An error occurred while generating the dataset") and can be skipped under skip_bad. A folder
    `save_to_disk` wrote goes through datasets.load_from_disk; any other local file (.json, .csv, .parquet, ...)
    or a hub dataset name through datasets.load_dataset. `split`: the split of a dataset that has several.
    The columns may be this project's schema or a layout of LAYOUTS; the mapping used is printed."""
    problems = _Problems(str(path), skip_bad, report)
    local = Path(path)
    builders = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
    if local.suffix == ".jsonl":
        rows = ((f"{local}:{number}", record) for number, record in _jsonl_records(local, problems))
    elif local.is_dir() and is_dataset_folder(local):
        import datasets  # optional and slow to import

        table = datasets.load_from_disk(str(local))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise DataError(f"{local}: no split {split!r} (its splits: {', '.join(table)}); pass --data-split")
            table = table[split]
        rows = ((f"{path} row {i + 1}", record) for i, record in enumerate(table))
    else:
        if local.suffix in builders and not local.is_file():
            raise MissingFileError(f"{local}: no such file")
        if local.exists() and local.suffix not in builders:
            raise DataError(f"{local}: unknown training-file format {local.suffix!r} "
                            f"(want .jsonl, {', '.join(builders)})")
        import datasets  # optional and slow to import: needed only for files other than .jsonl

        if local.exists():
            # One file is one split, which datasets names "train": `split` is for folders and hub names.
            table = datasets.load_dataset(builders[local.suffix], data_files=str(local), split="train")
        else:  # a dataset name on the hub, where one is reachable
            try:
                table = datasets.load_dataset(str(path), split=split)
            except FileNotFoundError as error:  # datasets' DatasetNotFoundError is one too
                raise MissingFileError(f"{path}: no such file, nor a dataset of that name ({error})") from error
        rows = ((f"{path} row {i + 1}", record) for i, record in enumerate(table))
    examples, layout = [], None
    for where, record in rows:
        if layout is None:  # the first row's columns say the layout (a table's columns are every row's)
            layout = training_layout(list(record))
            if layout != "nv-embed":
                log.info("%s: %s layout: %s; instruction \"\", task_type retrieval", path, layout,
                            LAYOUTS[layout])
        for row in rows_as_schema(layout, record):
            if (example := _example_from_row(row, where, problems)) is not None:
                examples.append(example)
    problems.finish()
    if not examples:
        raise DataError(f"{path}: no training examples")
    return examples


def write_training_file(path: str | Path, examples: Iterable[Example]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")


def read_negatives_file(path: str | Path, skip_bad: bool = False,
                        report: SkipReport | None = None) -> dict[str, list[str]]:
    """Negatives file: .jsonl rows {"query_id": str, "negative_ids": [doc_id, ...]} (hardest first)."""
    path = Path(path)
    problems = _Problems(str(path), skip_bad, report)
    negatives, seen_at = {}, {}
    for number, record in _jsonl_records(path, problems):
        where = f"{path}:{number}"
        query_id = _id_field(record, "query_id", where, problems)
        ids = record.get("negative_ids")
        if query_id is None:
            continue
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
            problems("bad negatives row", f"{where}: 'negative_ids' must be a list of ids (got {ids!r})")
            continue
        if query_id in negatives:
            problems("duplicate id", f"{where}: duplicate query id {query_id!r} (first at line {seen_at[query_id]})")
            continue
        negatives[query_id], seen_at[query_id] = [str(i) for i in ids], number
    problems.finish()
    return negatives


def beir_training_examples(corpus: Mapping[str, Mapping[str, str]], queries: Mapping[str, str],
                           qrels: Mapping[str, Mapping[str, int]],
                           negatives: Mapping[str, Sequence[str]] | str | Path, instruction: str,
                           skip_bad: bool = False, report: SkipReport | None = None) -> list[Example]:
    """A BEIR train split plus hard negatives -> retrieval examples, one per (query, positive document).

    negatives: {query_id: [doc_id, ...]} (hardest first) or the path of a negatives file (read_negatives_file).
    Errors (or skips under skip_bad): a judged query with no entry in `negatives`, a negative id absent from the
    corpus, a negative id that is one of the query's positives (the skip drops just that id). Queries without a
    positive judgement (grade > 0) or whose negatives list is empty are dropped and counted, never silently."""
    if not isinstance(negatives, Mapping):
        negatives = read_negatives_file(negatives, skip_bad=skip_bad, report=report)
    problems = _Problems("BEIR training examples", skip_bad, report)
    examples = []
    for query_id, judged in qrels.items():
        positives = [doc_id for doc_id, grade in judged.items() if grade > 0]
        if not positives:
            problems.note("no positive", f"query {query_id!r} has no judgement with grade > 0")
            continue
        if query_id not in queries:
            problems("unknown id", f"qrels query id {query_id!r} is not in queries")
            continue
        if query_id not in negatives:
            problems("no negatives entry", f"query {query_id!r} has no entry in the negatives")
            continue
        negative_ids = []
        for doc_id in negatives[query_id]:
            if doc_id not in corpus:
                problems("unknown id", f"query {query_id!r}: negative {doc_id!r} is not in the corpus")
            elif doc_id in positives:
                problems("negative is a positive", f"query {query_id!r}: negative {doc_id!r} is judged positive")
            else:
                negative_ids.append(doc_id)
        if not negative_ids:
            problems.note("no negatives", f"query {query_id!r} has no usable hard negative")
            continue
        for positive_id in positives:
            if positive_id not in corpus:
                problems("unknown id", f"query {query_id!r}: positive {positive_id!r} is not in the corpus")
                continue
            examples.append(Example(queries[query_id], instruction, doc_text(corpus[positive_id]),
                                    [doc_text(corpus[d]) for d in negative_ids], "retrieval",
                                    query_id, positive_id, list(negative_ids)))
    problems.finish()
    return examples


# ----------------------------------------------------------------------------------------------------------------
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
                    raise ValueError(f"write_trec: id {item_id!r} (query {qid!r}) is empty or has whitespace, "
                                     "which the TREC format cannot hold")
            ranked = sorted(docs.items(), key=lambda item: (float(np.float32(item[1])), item[0]), reverse=True)
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
                raise ValueError(f"{path}:{number}: expected 6 fields (query_id Q0 doc_id rank score run_name), "
                                 f"got {len(fields)}")
            qid, _, did, _, score, _ = fields
            try:
                run.setdefault(qid, {})[did] = float(score)
            except ValueError:
                raise ValueError(f"{path}:{number}: score {score!r} is not a number") from None
    return run


# ----------------------------------------------------------------------------------------------------------------
# `python data.py check-beir` / `check-train`: read a file as training or evaluation would, print its counts.


def check_beir(folder: str | Path, split: str, skip_bad: bool = False) -> None:
    corpus, queries, qrels = load_beir(folder, split, skip_bad=skip_bad)
    print(f"{folder} ({split}): {len(corpus)} documents, {len(queries)} queries, "
          f"{sum(len(d) for d in qrels.values())} judgements")


def check_training_file(path: str | Path, skip_bad: bool = False) -> None:
    examples = read_training_file(path, skip_bad=skip_bad)
    print(f"{path}: {len(examples)} examples, task types {dict(Counter(e.task_type for e in examples))}, "
          f"hard negatives per example min {min(len(e.negatives) for e in examples)} "
          f"max {max(len(e.negatives) for e in examples)}")
    without = [e for e in examples if not e.negatives]
    if without:  # allowed by the schema, refused by training unless it asks for no hard negative
        print(f"{len(without)} example{' has' if len(without) == 1 else 's have'} no hard negative "
              f"(first: {without[0].location}); training refuses them unless --hard-negatives is 0")


# The metrics of BEIR's summary table, in its column order.
METRIC_NAMES = ("NDCG", "MAP", "Recall", "P", "MRR")


def format_table(metrics):
    """BEIR's summary: one row per cutoff k, one column per metric, 5 decimals as BEIR rounds."""
    k_values = sorted({int(name.split("@")[1]) for name in metrics})
    lines = [f"{'k':>6}" + "".join(f"{name:>10}" for name in METRIC_NAMES)]
    for k in k_values:
        lines.append(f"{k:>6}" + "".join(f"{metrics[f'{name}@{k}']:>10.5f}" for name in METRIC_NAMES))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Stage-2 source rows (data.py pairs them): classification / clustering (text, label), STS (text1, text2, score)


def _row_fields(row: Any, names: Sequence[Sequence[str]], where: str, problems: _Problems) -> tuple | None:
    """(a, b, ...) from a tuple/list row or a mapping row with one of the accepted key names per field."""
    if isinstance(row, Mapping):
        keys = [next((k for k in alternatives if row.get(k) is not None), None) for alternatives in names]
        if None in keys:
            missing = names[keys.index(None)]
            return problems("missing field", f"{where}: field {' / '.join(missing)} is missing (got {row!r})")
        return tuple(row[k] for k in keys)
    if isinstance(row, (tuple, list)) and len(row) == len(names) and None not in row:
        return tuple(row)
    return problems("missing field", f"{where}: expected {len(names)} fields "
                                     f"({', '.join(n[0] for n in names)}), got {row!r}")


def labelled_rows(rows: Iterable, source: str, problems: _Problems) -> tuple[list[str], list]:
    """(texts, labels) of rows (text, label), tuples or mappings; a bad row is refused (or skipped)."""
    texts, labels = [], []
    for i, row in enumerate(rows):
        fields = _row_fields(row, (("text",), ("label",)), f"{source} row {i}", problems)
        if fields is None:
            continue
        text, label = fields
        if not isinstance(text, str) or not text.strip():
            problems("empty text", f"{source} row {i}: text is empty or not a string ({text!r})")
            continue
        texts.append(text)
        labels.append(label)
    return texts, labels


def scored_rows(rows: Iterable, source: str, problems: _Problems) -> list[tuple[str, str, float]]:
    """(text1, text2, score) of rows (text1|sentence1, text2|sentence2, score), tuples or mappings."""
    pairs = []
    for i, row in enumerate(rows):
        fields = _row_fields(row, (("text1", "sentence1"), ("text2", "sentence2"), ("score",)), f"{source} row {i}",
                             problems)
        if fields is None:
            continue
        a, b, score = fields
        if not all(isinstance(t, str) and t.strip() for t in (a, b)):
            problems("empty text", f"{source} row {i}: a text is empty or not a string ({a!r}, {b!r})")
            continue
        try:
            score = float(score)
        except (TypeError, ValueError):
            problems("bad score", f"{source} row {i}: score {score!r} is not a number")
            continue
        pairs.append((a, b, score))
    return pairs

# ----------------------------------------------------------------------------------------------------------------
# The data-checking command: `python data.py check-beir FOLDER SPLIT` / `check-train FILE` (data.py calls it).


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="NV-Embed data: check data files (`python -m plumbing.builtin OUT` "
                                                 "writes the built-in dataset).")
    commands = parser.add_subparsers(dest="command", required=True)
    check_beir_command = commands.add_parser("check-beir", help="read a BEIR folder's split and print its counts")
    check_beir_command.add_argument("folder")
    check_beir_command.add_argument("split")
    check_beir_command.add_argument("--skip-bad", action="store_true",
                                    help="skip bad records (counted) instead of failing")
    check_train = commands.add_parser("check-train", help="read a training file and print its counts")
    check_train.add_argument("path")
    check_train.add_argument("--skip-bad", action="store_true", help="skip bad rows (counted) instead of failing")
    for command in (check_beir_command, check_train):
        add_verbosity_flags(command)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if args.command == "check-beir":
        check_beir(args.folder, args.split, skip_bad=args.skip_bad)
    else:
        check_training_file(args.path, skip_bad=args.skip_bad)

