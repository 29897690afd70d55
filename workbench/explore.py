"""A finished run folder as one object: ``run = open_run("reports/demo")``.

``run.accuracy`` is the evaluation table, ``run.load_model("gist", "full", 0)`` a fine-tuned CLIP, and
``run`` alone, in JupyterLab, a one-screen summary. Opening reads nothing: each attribute reads its file
when first asked for (through the readers of :mod:`workbench.runs`) and keeps it; models load only in
:meth:`Run.load_model` and :meth:`Run.explore`. A missing file is an error that names it and the stage
that writes it.
"""
from __future__ import annotations

import html
from functools import cached_property
from pathlib import Path

import pandas as pd

from . import config as C
from .params import Params
from .runs import (
    DESCRIPTIONS,
    INDEX,
    MATCHES,
    METRICS,
    PARAMS,
    read_descriptions,
    read_index,
    read_matches,
    read_metrics,
    read_params,
)

# What writes each file of a run folder, or each section of metrics.json: its stage (None: `workbench run`).
WRITTEN_BY = {PARAMS: None, DESCRIPTIONS: "describe", MATCHES: "match", INDEX: "finetune",
              "accuracy": "evaluate", "comparisons": "evaluate", "figures": None}
# The first columns of the tables, in this order (metrics.json's rows carry more).
ACCURACY_COLUMNS = ["method", "shots", "seed", "top1", "ci95", "top3"]
COMPARISON_COLUMNS = ["a", "b", "shots", "diff", "ci95", "p", "p_holm", "n_test", "seeds"]
CHECKPOINT_COLUMNS = ["method", "shots", "seed", "path", "abspath", "model", "pretrained", "epoch", "val_top1",
                      "identity_digest", "identity"]


class RunFileMissing(FileNotFoundError):
    """A file (or metrics.json section) of the run folder is not there; the message names its writer."""


class NoSuchCheckpoint(LookupError):
    """The index has no checkpoint of that method, shots and seed; the message lists those it has."""


