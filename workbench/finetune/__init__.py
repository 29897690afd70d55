"""Fine-tuning stage: contrastive training of CLIP on (image, caption) pairs.

Modules: ``config`` (one run's settings), ``trainer`` (the one training loop, shared with pretraining),
``losses`` (CLIP, class-aware, multi-positive, FILIP), ``augment`` (crops on the device),
``checkpoint``, ``attention`` (GPU kernel choice), ``validate`` (checkpoint selection on val),
``plots``, ``stage`` (what
notebook 03_finetune calls), ``__main__`` (``torchrun -m workbench.finetune``).
"""
from ..runs import run_name, run_warnings, unmoved_counts, warnings_note  # noqa: F401  (stored in the run folder: runs.py)
from . import sources  # noqa: F401  (the control methods' caption sources)
from .config import ATTENTION, METHODS, FinetuneConfig
from .plots import plot_training, summary_table
from .stage import CLASSNAME_TEMPLATE, build_pairs, finetune_all, plan_runs, planned_runs, run, train_options
from .trainer import NonFiniteLossError, Trainer, TrainStep, compute_loss, lr_at, train_run
from .validate import ZEROSHOT_TEMPLATES, validate

__all__ = [
    "ATTENTION", "CLASSNAME_TEMPLATE", "METHODS", "ZEROSHOT_TEMPLATES", "FinetuneConfig", "NonFiniteLossError",
    "TrainStep", "Trainer", "build_pairs", "compute_loss", "finetune_all", "lr_at", "plan_runs", "planned_runs",
    "plot_training",
    "run", "run_name", "run_warnings", "summary_table", "train_options", "train_run", "unmoved_counts", "validate",
    "warnings_note",
]
