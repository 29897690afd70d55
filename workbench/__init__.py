"""GIST workbench: fine-grained classification with generated image-specific text.

Pipeline stages, one module each: describe -> match -> finetune -> evaluate -> align.
"""
__version__ = "0.1.0"
