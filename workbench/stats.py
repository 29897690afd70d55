"""Statistics, in one place: percentile bootstrap intervals, paired differences with their p-values,
Wilson intervals of a proportion and Holm's correction for several tests. numpy only; nothing here
knows of stages, rows or runs.

Bootstrap resampling is written once (:func:`resampled_means`): rows of outcomes are resampled over
their columns (test images) with replacement, the same indices for every row, in chunks so that a large
test set never gathers gigabytes at once. Both :func:`bootstrap_ci` (accuracies) and
:func:`paired_difference` (differences of two methods) use it.

Paired differences. For methods a and b, ``d[s, i] = correct_a - correct_b`` on test image i of draw
(seed) s. The difference is ``mean(d)`` in points. Its interval is a percentile bootstrap that resamples
test images (the same indices for every seed, since a draw changes the training images, not the test
images) and, with several seeds, the seeds too, so the interval covers both sources of variation.

The p-value, with one draw, is a sign-flip permutation test: under "a and b are exchangeable", each
image's pair of outcomes is as likely swapped as not. With several draws that test would hold the draws
fixed, and could call a difference significant that the draws' spread makes uncertain (the interval
would then contain zero while p < 0.05); so there p comes from the same bootstrap as the interval
(twice the share of resampled differences on the far side of zero), and the two always agree.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Bound the resample x example gather so a large test set never allocates gigabytes at once. With several
# draws the chunk size is part of the numbers (the seeds' indices are drawn between chunks): keep it.
_MAX_ELEMENTS = 1 << 24


# ---------------------------------------------------------------- bootstrap
def resampled_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Means of each row of ``x`` (``M x N``) over ``n_boot`` resamples of its N columns drawn with replacement,
    the same indices for every row: yielded a chunk at a time, ``M x k`` (k resamples), ``n_boot`` in all.

    A chunk's indices are drawn from ``rng`` just before it is yielded, so a caller may draw from ``rng``
    between chunks (the seeds of :func:`paired_difference`). Without such draws the indices are those of
    one ``rng.integers(0, N, size=(n_boot, N))``: numpy's stream does not depend on the chunking.
    """
    m, n = x.shape
    step = max(1, _MAX_ELEMENTS // (m * n))
    for i in range(0, n_boot, step):
        k = min(step, n_boot - i)
        yield x[:, rng.integers(0, n, size=(k, n))].mean(-1)


def bootstrap_ci(correct, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of an accuracy, in percent.

    ``correct``: per-example 0/1 (or any per-example score), shape ``N`` or ``M x N``; with several
    rows every row is resampled with the same indices (paired: methods evaluated on the same test
    set are compared on the same resamples). Returns
    ``{"mean", "ci95": [lo, hi], "std"}`` with arrays of length ``M`` for 2-d input. One gather per
    chunk of resamples (:func:`resampled_means`), no loop over them.
    """
    c = np.asarray(correct, dtype=np.float64)
    single = c.ndim == 1
    c = np.atleast_2d(c)
    if c.ndim != 2 or c.shape[1] == 0:
        raise ValueError(f"correct must be shaped N or M x N with N > 0, got {np.shape(correct)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    accs = np.concatenate(list(resampled_means(c, n_boot, np.random.default_rng(seed))), axis=1)  # M x B
    lo, hi = _percentile_interval(accs, level, axis=1) * 100
    out = {"mean": c.mean(1) * 100, "ci95": np.stack([lo, hi], 1), "std": accs.std(1) * 100}
    if single:
        out = {"mean": float(out["mean"][0]), "ci95": [float(lo[0]), float(hi[0])], "std": float(out["std"][0])}
    return out


def _percentile_interval(boot: np.ndarray, level: float, axis=None) -> np.ndarray:
    alpha = (1 - level) / 2
    return np.percentile(boot, [100 * alpha, 100 * (1 - alpha)], axis=axis)


# ---------------------------------------------------------------- paired differences
def paired_difference(a, b, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """``a``, ``b``: 0/1 correctness, ``N`` (one draw) or ``S x N`` (S draws of the same N test images).

    Returns ``{"diff", "ci95": [lo, hi], "p", "n_test", "n_seeds"}`` with differences in points."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"paired outcomes need equal, non-empty shapes; got {a.shape} and {b.shape}")
    d = a - b
    S, N = d.shape
    boot = paired_bootstrap(d, n_boot, np.random.default_rng(seed))
    lo, hi = _percentile_interval(boot, level) * 100
    p = sign_flip_p(d, n_perm, seed) if S == 1 else bootstrap_p(boot)
    return {"diff": float(d.mean() * 100), "ci95": [float(lo), float(hi)], "p": p, "n_test": int(N), "n_seeds": int(S)}


def paired_bootstrap(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap means of the paired differences ``d`` (``S x N``): test images resampled (the same
    indices for every seed) and, with several seeds, the seeds too."""
    S = len(d)
    chunks = []
    for per_seed in resampled_means(d, n_boot, rng):  # S x k: images resampled
        if S > 1:  # seeds resampled too
            per_seed = np.take_along_axis(per_seed, rng.integers(0, S, size=(S, per_seed.shape[1])), axis=0)
        chunks.append(per_seed.mean(0))
    return np.concatenate(chunks)


def bootstrap_p(boot: np.ndarray) -> float:
    """Two-sided p-value of "the difference is 0" dual to the percentile interval: twice the share of
    bootstrap differences at or beyond zero on the side away from the estimate (never 0, at most 1)."""
    if not np.any(boot):
        return 1.0
    n = len(boot)
    tail = min(int((boot <= 0).sum()), int((boot >= 0).sum()))
    return min(1.0, 2 * (tail + 1) / (n + 1))


def sign_flip_p(d: np.ndarray, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided p-value of ``mean(d) != 0`` by random sign flips of the paired differences (Monte Carlo,
    with the observed statistic counted, so p is never 0)."""
    d = np.atleast_2d(d).astype(np.float64)
    obs = abs(d.mean())
    if obs == 0:
        return 1.0
    rng = np.random.default_rng(seed + 1)
    hits = 0
    step = max(1, _MAX_ELEMENTS // d.size)
    for i in range(0, n_perm, step):
        k = min(step, n_perm - i)
        signs = rng.integers(0, 2, size=(k, *d.shape)) * 2 - 1
        hits += int((np.abs((signs * d).mean(axis=(1, 2))) >= obs - 1e-12).sum())
    return (hits + 1) / (n_perm + 1)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of p-values for the family-wise error rate, in the order given.

    With the ``m`` p-values sorted ascending, the i-th (1-based) is adjusted to
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``; reject where the adjusted value is below the level.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be one-dimensional, got shape {p.shape}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order])) if m else p[order]
    out = np.empty(m)
    out[order] = stepped
    return out


# ---------------------------------------------------------------- proportions
def wilson_interval(hits: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion ``hits / n``; None when ``n == 0``."""
    if n == 0:
        return None
    p = hits / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    # at 0 or n hits an end is exactly 0 or 1; computed, it can land a float hair inside the proportion
    return [0.0 if hits == 0 else max(0.0, float(c - h)), 1.0 if hits == n else min(1.0, float(c + h))]
