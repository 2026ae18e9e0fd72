"""mine.SentenceTransformerTeacher: a sentence-transformers folder read with transformers alone. Checked on tiny
hand-made folders (a random BertModel and the json files sentence-transformers writes) against pooling computed
here with numpy, one text at a time, and against sentence-transformers itself where it is installed; and on the
real all-MiniLM-L6-v2 (tests/helpers.py fetches it) against sentence-transformers."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

import mine
from plumbing.errors import CheckpointError
from tests.helpers import minilm_folder, scifact

WORDS = ["the", "cell", "protein", "binds", "to", "dna", "in", "mice", "cancer", "risk", "is", "low", "high", "gene"]
# Strictly decreasing lengths: the teacher batches longest first, so the batch it pads is this list in this order
# (and the naive path below pads the same batch). The first is longer than max_seq_length 12.
TEXTS = ["The protein binds to DNA in mice and the gene is high in the cell of the cancer risk",
         "Cancer risk is low in mice", "The cell binds DNA", "gene protein", "dna"]
MAX_SEQ_LENGTH = 12
HAS_ST = importlib.util.find_spec("sentence_transformers") is not None


def make_folder(path, modes, normalize, padding_side="right", do_lower_case=False, words=WORDS):
    """A sentence-transformers folder as it saves one: the Transformer at the root, 1_Pooling, 2_Normalize."""
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    # A cased tokenizer (words of other case are [UNK]): lowercasing is sentence_bert_config.json's do_lower_case.
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=False, padding_side=padding_side)
    assert len(tokenizer) == len(words) + 5  # the vocabulary was read (transformers 5 ignores `vocab_file`)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(path)
    modules = [dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
               dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling")]
    if normalize:
        modules.append(dict(idx=2, name="2", path="2_Normalize", type="sentence_transformers.models.Normalize"))
        (path / "2_Normalize").mkdir()
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 16, **{key: mode in modes for key, mode in mine.ST_POOLING_MODES.items()}}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (path / "sentence_bert_config.json").write_text(json.dumps(dict(max_seq_length=MAX_SEQ_LENGTH,
                                                                    do_lower_case=do_lower_case)))
    return path


def naive_pool(hidden, mode):
    """hidden (n, D) of one text's real tokens -> (D,), as sentence-transformers' Pooling defines each mode."""
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


def naive_encode(folder, texts, modes, normalize):
    """The padded batch through BertModel, then each text's real tokens pooled one at a time in numpy."""
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
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
         (["cls", "max", "mean"], True, "right")]  # several modes: concatenated in sentence-transformers' order


@pytest.mark.parametrize("modes, normalize, padding_side", CASES)
def test_hand_made_folder_matches_naive_pooling(tmp_path, modes, normalize, padding_side):
    folder = make_folder(tmp_path / "st", modes, normalize, padding_side)
    teacher = mine.SentenceTransformerTeacher(folder)
    assert teacher.pooling_modes == modes and teacher.normalize == normalize and teacher.max_length == MAX_SEQ_LENGTH
    got = teacher.encode(TEXTS, batch_size=len(TEXTS)).double().numpy()
    np.testing.assert_allclose(got, naive_encode(folder, TEXTS, modes, normalize), atol=1e-5)
    assert got.shape == (len(TEXTS), 16 * len(modes))


@pytest.mark.skipif(not HAS_ST, reason="sentence-transformers is not installed (the st extra: pip install -e '.[st]')")
@pytest.mark.parametrize("modes, normalize, padding_side", CASES[:6])
def test_hand_made_folder_matches_sentence_transformers(tmp_path, modes, normalize, padding_side):
    from sentence_transformers import SentenceTransformer

    folder = make_folder(tmp_path / "st", modes, normalize, padding_side, do_lower_case=True)
    # Right padding changes nothing, so our batches may differ from theirs; left padding shifts BERT's absolute
    # positions, so there the batch must be theirs (one batch of the texts, longest first, as both sort them).
    batch_size = 2 if padding_side == "right" else len(TEXTS)
    got = mine.SentenceTransformerTeacher(folder).encode(TEXTS, batch_size=batch_size)
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, batch_size=len(TEXTS),
                                                                    convert_to_tensor=True)
    torch.testing.assert_close(got, expected.cpu(), atol=1e-5, rtol=0)


