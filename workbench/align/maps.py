"""Word-patch map methods as one family: ``model, tokenizer, images, texts, words -> B x gh x gw``.

Dense-feature methods give every patch a feature in the joint space and score it against a query
(the caption's sentence embedding, or one word's token state) by cosine similarity:

- ``similarity``: the tower's own final patch tokens (``ln_post`` then ``proj``) against the word's
  token state: FILIP-style, today's default view. The final patch tokens are outside the joint space
  (no gradient reaches them from the pooled output), so this map rarely localises.
- ``maskclip`` (Zhou et al. 2022): the last block's attention replaced by identity, i.e. each token's
  value through ``out_proj``, with no residual and no MLP.
- ``clearclip`` (Lan et al. 2024): the last block with query-query attention, no residual, no MLP.
- ``sclip`` (Wang et al. 2024): the last block with correlative self-attention
  (``softmax(qqᵀ) + softmax(kkᵀ)``), residual and MLP kept (SCLIP's released code).
- ``surgery`` (CLIP Surgery, Li et al. 2023): a side stream that starts at zero and, through every
  block from the first, adds ``out_proj(A' v)`` computed from the original stream's ``ln_1`` output,
  with a locality-preserving ``A'``; no embeddings, no original residual, no MLP in the side stream.
  The suffix names ``A'``: ``surgery-vv`` is CLIP Surgery's own value-value attention, ``surgery-kk``
  key-key, ``surgery-qqkk`` SCLIP's correlative ``softmax(qqᵀ) + softmax(kkᵀ)`` (the default:
  :data:`DEFAULT`).

Gradient and attention methods (:mod:`.attention`): ``relevance`` (Chefer et al. 2021) explains the
image-caption cosine; ``rollout`` (Abnar & Zuidema 2020) reads the image tower alone and is the same
map for every caption (``query_specific=False``).

Every method re-runs open_clip's ``VisionTransformer`` blocks with :func:`~.attention.block_forward`
(batch first, version-independent), so it works for any open_clip ViT, tiny or ViT-L, pretrained or
fine-tuned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .attention import _check_block, _visual_embeds, block_forward, image_rollout, pair_relevance
from .features import _prepare, check_model, image_tokens, text_tokens, tokenize, word_map

QUERIES = ("sentence", "word")


@dataclass(frozen=True)
class MapMethod:
    """One map method. ``dense``: the patch features ``B x P x D`` it scores a query against (None for
    the attention/gradient methods, which have ``pair`` or ``image`` instead)."""

    name: str
    query_specific: bool  # does the map change when the caption changes?
    paper: str
    query: str | None = None  # default query of a dense method: "sentence" or "word"
    dense: Callable | None = None  # (model, images) -> B x P x D patch features in the joint space
    pair: Callable | None = None  # (model, tokenizer, images, texts) -> B x gh x gw, one pass per pair
    image: Callable | None = None  # (model, images) -> B x gh x gw, caption-independent


# ---------------------------------------------------------------- the pieces of a modified block
def _heads(blk, x: torch.Tensor):
    """q, k, v of a block on ``B x N x E`` (after its ``ln_1``), each ``B x H x N x d``."""
    attn = blk.attn
    B, N, E = x.shape
    H = attn.num_heads
    q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return [t.reshape(B, N, H, E // H).transpose(1, 2) for t in (q, k, v)]


# A' of :func:`side_attention`: the sum of softmax(t tᵀ/√d) over these of q, k, v ("identity": none)
SIDE_ATTENTION = {"kk": "k", "qq": "q", "vv": "v", "qqkk": "qk", "identity": ""}


def _self_softmax(t: torch.Tensor) -> torch.Tensor:
    return (t @ t.transpose(-2, -1) / math.sqrt(t.shape[-1])).softmax(-1)


def side_attention(blk, x: torch.Tensor, kind: str) -> torch.Tensor:
    """A block's attention output ``ls_1(out_proj(A' v))`` on ``B x N x E`` with a locality-preserving
    ``A'``: ``kk``, ``qq``, ``vv``, ``qqkk`` (``softmax(qqᵀ/√d) + softmax(kkᵀ/√d)``) or ``identity``
    (each token attends to itself)."""
    _check_block(blk)
    q, k, v = _heads(blk, x)
    if kind not in SIDE_ATTENTION:
        raise ValueError(f"unknown side attention {kind!r}; expected one of {list(SIDE_ATTENTION)}")
    qkv = {"q": q, "k": k, "v": v}
    terms = SIDE_ATTENTION[kind]
    o = sum(_self_softmax(qkv[t]) for t in terms) @ v if terms else v  # identity: each token keeps its value
    B, H, N, d = o.shape
    return blk.ls_1(blk.attn.out_proj(o.transpose(1, 2).reshape(B, N, H * d)))


def _project(visual, tokens: torch.Tensor) -> torch.Tensor:
    """Patch rows of ``B x N x E`` through ``ln_post`` and ``proj``: ``B x P x D``."""
    return visual.ln_post(tokens[:, 1:]) @ visual.proj


def _start(model, images):
    check_model(model)
    visual = model.visual
    return visual, _visual_embeds(visual, _prepare(model, images)), list(visual.transformer.resblocks)


def last_block_tokens(model, images: torch.Tensor, kind: str, residual: bool, mlp: bool) -> torch.Tensor:
    """Patch features with the last block's attention replaced (``kind`` as in :func:`side_attention`),
    optionally without its residual and MLP (MaskCLIP, ClearCLIP, SCLIP)."""
    visual, x, blocks = _start(model, images)
    for blk in blocks[:-1]:
        _check_block(blk)
        x = block_forward(blk, x)[0]
    last = blocks[-1]
    y = side_attention(last, x, kind) + (x if residual else 0)
    if mlp:
        y = y + last.ls_2(last.mlp(last.ln_2(y)))
    return _project(visual, y)


def surgery_tokens(model, images: torch.Tensor, kind: str = "kk") -> torch.Tensor:
    """CLIP Surgery's dual path: the side stream ``s_0 = 0``, ``s_l = s_{l-1} + side_attention(block_l,
    x_{l-1})`` over every block, ``x`` the original stream; patch features ``ln_post(s_L) @ proj``."""
    visual, x, blocks = _start(model, images)
    side = torch.zeros_like(x)
    for blk in blocks:
        side = side + side_attention(blk, x, kind)
        x = block_forward(blk, x)[0]
    return _project(visual, side)


def final_tokens(model, images: torch.Tensor) -> torch.Tensor:
    """The tower's own projected final patch tokens (:func:`~.features.image_tokens`)."""
    return image_tokens(model, images)[1]


