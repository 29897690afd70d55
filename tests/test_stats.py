"""Statistics (workbench/stats.py): bootstrap vs a naive loop, paired differences and p-values vs scipy,
Wilson intervals vs scipy, Holm's correction vs its definition, and numbers pinned bit for bit."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from workbench.stats import bootstrap_ci, holm, paired_difference, sign_flip_p, wilson_interval


def _correct(n, acc, seed):
    return np.random.default_rng(seed).random(n) < acc


# ---------------------------------------------------------------- bootstrap
def test_vectorised_bootstrap_equals_naive_loop():
    rng = np.random.default_rng(3)
    correct = rng.random((2, 37)) < [[0.6], [0.85]]
    out = bootstrap_ci(correct, n_boot=200, seed=7)
    # Naive: the same RNG draws, one resample at a time, accuracies summed in Python.
    draws = np.random.default_rng(7).integers(0, 37, size=(200, 37))
    for row in range(2):
        accs = [sum(bool(correct[row, i]) for i in draws[b]) / 37 for b in range(200)]
        lo, hi = np.percentile(accs, [2.5, 97.5])
        np.testing.assert_allclose(out["ci95"][row], [lo * 100, hi * 100], rtol=0, atol=1e-9)
        np.testing.assert_allclose(out["std"][row], np.std(accs) * 100, atol=1e-9)
        assert out["mean"][row] == pytest.approx(correct[row].mean() * 100)
    single = bootstrap_ci(correct[0], n_boot=200, seed=7)
    assert single["ci95"] == pytest.approx(list(out["ci95"][0]))
    lo, hi = single["ci95"]
    assert lo <= single["mean"] <= hi


# ---------------------------------------------------------------- paired differences
def test_paired_interval_agrees_with_scipy_bootstrap():
    """One draw: the interval resamples test images jointly for both methods, like scipy's paired bootstrap."""
    from scipy.stats import bootstrap

    a, b = _correct(600, 0.62, 1), _correct(600, 0.55, 2)
    b[:300] = a[:300]  # correlated outcomes: the paired interval is narrower than the unpaired one
    ours = paired_difference(a, b, n_boot=20000, seed=0)
    assert ours["diff"] == pytest.approx(100 * (a.mean() - b.mean()), abs=1e-9)
    ref = bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis: x.mean(axis) - y.mean(axis), paired=True,
                    vectorized=True, n_resamples=20000, method="percentile", random_state=0).confidence_interval
    assert ours["ci95"] == pytest.approx([100 * ref.low, 100 * ref.high], abs=0.4)  # Monte Carlo error ~0.1 point
    unpaired = [np.percentile([(a[np.random.default_rng(i).integers(0, 600, 600)].mean()
                                - b[np.random.default_rng(10**6 + i).integers(0, 600, 600)].mean()) * 100
                               for i in range(2000)], q) for q in (2.5, 97.5)]
    assert ours["ci95"][1] - ours["ci95"][0] < unpaired[1] - unpaired[0]


def test_sign_flip_p_agrees_with_scipy_permutation_test():
    from scipy.stats import permutation_test

    a, b = _correct(300, 0.6, 3), _correct(300, 0.5, 4)
    d = a.astype(float) - b.astype(float)
    ref = permutation_test((a.astype(float), b.astype(float)), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                           permutation_type="samples", vectorized=True, n_resamples=20000, random_state=0).pvalue
    assert sign_flip_p(d, n_perm=20000) == pytest.approx(ref, abs=0.01)
    assert sign_flip_p(np.zeros(50)) == 1.0  # identical predictions: nothing to tell apart
    assert sign_flip_p(np.ones(200), n_perm=999) == pytest.approx(1 / 1000)  # never 0


def test_seeds_widen_the_interval_and_the_difference_is_their_mean():
    a = np.stack([_correct(400, acc, s) for s, acc in enumerate((0.7, 0.5, 0.6))])
    b = np.stack([_correct(400, 0.55, 10 + s) for s in range(3)])
    three = paired_difference(a, b, seed=0)
    assert three["diff"] == pytest.approx(100 * (a.mean() - b.mean())) and three["n_seeds"] == 3
    one = paired_difference(a[:1], b[:1], seed=0)
    lo, hi = three["ci95"]
    assert lo < three["diff"] < hi
    assert hi - lo > (one["ci95"][1] - one["ci95"][0])  # the draws disagree: their spread is in the interval
    with pytest.raises(ValueError, match="equal, non-empty shapes"):
        paired_difference(a, b[:2])


def test_with_several_draws_p_and_interval_tell_the_same_story():
    """One draw far better, two no different: per-image sign flips with the draws held fixed call that
    certain (p < 0.001), but the draws' spread does not support it. With several draws p comes from the
    bootstrap of the interval, so p < 0.05 exactly when the interval excludes zero."""
    b = np.stack([_correct(600, 0.5, 10 + s) for s in range(3)])
    for accs in ((0.75, 0.5, 0.5), (0.7, 0.6, 0.62), (0.62, 0.6, 0.61), (0.5, 0.5, 0.5)):
        a = np.stack([_correct(600, acc, s) for s, acc in enumerate(accs)])
        r = paired_difference(a, b, seed=0)
        lo, hi = r["ci95"]
        assert (r["p"] < 0.05) == (lo > 0 or hi < 0), (accs, r)
        if accs == (0.75, 0.5, 0.5):
            assert sign_flip_p(a.astype(float) - b) < 0.001 and lo < 0 < hi and r["p"] > 0.2