def test_refuses_what_it_does_not_implement(tmp_path):
    folder = make_folder(tmp_path / "st", ["mean"], True)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules + [dict(path="3_Dense", type="x.models.Dense")]))
    with pytest.raises(CheckpointError, match=r"modules.json: modules \['Transformer', 'Pooling', 'Normalize', "
                                              r"'Dense'\]: only Transformer, Pooling and an optional Normalize"):
        mine.SentenceTransformerTeacher(folder)
    (folder / "modules.json").write_text(json.dumps(modules[:2] + modules[1:2]))  # a second Pooling
    with pytest.raises(CheckpointError, match=r"modules \['Transformer', 'Pooling', 'Pooling'\]"):
        mine.SentenceTransformerTeacher(folder)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": False}))
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: pooling modes \[\]"):
        mine.SentenceTransformerTeacher(folder)
    (folder / "1_Pooling" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"1_Pooling/config.json: not JSON"):
        mine.SentenceTransformerTeacher(folder)


@pytest.mark.parametrize("file, settings, refused", [
    ("sentence_bert_config.json", dict(max_seq_length=12, tokenizer_args=dict(model_max_length=5)),
     r"sentence_bert_config.json: tokenizer_args: not implemented"),
    ("config_sentence_transformers.json", dict(prompts=dict(query="query: "), default_prompt_name="query"),
     r"config_sentence_transformers.json: default_prompt_name 'query'"),
    ("config_sentence_transformers.json", dict(similarity_fn_name="dot"),
     r"config_sentence_transformers.json: similarity_fn_name 'dot': mining ranks by cosine"),
])
def test_refuses_settings_sentence_transformers_would_apply(tmp_path, file, settings, refused):
    folder = make_folder(tmp_path / "st", ["mean"], normalize=False)
    (folder / file).write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match=refused):
        mine.SentenceTransformerTeacher(folder)


def test_reads_an_older_models_config_name_and_accepts_dot_on_unit_vectors(tmp_path):
    folder = make_folder(tmp_path / "st", ["mean"], normalize=True)
    (folder / "sentence_bert_config.json").rename(folder / "sentence_roberta_config.json")
    (folder / "config_sentence_transformers.json").write_text(json.dumps(dict(similarity_fn_name="dot")))
    assert mine.SentenceTransformerTeacher(folder).max_length == MAX_SEQ_LENGTH  # not the model's 64


@pytest.mark.skipif(not HAS_ST, reason="sentence-transformers is not installed (the st extra: pip install -e '.[st]')")
def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    folder = minilm_folder()
    corpus = [json.loads(line) for line in (scifact() / "corpus.jsonl").open().readlines()[:6]]
    texts = [(d["title"] + " " + d["text"]).strip() for d in corpus] + ["  a claim with spaces  ", "Vitamin D"]
    teacher = mine.SentenceTransformerTeacher(folder)
    assert (teacher.pooling_modes, teacher.normalize, teacher.max_length) == (["mean"], True, 256)
    expected = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(teacher.encode(texts, batch_size=3), expected.cpu(), atol=2e-6, rtol=0)


def test_mine_command_takes_a_sentence_transformers_folder(tmp_path):
    """mine.py --model FOLDER (it has modules.json): the teacher embeds bare queries (sentence-transformers models
    are trained on bare queries), the training file keeps the student's instruction; NV-Embed flags are refused."""
    from plumbing.builtin import BUILTIN_INSTRUCTION
    from plumbing.training_files import read_training_file

    folder = make_folder(tmp_path / "st", ["mean"], normalize=True)
    out = tmp_path / "mined.jsonl"
    _, stats = mine.main(["--model", str(folder), "--out", str(out), "--top-k", "3", "--margin", "10", "--quiet"])
    assert stats["model"] == str(folder) and stats["teacher_instruction"] == "" and stats["queries_kept"] > 0
    examples = read_training_file(out)
    assert examples and all(e.instruction == BUILTIN_INSTRUCTION and len(e.negatives) <= 3 for e in examples)
    with pytest.raises(SystemExit) as exit_:
        mine.main(["--model", str(folder), "--pooling", "mean", "--out", str(tmp_path / "other.jsonl")])
    assert exit_.value.code == 2
