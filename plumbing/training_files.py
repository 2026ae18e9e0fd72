"""The training file, negatives files, a BEIR train split as training examples, and the rows of
stage 2's sources (data.py pairs them); each error located (plumbing/datafiles.py's `Problems`).

Training-file schema (one JSON object per line in a .jsonl file; any other format or hub name that
`datasets.load_dataset` reads, with the same columns):
    query         str, non-empty     the query text, without its instruction
    instruction   str                the task instruction ("" for none); formatted with the query
                                     template
    positive      str, non-empty     the positive document's text (BEIR documents: doc_text(doc))
    negatives     list[str]          hard negatives, hardest first; each non-empty and different
                                     from `positive`
    task_type     str                "retrieval" | "classification" | "clustering" | "sts"
    query_id      str, optional      ids where the source has them (provenance; mining writes them)
    positive_id   str, optional
    negative_ids  list[str], optional, same length as `negatives`
Extra columns are ignored. Documents get the instruction only for symmetric tasks: task_type "sts"
means the positive and the negatives are tokenized with the same instruction and template as the
query (PAPER.md section 3); every other task type tokenizes documents bare.

Other projects' layouts are mapped to this schema (`LAYOUTS`): FlagEmbedding's and tevatron's by
their columns' names, sentence-transformers' (any table without this schema's own columns) by
position, as sentence-transformers reads them. Tests: tests/test_data.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from plumbing.datafiles import Problems, SkipReport, doc_text, id_field, jsonl_records
from plumbing.errors import DataError, MissingFileError

log = logging.getLogger("nvembed.training_files")  # notices: errors.py

TASK_TYPES = ("retrieval", "classification", "clustering", "sts")


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
    # "file:line" it was read from, for errors
    location: str | None = field(default=None, compare=False)

    @property
    def document_instruction(self) -> str:
        """Symmetric tasks (STS) put the instruction on documents too (PAPER.md section 3); others
        leave them bare."""
        return self.instruction if self.task_type == "sts" else ""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None and k != "location"}


def _example_from_row(row: Mapping[str, Any], where: str, problems: Problems) -> Example | None:
    def bad(message: str) -> None:
        problems("bad training row", f"{where}: {message}")

    for key in ("query", "positive"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return bad(f"field '{key}' is missing or empty (got {row.get(key)!r})")
    if not isinstance(row.get("instruction"), str):
        return bad("field 'instruction' is missing or not a string (got "
                   f"{row.get('instruction')!r}); use \"\" for none")
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
    return Example(row["query"], row["instruction"], row["positive"], list(negatives),
                   row["task_type"], ids["query_id"], ids["positive_id"], negative_ids,
                   location=where)


# Other projects' training layouts. Their rows are retrieval pairs without an instruction: each
# becomes one example per positive, instruction "" (or --instruction's), task_type "retrieval".
LAYOUTS = {
    "sentence-transformers": "by position, as sentence-transformers reads a table: the first "
                             "column -> query, the second -> positive, the others -> negatives",
    "FlagEmbedding": "query -> query, each of pos -> positive, neg -> negatives, prompt -> "
                     "instruction",
    "tevatron": "query -> query, each of positive_passages -> positive, negative_passages -> "
                "negatives (a passage: title + ' ' + text)",
}
# A column of this schema alone (the query and positive columns are common names): a table with one
# is read by name, a row missing a field refused by name, never read by position.
SCHEMA_COLUMNS = ("instruction", "task_type", "negatives")
# sentence-transformers' label columns (its data collator's), not texts. "scores" (a list a row,
# mine_hard_negatives' output_scores) rates the texts of a row: ignored. A label or a score of a
# pair says that its second text is not always a positive (a cross-encoder's or a regression's
# table): refused.
IGNORED_COLUMNS = ("scores",)
LABEL_COLUMNS = ("label", "labels", "score")


def training_layout(columns: Sequence[str]) -> str:
    """Which layout a training table's columns are in: "nv-embed" (the schema above) or one of
    LAYOUTS: tevatron and FlagEmbedding by a column only they have, this schema by one of
    SCHEMA_COLUMNS, and any other table is sentence-transformers' (texts by position)."""
    if "anchor" in columns:
        return "sentence-transformers"
    if "positive_passages" in columns:
        return "tevatron"
    if "pos" in columns and "positive" not in columns:
        return "FlagEmbedding"
    if any(column in columns for column in SCHEMA_COLUMNS):
        return "nv-embed"
    return "sentence-transformers"


