"""Token-level CLIP features: projected patch tokens, projected text token states, word pieces -> words,
and FILIP-style token x patch similarity maps.

Works for open_clip ViT CLIP models (``open_clip.model.CLIP`` with a ``VisionTransformer`` tower and the
``SimpleTokenizer``), the package's tiny model included.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..clip import normalize_images, output_tokens, text_forward, token_mask

SPECIAL = {"sot": "<sot>", "eot": "<eot>"}


@dataclass
class Word:
    """A word of a caption: its text and the token positions (word pieces) it spans."""

    text: str
    positions: list[int]
    special: bool = False


@dataclass
class TextTokens:
    """A tokenised batch: ids ``B x L``, masks and the decoded words of each caption."""

    ids: torch.Tensor  # B x L token ids
    mask: torch.Tensor  # B x L bool: SOT .. EOT inclusive (padding excluded)
    special: torch.Tensor  # B x L bool: SOT or EOT
    eot: torch.Tensor  # B long: EOT position
    pieces: list[list[str]] = field(default_factory=list)  # decoded piece per valid position
    words: list[list[Word]] = field(default_factory=list)  # words incl. special tokens, in order


def check_model(model) -> None:
    """Raise a clear error for models this module cannot take apart (before any heavy work)."""
    visual = getattr(model, "visual", None)
    need = ("conv1", "transformer", "ln_post", "proj", "grid_size")
    if visual is None or not all(hasattr(visual, a) for a in need):
        raise TypeError(
            f"alignment maps need an open_clip ViT CLIP model (visual.conv1/transformer/ln_post/proj); "
            f"got {type(model).__name__} with visual {type(visual).__name__}"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise TypeError("alignment maps do not support ViTs with attentional pooling (CoCa-style)")
    if visual.proj is None:
        raise TypeError("the vision tower has no projection (visual.proj is None); patch tokens would not be in the joint space")
    if not hasattr(model, "token_embedding") or not hasattr(model, "text_projection"):
        raise TypeError("alignment maps need the built-in open_clip text tower (token_embedding, text_projection); HF text towers are not supported")


def _simple_tokenizer(tokenizer):
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not (hasattr(tok, "decoder") and hasattr(tok, "byte_decoder") and hasattr(tok, "sot_token_id")):
        raise TypeError(f"word mapping needs open_clip's SimpleTokenizer; got {type(tokenizer).__name__}")
    return tok


def decode_piece(tokenizer, token_id: int) -> str:
    """One BPE piece as text; a trailing ``</w>`` (end of word) is kept so words can be regrouped."""
    tok = _simple_tokenizer(tokenizer)
    s = tok.decoder[int(token_id)]
    end = s.endswith("</w>")
    s = s[:-4] if end else s
    text = bytearray(tok.byte_decoder[c] for c in s).decode("utf-8", errors="replace")
    return text + ("</w>" if end else "")


def group_words(pieces: list[str], sot: bool = True) -> list[Word]:
    """Group decoded pieces (SOT first, EOT last) into words: a word ends at a piece ending in ``</w>``."""
    words, cur = [], []
    n = len(pieces)
    for i, p in enumerate(pieces):
        if (i == 0 and sot) or i == n - 1:
            if cur:  # truncated caption: a word cut off before EOT
                words.append(Word("".join(pieces[j].removesuffix("</w>") for j in cur), cur))
                cur = []
            words.append(Word(SPECIAL["sot"] if i == 0 else SPECIAL["eot"], [i], special=True))
            continue
        cur.append(i)
        if p.endswith("</w>"):
            words.append(Word("".join(pieces[j].removesuffix("</w>") for j in cur), cur))
            cur = []
    return words


def tokenize(tokenizer, texts: str | list[str]) -> TextTokens:
    """Tokenise captions and recover their words (word pieces mapped back via the SimpleTokenizer)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError(f"captions must be non-empty strings; got {texts!r}")
    tok = _simple_tokenizer(tokenizer)
    ids = tokenizer(list(texts))
    mask = token_mask(ids)
    eot = ids.argmax(-1)
    special = torch.zeros_like(mask)
    special[:, 0] = ids[:, 0] == tok.sot_token_id
    special[torch.arange(len(ids)), eot] = True
    pieces = [[decode_piece(tok, t) for t in row[: int(e) + 1].tolist()] for row, e in zip(ids, eot)]
    words = [group_words(p, sot=bool(s[0])) for p, s in zip(pieces, special)]
    return TextTokens(ids, mask, special, eot, pieces, words)


def find_phrase(tokenizer, ids_row: torch.Tensor, phrase: str) -> list[int]:
    """Token positions of the first occurrence of ``phrase`` (e.g. a class name) in one caption; [] if absent."""
    tok = _simple_tokenizer(tokenizer)
    target = tok.encode(phrase)
    row = ids_row.tolist()
    n = len(target)
    for i in range(1, len(row) - n + 1):
        if row[i : i + n] == target:
            return list(range(i, i + n))
    return []


