"""The tiny CLIP pretrained on the synthetic benchmark: a stand-in for web-pretrained CLIP that knows
parts and colours but no species name.

Modules: ``captions`` (attribute captions and their truth table), ``recipe`` (the recipe, trained by
fine-tuning's ``TrainStep``, and :func:`build`, which writes the weights the package ships; the command
is ``workbench pretrain``), ``evaluate`` (zero-shot figures), ``plots`` (the benchmark's sample images),
``stage`` (what notebook 00_pretrain calls).
"""
from .captions import WEIGHTS, attribute_prompts, caption_vocabulary, training_captions, truth_table
from .evaluate import evaluate_pretrained, label_permutation_null, plot_zero_shot, species_note
from .plots import plot_samples
from .recipe import (
    ARCH,
    DEFAULTS,
    PRETRAIN_VERSION,
    build,
    default_threads,
    pretrain_config,
    pretrain_images,
    text_lr_scale,
    train,
    trained_tokens,
)
from .stage import active, benchmark, run, samples_figure

__all__ = [
    "ARCH", "DEFAULTS", "PRETRAIN_VERSION", "WEIGHTS", "active", "attribute_prompts", "benchmark", "build",
    "caption_vocabulary", "default_threads", "evaluate_pretrained", "label_permutation_null", "plot_samples", "plot_zero_shot", "pretrain_config",
    "pretrain_images", "run", "text_lr_scale", "samples_figure", "species_note", "train", "trained_tokens", "training_captions", "truth_table",
]
