"""Evaluation: linear probes (L-BFGS, weight-decay sweep), zero-shot (prompt ensembles, descriptions),
few-shot draws over seeds, bootstrap intervals, and the methods x shots comparison.

Modules: ``probe`` (probes), ``zeroshot``, ``draws`` (dataset features, training-set draws), ``compare``
(accuracy rows), ``paired`` (paired comparisons of methods), ``report`` (tables, mean ± std over seeds),
``plots`` (figures), ``stage`` (what notebook 04_evaluate calls). The statistics (bootstrap intervals,
paired differences, p-values) live in :mod:`workbench.stats`; ``bootstrap_ci``, ``paired_difference`` and
``sign_flip_p`` are re-exported here.
"""
from ..stats import bootstrap_ci, paired_difference, sign_flip_p
from .compare import FINETUNED, METHODS, finetuned_rows, load_checkpoint, probe_draw, probe_rows, zero_shot_rows
from .draws import Draw, check_draws, dataset_features, make_draw, rows_in
from .paired import PAIRS, comparisons, findings, gist_answers, gist_question
from .probe import DEFAULT_WEIGHT_DECAYS, ProbeResult, fit_logreg, linear_probe, reference_probe, topk_correct
from .report import accuracy_table, runs_table, seed_summary, val_note
from .stage import Setup, compare, frozen_rows, prepare, record, tuned_rows
from .zeroshot import (
    TEMPLATES,
    classname_classifier,
    classname_scores,
    description_scores,
    description_texts,
    load_descriptions,
)

__all__ = [
    "DEFAULT_WEIGHT_DECAYS", "Draw", "FINETUNED", "METHODS", "PAIRS", "ProbeResult", "Setup", "TEMPLATES",
    "accuracy_table", "bootstrap_ci", "check_draws", "classname_classifier", "classname_scores", "compare",
    "comparisons", "dataset_features", "findings", "gist_answers", "gist_question", "paired_difference", "sign_flip_p",
    "description_scores", "description_texts", "finetuned_rows", "fit_logreg", "frozen_rows", "linear_probe",
    "load_checkpoint", "load_descriptions", "make_draw", "prepare", "probe_draw", "probe_rows", "record", "reference_probe", "rows_in",
    "runs_table", "seed_summary", "topk_correct", "tuned_rows", "val_note", "zero_shot_rows",
]