def test_numbers_are_pinned():
    """The resampling was unified (one chunked loop for accuracies and paired differences); the draws, and so
    every interval and p-value in a run's metrics.json, are what they were before, bit for bit."""
    rng = np.random.default_rng(5)
    c = (rng.random((2, 333)) < 0.6).astype(float)
    a, b = rng.random((3, 250)) < 0.7, rng.random((3, 250)) < 0.6
    assert bootstrap_ci(c[0], 500, 3) == {"ci95": [57.8003003003003, 67.56756756756756], "mean": 63.06306306306306,
                                          "std": 2.6524295975873793}
    assert paired_difference(a[0], b[0], seed=4) == {"ci95": [-0.4, 16.0], "diff": 8.0, "n_seeds": 1, "n_test": 250,
                                                     "p": 0.07396301849075462}
    assert paired_difference(a, b, seed=2) == {"ci95": [1.7333333333333336, 14.799999999999999],
                                               "diff": 8.133333333333333, "n_seeds": 3, "n_test": 250,
                                               "p": 0.013993003498250875}
    assert bootstrap_ci(rng.random(40000) < 0.5, 1200, 2) == {"ci95": [49.7125, 50.682624999999994], "mean": 50.2175,
                                                              "std": 0.24756709800878846}  # several chunks
    big = rng.random((2, 20000)) < 0.5, rng.random((2, 20000)) < 0.52  # several chunks, seeds drawn between them
    assert paired_difference(*big, n_boot=1500, seed=1) == {"ci95": [-3.8078749999999992, -1.68], "diff": -2.7425,
                                                            "n_seeds": 2, "n_test": 20000, "p": 0.0013324450366422385}


def test_resampling_chunks_do_not_change_the_draws(monkeypatch):
    """A large test set is resampled a chunk at a time; for accuracies and one draw the chunk size changes
    memory, never the numbers. (With several draws the seeds' indices are drawn between chunks, so there
    the chunk size is part of the numbers: ``_MAX_ELEMENTS`` is pinned by test_numbers_are_pinned.)"""
    from workbench import stats

    a, b = _correct(300, 0.6, 1).reshape(3, 100), _correct(300, 0.55, 2).reshape(3, 100)
    whole = bootstrap_ci(a, 250, 1), paired_difference(a[0], b[0], n_boot=250, seed=1)
    monkeypatch.setattr(stats, "_MAX_ELEMENTS", 7 * 300)  # 7 resamples per chunk
    chunked = bootstrap_ci(a, 250, 1), paired_difference(a[0], b[0], n_boot=250, seed=1)
    for x, y in zip(whole, chunked):
        assert {k: np.asarray(v).tolist() for k, v in x.items()} == {k: np.asarray(v).tolist() for k, v in y.items()}


def test_evaluate_re_exports_the_statistics():
    """Notebooks that import them from workbench.evaluate keep working: the same functions."""
    import workbench.evaluate as ev

    assert (ev.bootstrap_ci, ev.paired_difference, ev.sign_flip_p) == (bootstrap_ci, paired_difference, sign_flip_p)


# ---------------------------------------------------------------- proportions, several tests
def test_wilson_interval_agrees_with_scipy():
    from scipy.stats import binomtest

    for hits, n in ((0, 7), (3, 10), (10, 10), (41, 120), (1, 1)):
        ref = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(hits, n) == pytest.approx([ref.low, ref.high], abs=2e-5)  # z = 1.96 vs 1.95996...
    assert wilson_interval(0, 0) is None


def _holm_by_definition(p):
    """Holm (1979): test the hypotheses in ascending order of p; H_(i) is rejected at level alpha iff
    p_(j) <= alpha / (m - j + 1) for every j <= i. The adjusted p-value of a hypothesis is the smallest
    alpha at which it is rejected, found here by brute force over the candidate levels."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    candidates = sorted({min(1.0, (m - j) * p[order[j]]) for j in range(m)} | {1.0})
    out = [1.0] * m
    for rank, i in enumerate(order):
        for alpha in candidates:
            if all(p[order[j]] <= alpha / (m - j) + 1e-15 for j in range(rank + 1)):
                out[i] = alpha
                break
    return out


def test_holm_against_its_definition():
    rng = np.random.default_rng(0)
    cases = [[0.01, 0.04, 0.03, 0.005], [0.5], [0.2, 0.2, 0.2], [0.001, 0.9, 0.012, 0.04, 0.3, 0.011],
             list(rng.random(9) ** 3), []]
    for p in cases:
        assert holm(p).tolist() == pytest.approx(_holm_by_definition(p), abs=1e-12), p
    # a hand-worked case: sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005, 3 x 0.01, max(2 x 0.03, .), max(1 x 0.04, .)
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    for p in itertools.islice(itertools.product([0.01, 0.02, 0.5], repeat=3), 27):
        adj = holm(p)
        assert (adj >= np.asarray(p)).all() and (adj <= 1).all()
    with pytest.raises(ValueError, match="one-dimensional"):
        holm([[0.1]])
