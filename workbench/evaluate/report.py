"""Tables of the accuracy rows: the methods x shots comparison and the per-run listing."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .compare import METHODS


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


def _shots_order(rows) -> list[str]:
    vals = {str(r["shots"]) for r in rows}
    return (["full"] if "full" in vals else []) + sorted((v for v in vals if v != "full"), key=int)


def _method_order(rows) -> list[str]:
    present = {r["method"] for r in rows}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def accuracy_table(rows: list[dict], metric: str = "top1") -> pd.DataFrame:
    """Methods x shots, each cell a string.

    Several seeds: ``mean ± std (n=…)`` (sample std over seeds). One run: ``value [lo, hi]`` with
    its 95% bootstrap interval (top-1 only). Zero-shot cells read ``value (0-shot)``; ``—`` = not run.
    A cell with fine-tuning runs that collapsed or kept their starting weights (``warning``, see
    :func:`workbench.finetune.run_warnings`) ends in ``†k`` (k of its runs).
    """
    shots, methods = _shots_order(rows), _method_order(rows)
    table = pd.DataFrame("—", index=pd.Index(methods, name="method"), columns=pd.Index(shots, name="shots"))
    for s in seed_summary(rows):
        mean, std = s[f"{metric}_mean"], s[f"{metric}_std"]
        if s["zero_shot"]:
            cell = f"{mean:.1f} (0-shot)"
        elif s["n"] > 1:
            cell = f"{mean:.1f} ± {std:.1f} (n={s['n']})"
        elif metric == "top1" and s.get("ci95"):
            lo, hi = s["ci95"]
            cell = f"{mean:.1f} [{lo:.1f}, {hi:.1f}]"
        else:
            cell = f"{mean:.1f}"
        table.loc[s["method"], str(s["shots"])] = cell + (f" †{s['warned']}" if s.get("warned") else "")
    return table


def runs_table(rows: list[dict]) -> pd.DataFrame:
    """One line per row (method, shots, seed) with top-1/top-3, intervals and probe details."""
    order = {m: i for i, m in enumerate(_method_order(rows))}
    shots = {s: i for i, s in enumerate(_shots_order(rows))}
    out = []
    for r in sorted(rows, key=lambda r: (order[r["method"]], shots[str(r["shots"])], r.get("seed") or 0)):
        d = {"method": r["method"], "shots": str(r["shots"]), "seed": r.get("seed"), "top1": round(r["top1"], 2),
             "top1 95% CI": "[{:.1f}, {:.1f}]".format(*r["ci95"]) if r.get("ci95") else "", "top3": round(r["top3"], 2)}
        if r.get("val_policy") and not r.get("zero_shot"):  # what chose the weight decay (and the epoch)
            d["val"] = f"{r['val_policy']} ({r['n_val']})" if r.get("n_val") is not None else r["val_policy"]
        for k in ("n_train", "weight_decay", "val_top1", "desc_top1"):
            if r.get(k) is not None:
                d[k] = round(r[k], 2) if k.endswith("top1") else r[k]
        if r.get("warning"):  # the kinds only; the sentence is in metrics.json and the note above the table
            d["warning"] = ", ".join(k for k in ("collapsed", "unmoved") if f"{k}:" in r["warning"])
        out.append(d)
    return pd.DataFrame(out)


def val_note(rows: list[dict]) -> str:
    """One sentence on what the k-shot rows chose their weight decay and checkpoints on (``val_policy``)."""
    k = [r for r in rows if str(r.get("shots")) != "full" and not r.get("zero_shot") and r.get("val_policy")]
    if not k:
        return ""
    policies = sorted({r["val_policy"] for r in k})
    n_val = sorted({r["n_val"] for r in k if r.get("n_val") is not None})
    what = {"full": "the whole validation split (val_policy=full, GIST's protocol)",
            "k_shot": "at most k validation images per class, drawn like the training images (val_policy=k_shot)"}
    return ("k-shot figures chose the probe's weight decay and the fine-tuned checkpoints on "
            + " and ".join(what.get(p, p) for p in policies)
            + (f": {', '.join(map(str, n_val))} validation images." if n_val else "."))
