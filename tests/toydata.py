"""A tiny image dataset for fine-tuning tests: each class is a coloured square on noise."""
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from workbench.data import Dataset

# `workbench run demo` overrides that give the quick pipeline tests want: the preset's fine-tuning (the
# instrument's 300-step, 5-shot design with the oracle) is the demo's, not a test's.
QUICK_DEMO = ["finetune.methods=[gist, finetune-classname]", "finetune.steps=0", "finetune.validate_every=0",
              "align.finetuned_shots=full"]

COLORS = [(220, 40, 40), (40, 200, 60), (50, 80, 220), (230, 210, 40), (200, 60, 200), (40, 200, 210)]


def make_toy_dataset(root, n_classes=4, n_train=6, n_val=3, n_test=2, size=64, seed=0) -> Dataset:
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    names = [f"toy species {c}" for c in range(n_classes)]
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for c in range(n_classes):
            for k in range(count):
                img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                s = int(rng.integers(size // 4, size // 2))
                x, y = rng.integers(0, size - s, 2)
                img[y : y + s, x : x + s] = COLORS[c % len(COLORS)]
                f = f"images/{split}_{c}_{k}.png"
                Image.fromarray(img).save(root / f)
                rows.append({"filename": f, "split": split, "label": c, "species": names[c]})
    return Dataset("toy", root, pd.DataFrame(rows), names)


def make_matches(ds: Dataset, k=3):
    """matches.jsonl records: k "class: caption" captions per training image."""
    out = []
    tr = ds.split("train").table
    for f, y, c in zip(tr["filename"], tr["label"], tr["species"]):
        caps = [f"{c}: a {['red', 'green', 'blue', 'yellow', 'pink', 'cyan'][y % 6]} square, view {j}" for j in range(k)]
        out.append({"image": f, "label": int(y), "class": c, "description_ids": [], "descriptions": caps,
                    "captions": caps, "scores": [0.3] * k, "probs": [1 / k] * k, "model": "tiny", "pretrained": None})
    return out
