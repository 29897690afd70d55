"""GIST workbench: fine-grained classification with generated image-specific text.

The pipeline, one package per stage: pretrain (the synthetic benchmark's tiny CLIP) -> describe ->
match -> finetune -> evaluate -> align, over the lower layers ``data`` and ``clip`` and the
run-directory contract ``runs``. ARCHITECTURE.md in the repository is the module map.
"""
__version__ = "0.1.0"