def _prepare(model, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> normalised model input on the model's device and in its weights' dtype
    (fp16/bf16 models take half inputs); float input is taken as normalised already."""
    w = model.visual.conv1.weight
    if images.ndim == 3:
        images = images[None]
    if images.dtype == torch.uint8:
        images = normalize_images(images.to(w.device), model)
    return images.to(w.device, w.dtype)


def image_tokens(model, images: torch.Tensor, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled ``B x D``, projected patch tokens ``B x P x D``) in the joint space.

    ``visual.output_tokens=True`` makes the tower return the patch tokens after ``ln_post``; they are
    not projected, so we multiply by ``visual.proj`` (the same projection the pooled token gets).
    """
    check_model(model)
    visual = model.visual
    x = _prepare(model, images)
    with output_tokens(visual):
        pooled, tokens = visual(x)
    if getattr(visual, "final_ln_after_pool", False):
        tokens = visual.ln_post(tokens)  # the tower normalised only the pooled token
    patches = tokens @ visual.proj
    if normalize:
        pooled, patches = F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1)
    return pooled, patches


def text_tokens(model, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Projected token states ``B x L x D`` (:func:`workbench.clip.text_forward`); the row at the EOT
    position equals ``model.encode_text``. The text transformer is causal, so a token's state has seen
    only the words before it. Columns after the batch's last EOT are padding: NaN, never computed."""
    check_model(model)
    ids = ids.to(model.positional_embedding.device)
    _, x = text_forward(model, ids, tokens=True)
    if normalize:
        x = F.normalize(x, dim=-1)
    return F.pad(x, (0, 0, 0, ids.shape[1] - x.shape[1]), value=float("nan"))


def token_patch_similarity(text_feats: torch.Tensor, patch_feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of every text token with every patch: ``B x L x P`` for paired rows.

    Invalid (padding) tokens get NaN, so no max/mean can pick them up by accident.
    """
    t = F.normalize(text_feats.float(), dim=-1)
    p = F.normalize(patch_feats.float(), dim=-1)
    sim = torch.einsum("bld,bpd->blp", t, p)
    if mask is not None:
        sim = sim.masked_fill(~mask.to(sim.device)[..., None], float("nan"))
    return sim


@torch.no_grad()
def similarity_maps(model, tokenizer, images: torch.Tensor, texts: str | list[str]) -> tuple[torch.Tensor, TextTokens]:
    """Token x patch cosine maps for image-caption pairs: ``B x L x gh x gw`` (NaN at padding) and the tokens.

    One image with several captions (or the reverse) is broadcast.
    """
    tt = tokenize(tokenizer, texts)
    x = _prepare(model, images)
    _, patches = image_tokens(model, x)
    tf = text_tokens(model, tt.ids)
    if len(patches) != len(tf):
        if len(patches) == 1:
            patches = patches.expand(len(tf), -1, -1)
        elif len(tf) == 1:
            tf = tf.expand(len(patches), -1, -1)
            tt = _repeat(tt, len(patches))
        else:
            raise ValueError(f"{len(patches)} images vs {len(tf)} captions: pass equal numbers, or one of either")
    sim = token_patch_similarity(tf, patches, tt.mask)
    gh, gw = model.visual.grid_size
    return sim.reshape(*sim.shape[:2], gh, gw).cpu(), tt


def _repeat(tt: TextTokens, n: int) -> TextTokens:
    r = lambda t: t.expand(n, *t.shape[1:])  # noqa: E731
    return TextTokens(r(tt.ids), r(tt.mask), r(tt.special), tt.eot.expand(n), tt.pieces * n, tt.words * n)


def word_maps(sim: torch.Tensor, words: list[Word], special: bool = False) -> dict[str, torch.Tensor]:
    """One map per word (mean over its pieces) from one caption's ``L x gh x gw`` similarity maps.

    Repeated words get a ``#n`` suffix so keys stay unique, in caption order.
    """
    out = {}
    for w in words:
        if w.special and not special:
            continue
        key, n = w.text, 2
        while key in out:
            key, n = f"{w.text}#{n}", n + 1
        out[key] = sim[w.positions].mean(0)
    return out


def word_map(sim: torch.Tensor, words: list[Word], word: str) -> torch.Tensor:
    """The map of the first word equal to ``word`` (case-insensitive; a multi-word phrase averages its words)."""
    want = word.lower().split()
    texts = [w.text.lower() for w in words]
    for i in range(len(words) - len(want) + 1):
        if texts[i : i + len(want)] == want:
            pos = [p for w in words[i : i + len(want)] for p in w.positions]
            return sim[pos].mean(0)
    raise KeyError(f"word {word!r} not in caption words {[w.text for w in words]}")


def argmax_token_map(sim: torch.Tensor, mask: torch.Tensor, special: torch.Tensor | None = None) -> torch.Tensor:
    """For each patch, the position of its most similar text token (FILIP's word-patch plot): ``gh x gw``.

    ``sim``: one caption's ``L x gh x gw``; ``mask``: its valid positions; tokens in ``special``
    (SOT/EOT) are left out when given, since EOT carries the whole sentence and tends to win everywhere.
    """
    keep = mask.clone()
    if special is not None:
        keep &= ~special
    if not keep.any():
        raise ValueError("no token left to assign patches to")
    s = sim.clone()
    s[~keep] = float("-inf")
    return s.nan_to_num(nan=float("-inf")).argmax(0)
