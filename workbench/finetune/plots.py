"""What notebook 03_finetune shows: the chosen checkpoints against the starting weights, and the
training and validation curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ..plots import save_figure
from ..runs import FINETUNE_METHODS as METHODS
from ..runs import read_index, read_train_log, run_name


def summary_table(run_dir: str | Path):
    """One row per run: the chosen epoch, its validation top-1 and the starting weights' (epoch 0)."""
    index = read_index(run_dir)
    log = read_train_log(run_dir)
    start = {r["run"]: r for r in log if r.get("epoch") == 0 and "val_top1" in r}
    rows = []
    for r in index:
        name = run_name(r["method"], r["shots"], r["seed"])
        s0 = start.get(name, {})
        rows.append({"run": name, "method": r["method"], "shots": str(r["shots"]), "seed": r["seed"],
                     "epoch": r["epoch"], "val_top1": r["val_top1"], "start_val_top1": s0.get("val_top1"),
                     "val_zeroshot_top1": next((x.get("val_zeroshot_top1") for x in log if x["run"] == name
                                                and x.get("epoch") == r["epoch"] and "val_top1" in x), None),
                     "start_val_zeroshot_top1": s0.get("val_zeroshot_top1"), "path": r["path"]})
    df = pd.DataFrame(rows)
    if len(df):
        df["gain"] = df["val_top1"] - df["start_val_top1"]
    return df


def plot_training(run_dir: str | Path, runs: list[str] | None = None, path: str | Path | None = None):
    """Training loss per step and validation top-1 per epoch (0 = before fine-tuning), one line per
    run: colour by method, full-shot runs bold. Saved to ``path`` when given; returns the figure."""
    rows = read_train_log(run_dir)
    names = runs or list(dict.fromkeys(r["run"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        method = next((m for m in METHODS if name.startswith(m + "-")), None)
        full = "-full-" in name
        style = dict(color=colors.get(method, "k"), lw=1.8 if full else 0.7, alpha=1.0 if full else 0.6)
        tr = [r for r in rows if r["run"] == name and "loss" in r]
        va = [r for r in rows if r["run"] == name and "val_top1" in r]
        if tr:
            ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=name if full else None, **style)
        if va:
            ax2.plot([r["epoch"] for r in va], [r["val_top1"] for r in va], marker="o", ms=3,
                     label=name if full else None, **style)
    ax1.set(xlabel="step", ylabel="training loss", title="training loss (bold: full-shot)")
    ax2.set(xlabel="epoch (0 = before fine-tuning)", ylabel="val top-1 % (ridge probe)", title="validation")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
