"""ipywidgets explorer: pick an image, a caption (or type one), a word, a method and a model -> overlay."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .plots import SIM_LABEL, overlay, shared_norm
from .report import pair_maps


def explorer(bundles: dict, images: torch.Tensor, captions: list[list[str]], names: list[str] | None = None,
             classnames: list[str] | None = None):
    """Interactive overlay viewer (build only when ``interactive=True``).

    ``bundles``: ``{"pretrained": bundle, "finetuned": bundle}``; ``images``: uint8 ``N x 3 x S x S``;
    ``captions[i]``: suggested captions of image i (any text can be typed in the caption box).
    The similarity scale is shared across the caption's words, so words compare with each other.
    """
    import ipywidgets as W  # optional UI dependency: loaded only when a widget is built
    from IPython.display import display

    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
    names = names or [f"image {i}" for i in range(len(images))]
    img_w = W.Dropdown(options=[(n, i) for i, n in enumerate(names)], description="image")
    cap_w = W.Combobox(options=captions[0], value=captions[0][0], description="caption", ensure_option=False,
                       layout=W.Layout(width="60%"))
    word_w = W.Dropdown(description="word")
    method_w = W.ToggleButtons(options=["similarity", "rollout", "relevance"], description="method")
    model_w = W.ToggleButtons(options=list(bundles), description="model")
    out = W.Output()
    cache: dict = {}

    def maps():
        key = (model_w.value, img_w.value, cap_w.value)
        if key not in cache:
            cls = classnames[img_w.value] if classnames else None
            cache[key] = pair_maps(bundles[model_w.value], images[img_w.value], cap_w.value, cls)
        return cache[key]

    def render(*_):
        with out:
            out.clear_output(wait=True)
            try:
                if not cap_w.value.strip():
                    print("type a caption")
                    return
                m = maps()
                words = list(m["words"])
                if list(word_w.options) != words or word_w.value not in words:
                    word_w.unobserve(render, "value")  # no re-render while we fix the word list
                    keep = word_w.value
                    word_w.options = words
                    word_w.value = keep if keep in words else words[0]
                    word_w.observe(render, "value")
                method = method_w.value
                if method == "similarity":
                    mp = m["words"][word_w.value]
                    norm = shared_norm(list(m["words"].values()))  # same scale for every word of the caption
                    label, title = SIM_LABEL, f"{word_w.value!r} ({model_w.value})"
                else:
                    mp = m[method]
                    norm, label = shared_norm([mp]), ("rollout weight" if method == "rollout" else "relevance")
                    title = f"{method} ({model_w.value}), cos = {m['similarity']:.3f}"
                fig, ax = plt.subplots(figsize=(4, 4))
                im = overlay(ax, images[img_w.value], mp, norm, title=title)
                fig.colorbar(im, ax=ax, label=label, shrink=0.8)
                plt.show()
            except Exception as e:  # show the error: ipywidgets would swallow it
                print(f"{type(e).__name__}: {e}")

    def on_image(change):
        cap_w.options = captions[change["new"]]
        cap_w.value = captions[change["new"]][0]

    img_w.observe(on_image, "value")
    for w in (cap_w, word_w, method_w, model_w):
        w.observe(render, "value")
    ui = W.VBox([W.HBox([img_w, model_w]), cap_w, W.HBox([word_w, method_w]), out])
    render()
    display(ui)
    return ui
