"""Contrastive losses for fine-tuning CLIP: symmetric InfoNCE, class-aware soft targets, FILIP token-wise.

All losses take L2-normalised features and an already exponentiated ``logit_scale`` (what
``model.logit_scale.exp()`` gives). Under DDP, pass features through :func:`gather_features` first so
the loss sees the global batch; every rank then computes the same loss value.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ----------------------------------------------------------------------------- distributed
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of every rank's copy and returns this rank's slice.

    Each rank computes the full loss on the gathered batch, so the gradient reaching rank r's features
    is the sum over ranks of d(loss_k)/d(f_r) = world_size * d(loss)/d(f_r); DDP then averages the
    parameter gradients over ranks, which gives exactly the single-process gradient of the global batch.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        ctx.n = x.shape[0]
        out = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_features(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor over all ranks along dim 0, keeping gradients (identity outside DDP).

    Every rank must pass the same per-rank batch size.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    return tuple(_GatherWithGrad.apply(t) for t in tensors)


def gather_labels(x: torch.Tensor) -> torch.Tensor:
    """all_gather an integer tensor (no gradient); identity outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


# ----------------------------------------------------------------------------- CLIP InfoNCE
def _up(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features -> float32 (bf16 logits lose the ranking); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each is a pair).

    Same as open_clip's ``ClipLoss`` on one process: mean of image->text and text->image cross-entropy.
    Logits are computed in float32 whatever the feature dtype (bf16 logits lose the ranking).
    """
    img, txt = _up(image_features), _up(text_features)
    logits = logit_scale * img @ txt.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------------------- class-aware
def class_weights(
    labels: torch.Tensor, image_ids: torch.Tensor | None = None, class_weight: float = 1.0, dtype=torch.float32
) -> torch.Tensor:
    """Symmetric positive weights: pair (i, j) is a positive when i and j show the same image (weight 1)
    or the same class (weight ``class_weight``); every pair is its own positive."""
    same_class = (labels[:, None] == labels[None, :]).to(dtype)
    if image_ids is None:
        same_image = torch.eye(len(labels), device=labels.device, dtype=dtype)
    else:
        same_image = (image_ids[:, None] == image_ids[None, :]).to(dtype)
    return same_image + class_weight * (same_class - same_image).clamp_min(0)


def soft_infonce(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE against soft targets: ``weights[i, j] >= 0`` says how much caption ``j`` is a
    positive of image ``i``. Image i's target is row i normalised, caption j's is column j normalised.
    Every image needs a positive; a caption true of no image (a hard negative) takes part in the
    image->text softmax only. With ``weights = eye`` this is the CLIP loss."""
    w = weights.to(logits.dtype)
    i2t = -(w / w.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    has = w.sum(0) > 0
    wt, lt = w.T[has], logits.T[has]
    t2i = -(wt / wt.sum(1, keepdim=True) * lt.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


def class_aware_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    labels: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    class_weight: float = 1.0,
) -> torch.Tensor:
    """Multi-positive symmetric InfoNCE: captions of the same image or class are targets, not negatives
    (:func:`soft_infonce` over :func:`class_weights`). With all labels distinct it equals :func:`clip_loss`."""
    img, txt = _up(image_features), _up(text_features)
    logits = logit_scale * img @ txt.T
    return soft_infonce(logits, class_weights(labels, image_ids, class_weight, logits.dtype))


def multi_positive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                        positives: torch.Tensor) -> torch.Tensor:
    """InfoNCE over ``N`` images and ``M`` captions with ``positives[i, j]`` marking caption ``j`` true of
    image ``i`` (pretraining: a caption naming attributes is true of every image that shows them), so
    short captions shared by many images are not pushed apart from them as false negatives."""
    img, txt = _up(image_features), _up(text_features)
    return soft_infonce(logit_scale * img @ txt.T, positives)


# ----------------------------------------------------------------------------- FILIP
def _filip_block(x: torch.Tensor, y: torch.Tensor, ymask: torch.Tensor, xmask: torch.Tensor):
    """Token-wise scores for an image block x (bi, n1, D) vs a text block y (bj, n2, D).

    Returns (s_i2t, s_t2i), both (bi, bj): mean over patches of the best word, mean over words of the best patch.
    """
    sim = _up(torch.einsum("ikd,jrd->ijkr", x, y))
    neg = torch.finfo(sim.dtype).min
    ym, xm = ymask[None, :, None, :], xmask[:, None, :, None]
    best_word = sim.masked_fill(~ym, neg).amax(3)  # (bi, bj, n1)
    best_patch = sim.masked_fill(~xm, neg).amax(2)  # (bi, bj, n2)
    xw, yw = xmask.to(sim.dtype), ymask.to(sim.dtype)
    s_i2t = (best_word * xw[:, None, :]).sum(2) / xw.sum(1)[:, None]
    s_t2i = (best_patch * yw[None, :, :]).sum(2) / yw.sum(1)[None, :]
    return s_i2t, s_t2i


def filip_scores(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    block_size: int = 64,
    checkpoint_blocks: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP late-interaction scores ``(s_i2t, s_t2i)``, each (B_img, B_txt), computed in blocks.

    Only a ``block_size x block_size x n1 x n2`` similarity tensor exists at a time; with
    ``checkpoint_blocks`` it is recomputed in backward instead of kept, so memory stays bounded.
    Tokens should be L2-normalised and projected into the joint space.
    """
    bi, n1, _ = image_tokens.shape
    bt = text_tokens.shape[0]
    if text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(f"text_mask {tuple(text_mask.shape)} does not match text tokens {tuple(text_tokens.shape[:2])}")
    if image_mask is None:
        image_mask = torch.ones(bi, n1, dtype=torch.bool, device=image_tokens.device)
    text_mask, image_mask = text_mask.bool(), image_mask.bool()
    use_ckpt = checkpoint_blocks and torch.is_grad_enabled() and (image_tokens.requires_grad or text_tokens.requires_grad)
    rows_i2t, rows_t2i = [], []
    for i in range(0, bi, block_size):
        xi, xm = image_tokens[i : i + block_size], image_mask[i : i + block_size]
        cols_i2t, cols_t2i = [], []
        for j in range(0, bt, block_size):
            args = (xi, text_tokens[j : j + block_size], text_mask[j : j + block_size], xm)
            a, b = checkpoint(_filip_block, *args, use_reentrant=False) if use_ckpt else _filip_block(*args)
            cols_i2t.append(a)
            cols_t2i.append(b)
        rows_i2t.append(torch.cat(cols_i2t, 1))
        rows_t2i.append(torch.cat(cols_t2i, 1))
    return torch.cat(rows_i2t), torch.cat(rows_t2i)


def filip_loss(
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    logit_scale,
    image_mask: torch.Tensor | None = None,
    block_size: int = 64,
) -> torch.Tensor:
    """FILIP token-wise contrastive loss: mean of image->text InfoNCE over ``s_i2t`` and text->image
    InfoNCE over ``s_t2i`` (row i of the image tokens pairs with row i of the text tokens)."""
    s_i2t, s_t2i = filip_scores(image_tokens, text_tokens, text_mask, image_mask, block_size)
    labels = torch.arange(len(s_i2t), device=s_i2t.device)
    return (F.cross_entropy(logit_scale * s_i2t, labels) + F.cross_entropy(logit_scale * s_t2i.T, labels)) / 2


LOSSES = ("clip", "class-aware", "filip")