def open_run(path: str | Path) -> Run:
    """The run folder at ``path`` (``reports/<name>``) as a :class:`Run`; reads nothing yet."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise RunFileMissing(f"{path} is not a run folder (no such directory): `workbench run <preset> --name "
                             f"{path.name}` writes one under reports/")
    return Run(path)


class Run:
    """One run folder. Tables are pandas DataFrames, read on first use; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.resolve().name

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------------- files
    def missing(self, what: str, file: str | None = None) -> RunFileMissing:
        """The error for a missing file or metrics.json section ``what``: names it and what writes it."""
        stage = WRITTEN_BY.get(what)
        where = self.path / (file or what)
        how = (f"the {stage} stage writes it (workbench run <preset or config> --name {self.name} --stages {stage})"
               if stage else f"`workbench run <preset or config> --name {self.name}` writes it")
        if file:
            return RunFileMissing(f"{where} has no {what!r} section: {how}")
        return RunFileMissing(f"{where} is missing: {how}")

    def _need(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise self.missing(name)
        return path

    @cached_property
    def params(self) -> dict:
        """The resolved configuration the run used (``params.yaml``, as ``workbench run`` wrote it)."""
        self._need(PARAMS)
        return read_params(self.path)[0]

    @cached_property
    def provenance(self) -> dict:
        """``{version, commit, created}`` from ``params.yaml``'s first line ({} when it has none)."""
        self._need(PARAMS)
        return read_params(self.path)[1]

    @cached_property
    def metrics(self) -> dict:
        """``metrics.json``, every section, as the stages wrote it."""
        if not (self.path / METRICS).is_file():
            raise RunFileMissing(f"{self.path / METRICS} is missing: every stage adds its section to it "
                                 f"(workbench run <preset or config> --name {self.name})")
        return read_metrics(self.path)

    def _section(self, name: str, columns: list[str]) -> pd.DataFrame:
        rows = self.metrics.get(name)
        if not rows:
            raise self.missing(name, METRICS)
        df = pd.DataFrame(rows)
        first = [c for c in columns if c in df.columns]
        return df[first + [c for c in df.columns if c not in first]]

    @cached_property
    def accuracy(self) -> pd.DataFrame:
        """``metrics.json["accuracy"]``: one row per method, shots and seed (top-1, its ci95, top-3, ... in %)."""
        return self._section("accuracy", ACCURACY_COLUMNS)

    @cached_property
    def comparisons(self) -> pd.DataFrame:
        """``metrics.json["comparisons"]``: paired differences a − b in top-1 points, their ci95 and p."""
        return self._section("comparisons", COMPARISON_COLUMNS)

    @cached_property
    def matches(self) -> pd.DataFrame:
        """``matches.jsonl``: one row per training image (its class, matched captions, scores, the model)."""
        return pd.DataFrame(read_matches(self._need(MATCHES)))

    @cached_property
    def descriptions(self) -> pd.DataFrame:
        """``descriptions.jsonl``: one row per description (id, class, text, backend, model, prompt, ...)."""
        return pd.DataFrame(read_descriptions(self._need(DESCRIPTIONS)))

    @cached_property
    def checkpoints(self) -> pd.DataFrame:
        """``checkpoints/index.json``: one row per fine-tuned checkpoint, with its path (``abspath``
        resolved), model and run identity (``identity``, and its ``identity_digest``)."""
        self._need(INDEX)
        df = pd.DataFrame(read_index(self.path))
        first = [c for c in CHECKPOINT_COLUMNS if c in df.columns]
        return df[first + [c for c in df.columns if c not in first]]

    @property
    def figures(self) -> list[Path]:
        """The saved figures (``figures/*.png``), by name."""
        folder = self.path / "figures"
        if not folder.is_dir():
            raise self.missing("figures")
        return sorted(folder.glob("*.png"))

    @property
    def reports(self) -> dict[str, Path]:
        """Stage -> its executed notebook's HTML report (``NN_<stage>.html``), for the stages that ran."""
        return {p.stem.split("_", 1)[1]: p for p in sorted(self.path.glob("[0-9][0-9]_*.html"))}

    # ------------------------------------------------------------------------- models and explorers
    def checkpoint(self, method: str, shots="full", seed: int = 0) -> dict:
        """The index entry of one fine-tuned checkpoint; :class:`NoSuchCheckpoint` lists those there are."""
        df = self.checkpoints
        hit = df[(df["method"] == method) & (df["shots"].astype(str) == str(shots)) & (df["seed"] == int(seed))]
        if hit.empty:
            have = ", ".join(f"{m}/{k}/s{s}" for m, k, s in zip(df["method"], df["shots"], df["seed"]))
            raise NoSuchCheckpoint(f"{self.path / INDEX} has no checkpoint method={method!r} shots={shots!r} seed={seed}; "
                           f"it has (method/shots/seed): {have}")
        return hit.iloc[0].to_dict()

    def load_model(self, method: str, shots="full", seed: int = 0, device="auto"):
        """The CLIP of one fine-tuned checkpoint (a bundle: model, preprocess, tokenizer), loaded as the
        evaluate stage loads it, ready for :mod:`workbench.clip` and :mod:`workbench.align`."""
        from .evaluate import load_checkpoint  # torch and open_clip: loaded when a model is asked for

        return load_checkpoint(self.checkpoint(method, shots, seed), device=device)

    def stage_params(self, stage: str, **overrides) -> Params:
        """A stage's parameters as this run gave them (``params.yaml``), its ``run_dir`` this folder."""
        schema = C.load_schema()
        given = C.stage_parameters(self.params, stage, schema)
        return C.stage_params(stage, **{**given, "run_dir": str(self.path.resolve()), **overrides})

    def explore(self, max_images: int | None = 40, device: str = "auto"):
        """The match browser and the alignment explorer of this run, one under the other (ipywidgets).
        The explorer loads the run's pretrained and fine-tuned models and up to ``max_images`` of the
        pointing game's images."""
        import ipywidgets as W  # optional UI dependency: loaded only when a widget is built

        from .align import stage as align_stage
        from .data import load_dataset
        from .match.widgets import match_browser

        p = self.stage_params("align", device=device, progress=False,
                              **({"max_images": max_images} if max_images is not None else {}))
        ds = load_dataset(p.dataset, p.data_root, **p.dataset_options)
        browser = match_browser(self.matches.to_dict("records"), ds.root)
        with W.Output():  # the explorer displays itself; here it is shown inside the box below instead
            aligner = align_stage.explorer(align_stage.prepare(p))
        return W.VBox([W.HTML("<h4>Matches</h4>"), browser, W.HTML("<h4>Word-patch alignment</h4>"), aligner])

    # ------------------------------------------------------------------------- the summary
    def _repr_html_(self) -> str:
        """One screen: where and when the run was made, what it holds, its accuracy table."""
        from .evaluate import accuracy_table  # pandas only, but with the evaluate package

        e = html.escape
        parts = [f"<h3>Run <code>{e(self.name)}</code></h3><p><code>{e(str(self.path))}</code>"]
        if (self.path / PARAMS).is_file():
            pv, cfg = self.provenance, self.params
            parts.append(f"<br>made {e(str(pv.get('created', '?')))} by workbench {e(str(pv.get('version', '?')))}, "
                         f"commit {e(str(pv.get('commit', '?'))[:12])}; dataset <code>{e(str(cfg.get('dataset')))}"
                         f"</code>, seed {e(str(cfg.get('seed')))}")
        parts.append("</p><p>" + " · ".join(self._holdings()) + "</p>")
        m = self.metrics if (self.path / METRICS).is_file() else {}
        if m.get("accuracy"):
            parts.append("<p>Top-1 (%) on the test split (<code>run.accuracy</code> has every row):</p>"
                         + accuracy_table(m["accuracy"], "top1").to_html())
        warned = [r.get("run", "?") for r in (m.get("finetune") or {}).get("runs", []) if r.get("warning")]
        if warned:
            parts.append(f"<p><b>Warning:</b> {len(warned)} fine-tuning run(s) collapsed or stayed unmoved: "
                         f"{e(', '.join(warned))}</p>")
        if self.reports:
            parts.append("<p>Reports: " + ", ".join(f"<a href='{e(str(p))}'>{e(s)}</a>"
                                                    for s, p in self.reports.items()) + "</p>")
        return "\n".join(parts)

    def _holdings(self) -> list[str]:
        """What the folder holds, by file, cheaply (sizes and counts of small files only)."""
        out = []
        for label, name in (("descriptions", DESCRIPTIONS), ("matches", MATCHES)):
            f = self.path / name
            out.append(f"{label}: {f.stat().st_size / 1e6:.1f} MB" if f.is_file() else f"{label}: none")
        try:
            index = read_index(self.path, required=False)
            out.append(f"checkpoints: {len(index)}" if index is not None else "checkpoints: none")
        except ValueError as err:  # a summary shows what is wrong rather than failing
            out.append(f"checkpoints: {html.escape(str(err))}")
        figures = self.path / "figures"
        out.append(f"figures: {len(list(figures.glob('*.png')))}" if figures.is_dir() else "figures: none")
        return out
