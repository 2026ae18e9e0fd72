"""mine.SentenceTransformerTeacher: a sentence-transformers folder read by sentence-transformers
(the st extra). Checked on tiny hand-made folders (a random BertModel and the json files
sentence-transformers writes) against pooling computed here with numpy, one text at a time, and on
the real all-MiniLM-L6-v2 (tests/helpers.py fetches it) against transformers' BertModel mean-pooled
by hand; the settings it refuses, and the one-line error where sentence-transformers is not
installed."""

import builtins
import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

import mine
from plumbing.errors import CheckpointError, UsageError
from tests.helpers import minilm_folder, scifact

WORDS = ["the", "cell", "protein", "binds", "to", "dna", "in", "mice", "cancer", "risk", "is",
         "low", "high", "gene"]
# Strictly decreasing lengths: the teacher batches longest first, so the batch it pads is this list
# in this order (and the naive path below pads the same batch). The first is longer than
# max_seq_length 12.
TEXTS = ["The protein binds to DNA in mice and the gene is high in the cell of the cancer risk",
         "Cancer risk is low in mice", "The cell binds DNA", "gene protein", "dna"]
MAX_SEQ_LENGTH = 12
HAS_ST = importlib.util.find_spec("sentence_transformers") is not None
needs_st = pytest.mark.skipif(not HAS_ST,
                              reason="sentence-transformers is not installed (the st extra: "
                                                 "pip install -e '.[st]')")
# sentence-transformers' legacy pooling flags in 1_Pooling/config.json (all-MiniLM-L6-v2 uses them),
# in the order it concatenates several modes.
POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean",
                 "pooling_mode_lasttoken": "lasttoken"}


