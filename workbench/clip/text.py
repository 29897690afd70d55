"""The CLIP text tower, written once: the forward that trims at the end-of-text token and can return
per-token features, the mask of valid token positions, and token counting against the 77-token context.

CLIP's text transformer is causal and pools at the EOT token (the largest id, found by argmax), so
positions after a batch's last EOT never influence anything before it: cutting them saves up to
~3x text compute and changes no result.
"""
from __future__ import annotations

from typing import Callable

import open_clip
import torch
import torch.nn as nn

from .load import resolve_name


def plain_text_tower(model) -> bool:
    """An open_clip CLIP text tower with a causal mask and EOT (argmax) pooling, which
    :func:`text_forward` can take apart (HF text towers cannot)."""
    return (
        hasattr(model, "token_embedding")
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", "argmax") == "argmax"
    )


def trim(ids: torch.Tensor) -> torch.Tensor:
    """Cut a token batch after its last EOT (padding columns cost time and change nothing)."""
    return ids[:, : int(ids.argmax(-1).max()) + 1]


def token_mask(ids: torch.Tensor) -> torch.Tensor:
    """Valid positions ``arange(L) <= argmax(ids)``: SOT through EOT inclusive, padding excluded.

    By position, not ``ids != 0``: in the CLIP vocabulary id 0 is a real token ("!"), and EOT has
    the largest id, so argmax finds it.
    """
    return torch.arange(ids.shape[-1], device=ids.device) <= ids.argmax(-1, keepdim=True)


def _project(model, x: torch.Tensor) -> torch.Tensor:
    proj = model.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def text_forward(model, ids: torch.Tensor, tokens: bool = False, trim_eot: bool = True,
                 run_blocks: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pooled B x D, projected token states B x L x D or None)`` for token ids.

    The pooled row equals ``model.encode_text(ids)``. ``trim_eot`` cuts the batch after its last EOT
    first (pass False for ids already cut to a chosen length, e.g. bucketed for ``torch.compile``).
    ``run_blocks(x, attn_mask)`` replaces ``model.transformer(x, attn_mask=...)`` (the alignment code
    re-runs the blocks itself to read their attention). Towers other than :func:`plain_text_tower`
    fall back to ``encode_text`` and cannot return tokens.
    """
    if not plain_text_tower(model):
        if tokens or run_blocks is not None:
            raise ValueError("token features need a plain open_clip CLIP text tower (causal, EOT pooling)")
        return model.encode_text(ids), None
    ids = trim(ids) if trim_eot else ids
    n, L = ids.shape
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(cast) + model.positional_embedding[:L].to(cast)
    mask = model.attn_mask[:L, :L]
    x = run_blocks(x, mask) if run_blocks is not None else model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    pooled = _project(model, x[torch.arange(n, device=x.device), ids.argmax(-1)])
    return pooled, (_project(model, x) if tokens else None)


# ----------------------------------------------------------------------------- token counting
def get_tokenizer(tokenizer_or_model="tiny"):
    """A CLIP tokenizer from a tokenizer, a :func:`workbench.clip.load_clip` bundle, or a model name."""
    if isinstance(tokenizer_or_model, str):
        return open_clip.get_tokenizer(resolve_name(tokenizer_or_model))
    if hasattr(tokenizer_or_model, "tokenizer") and hasattr(tokenizer_or_model, "model_id"):
        return tokenizer_or_model.tokenizer
    return tokenizer_or_model


def context_length(tokenizer) -> int:
    return int(getattr(tokenizer, "context_length", None) or 77)


def token_counter(tokenizer) -> Callable[[str], int]:
    """``count(text)``: tokens the CLIP text tower sees for ``text``, start/end tokens included, untruncated."""
    tokenizer = get_tokenizer(tokenizer)
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "sot_token_id"):  # open_clip SimpleTokenizer
        return lambda text: len(tokenizer.encode(text)) + 2
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and callable(hf):  # open_clip HFTokenizer: the wrapped HF tokenizer adds its specials
        return lambda text: len(hf(text)["input_ids"])

    def count(text: str) -> int:  # generic: tokenize with a long context, count up to the last non-pad
        ids = tokenizer([text], context_length=4096)[0]
        nz = (ids != 0).nonzero()
        return int(nz[-1]) + 1 if len(nz) else 0

    return count


def count_tokens(tokenizer, text: str) -> int:
    """Tokens ``text`` takes in the CLIP context, start/end tokens included."""
    return token_counter(tokenizer)(text)


def token_lengths(texts, tokenizer) -> list[int]:
    count = token_counter(tokenizer)
    return [count(t) for t in texts]
