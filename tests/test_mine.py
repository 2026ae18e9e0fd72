"""mine.py (TopK-PercPos): with a tiny embedder, checked against encode directly; with BM25, checked
against a naive BM25 written out here."""

import json
import math
import re

import pytest
import torch

import mine
from plumbing.builtin import BUILTIN_INSTRUCTION, builtin_dataset
from plumbing.datafiles import doc_text
from plumbing.training_files import read_training_file
from model import NVEmbed
from tests.test_teachers import HAS_ST, make_folder
from plumbing.loading import from_base


def test_mining_rules_hold_for_every_kept_negative():
    torch.manual_seed(0)
    model = from_base("tiny", pooling="mean").eval()
    corpus, queries, qrels = builtin_dataset().split("train")
    qrels = dict(list(qrels.items())[:40])
    negatives, stats = mine.mine(model, corpus, queries, qrels, BUILTIN_INSTRUCTION, top_k=10,
                                 margin=0.95, depth=len(corpus))
    assert set(negatives) == set(qrels)
    doc_ids = list(corpus)
    doc_emb = dict(zip(doc_ids, model.encode([doc_text(corpus[d]) for d in doc_ids],
                                             convert_to_tensor=True)))
    kept_total = 0
    for query_id, negative_ids in negatives.items():
        q = model.encode([queries[query_id]], instruction=BUILTIN_INSTRUCTION,
                         convert_to_tensor=True)[0]
        positives = [d for d, g in qrels[query_id].items() if g > 0]
        positive_score = min(float(doc_emb[d] @ q) for d in positives)
        assert len(negative_ids) <= 10 and len(set(negative_ids)) == len(negative_ids)
        assert not set(negative_ids) & set(positives)  # positives never become negatives
        scores = [float(doc_emb[d] @ q) for d in negative_ids]
        assert all(s <= 0.95 * positive_score + 1e-5 for s in scores)  # the 0.95 rule
        assert scores == sorted(scores, reverse=True)  # hardest first
        # Nothing scoring between the kept ones and the threshold was skipped.
        others = [float(doc_emb[d] @ q) for d in doc_ids
                  if d not in positives and d not in negative_ids]
        if len(negative_ids) == 10:
            assert all(s <= scores[-1] + 1e-5 or s > 0.95 * positive_score - 1e-5 for s in others)
        kept_total += len(negative_ids)
    assert kept_total > 0 and stats["queries"] == len(qrels)


# A hand-made corpus. "the", "a", "is", "and", "of", "in" are on Lucene's English stop list, which
# bm25s uses; no other word here is. d3 is nearly d1 (an unjudged relevant document: the margin rule
# must drop it), d8 and d9 are the same text (an exact tie, broken by corpus order), d10 shares no
# word with any query.
STOPWORDS = {"the", "a", "is", "and", "of", "in"}
CORPUS = {
    "d0": "The red river floods the valley in spring",
    "d1": "A cold river runs through the northern valley",
    "d2": "The town market sells red apples and river fish",
    "d3": "A cold river in the northern valley",
    "d4": "Mountain goats climb the northern cliffs",
    "d5": "The river of the red valley is long and the river is cold",
    "d6": "Spring rain fills every river and lake of the valley",
    "d7": "Old town walls stand above the harbour",
    "d8": "Fish markets of the harbour town open early",
    "d9": "Fish markets of the harbour town open early",
    "d10": "Quiet snow",
}
QUERIES = {"q0": "cold river northern valley", "q1": "red river valley floods",
           "q2": "harbour town fish market", "q3": "northern mountain goats cliffs",
           "q4": "river river spring lake"}
QRELS = {"q0": {"d1": 1}, "q1": {"d0": 1, "d5": 2}, "q2": {"d2": 1, "d7": 0}, "q3": {"d4": 1},
         "q4": {"d6": 1}}


def naive_bm25(query, texts, k1=1.5, b=0.75):
    """Lucene's BM25 by hand: sum over the query's words w, repeats included, of
    idf(w) * tf / (tf + k1 * (1 - b + b * len(d) / avgdl)),
    idf(w) = ln(1 + (N - df + 0.5) / (df + 0.5)); words are lowercased runs of 2+ word characters
    without stopwords, and len(d) counts those."""
    def words(text):
        return [w for w in re.findall(r"\w+", text.lower()) if len(w) > 1 and w not in STOPWORDS]

    docs = [words(t) for t in texts]
    avgdl = sum(map(len, docs)) / len(docs)
    scores = []
    for doc in docs:
        score = 0.0
        for w in words(query):
            df = sum(w in d for d in docs)
            tf = doc.count(w)
            if tf:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                score += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(score)
    return scores


