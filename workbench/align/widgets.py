"""ipywidgets explorer: pick an image, a caption (or type one), a word, a method and a model -> overlay."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from . import maps as map_methods
from .plots import SIM_LABEL, overlay, shared_norm
from .report import pair_maps


def explorer(bundles: dict, images: torch.Tensor, captions: list[list[str]], names: list[str] | None = None,
             classnames: list[str] | None = None):
    """Interactive overlay viewer (05_align builds it by default in JupyterLab).

    ``bundles``: ``{"pretrained": bundle, "finetuned": bundle}``; ``images``: uint8 ``N x 3 x S x S``;
    ``captions[i]``: suggested captions of image i (any text can be typed in the caption box).
    The similarity scale is shared across the caption's words, so words compare with each other.
    The method starts at :data:`~workbench.align.maps.DEFAULT`; a dense method's ``query`` is the
    caption's sentence embedding or the chosen word's token state.
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
    method_w = W.Dropdown(options=list(map_methods.METHODS), value=map_methods.DEFAULT, description="method")
    query_w = W.ToggleButtons(options=list(map_methods.QUERIES), value="sentence", description="query")
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
                query_w.disabled = map_methods.METHODS[method].dense is None or method == "similarity"
                mp, norm, label, title = chosen_map(bundles[model_w.value], images[img_w.value], m, cap_w.value,
                                                    word_w.value, method, query_w.value, model_w.value, cache, img_w.value)
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
    for w in (cap_w, word_w, method_w, query_w, model_w):
        w.observe(render, "value")
    ui = W.VBox([W.HBox([img_w, model_w]), cap_w, W.HBox([word_w, method_w, query_w]), out])
    render()
    display(ui)
    return ui


def chosen_map(bundle, image: torch.Tensor, m: dict, caption: str, word: str, method: str, query: str, model_name: str,
               cache: dict, image_key=None) -> tuple:
    """The explorer's overlay: ``(map, colour norm, colour-bar label, title)`` for one method; ``m``:
    :func:`~workbench.align.report.pair_maps` of the image-caption pair (similarity, rollout, relevance);
    other dense methods are computed here and kept in ``cache`` under ``image_key`` (the image's index)."""
    if method == "similarity":
        norm = shared_norm(list(m["words"].values()))  # same scale for every word of the caption
        return m["words"][word], norm, SIM_LABEL, f"{word!r} ({model_name})"
    if map_methods.METHODS[method].dense is None:
        label = "rollout weight" if method == "rollout" else "relevance"
        return m[method], shared_norm([m[method]]), label, f"{method} ({model_name}), cos = {m['similarity']:.3f}"
    key = (model_name, image_key, caption, method, query, word if query == "word" else None)
    if key not in cache:
        model, _, tok = bundle
        cache[key] = map_methods.maps(model, tok, image, [caption], [word], method=method, query=query)[0]
    what = repr(word) if query == "word" else "sentence"
    return cache[key], shared_norm([cache[key]]), "cosine (patch · query)", f"{method}, {what} ({model_name})"
