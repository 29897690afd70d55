"""Paired comparisons of methods: the difference in top-1 on the same test images and the same draws,
with a 95% interval and a p-value (:func:`workbench.stats.paired_difference`: bootstrap over test images
and seeds, sign-flip p-values). A claim that one method beats another rests on this, never on two
overlapping per-method intervals. Here: which pairs are compared (:data:`PAIRS`), the
``metrics.json["comparisons"]`` rows and the sentences that read them.
"""
from __future__ import annotations

import numpy as np

from ..stats import paired_difference

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
