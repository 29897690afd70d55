"""Losses against naive loop references (values and gradients), blocked FILIP == naive, masking."""
import math

import pytest
import torch
import torch.nn.functional as F

from workbench.clip import token_mask as text_token_mask
from workbench.finetune.losses import (
    class_aware_loss,
    class_weights,
    clip_loss,
    filip_loss,
    filip_scores,
)

D = torch.float64  # references are compared tightly


def _feats(n, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=D), dim=-1) * scale
    return x.requires_grad_()


# ------------------------------------------------------------------ naive references
def naive_clip(img, txt, s):
    n = len(img)
    total = 0.0
    for i in range(n):  # image i vs all texts
        logits = [s * torch.dot(img[i], txt[j]) for j in range(n)]
        lse = torch.logsumexp(torch.stack(logits), 0)
        total = total + (lse - logits[i])
    for j in range(n):  # text j vs all images
        logits = [s * torch.dot(txt[j], img[i]) for i in range(n)]
        lse = torch.logsumexp(torch.stack(logits), 0)
        total = total + (lse - logits[j])
    return total / (2 * n)


def naive_class_aware(img, txt, s, labels, image_ids, w):
    n = len(img)
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(n):
            logits = torch.stack([s * torch.dot(a[i], b[j]) for j in range(n)])
            logp = logits - torch.logsumexp(logits, 0)
            weights = []
            for j in range(n):
                if image_ids[i] == image_ids[j]:
                    weights.append(1.0)
                elif labels[i] == labels[j]:
                    weights.append(w)
                else:
                    weights.append(0.0)
            z = sum(weights)
            total = total - sum(wj / z * logp[j] for j, wj in enumerate(weights))
    return total / (2 * n)


def naive_filip(x, y, ids, s):
    """Loops over pairs; text tokens kept explicitly by slicing up to the EOT position."""
    n = len(x)
    lengths = [int(torch.argmax(ids[j])) + 1 for j in range(n)]
    rows_i2t, rows_t2i = [], []
    for i in range(n):
        r1, r2 = [], []
        for j in range(n):
            yj = y[j, : lengths[j]]
            sim = x[i] @ yj.T  # n1 x len
            r1.append(sim.max(1).values.mean())
            r2.append(sim.max(0).values.mean())
        rows_i2t.append(torch.stack(r1))
        rows_t2i.append(torch.stack(r2))
    s_i2t, s_t2i = torch.stack(rows_i2t), torch.stack(rows_t2i)
    labels = torch.arange(n)
    loss = (F.cross_entropy(s * s_i2t, labels) + F.cross_entropy(s * s_t2i.T, labels)) / 2
    return loss, s_i2t, s_t2i


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


# ------------------------------------------------------------------ tests
def test_clip_loss_matches_naive_values_and_grads():
    img, txt = _feats(7, 5, 0), _feats(7, 5, 1)
    s = torch.tensor(12.0, dtype=D, requires_grad=True)
    got = clip_loss(img, txt, s)
    ref = naive_clip(img, txt, s)
    assert torch.allclose(got, ref, atol=1e-10)
    for g, r in zip(_grads(got, img, txt, s), _grads(ref, img, txt, s)):
        assert torch.allclose(g, r, atol=1e-10)


def test_clip_loss_perfect_alignment_is_small_and_random_is_log_n():
    x = _feats(16, 32, 0).detach()
    assert clip_loss(x, x, 100.0) < 1e-3
    assert math.isclose(float(clip_loss(x, x, 0.0)), math.log(16), rel_tol=1e-9)


def test_class_aware_matches_naive_values_and_grads():
    img, txt = _feats(8, 6, 2), _feats(8, 6, 3)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # captions 0,1 and 4,5 share an image
    s = torch.tensor(10.0, dtype=D, requires_grad=True)
    for w in (1.0, 0.5):
        got = class_aware_loss(img, txt, s, labels, image_ids, class_weight=w)
        ref = naive_class_aware(img, txt, s, labels.tolist(), image_ids.tolist(), w)
        assert torch.allclose(got, ref, atol=1e-10)
        for g, r in zip(_grads(got, img, txt, s), _grads(ref, img, txt, s)):
            assert torch.allclose(g, r, atol=1e-10)


def test_class_aware_reduces_to_clip_when_all_distinct():
    img, txt = _feats(6, 4, 4), _feats(6, 4, 5)
    got = class_aware_loss(img, txt, 5.0, torch.arange(6))
    assert torch.allclose(got, clip_loss(img, txt, 5.0), atol=1e-12)


