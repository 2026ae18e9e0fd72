"""mine.py (TopK-PercPos) on the built-in data with a tiny model, checked against encode directly."""

import json
import math

import pytest
import torch

import data
import mine
from model import NVEmbed


@pytest.mark.parametrize("teacher", ["tiny", "tfidf"])
def test_mining_rules_hold_for_every_kept_negative(teacher):
    torch.manual_seed(0)
    model = mine.TfidfTeacher() if teacher == "tfidf" else NVEmbed.from_base("tiny", pooling="mean").eval()
    corpus, queries, qrels = data.builtin_dataset().split("train")
    qrels = dict(list(qrels.items())[:40])
    negatives, stats = mine.mine(model, corpus, queries, qrels, data.BUILTIN_INSTRUCTION, top_k=10, margin=0.95,
                                 depth=len(corpus))
    assert set(negatives) == set(qrels)
    doc_ids = list(corpus)
    doc_emb = dict(zip(doc_ids, model.encode([data.doc_text(corpus[d]) for d in doc_ids])))
    kept_total = 0
    for query_id, negative_ids in negatives.items():
        q = model.encode([queries[query_id]], instruction=data.BUILTIN_INSTRUCTION)[0]
        positives = [d for d, g in qrels[query_id].items() if g > 0]
        positive_score = min(float(doc_emb[d] @ q) for d in positives)
        assert len(negative_ids) <= 10 and len(set(negative_ids)) == len(negative_ids)
        assert not set(negative_ids) & set(positives)  # positives never become negatives
        scores = [float(doc_emb[d] @ q) for d in negative_ids]
        assert all(s <= 0.95 * positive_score + 1e-5 for s in scores)  # the 0.95 rule
        assert scores == sorted(scores, reverse=True)  # hardest first
        # Nothing scoring between the kept ones and the threshold was skipped.
        others = [float(doc_emb[d] @ q) for d in doc_ids if d not in positives and d not in negative_ids]
        if len(negative_ids) == 10:
            assert all(s <= scores[-1] + 1e-5 or s > 0.95 * positive_score - 1e-5 for s in others)
        kept_total += len(negative_ids)
    assert kept_total > 0 and stats["queries"] == len(qrels)


def test_tfidf_teacher_against_a_naive_computation():
    texts = ["the red river floods", "a red town", "the river is cold and the river is long"]
    teacher = mine.TfidfTeacher(dim=2**16).fit(texts)
    got = teacher.encode(["red river"]) @ teacher.encode(texts).T  # (1, 3)
    words = [t.split() for t in texts]
    vocab = sorted({w for ws in words for w in ws})
    idf = {w: math.log(4 / (1 + sum(w in ws for ws in words))) + 1 for w in vocab}

    def vector(ws):
        v = torch.tensor([math.log1p(ws.count(w)) * idf[w] for w in vocab])
        return v / v.norm()

    expected = torch.stack([vector("red river".split()) @ vector(ws) for ws in words])
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


def test_command_writes_a_readable_training_file(tmp_path):
    out = tmp_path / "mined.jsonl"
    mine.main(["--out", str(out), "--top-k", "5", "--max-length", "160"])
    examples = data.read_training_file(out)
    assert examples and all(e.task_type == "retrieval" and 1 <= len(e.negatives) <= 5 for e in examples)
    assert all(e.positive not in e.negatives for e in examples)
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["examples"] == len(examples)
    try:
        mine.main(["--out", str(out)])
    except SystemExit as exit_:
        assert exit_.code == 2  # refuses to overwrite
    else:
        raise AssertionError("mine.py overwrote an existing file")
