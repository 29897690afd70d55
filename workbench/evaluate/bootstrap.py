"""Uncertainty: vectorised bootstrap intervals over test predictions, mean ± std across seeds."""
from __future__ import annotations

import numpy as np

# Bound the resample x example gather so a large test set never allocates gigabytes at once.
_MAX_ELEMENTS = 1 << 25


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """The resamples: an ``n_boot x n`` matrix of indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(correct, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of an accuracy, in percent.

    ``correct``: per-example 0/1 (or any per-example score), shape ``N`` or ``M x N``; with several
    rows every row is resampled with the same indices (paired: methods evaluated on the same test
    set are compared on the same resamples). Returns ``{"mean", "ci95": [lo, hi], "std"}`` with
    arrays of length ``M`` for 2-d input. One gather over all resamples, no loop over them (the
    resamples are processed in a few chunks only when ``n_boot x N`` is very large).
    """
    c = np.asarray(correct, dtype=np.float64)
    single = c.ndim == 1
    c = np.atleast_2d(c)
    if c.ndim != 2 or c.shape[1] == 0:
        raise ValueError(f"correct must be shaped N or M x N with N > 0, got {np.shape(correct)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n = c.shape[1]
    idx = bootstrap_indices(n, n_boot, seed)
    step = max(1, _MAX_ELEMENTS // (n * len(c)))
    accs = np.concatenate([c[:, idx[i : i + step]].mean(-1) for i in range(0, n_boot, step)], axis=1)  # M x B
    alpha = (1 - level) / 2
    lo, hi = np.percentile(accs, [100 * alpha, 100 * (1 - alpha)], axis=1) * 100
    out = {"mean": c.mean(1) * 100, "ci95": np.stack([lo, hi], 1), "std": accs.std(1) * 100}
    if single:
        out = {"mean": float(out["mean"][0]), "ci95": [float(lo[0]), float(hi[0])], "std": float(out["std"][0])}
    return out


def seed_summary(rows: list[dict], keys=("method", "shots"), values=("top1", "top3")) -> list[dict]:
    """Group rows by ``keys`` and report mean, sample std (ddof=1; 0 for one seed) and the seeds.

    Rows flagged ``zero_shot`` are kept as they are (one number, no seeds involved).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[k]) for k in keys), []).append(r)
    out = []
    for _, rs in groups.items():
        s = {k: rs[0][k] for k in keys}
        s["n"] = len(rs)
        s["seeds"] = [r.get("seed") for r in rs]
        for v in values:
            x = np.array([r[v] for r in rs], dtype=np.float64)
            s[f"{v}_mean"] = float(x.mean())
            s[f"{v}_std"] = float(x.std(ddof=1)) if len(x) > 1 else 0.0
        if len(rs) == 1 and rs[0].get("ci95") is not None:
            s["ci95"] = list(rs[0]["ci95"])
        s["zero_shot"] = bool(rs[0].get("zero_shot", False))
        s["warned"] = sum(1 for r in rs if r.get("warning"))
        out.append(s)
    return out
