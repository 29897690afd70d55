"""The tiny CLIP pretrained on the synthetic benchmark: a stand-in for web-pretrained CLIP that knows
parts and colours but no species name.

Modules: ``captions`` (attribute captions and their truth table), ``recipe`` (the recipe, trained by
fine-tuning's ``TrainStep``; the cached checkpoint), ``evaluate`` (zero-shot figures), ``stage``
(what notebook 00_pretrain calls).
"""
from .captions import attribute_caption, attribute_prompts, caption_vocabulary, truth_table
from .evaluate import evaluate_pretrained, plot_zero_shot
from .recipe import (
    ARCH,
    DEFAULTS,
    PRETRAIN_VERSION,
    checkpoint_info,
    checkpoint_key,
    checkpoint_path,
    default_threads,
    pretrain_config,
    pretrain_images,
    synthetic_checkpoint,
    train,
)
from .stage import active, benchmark, run, samples_figure

__all__ = [
    "ARCH", "DEFAULTS", "PRETRAIN_VERSION", "active", "attribute_caption", "attribute_prompts", "benchmark",
    "caption_vocabulary", "checkpoint_info", "checkpoint_key", "checkpoint_path", "default_threads",
    "evaluate_pretrained", "plot_zero_shot", "pretrain_config", "pretrain_images", "run", "samples_figure",
    "synthetic_checkpoint", "train", "truth_table",
]
