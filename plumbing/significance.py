"""Is system A better than system B on the same queries? Paired tests on per-query metrics, plain
numpy.

Two runs scored on the same queries (evaluate.py --per-query writes NAME.per_query.json) give one
difference per query, d_i = A_i - B_i; their mean is the gap between the two averages the tables
report.
- `randomization_test`: the paired randomization (sign-flip) test. Under "A and B are exchangeable",
  each d_i is as likely to be -d_i; the two-sided p-value is the share of the 2^n sign patterns
  whose mean is at least as far from 0 as the observed one: every pattern when 2^n <= resamples
  (exact), else `resamples` random ones, counted with the observed pattern as one of them ((hits +
  1) / (resamples + 1), which is never 0: a Monte Carlo p-value).
- `bootstrap_ci`: the paired bootstrap's percentile interval of the mean difference: resample the n
  queries with replacement, `resamples` times.
- `two_level_bootstrap_ci`: the same interval when the training seeds are chance too: each resample
  draws each side's seeds and, shared by both sides, the queries, all with replacement.
Both are seeded, so a table's p-values are reproducible. (Smucker, Allan & Carterette 2007 compare
these tests on IR metrics: the randomization test is the one they recommend.)

    python -m plumbing.significance A.per_query.json B.per_query.json [--metric NDCG@10]
    [--resamples 10000] [--seed 0]

prints the mean difference A - B, its 95% CI and the p-value. Files whose query sets differ, or
malformed ones, are refused: one line `significance.py: error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from plumbing.errors import DataError, MissingFileError, exits_on_user_error

EXACT_UP_TO = 16  # 2^16 sign patterns enumerated at most (a (65536, 16) matrix)


def randomization_test(differences, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip test of mean(differences) == 0; differences
    (n,)."""
    d = np.asarray(differences, dtype=np.float64)  # (n,)
    if d.ndim != 1 or not len(d):
        raise ValueError("randomization_test: expected a non-empty 1-D array of differences")
    observed = abs(d.mean())
    n = len(d)
    if n <= EXACT_UP_TO and 2 ** n <= resamples:
        # (2^n, n): every subset of flipped signs
        patterns = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        signs = 1.0 - 2.0 * patterns
        exact = True
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(resamples, n))  # (R, n)
        exact = False
    means = np.abs(signs @ d) / n  # (patterns,)
    # A pattern ties the observed mean when they are equal up to rounding (flipping a 0.5 and a -0.5
    # gives the same sum in another order): within 1e-12 relative, they count as at least as
    # extreme.
    hits = int((means >= observed - 1e-12 * max(observed, np.abs(d).max())).sum())
    return hits / len(signs) if exact else (hits + 1) / (resamples + 1)