def positional_columns(columns: Sequence[str], source: str) -> tuple[str, str, list[str]]:
    """(query column, positive column, negative columns) of a sentence-transformers table, by
    position whatever their names (its columns in order, but IGNORED_COLUMNS): the shapes (anchor,
    positive), (anchor, positive, negative), (anchor, positive, negative_1, ..., negative_n), and
    mine_hard_negatives' triplet and n-tuple forms under the dataset's own names. A DataError for a
    labelled table (LABEL_COLUMNS) or one of fewer than two texts."""
    if labels := [c for c in columns if c in LABEL_COLUMNS]:
        raise DataError(f"{source}: column {labels[0]!r}: a labelled or scored pair table (a "
                        "cross-encoder's or a regression's) has no positives to train on; want "
                        "(anchor, positive, negatives...) columns")
    texts = [c for c in columns if c not in IGNORED_COLUMNS]
    if len(texts) < 2:
        raise DataError(f"{source}: columns {list(columns)}: want (anchor, positive, "
                        "negatives...) texts, by position, or the columns of training_files.py")
    return texts[0], texts[1], texts[2:]


def layout_mapping(layout: str, columns: Sequence[str]) -> str:
    """The mapping read_training_file prints: LAYOUTS[layout], and the columns by position."""
    if layout != "sentence-transformers":
        return LAYOUTS[layout]
    query, positive, negatives = positional_columns(columns, "")
    ignored = [c for c in columns if c in IGNORED_COLUMNS]
    return (f"{LAYOUTS[layout]}: {query} -> query, {positive} -> positive, "
            f"{', '.join(negatives) or '(none)'} -> negatives"
            + (f" ({', '.join(ignored)} ignored)" if ignored else ""))


def _passage_text(passage: Any) -> Any:
    return doc_text(passage) if isinstance(passage, Mapping) else passage


