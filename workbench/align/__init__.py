"""Word-patch alignment for open_clip ViT CLIP models (tiny and real).

- maps: the map methods as one registry (similarity, MaskCLIP, ClearCLIP, SCLIP, CLIP Surgery's side
  path, relevance, rollout), one signature, and the default chosen on validation;
- features: projected patch tokens and text token states, words; FILIP-style token x patch
  similarity maps and the argmax-token-per-patch map;
- attention: attention rollout and gradient-weighted relevance (Chefer et al. 2021);
- pointing / regions: the pointing game against part masks, boxes or keypoints;
- plots, widgets, report: figures, the explorer, the pieces of a report;
- stage: what notebook 05_align calls.
"""
from . import maps
from .attention import (
    block_forward,
    image_forward,
    image_rollout,
    pair_relevance,
    relevance,
    rollout,
    text_forward,
)
from .features import (
    TextTokens,
    Word,
    argmax_token_map,
    find_phrase,
    image_tokens,
    similarity_maps,
    text_tokens,
    token_patch_similarity,
    tokenize,
    word_map,
    word_maps,
)
from .pointing import METHODS, PartItem, method_maps, point_hits, pointing_game
from .regions import part_items, part_regions
from .report import captions_for, finetuned_checkpoint, load_models, pair_maps, pointing_table, run_pointing

__all__ = [
    "METHODS", "PartItem", "TextTokens", "Word", "argmax_token_map", "block_forward", "captions_for",
    "find_phrase", "finetuned_checkpoint", "maps", "image_forward", "image_rollout", "image_tokens", "load_models",
    "method_maps", "pair_maps", "pair_relevance", "part_items", "part_regions", "point_hits", "pointing_game",
    "pointing_table", "relevance", "rollout", "run_pointing", "similarity_maps", "text_forward", "text_tokens",
    "token_patch_similarity", "tokenize", "word_map", "word_maps",
]
