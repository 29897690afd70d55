"""Paired comparisons of methods: the difference in top-1 on the same test images and the same draws,
with a 95% interval and a p-value. A claim that one method beats another rests on this, never on two
overlapping per-method intervals.

For methods a and b at one shots setting, ``d[s, i] = correct_a - correct_b`` on test image i of draw
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

import numpy as np

_MAX_ELEMENTS = 1 << 24  # resamples x images gathered at once


def paired_difference(a, b, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """``a``, ``b``: 0/1 correctness, ``N`` (one draw) or ``S x N`` (S draws of the same N test images).

    Returns ``{"diff", "ci95": [lo, hi], "p", "n_test", "n_seeds"}`` with differences in points."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"paired outcomes need equal, non-empty shapes; got {a.shape} and {b.shape}")
    d = a - b
    S, N = d.shape
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    step = max(1, _MAX_ELEMENTS // (S * N))
    for i in range(0, n_boot, step):
        k = min(step, n_boot - i)
        per_seed = d[:, rng.integers(0, N, size=(k, N))].mean(-1)  # S x k: images resampled
        if S > 1:  # seeds resampled too
            per_seed = np.take_along_axis(per_seed, rng.integers(0, S, size=(S, k)), axis=0)
        boot[i : i + k] = per_seed.mean(0)
    alpha = (1 - level) / 2
    lo, hi = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)]) * 100
    p = sign_flip_p(d, n_perm, seed) if S == 1 else bootstrap_p(boot)
    return {"diff": float(d.mean() * 100), "ci95": [float(lo), float(hi)], "p": p, "n_test": int(N), "n_seeds": int(S)}


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


PAIRS = (("gist", "finetune-classname"), ("gist", "linear-probe"), ("finetune-classname", "linear-probe"),
         ("gist", "zero-shot"), ("finetune-classname", "zero-shot"), ("linear-probe", "zero-shot"))


def _outcomes(rows: list[dict], method: str, shots) -> dict[int, dict]:
    return {r.get("seed"): r["_test"] for r in rows
            if r["method"] == method and str(r["shots"]) == str(shots) and "_test" in r}


def _paired(oa: dict, ob: dict) -> tuple[np.ndarray, np.ndarray, list] | None:
    """Outcomes of the seeds both methods ran (zero-shot has one, the same for every draw)."""
    if len(ob) == 1 and len(oa) > 1:
        ob = {s: next(iter(ob.values())) for s in oa}
    if len(oa) == 1 and len(ob) > 1:
        oa = {s: next(iter(oa.values())) for s in ob}
    seeds = sorted(set(oa) & set(ob), key=str)
    if not seeds:
        return None
    for s in seeds:
        if not np.array_equal(oa[s]["rows"], ob[s]["rows"]):
            raise ValueError("methods were scored on different test images; they cannot be compared pairwise")
    return (np.stack([oa[s]["correct"] for s in seeds]), np.stack([ob[s]["correct"] for s in seeds]), seeds)


def comparisons(rows: list[dict], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """``metrics.json["comparisons"]`` rows ``{a, b, shots, diff, ci95, p, n_test, seeds}`` (points) for
    every shots setting and every pair of :data:`PAIRS` whose methods were both evaluated there."""
    out = []
    shots = list(dict.fromkeys(str(r["shots"]) for r in rows))
    for s in shots:
        for a, b in PAIRS:
            pair = _paired(_outcomes(rows, a, s), _outcomes(rows, b, s))
            if pair is None:
                continue
            xa, xb, seeds = pair
            r = paired_difference(xa, xb, n_boot=n_boot, seed=seed)
            out.append({"a": a, "b": b, "shots": "full" if s == "full" else int(s), "diff": r["diff"],
                        "ci95": r["ci95"], "p": r["p"], "n_test": r["n_test"], "seeds": list(seeds)})
    return out


LABELS = {"gist": "GIST", "finetune-classname": "FLYP-style", "linear-probe": "linear probe", "zero-shot": "zero-shot"}


def findings(comps: list[dict]) -> list[str]:
    """One sentence per comparison, computed from the numbers: which way, by how much, how sure. A method
    is called better only when the whole 95% interval of the difference is on its side of zero."""
    out = []
    for c in sorted(comps, key=lambda c: (str(c["shots"]) != "full", str(c["shots"]), PAIRS.index((c["a"], c["b"])))):
        a, b = LABELS.get(c["a"], c["a"]), LABELS.get(c["b"], c["b"])
        at = "full shot" if c["shots"] == "full" else f"{c['shots']} shot{'s' if c['shots'] != 1 else ''}"
        lo, hi = c["ci95"]
        verdict = (f"{a} is better" if lo > 0 else f"{b} is better" if hi < 0 else "no difference can be claimed")
        n = len(c["seeds"])
        out.append(f"{a} vs {b} at {at}: {c['diff']:+.1f} points [{lo:+.1f}, {hi:+.1f}], {_p(c['p'])} "
                   f"({c['n_test']} test images, {n} draw{'s' if n != 1 else ''}): {verdict}.")
    return out


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"
