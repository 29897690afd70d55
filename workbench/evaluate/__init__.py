"""Evaluation: linear probes (L-BFGS, weight-decay sweep), zero-shot (prompt ensembles, descriptions),
few-shot draws over seeds, bootstrap intervals, and the methods x shots comparison.

Modules: ``probe`` (probes), ``zeroshot``, ``bootstrap``, ``features`` (cached image features, draws),
``compare`` (accuracy rows), ``report`` (tables), ``plots`` (figures).
"""
from .bootstrap import bootstrap_ci, seed_summary
from .compare import (
    FINETUNED, METHODS, finetuned_rows, probe_draw, probe_rows, read_checkpoint_index, zero_shot_rows,
)
from .features import Draw, check_draws, image_features, load_shot_file, make_draw, parse_shots, rows_in
from .probe import DEFAULT_WEIGHT_DECAYS, ProbeResult, fit_logreg, linear_probe, reference_probe, topk_correct
from .report import accuracy_table, runs_table
from .zeroshot import (
    TEMPLATES, classname_classifier, classname_scores, description_scores, description_texts, load_descriptions,
)

__all__ = [
    "DEFAULT_WEIGHT_DECAYS", "Draw", "FINETUNED", "METHODS", "ProbeResult", "TEMPLATES", "accuracy_table",
    "bootstrap_ci", "check_draws", "classname_classifier", "classname_scores", "description_scores", "description_texts",
    "finetuned_rows", "fit_logreg", "image_features", "linear_probe", "load_descriptions", "load_shot_file",
    "make_draw", "parse_shots", "probe_draw", "probe_rows", "read_checkpoint_index", "reference_probe",
    "rows_in", "runs_table", "seed_summary", "topk_correct", "zero_shot_rows",
]
