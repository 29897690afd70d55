"""GIST workbench: fine-grained classification with generated image-specific text.

The pipeline, one package per stage: pretrain (the synthetic benchmark's tiny CLIP) -> describe ->
match -> finetune -> evaluate -> align, over the lower layers ``data`` and ``clip`` and the
run-directory contract ``runs``. ARCHITECTURE.md in the repository is the module map.
A finished run: ``from workbench import open_run; run = open_run("reports/demo"); run.accuracy``.
"""
__version__ = "0.1.0"
__all__ = ["Run", "open_run"]


def __getattr__(name: str):
    # ``import workbench`` stays light (no pandas, papermill): the run explorer loads when first named
    if name in ("Run", "open_run"):
        from . import explore

        return getattr(explore, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