def test_bm25_scores_equal_a_naive_bm25():
    texts = list(CORPUS.values())
    teacher = mine.BM25Teacher().index(texts)
    rows = [[0], [1, 5], [2], [3], [4]]
    candidates, positive_scores = teacher.rank(list(QUERIES.values()), rows, k=len(texts))
    for query, ranked, positives, positive_score in zip(QUERIES.values(), candidates, rows,
                                                        positive_scores):
        expected = naive_bm25(query, texts)
        # Every document sharing a word with the query, best first, ties by corpus order.
        assert [j for _, j in ranked] == sorted((j for j in range(len(texts)) if expected[j] > 0),
                                                key=lambda j: (-expected[j], j))
        assert [score for score, _ in ranked] == \
            pytest.approx([expected[j] for _, j in ranked], rel=1e-6)
        assert positive_score == pytest.approx(min(expected[j] for j in positives), rel=1e-6)
    # Cut at every k: the k best, also when the cut falls inside the exact tie of d8 and d9 (k = 2
    # for q2).
    expected = naive_bm25(QUERIES["q2"], texts)
    full = sorted((j for j in range(len(texts)) if expected[j] > 0),
                  key=lambda j: (-expected[j], j))
    assert full[1:3] == [8, 9] and expected[8] == expected[9]
    for k in range(1, len(texts) + 1):
        ranked, _ = teacher.rank([QUERIES["q2"]], [[2]], k=k)
        assert [j for _, j in ranked[0]] == full[:k]


@pytest.mark.parametrize("top_k, margin", [(3, 0.95), (10, 0.95), (2, 0.5)])
def test_bm25_mining_follows_the_rules_on_naive_scores(top_k, margin):
    """mine()'s negatives and counts are what TopK-PercPos gives on the naive BM25 scores."""
    corpus = {d: {"title": "", "text": t} for d, t in CORPUS.items()}
    negatives, stats = mine.mine(mine.BM25Teacher(), corpus, QUERIES, QRELS, "", top_k=top_k,
                                 margin=margin, depth=top_k)
    doc_ids, texts = list(CORPUS), list(CORPUS.values())
    expected, as_positive, by_margin = {}, 0, 0
    for query_id, judged in QRELS.items():
        scores = naive_bm25(QUERIES[query_id], texts)
        positives = {d for d, grade in judged.items() if grade > 0}
        threshold = margin * min(scores[doc_ids.index(d)] for d in positives)
        ranked = sorted((j for j in range(len(texts)) if scores[j] > 0),
                        key=lambda j: (-scores[j], j))
        kept = []
        for j in ranked[:top_k + 2]:  # depth top_k, plus room for the (at most 2) positives
            if len(kept) == top_k:
                break
            if doc_ids[j] in positives:
                as_positive += 1
            elif scores[j] > threshold:
                by_margin += 1
            else:
                kept.append(doc_ids[j])
        expected[query_id] = kept
        assert not set(negatives[query_id]) & positives  # no judged positive is ever a negative
    assert negatives == expected
    assert (stats["dropped_as_positive"], stats["dropped_by_margin"]) == (as_positive, by_margin)
    assert as_positive > 0 and by_margin > 0  # both rules were exercised
    assert "d3" not in negatives["q0"]  # the near-duplicate of q0's positive


def test_command_writes_a_readable_training_file(tmp_path):
    out = tmp_path / "mined.jsonl"
    mine.main(["--out", str(out), "--top-k", "5", "--max-length", "160"])
    examples = read_training_file(out)
    assert examples and \
        all(e.task_type == "retrieval" and 1 <= len(e.negatives) <= 5 for e in examples)
    assert all(e.positive not in e.negatives for e in examples)
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["examples"] == len(examples)
    bm25_out = tmp_path / "bm25.jsonl"
    _, bm25_stats = mine.main(["--model", "bm25", "--out", str(bm25_out), "--top-k", "5"])
    bm25_examples = read_training_file(bm25_out)
    assert bm25_stats["examples"] == len(bm25_examples) > 0 and bm25_stats["model"] == "bm25"
    assert all(e.positive not in e.negatives for e in bm25_examples)
    with pytest.raises(SystemExit):
        mine.main(["--model", "tfidf", "--out", str(tmp_path / "tfidf.jsonl")])
    try:
        mine.main(["--out", str(out)])
    except SystemExit as exit_:
        assert exit_.code == 2  # refuses to overwrite
    else:
        raise AssertionError("mine.py overwrote an existing file")


class LookupEmbedder:
    """An adversarial dense teacher: each distinct text is a basis vector, each query a vector of
    chosen scores, so query . document is exactly the score chosen for that document's text (the
    same for duplicate texts)."""

    def __init__(self, doc_scores_by_query):
        self.doc_scores_by_query = doc_scores_by_query  # {query text: {doc text: score}}
        self.texts = sorted({t for scores in doc_scores_by_query.values() for t in scores})

    def encode(self, texts, instruction="", convert_to_tensor=True, **kwargs):
        if texts and texts[0] in self.doc_scores_by_query:  # the queries
            return torch.tensor([[self.doc_scores_by_query[q].get(t, 0.0) for t in self.texts]
                                 for q in texts])
        # (N, D) the documents
        return torch.eye(len(self.texts))[[self.texts.index(t) for t in texts]]