def bootstrap_ci(differences, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0):
    """(low, high): the percentile interval of the mean of `differences` (n,) over bootstrap
    resamples."""
    d = np.asarray(differences, dtype=np.float64)  # (n,)
    if d.ndim != 1 or not len(d):
        raise ValueError("bootstrap_ci: expected a non-empty 1-D array of differences")
    # (R, n) query indices
    rows = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[rows].mean(axis=1)  # (R,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def compare(a, b, resamples: int = 10_000, seed: int = 0) -> dict:
    """A - B over paired per-query values a, b (n,): mean difference, 95% bootstrap CI, sign-flip
    p-value."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # (n,)
    low, high = bootstrap_ci(d, resamples=resamples, seed=seed)
    return dict(queries=len(d), mean_a=float(np.mean(a)), mean_b=float(np.mean(b)),
                difference=float(d.mean()), ci_low=low, ci_high=high,
                p_value=randomization_test(d, resamples=resamples, seed=seed))


def two_level_bootstrap_ci(a, b, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0):
    """(low, high): the percentile interval of mean(A) - mean(B) when both the training seeds and
    the queries are chance. a (S_a, n) and b (S_b, n) hold each seed's per-query values over the
    same n queries (column j is query j on both sides). Each resample draws S_a of A's seeds and
    S_b of B's with replacement (a configuration's seeds are its own: they need not pair across
    sides) and one set of n queries with replacement, shared by both sides (the queries pair), then
    takes A's mean over its drawn seeds and queries minus B's. With one seed a side this is
    `bootstrap_ci` of the per-query differences; with more, the spread between seeds widens it."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not a.size or not b.size:
        raise ValueError("two_level_bootstrap_ci: expected (seeds, queries) arrays over the same "
                         "queries")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    seeds_a = rng.integers(0, len(a), size=(resamples, len(a)))  # (R, S_a)
    seeds_b = rng.integers(0, len(b), size=(resamples, len(b)))  # (R, S_b)
    queries = rng.integers(0, n, size=(resamples, n))  # (R, n)
    # A resample's mean over its drawn seeds and queries: average the drawn seeds' rows first
    # (R, n) by counting how often each seed was drawn, then pick the drawn queries.
    weights_a = (seeds_a[:, :, None] == np.arange(len(a))).mean(axis=1)  # (R, S_a): share drawn
    weights_b = (seeds_b[:, :, None] == np.arange(len(b))).mean(axis=1)  # (R, S_b)
    rows = weights_a @ a - weights_b @ b  # (R, n): per query, drawn seeds' A mean - B mean
    means = np.take_along_axis(rows, queries, axis=1).mean(axis=1)  # (R,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_values(per_query_a: dict, per_query_b: dict, metric: str, names=("A", "B")):
    """The metric's values of the same queries, in one order: (a (n,), b (n,)). Query sets must be
    equal."""
    only_a, only_b = (sorted(set(per_query_a) - set(per_query_b)),
                      sorted(set(per_query_b) - set(per_query_a)))
    if only_a or only_b:
        raise DataError(f"{names[0]} and {names[1]} score different queries: {len(only_a)} only in "
                        f"{names[0]} (e.g. {only_a[:3]}), {len(only_b)} only in {names[1]} (e.g. "
                        f"{only_b[:3]}); a paired test needs the same queries")
    query_ids = sorted(per_query_a)
    return tuple(np.array([_value(per_query, q, metric, name) for q in query_ids])
                 for per_query, name in zip((per_query_a, per_query_b), names))


def _value(per_query, query_id, metric, name):
    values = per_query[query_id]
    if not isinstance(values, dict) or metric not in values:
        raise DataError(f"{name}: per_query[{query_id!r}] has no {metric!r}")
    value = values[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{name}: per_query[{query_id!r}][{metric!r}] = {value!r}: expected a "
                        "finite number")
    return float(value)


def read_per_query(path: Path) -> dict:
    """{query_id: {metric: value}} of a NAME.per_query.json (evaluate.py --per-query,
    bench/teachers.py)."""
    if not path.is_file():
        raise MissingFileError(f"{path}: not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not JSON ({error})") from None
    per_query = data.get("per_query") if isinstance(data, dict) else None
    if not isinstance(per_query, dict) or not per_query:
        raise DataError(f"{path}: expected an object with a non-empty 'per_query' object "
                        "{query_id: {metric: value}}}")
    return per_query


@exits_on_user_error
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="A.per_query.json")
    p.add_argument("b", type=Path, help="B.per_query.json")
    p.add_argument("--metric", default="NDCG@10", help="which per-query metric (default NDCG@10)")
    p.add_argument("--resamples", type=int, default=10_000,
                   help="bootstrap / sign-flip resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.resamples < 1:
        p.error("--resamples must be positive")
    a, b = paired_values(read_per_query(args.a), read_per_query(args.b), args.metric,
                         names=(str(args.a), str(args.b)))
    result = compare(a, b, resamples=args.resamples, seed=args.seed)
    print(f"{args.metric} over {result['queries']} queries: A {result['mean_a']:.4f}, B "
          f"{result['mean_b']:.4f}")
    print(f"A - B = {result['difference']:+.4f}, 95% CI [{result['ci_low']:+.4f}, "
          f"{result['ci_high']:+.4f}] (paired bootstrap), p = {result['p_value']:.4f} (paired "
          "sign-flip test, two-sided)")
    return result


if __name__ == "__main__":
    main()