def test_same_class_pairs_are_not_negatives():
    """Two captions of one class: plain CLIP pushes them apart, class-aware pulls them together."""
    labels = torch.tensor([0, 0, 1])

    def feats(theta):  # rows 0 and 1 (same class) at angle theta, row 2 another class
        return torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)], [0.0, -1.0]], dtype=D)

    near, far = feats(0.05), feats(0.3)
    assert clip_loss(far, far, 50.0) < clip_loss(near, near, 50.0)
    assert class_aware_loss(far, far, 50.0, labels) > class_aware_loss(near, near, 50.0, labels)
    assert torch.equal(class_weights(labels), torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]))
    # at identical features the soft targets are met: the loss is the targets' entropy
    same = feats(0.0)
    assert math.isclose(float(class_aware_loss(same, same, 50.0, labels)), 2 / 3 * math.log(2), rel_tol=1e-6)


def test_text_mask_by_position_not_by_id():
    # token id 0 is "!" in CLIP's vocabulary: a real token inside the text must stay valid
    ids = torch.tensor([[49406, 0, 320, 49407, 0, 0], [49406, 320, 0, 0, 49407, 0]])
    mask = text_token_mask(ids)
    assert mask.tolist() == [[True, True, True, True, False, False], [True, True, True, True, True, False]]


def _filip_inputs(n=5, n1=6, n2=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, n1, d, generator=g, dtype=D), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, n2, d, generator=g, dtype=D), dim=-1).requires_grad_()
    ids = torch.zeros(n, n2, dtype=torch.long)
    for j in range(n):
        length = 2 + j % (n2 - 1)
        ids[j, :length] = torch.randint(0, 1000, (length,), generator=g)
        ids[j, 0], ids[j, length - 1] = 49406, 49407
        ids[j, 1] = 0  # a real "!" token
    return x, y, ids


@pytest.mark.parametrize("block_size", [1, 2, 64])
def test_filip_blocked_equals_naive(block_size):
    x, y, ids = _filip_inputs()
    s = torch.tensor(7.0, dtype=D, requires_grad=True)
    got = filip_loss(x, y, text_token_mask(ids), s, block_size=block_size)
    ref, ref_i2t, ref_t2i = naive_filip(x, y, ids, s)
    a, b = filip_scores(x, y, text_token_mask(ids), block_size=block_size)
    assert torch.allclose(a, ref_i2t, atol=1e-12) and torch.allclose(b, ref_t2i, atol=1e-12)
    assert torch.allclose(got, ref, atol=1e-12)
    for g, r in zip(_grads(got, x, y, s), _grads(ref, x, y, s)):
        assert torch.allclose(g, r, atol=1e-10)


def test_filip_padding_does_not_change_scores():
    x, y, ids = _filip_inputs(seed=1)
    mask = text_token_mask(ids)
    a, b = filip_scores(x.detach(), y.detach(), mask)
    y2 = y.detach().clone()
    y2[~mask] = 10.0  # garbage on padded positions must be ignored
    a2, b2 = filip_scores(x.detach(), y2, mask)
    assert torch.allclose(a, a2) and torch.allclose(b, b2)
    # and s_i2t is not symmetric in general
    assert not torch.allclose(a, b)


def test_filip_bad_mask_shape():
    x, y, ids = _filip_inputs()
    with pytest.raises(ValueError, match="text_mask"):
        filip_scores(x, y, text_token_mask(ids)[:, :3])


def test_hard_negative_captions_take_part_in_the_image_to_text_softmax_only():
    """A caption true of no image in the batch (a pretraining hard negative) lowers the score of the
    image->text targets but has no text->image term of its own (it has no target to point at)."""
    from workbench.finetune.losses import soft_infonce

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, generator=g, dtype=D)
    pos = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=D)  # captions 3, 4: no image
    i2t = torch.stack([-(logits[i].log_softmax(0) * pos[i] / pos[i].sum()).sum() for i in range(3)]).mean()
    cols = [0, 1, 2]
    t2i = torch.stack([-(logits[:, j].log_softmax(0) * pos[:, j] / pos[:, j].sum()).sum() for j in cols]).mean()
    assert torch.allclose(soft_infonce(logits, pos), (i2t + t2i) / 2, atol=1e-12)
    more = torch.cat([logits, torch.full((3, 1), 5.0, dtype=D)], 1)  # a strong negative makes the loss larger
    assert soft_infonce(more, torch.cat([pos, torch.zeros(3, 1, dtype=D)], 1)) > soft_infonce(logits, pos)