def _relevance(model, tokenizer, images, texts):
    return pair_relevance(model, images, tokenize(tokenizer, texts).ids, text=False)[0]


METHODS: dict[str, MapMethod] = {m.name: m for m in (
    MapMethod("similarity", True, "FILIP (Yao et al. 2022): final patch tokens x word token", "word", final_tokens),
    MapMethod("maskclip", True, "MaskCLIP (Zhou et al. 2022)", "sentence",
              lambda m, x: last_block_tokens(m, x, "identity", residual=False, mlp=False)),
    MapMethod("clearclip", True, "ClearCLIP (Lan et al. 2024)", "sentence",
              lambda m, x: last_block_tokens(m, x, "qq", residual=False, mlp=False)),
    MapMethod("sclip", True, "SCLIP (Wang et al. 2024)", "sentence",
              lambda m, x: last_block_tokens(m, x, "qqkk", residual=True, mlp=True)),
    MapMethod("surgery-kk", True, "CLIP Surgery (Li et al. 2023)'s side path, key-key attention", "sentence",
              lambda m, x: surgery_tokens(m, x, "kk")),
    MapMethod("surgery-vv", True, "CLIP Surgery (Li et al. 2023), its value-value attention", "sentence",
              lambda m, x: surgery_tokens(m, x, "vv")),
    MapMethod("surgery-qqkk", True, "CLIP Surgery (Li et al. 2023)'s side path, SCLIP's q-q + k-k attention", "sentence",
              lambda m, x: surgery_tokens(m, x, "qqkk")),
    MapMethod("relevance", True, "Chefer et al. 2021, gradient-weighted relevance", pair=_relevance),
    MapMethod("rollout", False, "attention rollout (Abnar & Zuidema 2020), image tower only", image=image_rollout),
)}
# Chosen on a validation draw of the synthetic benchmark (benchmarks/align_methods.py; the figures are in
# benchmarks/ALIGNMENT_STUDY.md): the best pointing score of the query-specific methods.
DEFAULT = "surgery-qqkk"


