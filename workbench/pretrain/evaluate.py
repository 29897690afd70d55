"""Zero-shot figures of a CLIP on the synthetic benchmark: attribute retrieval and species names."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..clip import encode_images, encode_texts, image_size, load_clip
from ..clip.zeroshot import classname_classifier, classname_scores
from ..data import load_dataset
from ..data import synthetic as syn
from ..data.images import image_cache
from ..plots import save_figure
from .captions import attribute_prompts

SPECIES_PROMPT = "a photo of a {}, a type of bird."


@torch.no_grad()
def evaluate_pretrained(bundle=None, dataset=None, n_heldout: int = 600, heldout_seed: int = 2_000_003,
                        split: str = "test", device: str = "cpu") -> dict:
    """Zero-shot figures of a CLIP on the synthetic benchmark (the ``pretrain`` metrics section).

    - ``attributes``: per attribute, top-1 of "which <value>" among that attribute's values on
      ``n_heldout`` fresh random birds (its own seed: neither pretraining nor demo images), with
      chance = 1 / number of values.
    - ``dataset_attributes``: the same on ``dataset``'s ``split`` images (values per the table).
    - ``species``: top-1 of species-name prompts on ``dataset``'s ``split``, chance 1 / classes.
    """
    if bundle is None:
        bundle = load_clip("tiny", pretrained="synthetic", device=device)
    model, _, tok = bundle
    size = image_size(model)
    images, attrs = syn.random_birds(n_heldout, heldout_seed, size)
    feats = encode_images(model, torch.from_numpy(images))
    out = {"model": bundle.model_id, "attributes": _attribute_scores(model, tok, feats, attrs)}
    out["attribute_mean_top1"] = float(np.mean([v["top1"] for v in out["attributes"].values()]))
    out["attribute_mean_chance"] = float(np.mean([v["chance"] for v in out["attributes"].values()]))
    if dataset is None:
        dataset = load_dataset("synthetic")
    ds = dataset.split(split)
    f = encode_images(model, image_cache(ds.paths(), size))
    rows = ds.table.to_dict("records")
    out["dataset_attributes"] = _attribute_scores(model, tok, f, rows)
    W = classname_classifier(model, tok, ds.classnames, (SPECIES_PROMPT,))
    pred = classname_scores(f, W).argmax(1).numpy()
    out["species"] = {"top1": float((pred == ds.labels).mean()), "chance": 1.0 / ds.num_classes, "n": len(ds),
                      "prompt": SPECIES_PROMPT, "split": split,
                      **label_permutation_null(pred, ds.labels, ds.num_classes)}
    return out


def label_permutation_null(pred, labels, n_classes: int, n: int = 2000, seed: int = 0) -> dict:
    """How far from chance top-1 goes by luck alone, for these predictions.

    The species names are words the model never learnt, so which name an image lands on is decided by
    the names' random token embeddings, not by the image's species: the predictions pile up on a few
    "hub" names. Accuracy is then a draw from the label-permutation null (the same predictions scored
    against randomly renamed classes): mean = chance for balanced classes, spread set by how few names
    take the predictions. Returns ``null_mean``, ``null95`` (2.5 and 97.5 percentiles), ``null_quantile``
    (share of the null at or below the observed top-1) and ``top_name_share`` (the commonest prediction's share).
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n, n_classes)), axis=1)  # n random renamings of the classes
    null = (perms[:, labels] == pred[None, :]).mean(1)
    top1 = float((pred == labels).mean())
    return {"null_mean": float(null.mean()), "null95": [float(q) for q in np.quantile(null, [0.025, 0.975])],
            "null_quantile": float((null <= top1).mean()),
            "top_name_share": float(np.bincount(pred, minlength=n_classes).max() / len(pred))}


def species_note(species: dict) -> str:
    """One sentence on the species-name zero-shot figure, from :func:`label_permutation_null`'s numbers."""
    lo, hi = species["null95"]
    inside = lo <= species["top1"] <= hi
    return (f"Species-name zero-shot is {100 * species['top1']:.1f}% against {100 * species['chance']:.1f}% chance; "
            f"{100 * species['top_name_share']:.0f}% of the images land on a single name, so renaming the classes at random "
            f"gives anywhere from {100 * lo:.1f}% to {100 * hi:.1f}% (95% of renamings): the figure is "
            + ("within what luck gives for names the model never learnt, neither above nor below chance."
               if inside else "outside that range: the names carry information the model learnt (check the captions).")
            )


def _attribute_scores(model, tok, feats: torch.Tensor, attrs: list[dict]) -> dict:
    res = {}
    for a in syn.ATTRIBUTES:
        values = syn.ATTRIBUTE_VALUES[a]
        txt = encode_texts(model, tok, attribute_prompts(a))
        pred = (feats @ txt.T).argmax(1).numpy()
        truth = np.array([values.index(r[a]) for r in attrs])
        counts = np.bincount(truth, minlength=len(values))
        res[a] = {"top1": float((pred == truth).mean()), "chance": 1.0 / len(values),
                  "majority": float(counts.max() / counts.sum()), "n": len(truth)}
    return res


def plot_zero_shot(figures: dict, path=None):
    """Bar chart of :func:`evaluate_pretrained` figures: top-1 per attribute and species, with chance."""
    names = list(figures["attributes"]) + ["species name"]
    top1 = [figures["attributes"][a]["top1"] for a in figures["attributes"]] + [figures["species"]["top1"]]
    chance = [figures["attributes"][a]["chance"] for a in figures["attributes"]] + [figures["species"]["chance"]]
    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(names))
    ax.bar(x, top1, color=["#377eb8"] * (len(names) - 1) + ["#e41a1c"], label="zero-shot top-1")
    ax.scatter(x, chance, marker="_", s=600, color="black", label="chance", zorder=3)
    ax.set_xticks(x, [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1")
    ax.set_title("pretrained tiny CLIP: attribute retrieval (held-out birds) vs species names", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path, dpi=150)
