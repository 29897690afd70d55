"""Paired comparisons of methods: the difference in top-1 on the same test images and the same draws,
with a 95% interval and a p-value (:func:`workbench.stats.paired_difference`: bootstrap over test images
and seeds, sign-flip p-values). A claim that one method beats another rests on this, never on two
overlapping per-method intervals. Here: which pairs are compared (:data:`PAIRS`), the
``metrics.json["comparisons"]`` rows, the sentences that read them, and the GIST question
(:func:`gist_question`: GIST against the controls that bracket it).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..stats import holm, paired_difference

PAIRS = (("gist", "finetune-classname"), ("gist", "linear-probe"), ("finetune-classname", "linear-probe"),
         ("gist", "zero-shot"), ("finetune-classname", "zero-shot"), ("linear-probe", "zero-shot"),
         # the controls that bracket GIST (workbench.finetune.sources), compared only where they ran
         ("oracle", "finetune-classname"), ("gist", "random-own-class"), ("oracle", "gist"), ("waffle", "gist"))


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
    """``metrics.json["comparisons"]`` rows ``{a, b, shots, diff, ci95, p, p_holm, n_test, seeds}`` (points)
    for every shots setting and every pair of :data:`PAIRS` whose methods were both evaluated there.

    ``p_holm``: ``p`` after Holm's step-down correction (:func:`workbench.stats.holm`) over ALL the
    comparison rows returned here (every pair at every shots setting of the run), so the family-wise
    error rate over the run's comparisons stays at the level; ``ci95`` stays the unadjusted interval."""
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
    for c, ph in zip(out, holm([c["p"] for c in out])):
        c["p_holm"] = float(ph)
    return out


LABELS = {"gist": "GIST", "finetune-classname": "FLYP-style", "linear-probe": "linear probe", "zero-shot": "zero-shot",
          "oracle": "oracle", "random-own-class": "random own-class", "waffle": "WaffleCLIP-style"}


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


# The GIST question: does it beat FLYP-style, does matching help, how much of the possible gain it captures.
QUESTIONS = (("gist", "finetune-classname", "does GIST beat FLYP-style class names?"),
             ("gist", "random-own-class", "does matching help (vs random descriptions of the own class)?"),
             ("oracle", "gist", "how much of the possible gain does matching capture (oracle: the true attributes)?"))


def _at(shots) -> str:
    return "full shot" if str(shots) == "full" else f"{shots} shot{'s' if str(shots) != '1' else ''}"


def _shots_sorted(values) -> list:
    vals = list(dict.fromkeys(values))
    return [v for v in vals if str(v) == "full"] + sorted((v for v in vals if str(v) != "full"), key=lambda v: int(v))


def gist_question(comps: list[dict], level: float = 0.05) -> tuple[pd.DataFrame, list[str]]:
    """The GIST question, per shots setting, from ``metrics.json["comparisons"]`` rows: GIST vs FLYP-style,
    GIST vs random own-class descriptions (does matching help?), oracle vs GIST, each with the paired
    difference (points of test top-1), its 95% interval, ``p`` and the Holm-corrected ``p_holm``; and, where
    GIST, FLYP-style and the oracle all ran, the share of the oracle's gain over FLYP-style that GIST's
    gain captures (point estimates; only when that gain's interval is above zero).

    Returns ``(table, sentences)``: one table row per question answered; one sentence per row, whatever
    the sign, plus one per question that could not be answered, naming the method(s) that did not run.
    A difference "holds" when its Holm p is below ``level``.
    """
    rows, said = _gist_question(comps, level)
    return pd.DataFrame(rows), [s for s, _ in said]


def gist_answers(comps: list[dict], level: float = 0.05) -> tuple[list[str], int]:
    """:func:`gist_question`'s answered sentences and how many questions went unanswered (a method did not
    run): what a summary shows, where 04_evaluate names every unanswered question."""
    said = _gist_question(comps, level)[1]
    return [s for s, answered in said if answered], sum(not answered for _, answered in said)


def _gist_question(comps: list[dict], level: float) -> tuple[list[dict], list[tuple[str, bool]]]:
    """(table rows, [(sentence, answered)]): see :func:`gist_question`."""
    by = {(c["a"], c["b"], str(c["shots"])): c for c in comps}
    ran = {}
    for c in comps:
        ran.setdefault(str(c["shots"]), set()).update((c["a"], c["b"]))
    rows, sentences = [], []
    if not comps:
        return rows, [("no comparisons: no two methods were evaluated at the same shots setting", False)]
    for s in _shots_sorted(str(c["shots"]) for c in comps):
        for a, b, question in QUESTIONS:
            label = f"{LABELS[a]} − {LABELS[b]}"
            c = by.get((a, b, s))
            if c is None:
                missing = [m for m in (a, b) if m not in ran[s]]
                why = (f"{' and '.join(f'`{m}`' for m in missing)} did not run (or was not evaluated) at this shots setting"
                       if missing else "the two were not scored on the same draws")
                sentences.append((f"{_at(s)}, {question} {label}: not answered: {why}.", False))
                continue
            lo, hi = c["ci95"]
            ph = c.get("p_holm")
            holds = ph is not None and ph < level
            side = LABELS[a] if c["diff"] > 0 else LABELS[b] if c["diff"] < 0 else None
            verdict = ((f"{side} is ahead, and this holds after Holm correction" if holds else
                        f"{side} is ahead by the point estimate, but this does not hold after Holm correction")
                       if side else "no difference")
            p_holm = "Holm p n/a" if ph is None else f"Holm {_p(ph)}"
            rows.append({"shots": c["shots"], "question": question, "difference": label, "diff": round(c["diff"], 2),
                         "ci95_low": round(lo, 2), "ci95_high": round(hi, 2), "p": c["p"], "p_holm": ph,
                         "n_test": c["n_test"], "draws": len(c["seeds"])})
            sentences.append((f"{_at(s)}, {question} {label} = {c['diff']:+.1f} points [{lo:+.1f}, {hi:+.1f}], "
                              f"{_p(c['p'])}, {p_holm}: {verdict}.", True))
        share = _captured(by, s)
        if share:
            sentences.append((share, True))
    return rows, sentences


def _captured(by: dict, s: str) -> str | None:
    """The share of the oracle's gain over FLYP-style that GIST's gain over FLYP-style is (point estimates)."""
    gain, got = by.get(("oracle", "finetune-classname", s)), by.get(("gist", "finetune-classname", s))
    if gain is None or got is None:
        return None
    if gain["ci95"][0] <= 0:
        return (f"{_at(s)}: the oracle's gain over FLYP-style ({gain['diff']:+.1f} points [{gain['ci95'][0]:+.1f}, "
                f"{gain['ci95'][1]:+.1f}]) is not clear of zero, so the share of it GIST captures is not defined.")
    return (f"{_at(s)}: GIST's gain over FLYP-style is {100 * got['diff'] / gain['diff']:.0f}% of the oracle's "
            f"({got['diff']:+.1f} of {gain['diff']:+.1f} points, point estimates).")