def rows_as_schema(layout: str, row: Mapping,
                   columns: tuple[str, str, list[str]] | None = None) -> list[Mapping]:
    """One row of `layout` as rows of this project's schema (missing values stay missing: the row
    check names them at the row's location). columns: a sentence-transformers table's
    positional_columns (default: this row's)."""
    if layout == "nv-embed":
        return [row]
    if layout == "sentence-transformers":
        query_column, positive_column, negative_columns = \
            columns or positional_columns(list(row), "row")
        positives = [row.get(positive_column)]
        negatives = [row.get(c) for c in negative_columns]
        query, instruction = row.get(query_column), ""
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
    return any((Path(path) / name).is_file()
               for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def read_training_file(path: str | Path, skip_bad: bool = False, report: SkipReport | None = None,
                       split: str = "train", instruction: str | None = None) -> list[Example]:
    """Reads and validates a training file, row by row (errors name file and line/row).

    A local .jsonl file is parsed line by line here, so that a malformed line is named (datasets'
    JSON reader reports only "An error occurred while generating the dataset") and can be skipped
    under skip_bad. A folder `save_to_disk` wrote goes through datasets.load_from_disk; any other
    local file (.json, .csv, .parquet, ...) or a hub dataset name through datasets.load_dataset.
    `split`: the split of a dataset that has several. The columns may be this project's schema or a
    layout of LAYOUTS; the mapping used is printed. `instruction` (train.py --instruction): the
    instruction of every row that has none (missing or ""), their count logged."""
    problems = Problems(str(path), skip_bad, report)
    local = Path(path)
    builders = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
    if local.suffix == ".jsonl":
        rows = ((f"{local}:{number}", record) for number, record in jsonl_records(local, problems))
    elif local.is_dir() and is_dataset_folder(local):
        import datasets  # optional and slow to import

        table = datasets.load_from_disk(str(local))
        if isinstance(table, datasets.DatasetDict):
            if split not in table:
                raise DataError(f"{local}: no split {split!r} (its splits: {', '.join(table)}); "
                                "pass --data-split")
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
            # One file is one split, which datasets names "train": `split` is for folders and hub
            # names.
            table = datasets.load_dataset(builders[local.suffix], data_files=str(local),
                                          split="train")
        else:  # a dataset name on the hub, where one is reachable
            try:
                table = datasets.load_dataset(str(path), split=split)
            except FileNotFoundError as error:  # datasets' DatasetNotFoundError is one too
                raise MissingFileError(f"{path}: no such file, nor a dataset of that name "
                                       f"({error})") from error
        rows = ((f"{path} row {i + 1}", record) for i, record in enumerate(table))
    examples, layout, columns, given = [], None, None, 0
    # sentence-transformers' rows of one (anchor, positive) are one example, their negatives joined
    # in order: its triplet form writes one row a negative (rows that would else be false in-batch
    # negatives of each other)
    seen: dict[tuple, Example] = {}
    joined = 0
    for where, record in rows:
        # the first row's columns say the layout (a table's columns are every row's)
        if layout is None:
            layout = training_layout(list(record))
            if layout == "sentence-transformers":
                columns = positional_columns(list(record), str(path))
            if layout != "nv-embed":
                log.info("%s: %s layout, %s; instruction \"\", task_type retrieval", path, layout,
                         layout_mapping(layout, list(record)))
        for row in rows_as_schema(layout, record, columns):
            without = instruction is not None and not row.get("instruction")
            if without:
                row = {**row, "instruction": instruction}
            if (example := _example_from_row(row, where, problems)) is None:
                continue
            if columns is not None and (key := (example.query, example.positive)) in seen:
                first = seen[key]
                first.negatives += [n for n in example.negatives if n not in first.negatives]
                joined += 1
                continue
            if columns is not None:
                seen[key] = example
            examples.append(example)
            given += without
    if joined:
        log.info("%s: %d rows repeat an earlier row's anchor and positive: their negatives joined "
                 "its (%d examples)", path, joined, len(examples))
    problems.finish()
    if not examples:
        raise DataError(f"{path}: no training examples")
    if instruction is not None:
        log.info("%s: --instruction %r set on %d of %d rows (those without one)", path,
                 instruction, given, len(examples))
    return examples


def write_training_file(path: str | Path, examples: Iterable[Example]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example.to_json(), ensure_ascii=False) + "\n")


def read_negatives_file(path: str | Path, skip_bad: bool = False,
                        report: SkipReport | None = None) -> dict[str, list[str]]:
    """Negatives file: .jsonl rows {"query_id": str, "negative_ids": [doc_id, ...]} (hardest
    first)."""
    path = Path(path)
    problems = Problems(str(path), skip_bad, report)
    negatives, seen_at = {}, {}
    for number, record in jsonl_records(path, problems):
        where = f"{path}:{number}"
        query_id = id_field(record, "query_id", where, problems)
        ids = record.get("negative_ids")
        if query_id is None:
            continue
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
            problems("bad negatives row",
                     f"{where}: 'negative_ids' must be a list of ids (got {ids!r})")
            continue
        if query_id in negatives:
            problems("duplicate id",
                     f"{where}: duplicate query id {query_id!r} (first at line "
                     f"{seen_at[query_id]})")
            continue
        negatives[query_id], seen_at[query_id] = [str(i) for i in ids], number
    problems.finish()
    return negatives


