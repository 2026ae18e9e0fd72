"""Hard-negative mining with mine.py's BM25 teacher: time and peak memory, next to the TF-IDF
teacher it replaced.

(a) SciFact train (809 queries, 5,183 documents): `mine.mine` with `BM25Teacher`, and with the old
    `TfidfTeacher` (mine.py as of commit OLD_COMMIT, read with `git show`: it is no longer in the
    tree), each in a fresh process. The BM25 teacher's nDCG@10 on SciFact test is printed as a check
    that it ranks well.
(b) A synthetic corpus of `--docs` documents (default 1M) of 10-20 words drawn from a Zipf
    vocabulary, and `--queries` queries of 3-6 words drawn the same way: `BM25Teacher.index`, then
    `rank` (top 100). The old teacher is not run there: its dense (N, 32768) float32 count matrix
    alone is N x 32768 x 4 bytes.

Peak memory is the process's peak resident set (ru_maxrss), also given as its growth over the
resident set once the data were loaded or made (what the teacher itself added).

    python bench/mine_bm25.py                      # both
    python bench/mine_bm25.py --docs 100000        # a smaller synthetic corpus
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
OLD_COMMIT = "2a6c049"  # the last mine.py with TfidfTeacher
TFIDF_DIM = 2**15


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def old_mine_module(folder: Path):
    """mine.py at OLD_COMMIT, importable as `old_mine`. It imports data and evaluate; of data it
    uses only doc_text, which now lives in datafiles.py, so that one call is pointed there.
    Evaluate's part is unchanged."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:mine.py"],
                            capture_output=True, text=True, check=True).stdout
    source = source.replace("import data\n", "import data\nimport datafiles\n", 1)
    source = source.replace("data.doc_text(", "datafiles.doc_text(")
    (folder / "old_mine.py").write_text(source)
    sys.path.insert(0, str(folder))
    import old_mine

    return old_mine


def case_scifact(teacher: str) -> dict:
    from plumbing import datafiles
    import mine
    from evaluate import INSTRUCTIONS

    corpus, queries, qrels = datafiles.load_beir(SCIFACT, "train")
    instruction = INSTRUCTIONS["scifact"]
    if teacher == "tfidf":
        import tempfile

        old_mine = old_mine_module(Path(tempfile.mkdtemp()))
        model, mine_fn = old_mine.TfidfTeacher(), old_mine.mine
    else:
        model, mine_fn = mine.BM25Teacher(), mine.mine
    loaded = peak_rss_mib()
    start = time.perf_counter()
    negatives, stats = mine_fn(model, corpus, queries, qrels, instruction, top_k=30)
    seconds = time.perf_counter() - start
    result = dict(case=f"scifact-{teacher}", documents=len(corpus), queries=stats["queries"],
                  seconds=seconds, peak_rss_mib=peak_rss_mib(), rss_after_load_mib=loaded,
                  negatives_per_query=sum(map(len, negatives.values())) / len(negatives),
                  queries_with_no_negative=stats["queries_with_no_negative"],
                  dropped_by_margin=stats["dropped_by_margin"])
    if teacher == "bm25":
        result["test_ndcg@10"] = bm25_test_ndcg(corpus)
    return result


def bm25_test_ndcg(corpus) -> float:
    """nDCG@10 of the BM25 teacher on SciFact test (after the measurement: it does not count in the
    peak)."""
    from plumbing import datafiles
    import mine
    from evaluate import evaluate

    _, queries, qrels = datafiles.load_beir(SCIFACT, "test")
    doc_ids = list(corpus)
    teacher = mine.BM25Teacher().index([datafiles.doc_text(corpus[d]) for d in doc_ids])
    query_ids = list(qrels)
    ranked, _ = teacher.rank([queries[q] for q in query_ids], [[0]] * len(query_ids), k=1000)
    run = {q: {doc_ids[j]: score for score, j in candidates}
           for q, candidates in zip(query_ids, ranked)}
    return evaluate(qrels, run, k_values=(10,))["NDCG@10"]


def synthetic_texts(rng, count, min_words, max_words, vocabulary, exponent=1.1):
    """`count` texts of min..max words; word w_i has probability proportional to 1 / (i + 1) **
    exponent."""
    probabilities = 1.0 / np.arange(1, vocabulary + 1) ** exponent
    lengths = rng.integers(min_words, max_words + 1, size=count)  # (count,)
    words = rng.choice(vocabulary, size=int(lengths.sum()), p=probabilities / probabilities.sum())
    ends = np.cumsum(lengths)
    return [" ".join(f"w{i}" for i in words[end - n:end])
            for end, n in zip(ends.tolist(), lengths.tolist())]