def get(name: str) -> MapMethod:
    if name not in METHODS:
        raise ValueError(f"unknown map method {name!r}; expected one of {list(METHODS)}")
    return METHODS[name]


def check_query(query: str | None) -> None:
    if query is not None and query not in QUERIES:
        raise ValueError(f"unknown query {query!r}; expected one of {list(QUERIES)} (or None: the method's own)")


def sentence_queries(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """The captions' embeddings ``B x D`` (``encode_text``, the EOT state: the one the text tower trained)."""
    return model.encode_text(tokenize(tokenizer, texts).ids.to(model.positional_embedding.device))


def word_queries(model, tokenizer, texts: list[str], words: list[str]) -> torch.Tensor:
    """Each caption's token state of its ``word``: the mean of its pieces' unit states, ``B x D`` (so a
    word's map ranks patches as the mean of its pieces' cosine maps does)."""
    tt = tokenize(tokenizer, texts)
    states = text_tokens(model, tt.ids, normalize=True)
    return torch.stack([word_map(s, w, word) for s, w, word in zip(states, tt.words, words)])


def queries(model, tokenizer, texts: list[str], words: list[str] | None, query: str) -> torch.Tensor:
    check_query(query)
    if query == "word":
        if words is None:
            raise ValueError("word queries need the word of each caption")
        return word_queries(model, tokenizer, texts, words)
    return sentence_queries(model, tokenizer, texts)


def score(patches: torch.Tensor, q: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine of each patch feature ``B x P x D`` with its row's query ``B x D``: ``B x gh x gw``."""
    s = torch.einsum("bpd,bd->bp", F.normalize(patches.float(), dim=-1), F.normalize(q.float(), dim=-1))
    return s.reshape(len(s), *grid)


def maps(model, tokenizer, images: torch.Tensor, texts: list[str], words: list[str] | None = None,
         method: str = DEFAULT, query: str | None = None) -> torch.Tensor:
    """Maps ``B x gh x gw`` for image-caption pairs (row i with row i; one image broadcasts) by ``method``;
    ``words``: the queried word of each caption (needed by word queries); ``query``: ``sentence`` or
    ``word`` for dense methods (None: the method's own)."""
    m = get(method)
    check_query(query)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if images.ndim == 3:
        images = images[None]
    if len(images) != len(texts) and len(images) != 1:
        raise ValueError(f"{len(images)} images vs {len(texts)} captions: pass equal numbers, or one image")
    n = len(texts)
    if m.pair is not None:
        return m.pair(model, tokenizer, images.expand(n, *images.shape[1:]), texts)
    if m.image is not None:  # one image's map serves all its captions
        return m.image(model, images).expand(n, *model.visual.grid_size)
    with torch.no_grad():
        patches = m.dense(model, images)  # once per image, also when it broadcasts
        q = queries(model, tokenizer, texts, words, query or m.query)
    return score(patches.expand(n, *patches.shape[1:]), q, tuple(model.visual.grid_size)).cpu()
