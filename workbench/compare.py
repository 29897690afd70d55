"""Comparing runs (a sweep's members, or any run folders): one accuracy table with the settings that differ
as columns, the best setting per method and shots chosen on validation, paired comparisons between runs on
the same test images (Holm-corrected), and accuracy against each swept setting. ``workbench compare``
executes ``notebooks/06_compare.ipynb`` with these; the notebook only calls them.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .runs import METRICS, OUTCOMES, read_metrics, read_outcomes, read_params
from .stats import bootstrap_ci, holm, paired_difference

COMPARE_NOTEBOOK = "06_compare.ipynb"
# settings that say where a run is or how it showed itself, not what it computed
NOT_SETTINGS = ("progress", "interactive", "device", "stages")


class CompareError(ValueError):
    """Runs that cannot be compared as asked; the message names them."""


@dataclass
class RunData:
    name: str  # "sweep/member" or the folder's name
    path: Path
    settings: dict  # flattened params.yaml: "finetune.lr" -> value
    metrics: dict
    outcomes: dict | None  # test_outcomes.json, None for runs evaluated before it existed


def run_folders(paths) -> list[Path]:
    """Each path that is a run folder (it has ``metrics.json``), and the run folders one level below each
    other path (a sweep's members), in order; an error names a path that holds none."""
    out = []
    for p in map(Path, paths):
        if (p / METRICS).is_file():
            out.append(p.resolve())
            continue
        kids = sorted(q.resolve() for q in p.iterdir() if (q / METRICS).is_file()) if p.is_dir() else []
        if not kids:
            raise CompareError(f"{p}: not a run folder (no {METRICS}) and no run folders in it")
        out += kids
    return list(dict.fromkeys(out))


def flat_settings(d: dict, prefix: str = "") -> dict:
    """``params.yaml`` as ``{"finetune.lr": value}`` (dict-valued settings such as ``dataset_options`` kept whole)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("dataset_options", "shot_files"):
            out |= flat_settings(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_runs(paths) -> list[RunData]:
    folders = run_folders(paths)
    names = [f.name for f in folders]
    if len(set(names)) < len(names):  # members of two sweeps share names: say which sweep
        names = [f"{f.parent.name}/{f.name}" for f in folders]
    runs = []
    for name, f in zip(names, folders):
        params, _ = read_params(f)
        outcomes = read_outcomes(f) if (f / OUTCOMES).is_file() else None
        runs.append(RunData(name, f, flat_settings(params), read_metrics(f), outcomes))
    return runs


def differing_settings(runs: list[RunData]) -> list[str]:
    """The settings whose values are not the same in every run, in the order they first appear."""
    keys = list(dict.fromkeys(k for r in runs for k in r.settings if k.rsplit(".", 1)[-1] not in NOT_SETTINGS))

    def text(r, k):
        return json.dumps(r.settings.get(k), sort_keys=True, default=str)

    return [k for k in keys if len({text(r, k) for r in runs}) > 1]


def _cell(v):
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def accuracy_table(runs: list[RunData]) -> pd.DataFrame:
    """One row per run x method x shots x seed: the differing settings, top-1 (test), its interval, and the
    validation top-1 the best setting is chosen by."""
    cols = differing_settings(runs)
    rows = []
    for r in runs:
        for a in r.metrics.get("accuracy", []):
            ci = a.get("ci95") or [np.nan, np.nan]
            rows.append({"run": r.name, **{c: _cell(r.settings.get(c)) for c in cols}, "method": a["method"],
                         "shots": str(a["shots"]), "seed": a.get("seed"), "top1": a["top1"], "ci_lo": ci[0],
                         "ci_hi": ci[1], "val_top1": a.get("val_top1"), "n_test": a.get("n_test"),
                         "warning": "yes" if a.get("warning") else ""})
    if not rows:
        raise CompareError("none of the runs has accuracy rows: run their evaluate stage first")
    return pd.DataFrame(rows)


def best_on_validation(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and shots, the run whose mean validation top-1 over seeds is highest (ties: the first
    listed), with its test top-1: the setting a user would pick without looking at test."""
    out = []
    for (method, shots), g in table.groupby(["method", "shots"], sort=False):
        per = g.groupby("run", sort=False).agg(val=("val_top1", "mean"), test=("top1", "mean"), seeds=("seed", "count"))
        if per["val"].isna().all():
            out.append({"method": method, "shots": shots, "best_run": None, "val_top1": None, "test_top1": None,
                        "runs": len(per), "note": "no validation score (zero-shot): nothing to choose"})
            continue
        best = per["val"].idxmax()
        out.append({"method": method, "shots": shots, "best_run": best, "val_top1": round(per.loc[best, "val"], 2),
                    "test_top1": round(per.loc[best, "test"], 2), "runs": len(per), "note": ""})
    return pd.DataFrame(out)


def _outcomes(run: RunData) -> dict:
    return {(o["method"], str(o["shots"]), o["seed"]): o["correct"] for o in run.outcomes["rows"]}


def _identities(run: RunData) -> dict:
    return {(o["method"], str(o["shots"]), o["seed"]): o.get("identity") for o in run.outcomes["rows"]}


def check_same_test(runs: list[RunData]) -> None:
    """Paired comparisons need the same test images in every run: refuse, naming the runs, when not."""
    missing = [r.name for r in runs if r.outcomes is None]
    if missing:
        raise CompareError(f"no per-image test outcomes ({OUTCOMES}) in {', '.join(missing)}: rerun their evaluate "
                           "stage to compare them image by image")
    ref = runs[0]
    for r in runs[1:]:
        if r.outcomes["test"] != ref.outcomes["test"]:
            a, b = ref.outcomes["test"], r.outcomes["test"]
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise CompareError(f"runs {ref.name} and {r.name} were scored on different test images ({len(a)} vs "
                               f"{len(b)} images, first difference at position {first}): they cannot be compared "
                               "pairwise; compare runs of one dataset and split")


def paired_runs(runs: list[RunData], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every pair of runs, for each method and shots both evaluated: the difference in top-1 (first minus
    second) on the same test images and the seeds both ran, its 95% interval and p (the evaluate stage's
    paired statistics), and p after Holm's correction over all rows of this table. A method whose rows have
    the same identity in both runs (the same computation: a zero-shot or a probe the swept setting does not
    reach) is not compared: its difference is 0 by construction and would only dilute the correction."""
    if len(runs) < 2:
        return pd.DataFrame(columns=["a", "b", "method", "shots", "diff", "ci_lo", "ci_hi", "p", "p_holm", "seeds", "n_test"])
    check_same_test(runs)
    out = []
    for ra, rb in itertools.combinations(runs, 2):
        oa, ob = _outcomes(ra), _outcomes(rb)
        ia, ib = _identities(ra), _identities(rb)
        for method, shots in dict.fromkeys((m, s) for m, s, _ in oa):
            seeds = sorted({sd for m, s, sd in oa if (m, s) == (method, shots)} &
                           {sd for m, s, sd in ob if (m, s) == (method, shots)}, key=str)
            if not seeds or all(ia[(method, shots, sd)] is not None and ia[(method, shots, sd)] == ib[(method, shots, sd)]
                                for sd in seeds):
                continue
            xa = np.stack([oa[(method, shots, sd)] for sd in seeds])
            xb = np.stack([ob[(method, shots, sd)] for sd in seeds])
            r = paired_difference(xa, xb, n_boot=n_boot, seed=seed)
            out.append({"a": ra.name, "b": rb.name, "method": method, "shots": shots, "diff": r["diff"],
                        "ci_lo": r["ci95"][0], "ci_hi": r["ci95"][1], "p": r["p"], "seeds": len(seeds),
                        "n_test": r["n_test"]})
    table = pd.DataFrame(out)
    if len(table):
        table["p_holm"] = holm(table["p"].to_numpy())
        table = table[["a", "b", "method", "shots", "diff", "ci_lo", "ci_hi", "p", "p_holm", "seeds", "n_test"]]
    return table


def accuracy_by_setting(runs: list[RunData], setting: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per run, method and shots: the setting's value, top-1 averaged over seeds and its 95% bootstrap
    interval over test images (of the seed-mean correctness; the rows' own intervals without outcomes)."""
    rows = []
    for r in runs:
        value = r.settings.get(setting)
        groups: dict[tuple, list] = {}
        for a in r.metrics.get("accuracy", []):
            groups.setdefault((a["method"], str(a["shots"])), []).append(a)
        outs = _outcomes(r) if r.outcomes else {}
        for (method, shots), acc in groups.items():
            got = [outs[(method, shots, a.get("seed"))] for a in acc if (method, shots, a.get("seed")) in outs]
            if got:
                b = bootstrap_ci(np.stack(got).mean(0), n_boot=n_boot, seed=seed)
                mean, lo, hi = float(b["mean"]), *map(float, b["ci95"])
            else:
                mean = float(np.mean([a["top1"] for a in acc]))
                lo, hi = (float(np.mean([a["ci95"][i] for a in acc])) for i in (0, 1))
            rows.append({"run": r.name, "value": _cell(value), "method": method, "shots": shots, "top1": mean,
                         "ci_lo": lo, "ci_hi": hi})
    return pd.DataFrame(rows)


def plot_by_setting(runs: list[RunData], settings: list[str], path: str | Path | None = None):
    """Top-1 against each swept setting (one panel each; a line per method and shots, 95% intervals)."""
    import matplotlib.pyplot as plt

    from .plots import save_figure

    n = max(len(settings), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    for ax, setting in zip(axes[0], settings or [None]):
        if setting is None:
            ax.text(0.5, 0.5, "one setting only: nothing swept", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        t = accuracy_by_setting(runs, setting)
        values = list(dict.fromkeys(t["value"].map(str)))
        numeric = all(_is_number(v) for v in values)
        order = sorted(values, key=float) if numeric else values
        for (method, shots), g in t.groupby(["method", "shots"], sort=False):
            g = g.groupby(g["value"].map(str)).agg(top1=("top1", "mean"), lo=("ci_lo", "mean"), hi=("ci_hi", "mean"))
            g = g.reindex([v for v in order if v in g.index])
            x = [float(v) for v in g.index] if numeric else [order.index(v) for v in g.index]
            ax.errorbar(x, g["top1"], yerr=[g["top1"] - g["lo"], g["hi"] - g["top1"]], marker="o", capsize=3,
                        label=f"{method} ({shots})")
        if numeric and len(order) > 2 and min(map(float, order)) > 0 and max(map(float, order)) / min(map(float, order)) > 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(order)), order, rotation=20)
        ax.set_xlabel(setting)
        ax.set_ylabel("test top-1 (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def _is_number(v: str) -> bool:
    try:
        float(v)
        return v not in ("True", "False")
    except ValueError:
        return False