def beir_training_examples(corpus: Mapping[str, Mapping[str, str]], queries: Mapping[str, str],
                           qrels: Mapping[str, Mapping[str, int]],
                           negatives: Mapping[str, Sequence[str]] | str | Path, instruction: str,
                           skip_bad: bool = False,
                           report: SkipReport | None = None) -> list[Example]:
    """A BEIR train split plus hard negatives -> retrieval examples, one per (query, positive
    document).

    negatives: {query_id: [doc_id, ...]} (hardest first) or the path of a negatives file
    (read_negatives_file). Errors (or skips under skip_bad): a judged query with no entry in
    `negatives`, a negative id absent from the corpus, a negative id that is one of the query's
    positives (the skip drops just that id). Queries without a positive judgement (grade > 0) or
    whose negatives list is empty are dropped and counted, never silently."""
    if not isinstance(negatives, Mapping):
        negatives = read_negatives_file(negatives, skip_bad=skip_bad, report=report)
    problems = Problems("BEIR training examples", skip_bad, report)
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
                problems("unknown id",
                         f"query {query_id!r}: negative {doc_id!r} is not in the corpus")
            elif doc_id in positives:
                problems("negative is a positive",
                         f"query {query_id!r}: negative {doc_id!r} is judged positive")
            else:
                negative_ids.append(doc_id)
        if not negative_ids:
            problems.note("no negatives", f"query {query_id!r} has no usable hard negative")
            continue
        for positive_id in positives:
            if positive_id not in corpus:
                problems("unknown id",
                         f"query {query_id!r}: positive {positive_id!r} is not in the corpus")
                continue
            examples.append(Example(queries[query_id], instruction, doc_text(corpus[positive_id]),
                                    [doc_text(corpus[d]) for d in negative_ids], "retrieval",
                                    query_id, positive_id, list(negative_ids)))
    problems.finish()
    return examples


# ----------------------------------------------------------------------------
# Stage-2 source rows (data.py pairs them): classification / clustering (text, label), STS (text1,
# text2, score)


def _row_fields(row: Any, names: Sequence[Sequence[str]], where: str,
                problems: Problems) -> tuple | None:
    """(a, b, ...) from a tuple/list row or a mapping row with one of the accepted key names per
    field."""
    if isinstance(row, Mapping):
        keys = [next((k for k in alternatives if row.get(k) is not None), None)
                for alternatives in names]
        if None in keys:
            missing = names[keys.index(None)]
            return problems("missing field",
                            f"{where}: field {' / '.join(missing)} is missing (got {row!r})")
        return tuple(row[k] for k in keys)
    if isinstance(row, (tuple, list)) and len(row) == len(names) and None not in row:
        return tuple(row)
    return problems("missing field", f"{where}: expected {len(names)} fields "
                                     f"({', '.join(n[0] for n in names)}), got {row!r}")


def labelled_rows(rows: Iterable, source: str, problems: Problems) -> tuple[list[str], list]:
    """(texts, labels) of rows (text, label), tuples or mappings; a bad row is refused (or
    skipped)."""
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


def scored_rows(rows: Iterable, source: str, problems: Problems) -> list[tuple[str, str, float]]:
    """(text1, text2, score) of rows (text1|sentence1, text2|sentence2, score), tuples or
    mappings."""
    pairs = []
    for i, row in enumerate(rows):
        fields = _row_fields(row, (("text1", "sentence1"), ("text2", "sentence2"), ("score",)),
                             f"{source} row {i}", problems)
        if fields is None:
            continue
        a, b, score = fields
        if not all(isinstance(t, str) and t.strip() for t in (a, b)):
            problems("empty text",
                     f"{source} row {i}: a text is empty or not a string ({a!r}, {b!r})")
            continue
        try:
            score = float(score)
        except (TypeError, ValueError):
            problems("bad score", f"{source} row {i}: score {score!r} is not a number")
            continue
        pairs.append((a, b, score))
    return pairs