def make_folder(path, modes, normalize, padding_side="right", do_lower_case=False, words=WORDS):
    """A sentence-transformers folder as it saves one: the Transformer at the root, 1_Pooling,
    2_Normalize."""
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                               *words]) + "\n")
    # A cased tokenizer (words of other case are [UNK]): lowercasing is sentence_bert_config.json's
    # do_lower_case.
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=False,
                                  padding_side=padding_side)
    # the vocabulary was read (transformers 5 ignores `vocab_file`)
    assert len(tokenizer) == len(words) + 5
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(path)
    modules = [dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
               dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling")]
    if normalize:
        modules.append(dict(idx=2, name="2", path="2_Normalize",
                            type="sentence_transformers.models.Normalize"))
        (path / "2_Normalize").mkdir()
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 16,
               **{key: mode in modes for key, mode in POOLING_FLAGS.items()}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (path / "sentence_bert_config.json").write_text(json.dumps(dict(max_seq_length=MAX_SEQ_LENGTH,
                                                                    do_lower_case=do_lower_case)))
    return path


def naive_pool(hidden, mode):
    """hidden (n, D) of one text's real tokens -> (D,), as sentence-transformers' Pooling defines
    each mode."""
    n = len(hidden)
    if mode == "cls":
        return hidden[0]
    if mode == "lasttoken":
        return hidden[-1]
    if mode == "max":
        return hidden.max(axis=0)
    if mode == "mean":
        return hidden.sum(axis=0) / n
    if mode == "mean_sqrt_len_tokens":
        return hidden.sum(axis=0) / np.sqrt(n)
    weights = np.arange(1, n + 1, dtype=np.float64)  # weightedmean: the i-th token weighs i
    return (weights[:, None] * hidden).sum(axis=0) / weights.sum()


def naive_encode(folder, texts, modes, normalize, max_length=MAX_SEQ_LENGTH, lower=False):
    """The padded batch through the folder's model (transformers), then each text's real tokens
    pooled one at a time in numpy."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    texts = [text.lower() for text in texts] if lower else texts
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.double().numpy()  # (B, T, D)
    rows = []
    for row_hidden, row_mask in zip(hidden, batch["attention_mask"].numpy()):
        real = row_hidden[row_mask == 1]  # (n, D), in order, whichever side the padding is on
        row = np.concatenate([naive_pool(real, mode) for mode in modes])
        rows.append(row / np.linalg.norm(row) if normalize else row)
    return np.stack(rows)


CASES = [(["mean"], True, "right"), (["cls"], False, "right"), (["max"], True, "right"),
         (["lasttoken"], False, "right"), (["lasttoken"], True, "left"), (["cls"], False, "left"),
         (["mean_sqrt_len_tokens"], False, "right"), (["weightedmean"], False, "left"),
         # several modes: concatenated in sentence-transformers' order
         (["cls", "max", "mean"], True, "right")]


@needs_st
@pytest.mark.parametrize("modes, normalize, padding_side", CASES)
def test_hand_made_folder_matches_naive_pooling(tmp_path, modes, normalize, padding_side):
    folder = make_folder(tmp_path / "st", modes, normalize, padding_side)
    teacher = mine.SentenceTransformerTeacher(folder)
    assert teacher.max_length == MAX_SEQ_LENGTH  # the folder's, not the model's 64
    # One batch of the texts, longest first, as the naive path pads it: left padding shifts BERT's
    # positions.
    got = teacher.encode(TEXTS, batch_size=len(TEXTS)).double().numpy()
    np.testing.assert_allclose(got, naive_encode(folder, TEXTS, modes, normalize), atol=1e-5)
    assert got.shape == (len(TEXTS), 16 * len(modes))
    # Another max_length for one call, and the instruction prepended to each text as the prompt.
    short = teacher.encode(TEXTS, instruction="gene ", batch_size=len(TEXTS),
                           max_length=6).double().numpy()
    expected = naive_encode(folder, ["gene " + text for text in TEXTS], modes, normalize,
                            max_length=6)
    np.testing.assert_allclose(short, expected, atol=1e-5)


@needs_st
def test_do_lower_case_lowercases_before_the_cased_tokenizer(tmp_path):
    folder = make_folder(tmp_path / "st", ["mean"], normalize=True, do_lower_case=True)
    got = mine.SentenceTransformerTeacher(folder).encode(TEXTS,
                                                         batch_size=len(TEXTS)).double().numpy()
    np.testing.assert_allclose(got, naive_encode(folder, TEXTS, ["mean"], True, lower=True),
                               atol=1e-5)
    # case matters here
    assert not np.allclose(got, naive_encode(folder, TEXTS, ["mean"], True), atol=1e-3)


@needs_st
@pytest.mark.parametrize("settings, refused", [
    (dict(prompts=dict(query="query: "), default_prompt_name="query"), r"default prompt 'query'"),
    (dict(similarity_fn_name="dot"), r"similarity 'dot': mining ranks by cosine"),
])
def test_refuses_settings_that_would_change_the_ranking(tmp_path, settings, refused):
    folder = make_folder(tmp_path / "st", ["mean"], normalize=False)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=refused):
        mine.SentenceTransformerTeacher(folder)


@needs_st
def test_accepts_dot_on_unit_vectors(tmp_path):
    folder = make_folder(tmp_path / "st", ["mean"], normalize=True)
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps(dict(similarity_fn_name="dot")))
    assert mine.SentenceTransformerTeacher(folder).max_length == MAX_SEQ_LENGTH


def test_without_sentence_transformers_the_teacher_is_one_line(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_sentence_transformers(name, *args, **kwargs):
        if name.startswith("sentence_transformers"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentence_transformers)
    with pytest.raises(UsageError,
                       match=r"needs the sentence-transformers package: pip install -e '\.\[st\]'"):
        mine.SentenceTransformerTeacher(tmp_path / "st")


@needs_st
def test_minilm_matches_its_bert_mean_pooled_by_hand():
    folder = minilm_folder()
    corpus = [json.loads(line) for line in (scifact() / "corpus.jsonl").open().readlines()[:6]]
    texts = [(d["title"] + " " + d["text"]).strip() for d in corpus] + \
        ["  a claim with spaces  ", "Vitamin D"]
    teacher = mine.SentenceTransformerTeacher(folder)
    assert teacher.max_length == 256
    expected = naive_encode(folder, texts, ["mean"], normalize=True, max_length=256)
    # Other batches than the naive one: right padding changes BERT's outputs by float noise only.
    np.testing.assert_allclose(teacher.encode(texts, batch_size=3).double().numpy(), expected,
                               atol=1e-5)


@needs_st
def test_mine_command_takes_a_sentence_transformers_folder(tmp_path):
    """mine.py --model FOLDER (it has modules.json): the teacher embeds bare queries
    (sentence-transformers models are trained on bare queries), the training file keeps the
    student's instruction; NV-Embed flags are refused."""
    from plumbing.builtin import BUILTIN_INSTRUCTION
    from plumbing.training_files import read_training_file

    folder = make_folder(tmp_path / "st", ["mean"], normalize=True)
    out = tmp_path / "mined.jsonl"
    _, stats = mine.main(["--model", str(folder), "--out", str(out), "--top-k", "3", "--margin",
                          "10", "--quiet"])
    assert stats["model"] == str(folder) and stats["teacher_instruction"] == "" and \
        stats["queries_kept"] > 0
    examples = read_training_file(out)
    assert examples and \
        all(e.instruction == BUILTIN_INSTRUCTION and len(e.negatives) <= 3 for e in examples)
    with pytest.raises(SystemExit) as exit_:
        mine.main(["--model", str(folder), "--pooling", "mean", "--out",
                   str(tmp_path / "other.jsonl")])
    assert exit_.value.code == 2