def case_synthetic(num_docs: int, num_queries: int, vocabulary: int) -> dict:
    import mine

    rng = np.random.default_rng(0)
    doc_texts = synthetic_texts(rng, num_docs, 10, 20, vocabulary)
    query_texts = synthetic_texts(rng, num_queries, 3, 6, vocabulary)
    made = peak_rss_mib()
    start = time.perf_counter()
    teacher = mine.BM25Teacher().index(doc_texts)
    index_seconds = time.perf_counter() - start
    indexed = peak_rss_mib()
    start = time.perf_counter()
    ranked, _ = teacher.rank(query_texts, [[0]] * num_queries, k=100)
    rank_seconds = time.perf_counter() - start
    index = teacher.retriever.scores
    return dict(case="synthetic-bm25", documents=num_docs, queries=num_queries,
                vocabulary=vocabulary, index_seconds=index_seconds, rank_seconds=rank_seconds,
                ms_per_query=1000 * rank_seconds / num_queries,
                index_nonzeros=int(len(index["data"])), peak_rss_mib=peak_rss_mib(),
                rss_after_load_mib=made, peak_rss_after_index_mib=indexed,
                candidates_per_query=sum(map(len, ranked)) / num_queries,
                old_tfidf_one_matrix_gib=num_docs * TFIDF_DIM * 4 / 2**30)


def run_case(*args) -> dict:
    """One case in a fresh process, so that its peak resident set is its own."""
    result = subprocess.run([sys.executable, __file__, "--case", *map(str, args)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"case {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000, help="synthetic documents (default 1M)")
    p.add_argument("--queries", type=int, default=5000, help="synthetic queries (default 5000)")
    p.add_argument("--vocabulary", type=int, default=100_000,
                   help="synthetic vocabulary size (default 100k)")
    p.add_argument("--skip-scifact", action="store_true")
    p.add_argument("--skip-synthetic", action="store_true")
    # internal: run one case, print its JSON
    p.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        name, *rest = args.case
        result = case_scifact(rest[0]) if name == "scifact" else case_synthetic(*map(int, rest))
        print(json.dumps(result))
        return result

    results = []
    if not args.skip_scifact:
        if not (SCIFACT / "corpus.jsonl").is_file():
            print(f"SciFact not found at {SCIFACT}: skipping (a)")
        else:
            for teacher in ("bm25", "tfidf"):
                results.append(run_case("scifact", teacher))
                print(json.dumps(results[-1]), flush=True)
            bm25, tfidf = results[-2], results[-1]
            print(f"\n(a) SciFact train, {bm25['queries']} queries x {bm25['documents']} "
                  "documents, top_k 30:")
            print(f"{'teacher':<8}{'s':>8}{'peak RSS MiB':>14}{'growth MiB':>12}{'neg/query':>11}")
            for row in (bm25, tfidf):
                print(f"{row['case'].split('-')[1]:<8}{row['seconds']:>8.1f}"
                      f"{row['peak_rss_mib']:>14.0f}"
                      f"{row['peak_rss_mib'] - row['rss_after_load_mib']:>12.0f}"
                      f"{row['negatives_per_query']:>11.1f}")
            growth = [row["peak_rss_mib"] - row["rss_after_load_mib"] for row in (bm25, tfidf)]
            print(f"tfidf / bm25: time {tfidf['seconds'] / bm25['seconds']:.1f}x, memory growth "
                  f"{growth[1] / max(1.0, growth[0]):.1f}x; one (N, 32768) float32 matrix is "
                  f"{bm25['documents'] * TFIDF_DIM * 4 / 2**20:.0f} MiB")
            print(f"BM25 teacher on SciFact test: nDCG@10 {bm25['test_ndcg@10']:.4f}")
    if not args.skip_synthetic:
        row = run_case("synthetic", args.docs, args.queries, args.vocabulary)
        results.append(row)
        print(json.dumps(row), flush=True)
        print(f"\n(b) synthetic: {row['documents']:,} documents of 10-20 words (Zipf over "
              f"{row['vocabulary']:,} words), {row['queries']} queries of 3-6 words, top 100:")
        print(f"index {row['index_seconds']:.1f} s ({row['index_nonzeros']:,} stored scores), rank "
              f"{row['rank_seconds']:.1f} s ({row['ms_per_query']:.1f} ms/query); peak RSS "
              f"{row['peak_rss_mib']:.0f} MiB, "
              f"{row['peak_rss_mib'] - row['rss_after_load_mib']:.0f} MiB over the texts; the old "
              "teacher's (N, 32768) float32 count matrix alone: "
              f"{row['old_tfidf_one_matrix_gib']:.0f} GiB")
    return results


if __name__ == "__main__":
    main()
