"""significance.py against independent computations: the exact sign-flip test enumerated with
itertools, a hand example, a bootstrap checked against resampling written out as a loop, and the
command's refusals."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from plumbing import significance
from tests.helpers import REPO


def exact_sign_flip_p(differences):
    """Every one of the 2^n sign patterns, one at a time: the share whose |mean| is at least the
    observed one."""
    observed = abs(sum(differences) / len(differences))
    extreme = 0
    patterns = list(itertools.product((1, -1), repeat=len(differences)))
    for signs in patterns:
        flipped = abs(sum(s * d for s, d in zip(signs, differences)) / len(differences))
        extreme += flipped >= observed - 1e-12
    return extreme / len(patterns)


def test_hand_example():
    # Five queries, A better on every one by 0.1: of the 32 sign patterns only all-plus and
    # all-minus have |mean| >= 0.1, so p = 2/32; every bootstrap resample has mean 0.1.
    a, b = [0.5, 0.6, 0.7, 0.8, 0.9], [0.4, 0.5, 0.6, 0.7, 0.8]
    result = significance.compare(a, b)
    assert result["difference"] == pytest.approx(0.1) and result["p_value"] == pytest.approx(2 / 32)
    assert result["ci_low"] == pytest.approx(0.1) and result["ci_high"] == pytest.approx(0.1)
    # Differences (+0.3, -0.1, +0.2), |sum| 0.4. Sums of the 8 sign patterns: 0.4 (none flipped),
    # 0.6 (the -0.1 flipped), 0.0 (the +0.2 flipped), 0.2 (both), and their negatives: 4 of 8 reach
    # 0.4, p = 0.5.
    assert significance.randomization_test([0.3, -0.1, 0.2]) == pytest.approx(0.5)
    # Identical systems: no difference, p = 1.
    assert significance.compare(a, a)["p_value"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_exact_test_equals_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 11))
    differences = rng.choice([-0.2, 0.0, 0.1, 0.3, 0.5, -0.45], size=n) + \
        (rng.random(n) * 0.1 if seed % 2 else 0)
    assert significance.randomization_test(differences) == \
        pytest.approx(exact_sign_flip_p(list(differences)))


def test_monte_carlo_test_is_close_to_exact():
    differences = list(np.random.default_rng(3).normal(0.05, 0.2, size=14))  # 16384 patterns
    exact = exact_sign_flip_p(differences)
    resamples = 4000  # < 2^14: random sign patterns
    estimate = significance.randomization_test(differences, resamples=resamples, seed=1)
    assert abs(estimate - exact) < 4 * np.sqrt(exact * (1 - exact) / resamples) + 1 / resamples
    assert 0.01 < exact < 0.9  # a p-value where the check has teeth


def test_bootstrap_equals_a_resampling_loop():
    differences = np.random.default_rng(0).normal(size=20)
    rng = np.random.default_rng(7)
    means = []
    for _ in range(500):  # the same draws: one row of 20 indices per resample
        rows = rng.integers(0, 20, size=20)
        means.append(sum(differences[i] for i in rows) / 20)
    means = np.sort(means)
    low, high = significance.bootstrap_ci(differences, resamples=500, seed=7)
    assert np.quantile(means, 0.025) == pytest.approx(low) and \
        np.quantile(means, 0.975) == pytest.approx(high)
    assert low < differences.mean() < high


def test_two_level_bootstrap_hand_example():
    """Seeds drawn, queries fixed by design: A's two seeds score 0.2 and 0.4 on both queries, B's
    one seed 0. Drawing 2 of A's seeds gives a mean of 0.2 (1/4), 0.3 (1/2) or 0.4 (1/4), whatever
    the queries drawn: the 95% interval is [0.2, 0.4], where the per-query bootstrap of the seed
    means (0.3 on every query) gives [0.3, 0.3]: the seeds' spread is what the two-level CI adds."""
    a, b = [[0.2, 0.2], [0.4, 0.4]], [[0.0, 0.0]]
    assert significance.two_level_bootstrap_ci(a, b) == pytest.approx((0.2, 0.4))
    assert significance.bootstrap_ci([0.3, 0.3]) == pytest.approx((0.3, 0.3))
    # One seed a side: only the queries are drawn, the per-query bootstrap's interval.
    one_a, one_b = [[0.5, 0.1, 0.9, 0.4]], [[0.2, 0.3, 0.1, 0.4]]
    d = np.array(one_a[0]) - np.array(one_b[0])
    low, high = significance.two_level_bootstrap_ci(one_a, one_b, resamples=20_000)
    exact = np.sort([d[list(q)].mean() for q in itertools.product(range(4), repeat=4)])  # all 256
    assert low == pytest.approx(np.quantile(exact, 0.025), abs=0.02)
    assert high == pytest.approx(np.quantile(exact, 0.975), abs=0.02)


def test_two_level_bootstrap_equals_a_resampling_loop():
    """The vectorised resamples against the same draws written out: seeds of A, seeds of B, then one
    set of queries shared by both sides; the mean over drawn seeds and queries, A minus B."""
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 7)), rng.random((2, 7))
    draws = np.random.default_rng(5)
    seeds_a = draws.integers(0, 3, size=(300, 3))
    seeds_b = draws.integers(0, 2, size=(300, 2))
    queries = draws.integers(0, 7, size=(300, 7))
    means = [np.mean([a[s, q] for s in sa for q in qs]) - np.mean([b[s, q] for s in sb for q in qs])
             for sa, sb, qs in zip(seeds_a, seeds_b, queries)]
    low, high = significance.two_level_bootstrap_ci(a, b, resamples=300, seed=5)
    assert low == pytest.approx(np.quantile(means, 0.025))
    assert high == pytest.approx(np.quantile(means, 0.975))
    with pytest.raises(ValueError, match="same queries"):
        significance.two_level_bootstrap_ci(a, b[:, :6])


def write(path, per_query):
    path.write_text(json.dumps(dict(per_query=per_query)))
    return str(path)


def run_command(*args):
    return subprocess.run([sys.executable, "-m", "plumbing.significance", *args],
                          capture_output=True, text=True, cwd=REPO)


def test_command_prints_the_comparison_and_refuses_bad_files(tmp_path, capsys):
    a = write(tmp_path / "a.per_query.json",
              {f"q{i}": {"NDCG@10": 0.5 + 0.1 * (i % 3)} for i in range(6)})
    b = write(tmp_path / "b.per_query.json", {f"q{i}": {"NDCG@10": 0.5} for i in range(6)})
    result = significance.main([a, b])
    assert result["difference"] == pytest.approx(0.1) and result["queries"] == 6
    assert "A - B = +0.1000" in capsys.readouterr().out
    c = write(tmp_path / "c.per_query.json", {f"q{i}": {"NDCG@10": 0.5} for i in range(1, 7)})
    bad_value = write(tmp_path / "d.per_query.json",
                      {f"q{i}": {"NDCG@10": "high"} for i in range(6)})
    (tmp_path / "e.json").write_text("{")
    for args, message in (([a, c], "score different queries: 1 only in"),
                          ([a, bad_value], "expected a finite"),
                          ([a, str(tmp_path / "e.json")], "e.json: not JSON"),
                          ([a, b, "--metric", "MAP@5"], "has no 'MAP@5'")):
        finished = run_command(*args)
        assert finished.returncode == 2 and finished.stdout == ""
        lines = finished.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("significance.py: error: ") and \
            message in lines[0], lines
