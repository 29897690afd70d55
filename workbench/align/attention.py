"""Attention maps for an image-text pair: attention rollout and gradient-weighted relevance.

open_clip calls ``nn.MultiheadAttention(..., need_weights=False)``, and the weights a hook could
force out are not on the autograd path to the output. So we re-run each residual block ourselves,
recomputing ``softmax(q kᵀ/√d)`` from ``in_proj_weight`` on the ``ln_1`` output and using those
probabilities for the block output; the result is checked against the model's own forward in the
tests. This depends only on the block's attributes (ln_1, attn.in_proj_*, attn.out_proj, ls_1, ln_2,
mlp, ls_2), not on how a given open_clip version wires its forward.

- rollout (Abnar & Zuidema 2020): average heads, add identity, renormalise rows, multiply across layers.
- relevance (Chefer et al. 2021): ``R = I``; per layer ``R += mean_h(relu(∂s/∂A ⊙ A)) @ R`` with
  ``s`` the image-text cosine similarity.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..clip import text_forward as clip_text_forward
from ..clip import token_mask
from .features import _prepare, check_model


def _check_block(blk) -> None:
    attn = getattr(blk, "attn", None)
    if not isinstance(attn, torch.nn.MultiheadAttention) or not hasattr(blk, "ln_1"):
        raise TypeError(
            f"attention maps support open_clip ResidualAttentionBlock with nn.MultiheadAttention; got "
            f"{type(blk).__name__} (custom blocks with qk-norm / scaled-cosine attention are not supported)"
        )
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        raise TypeError("attention maps need a plain self-attention nn.MultiheadAttention (packed in_proj, no bias_k)")


def block_forward(blk, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual attention block on ``B x N x E`` (batch first); returns (output, attention ``B x H x N x N``)."""
    attn = blk.attn
    B, N, E = x.shape
    H = attn.num_heads
    d = E // H
    h = blk.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, N, H, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if attn_mask is not None:
        m = attn_mask[:N, :N]
        scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m.to(scores.dtype)
    a = scores.softmax(-1)
    o = (a @ v).transpose(1, 2).reshape(B, N, E)
    x = x + blk.ls_1(attn.out_proj(o))
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, a


def _run(blocks, x, attn_mask=None):
    attns = []
    for blk in blocks:
        _check_block(blk)
        x, a = block_forward(blk, x, attn_mask)
        attns.append(a)
    return x, attns


def _visual_embeds(visual, x: torch.Tensor) -> torch.Tensor:
    if hasattr(visual, "_embeds"):
        return visual._embeds(x)
    # open_clip < 3 inlines this in forward
    x = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def image_forward(model, images: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Image embeddings ``B x D`` (equal to ``encode_image``) and per-layer attention ``B x H x N x N``.

    With ``grad=True`` the attention tensors are on the autograd path to the embedding.
    """
    check_model(model)
    visual = model.visual
    x = _visual_embeds(visual, _prepare(model, images))
    if grad:
        x = x.detach().requires_grad_(True)
    x, attns = _run(visual.transformer.resblocks, x)
    if hasattr(visual, "_pool"):
        pooled, _ = visual._pool(x)
    else:
        x = visual.ln_post(x)
        pooled = x[:, 0]
    return pooled @ visual.proj, attns


def text_forward(model, ids: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Text embeddings ``B x D`` (equal to ``encode_text``) and per-layer causal attention ``B x H x n x n``
    over the positions up to the batch's last EOT (:func:`workbench.clip.text_forward`, whose blocks
    are re-run here to read their attention)."""
    check_model(model)
    attns: list[torch.Tensor] = []

    def run_blocks(x, attn_mask):
        if grad:  # the relevance is explained from the embeddings on: they need not carry gradients
            x = x.detach().requires_grad_(True)
        x, found = _run(model.transformer.resblocks, x, attn_mask)
        attns.extend(found)
        return x

    pooled, _ = clip_text_forward(model, ids.to(model.positional_embedding.device), run_blocks=run_blocks)
    return pooled, attns


def rollout(attns: list[torch.Tensor], add_identity: bool = True) -> torch.Tensor:
    """Attention rollout ``Â_L ⋯ Â_1`` with ``Â = rownorm(mean_h A + I)``; ``attns``: per layer ``B x H x N x N``."""
    if not attns:
        raise ValueError("rollout needs at least one attention layer")
    N = attns[0].shape[-1]
    eye = torch.eye(N, device=attns[0].device, dtype=attns[0].dtype)
    r = eye.expand(attns[0].shape[0], N, N)
    for a in attns:
        a = a.mean(1)
        if add_identity:  # the residual stream carries each token forward
            a = a + eye
            a = a / a.sum(-1, keepdim=True)
        r = a @ r
    return r


def relevance(attns: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. (2021) relevance: ``R = I``, ``R += mean_h(relu(g ⊙ A)) @ R`` layer by layer."""
    if len(attns) != len(grads) or not attns:
        raise ValueError("need one gradient per attention layer")
    N = attns[0].shape[-1]
    r = torch.eye(N, device=attns[0].device, dtype=attns[0].dtype).expand(attns[0].shape[0], N, N)
    for a, g in zip(attns, grads):
        cam = (g * a).clamp(min=0).mean(1)
        r = r + cam @ r
    return r


def _patch_row(model, r: torch.Tensor) -> torch.Tensor:
    """The pooled token's row over patches, as ``B x gh x gw``."""
    gh, gw = model.visual.grid_size
    if getattr(model.visual, "pool_type", "tok") == "tok":
        row = r[:, 0, 1:]
    else:  # average-pooled towers: the embedding is the mean of the patch rows
        row = r[:, 1:, 1:].mean(1)
    return row.reshape(-1, gh, gw)


@torch.no_grad()
def image_rollout(model, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout of the image tower, pooled token -> patches: ``B x gh x gw`` (text-independent)."""
    _, attns = image_forward(model, images)
    return _patch_row(model, rollout([a.float() for a in attns])).cpu()


def pair_relevance(model, images: torch.Tensor, ids: torch.Tensor, text: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gradient-weighted relevance for image-text pairs (row i with row i).

    Returns image relevance ``B x gh x gw`` (pooled token -> patches), text relevance ``B x L``
    (EOT -> tokens; None with ``text=False``, which skips the text tower's backward) and the cosine
    similarities ``B`` that were explained.
    """
    with torch.enable_grad():
        img, a_img = image_forward(model, images, grad=True)
        with torch.set_grad_enabled(text):
            txt, a_txt = text_forward(model, ids, grad=text)
        if len(img) != len(txt):
            raise ValueError(f"{len(img)} images vs {len(txt)} captions: relevance explains pairs, pass equal numbers")
        s = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(-1)
        wrt = a_img + (a_txt if text else [])
        grads = torch.autograd.grad(s.sum(), wrt)  # pairs are independent: one backward for all
    n = len(a_img)
    r_img = relevance([a.detach().float() for a in a_img], [g.float() for g in grads[:n]])
    t = None
    if text:
        r_txt = relevance([a.detach().float() for a in a_txt], [g.float() for g in grads[n:]])
        ids = ids.to(r_txt.device)
        t = F.pad(r_txt[torch.arange(len(ids)), ids.argmax(-1)], (0, ids.shape[1] - r_txt.shape[-1])) * token_mask(ids)
        t = t.cpu()
    return _patch_row(model, r_img).cpu(), t, s.detach().cpu()
