"""ipywidgets browser for matches: pick a class and an image, see it with its top-k captions and scores."""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Sequence

from PIL import Image

from ..data.images import to_rgb


def caption_table_html(record: dict) -> str:
    """An HTML table of one image's matched captions: rank, cosine, probability, caption, raw text."""
    rows = []
    scores = record.get("scores") or [None] * len(record["captions"])
    probs = record.get("probs") or [None] * len(record["captions"])
    for i, (cap, raw, s, p) in enumerate(zip(record["captions"], record["descriptions"], scores, probs)):
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        rows.append(
            f"<tr><td>{i + 1}</td><td>{fmt(s, '.4f')}</td><td>{fmt(p, '.3f')}</td>"
            f"<td>{html.escape(cap)}</td><td style='color:#777'>{html.escape(raw)}</td></tr>"
        )
    head = "<tr><th>#</th><th>cosine</th><th>prob</th><th>caption</th><th>description</th></tr>"
    title = f"<b>{html.escape(record['class'])}</b> — {html.escape(record['image'])}"
    return f"{title}<table style='font-size:12px'>{head}{''.join(rows)}</table>"


def _png(path: Path, size: int = 256) -> bytes:
    with Image.open(path) as im:
        im = to_rgb(im)  # as the model sees it: upright, 16-bit scaled, alpha over the background
        scale = size / max(im.size)
        if scale > 1:  # small synthetic images: enlarge so they can be seen, keep pixels crisp
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


def match_browser(records: Sequence[dict], root: str | Path, image_px: int = 256):
    """Class dropdown -> image dropdown -> image + caption table. Returns the widget (display it)."""
    import ipywidgets as W  # optional UI dependency: loaded only when a widget is built

    root = Path(root)
    by_class: dict[str, list[dict]] = {}
    for r in records:
        by_class.setdefault(r["class"], []).append(r)
    classes = sorted(by_class)
    cls = W.Dropdown(options=classes, description="class")
    img = W.Dropdown(options=[], description="image", layout=W.Layout(width="420px"))
    picture = W.Image(format="png", width=image_px)
    table = W.HTML()

    def on_class(change=None):
        img.options = [r["image"] for r in by_class[cls.value]]
        if img.options:
            img.value = img.options[0]

    def on_image(change=None):
        if img.value is None:
            return
        rec = next(r for r in by_class[cls.value] if r["image"] == img.value)
        picture.value = _png(root / rec["image"], image_px)
        table.value = caption_table_html(rec)

    cls.observe(on_class, names="value")
    img.observe(on_image, names="value")
    box = W.VBox([W.HBox([cls, img]), W.HBox([picture, table])])
    box.class_dropdown, box.image_dropdown, box.picture, box.table = cls, img, picture, table  # for tests
    if classes:
        on_class()
        on_image()
    return box