# dup: same text
ADVERSARIAL_CORPUS = {"p0": "positive scoring highest", "dup": "positive scoring highest",
                      "p1": "second positive scoring lowest", "n1": "negative a",
                      "n2": "negative b", "n3": "negative c", "p2": "positive of q1 only"}
ADVERSARIAL_SCORES = {  # by query text, by document text
    "q zero": {"positive scoring highest": 1.0, "second positive scoring lowest": 0.2,
               "negative a": 0.15, "negative b": 0.1, "negative c": -0.3,
               "positive of q1 only": 0.9},
    "q one": {"positive scoring highest": 0.8, "positive of q1 only": -0.1, "negative a": 0.5,
              "negative b": -0.2, "negative c": -0.05, "second positive scoring lowest": -0.5},
}


def test_no_judged_positive_is_mined_adversarial_dense():
    """A positive scoring highest, an unjudged exact duplicate of it, a second positive scoring
    below most negatives, the other query's positive, a negative positive score: the positives never
    come back."""
    corpus = {d: {"title": "", "text": t} for d, t in ADVERSARIAL_CORPUS.items()}
    queries = {"q0": "q zero", "q1": "q one"}
    qrels = {"q0": {"p0": 2, "p1": 1, "n3": 0}, "q1": {"p2": 1}}
    negatives, stats = mine.mine(LookupEmbedder(ADVERSARIAL_SCORES), corpus, queries, qrels, "",
                                 top_k=10, depth=10)
    # q0: threshold 0.95 x 0.2 (its lowest positive); dup (1.0) and p2 (0.9) are above it; n3 is
    # judged 0: a negative. q1: its positive scores -0.1, so the threshold is -0.095 and only what
    # scores below it is kept.
    assert negatives == {"q0": ["n1", "n2", "n3"], "q1": ["n2", "p1"]}
    # q1: p0, dup, n1, n3
    assert stats["dropped_as_positive"] == 3 and stats["dropped_by_margin"] == 2 + 4
    assert stats["queries_with_nonpositive_positive_score"] == 1
    assert stats["queries_kept"] == 2 and \
        stats["negatives_per_query"]["histogram"] == {"2": 1, "3": 1}


@pytest.mark.parametrize("teacher", ["bm25", "saved NV-Embed", pytest.param(
    "sentence-transformers", marks=(pytest.mark.skipif(
        not HAS_ST, reason="sentence-transformers is not installed (the st extra)")))])
def test_no_judged_positive_is_mined_by_any_teacher(tmp_path, teacher):
    """Every kind of teacher on the built-in data (30 train queries, their positives and 70 other
    documents): no judged positive among a query's negatives, no negative twice. The saved NV-Embed
    stands for a stage-1 model mining round 2; the sentence-transformers folder is a tiny hand-made
    one (tests/test_teachers.py)."""
    torch.manual_seed(0)
    corpus, queries, qrels = builtin_dataset().split("train")
    qrels = dict(list(qrels.items())[:30])
    judged = {d for judgments in qrels.values() for d in judgments}
    corpus = {d: doc for i, (d, doc) in enumerate(corpus.items()) if d in judged or i < 70}
    if teacher == "bm25":
        model = mine.BM25Teacher()
    elif teacher == "saved NV-Embed":
        from_base("tiny", pooling="latent").save(tmp_path / "model")
        model = NVEmbed.load(str(tmp_path / "model"))
    else:
        model = mine.SentenceTransformerTeacher(make_folder(tmp_path / "st", ["mean"],
                                                            normalize=True))
    # margin 10: nearly no candidate is dropped by the margin rule (the hand-made folder's texts are
    # mostly [UNK]: its scores are all alike), so only the positives' own rule stands between a
    # positive and the negatives.
    negatives, stats = mine.mine(model, corpus, queries, qrels, BUILTIN_INSTRUCTION, top_k=8,
                                 margin=10.0,
                                 # the teacher's own
                                 max_length=96 if teacher == "saved NV-Embed" else None)
    for query_id, negative_ids in negatives.items():
        assert not set(negative_ids) & {d for d, g in qrels[query_id].items() if g > 0}
        assert len(set(negative_ids)) == len(negative_ids)
    assert stats["negatives"] == sum(len(n) for n in negatives.values()) > 0
    assert stats["queries_kept"] + stats["queries_with_no_negative"] == stats["queries"] == \
        len(qrels)
