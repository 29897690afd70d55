"""Experiment tracking, optional (``workbench sweep --track mlflow``; ``pip install 'gist-workbench[track]'``):
each finished sweep member's settings, metrics and report files logged to MLflow, one MLflow run per member
in an experiment named after the sweep. The store is ``MLFLOW_TRACKING_URI`` when set, else a local
``./mlruns`` file store (MLflow's own default folder; ``mlflow ui`` started there shows it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .compare import flat_settings
from .runs import METRICS, PARAMS, read_metrics, read_params

TRACKERS = ("mlflow",)


class TrackingError(ValueError):
    """A tracker that cannot be used; the message says how to fix it."""


def member_metrics(metrics: dict) -> dict[str, float]:
    """``metrics.json`` as MLflow metrics: ``top1/<method>/<shots>/s<seed>`` (and ``val_top1/...``) per
    accuracy row, ``diff/<a>-vs-<b>/<shots>`` per comparison, ``timing/<stage>_s``."""
    out = {}
    for r in metrics.get("accuracy", []):
        key = f"{r['method']}/{r['shots']}/s{r.get('seed')}"
        out[f"top1/{key}"] = float(r["top1"])
        if r.get("val_top1") is not None:
            out[f"val_top1/{key}"] = float(r["val_top1"])
    for c in metrics.get("comparisons", []):
        out[f"diff/{c['a']}-vs-{c['b']}/{c['shots']}"] = float(c["diff"])
    for k, v in (metrics.get("timing") or {}).items():
        if isinstance(v, (int, float)):
            out[f"timing/{k}"] = float(v)
    return out


class MlflowTracker:
    def __init__(self, experiment: str):
        try:
            from mlflow.tracking import MlflowClient
        except (ImportError, TypeError):  # TypeError: a module blocked as None
            raise TrackingError("--track mlflow needs MLflow: pip install 'gist-workbench[track]' "
                                "(or pip install mlflow)") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (Path.cwd() / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks before using a file store
        self.uri = uri
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def log_member(self, run_dir: Path, member: str, sweep: str, settings: dict, state: str,
                   error: str | None = None) -> str:
        """One MLflow run for the member: its resolved parameters, metrics and report files; returns its id."""
        from mlflow.entities import Metric, Param, RunTag

        run = self.client.create_run(self.experiment_id, run_name=member, tags={
            "workbench.sweep": sweep, "workbench.member": member, "workbench.state": state,
            "workbench.run_dir": str(run_dir)})
        rid = run.info.run_id
        params, header = read_params(run_dir)
        flat = {**flat_settings(params), **{f"grid.{k}": v for k, v in settings.items()}}
        ps = [Param(k[:250], json.dumps(v, default=str)[:6000] if not isinstance(v, str) else v[:6000])
              for k, v in flat.items()]
        ms = [Metric(k, v, 0, 0) for k, v in member_metrics(read_metrics(run_dir)).items()]
        tags = [RunTag(f"workbench.{k}", str(v)) for k, v in header.items()]
        if error:
            tags.append(RunTag("workbench.error", error[:5000]))
        for i in range(0, max(len(ps), len(ms), 1), 100):  # MLflow's batch limits
            self.client.log_batch(rid, metrics=ms[i:i + 100], params=ps[i:i + 100], tags=tags if i == 0 else [])
        for name in (METRICS, PARAMS):
            if (run_dir / name).is_file():
                self.client.log_artifact(rid, str(run_dir / name))
        for html in sorted(run_dir.glob("[0-9][0-9]_*.html")):
            self.client.log_artifact(rid, str(html), "reports")
        if (run_dir / "figures").is_dir():
            self.client.log_artifacts(rid, str(run_dir / "figures"), "figures")
        self.client.set_terminated(rid, status="FINISHED" if state == "done" else "FAILED")
        return rid


def make_tracker(kind: str | None, experiment: str):
    if kind is None:
        return None
    if kind not in TRACKERS:
        raise TrackingError(f"--track {kind}: unknown tracker; known: {list(TRACKERS)}")
    return MlflowTracker(experiment)
