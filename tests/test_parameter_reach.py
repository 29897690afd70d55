"""Every parameter of every stage changes what the stage writes, unless ``config.OUTPUT_NEUTRAL`` says why
it cannot. (``tests/test_project.py`` checks that something reads each name; this checks that its value
matters.)

How: a stage's notebook runs in this process, cell by cell, the parameters cell's values replaced as
papermill replaces them, on a tiny synthetic dataset, in a fresh copy of a run folder that holds the
earlier stages' outputs. What it leaves in the folder is its output: JSON and JSONL parsed, timings and
the folder's own path left out, every other file hashed. A case changes one parameter from a base
configuration and expects another output. To stay cheap on two cores:

- figures are not rendered: ``savefig`` writes a digest of what the figure draws (lines, bars, images,
  texts), so a figure that shows other data is another file;
- the LLM backends answer from a stub whose text depends on the whole request (the backend's identity,
  the messages, the sampling parameters and the seed: what an LLM's answer depends on), and the
  transformers backend loads nothing (a stand-in module, no download, no import of transformers);
- ``model`` switches to ``wb-reach``, a smaller open_clip configuration registered here, with random
  weights.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pytest

from workbench.config import OUTPUT_NEUTRAL, discover_stages, load_schema

OPTS = {"n_species": 3, "n_train": 3, "n_val": 2, "n_test": 2}
NOISY = {**OPTS, "noise": 20.0, "occlusion": 0.0}  # the same species and files, other pixels
OTHER = {**OPTS, "seed": 1}  # other species
COMMON = {"dataset": "synthetic", "data_root": None, "dataset_options": OPTS, "seed": 0, "device": "cpu",
          "progress": False}
BASE = {
    "pretrain": {"n_heldout": 20},
    "describe": {"per_class": 2},
    "match": {"n_examples": 2},
    "finetune": {"methods": ["finetune-classname"], "shots": [1], "seeds": [0], "epochs": 1, "batch_size": 4},
    "evaluate": {"shots": ["full", 1], "seeds": [0], "bootstrap_n": 20, "weight_decays": [0.1, 0.01]},
    "align": {"max_images": 4, "n_examples": 1, "methods": ["similarity"], "parts": ["crown", "wing"]},
}
# stages run first (base parameters + these), once, into the folder every case of the stage starts from
UPSTREAM = {
    "match": [("describe", {})],
    "finetune": [("describe", {}), ("match", {})],
    "evaluate": [("describe", {}), ("match", {})],
    "align": [("describe", {}), ("match", {}), ("finetune", {"shots": ["full"]})],
}
# volatile keys of the stages' JSON outputs: wall-clock times
VOLATILE = {"time", "seconds", "timing", "train_s", "pairs_per_s", "created"}


class At:
    """A file or folder the module fixture makes (``At("noisy_root")``), put in a value when a case runs."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"At({self.name!r})"


@dataclass
class Case:
    value: Any  # the parameter's new value
    base: dict  # the base configuration's changes, where the parameter matters only in some settings
    base_raises: bool = False  # the base configuration fails (the new value is what makes the stage run)
    also: dict | None = None  # other keys the new value needs (no valid configuration differs in this one alone)


def case(value, base=None, **kw) -> Case:
    return Case(value, dict(base or {}), **kw)


OPENAI = {"backend": "openai", "llm": "stub-llm", "api_base": "http://127.0.0.1:9/v1"}
LOCAL_LM = {"backend": "transformers", "llm": "stub-lm", "deterministic": True}
RANDOM = {"pretrained": None}
CUB = {"dataset": "cub", "data_root": At("cub_root"), "dataset_options": {}}
DATA = {  # the common data keys, for every stage that declares them
    "dataset": case("gist", {"data_root": At("synthetic_root"), "dataset_options": {}}),  # its metadata.csv
    "data_root": case(At("noisy_root")),
    "dataset_options": case(NOISY),
    "seed": case(1),
}
CASES: dict[str, dict[str, Case]] = {
    "pretrain": {**DATA, "model": case("ViT-B-32"), "pretrained": case(None), "n_heldout": case(21)},
    "describe": {
        # descriptions depend on the class names (and the dataset's prompt domain), not on the pixels
        "dataset": case("cub", {"dataset": "gist", "data_root": At("cub_root"), "dataset_options": {}, **OPENAI}),
        "data_root": case(At("other_root")), "dataset_options": case(OTHER), "sampling_seed": case(1),
        "backend": case("transformers", OPENAI), "llm": case("other-llm", OPENAI), "domain": case("flowers", OPENAI),
        "domain_noun": case("mushroom", {**OPENAI, "domain": "generic"}), "per_class": case(3),
        "api_base": case("http://127.0.0.1:10/v1", OPENAI), "temperature": case(0.2, OPENAI),
        "top_p": case(0.5, OPENAI), "max_tokens": case(50, OPENAI), "batch_size": case(2, LOCAL_LM),
        "deterministic": case(False, LOCAL_LM), "max_attempts": case(1, OPENAI),
        "long_captions": case(At("long_captions_b"), {"backend": "import", "long_captions": At("long_captions_a")}),
        "attributes_root": case(At("cub_flipped"), {**CUB, "backend": "attributes"}),
        "model": case("wb-reach"),
    },
    "match": {
        **{k: v for k, v in DATA.items() if k != "seed"}, "examples_seed": case(1), "model": case("wb-reach", RANDOM), "pretrained": case(None), "k": case(3), "center": case(True),
        "summarize": case("extractive"), "summarize_options": case({"target_tokens": 8}, {"summarize": "extractive"}),
        "skip_bad_images": case(True, {"data_root": At("bad_root")}, base_raises=True), "split": case("val"),
        "n_examples": case(3), "import_captions": case(At("captions_top5")), "export_captions": case(False),
    },
    "finetune": {
        **DATA, "model": case("wb-reach", RANDOM), "pretrained": case(None), "methods": case(["gist"]),
        "shots": case([2]), "seeds": case([1]), "shot_files": case({"1": At("shot_file")}),
        "oracle_attributes": case(["beak_shape"], {"methods": ["oracle"]}),
        "val_policy": case("k_shot"), "epochs": case(2), "batch_size": case(2), "lr": case(1e-3),
        # 3 pairs in one batch: 1 step per epoch; steps=3 trains 3, validated after each (epoch ends) or at 2 and 3
        "steps": case(3), "validate_every": case(2, {"steps": 3}),
        "weight_decay": case(0.2), "betas": case([0.8, 0.9]), "eps": case(1e-4), "warmup": case(0.5),
        "loss": case("class-aware"), "class_weight": case(0.5, {"loss": "class-aware"}),
        "captions_per_image": case(1, {"methods": ["gist"]}), "crop_scale": case([0.8, 1.0]),
        "grad_clip": case(0.5), "precision": case("fp32"), "freeze_text": case(True),
    },
    "evaluate": {
        **DATA, "model": case("wb-reach", RANDOM), "pretrained": case(None), "shots": case(["full", 2]),
        "seeds": case([1]), "shot_files": case({"1": At("shot_file")}), "val_policy": case("k_shot"),
        "weight_decays": case([0.1]), "use_trainval": case(True, {"shots": ["full"]}), "bootstrap_n": case(30),
        "templates": case(["a photo of a {}."]), "use_descriptions": case(False),
        # a template far from the base: on this small draw "a bird: {text}" predicts exactly what "{text}" does
        "description_template": case("{classname}"),
    },
    "align": {
        **DATA, "dataset": case("cub", also={"data_root": At("cub_root"), "dataset_options": {}}),  # parts needed
        "model": case("wb-reach", RANDOM), "pretrained": case(None),
        "finetuned_method": case("finetune-classname"), "finetuned_shots": case(1), "split": case("val"), "max_images": case(3),
        "methods": case(["rollout"]), "word_specificity": case(False), "parts": case(["crown", "beak"]), "part_nouns": case({"wing": "tail"}),  # "feathers": the same hits on 4 images
        "caption_template": case("a photo of a bird with {desc}"), "radius": case(3.0, CUB), "n_examples": case(2),
    },
}
# parameters nothing in their stage reads: xfail until the notebook drops them or the stage uses them
DEAD = {("pretrain", "seed"): "00_pretrain declares seed but nothing in the stage reads it (the held-out birds "
                              "and the label-permutation null have fixed seeds of their own)"}

SCHEMA = load_schema()
NOTEBOOKS = discover_stages()


def _neutral(stage: str, name: str) -> str | None:
    return OUTPUT_NEUTRAL.get(f"{stage}.{name}") or OUTPUT_NEUTRAL.get(name)


def _ids():
    out = []
    for stage, cases in CASES.items():
        for name in cases:
            if name not in SCHEMA[stage]:
                continue  # a common key the stage does not declare
            marks = [pytest.mark.xfail(strict=True, reason=DEAD[stage, name])] if (stage, name) in DEAD else []
            out.append(pytest.param(stage, name, id=f"{stage}.{name}", marks=marks))
    return out


# ----------------------------------------------------------------------------- every parameter is classified
def test_every_parameter_has_a_case_or_a_reason_it_changes_nothing():
    """A parameter added to a notebook needs a case here (a value that must change the output) or an entry in
    ``config.OUTPUT_NEUTRAL`` (a one-line reason it changes no output); nothing is listed that is gone."""
    unclassified, both = [], []
    for stage, params in SCHEMA.items():
        for name in params:
            listed = name in CASES.get(stage, {}) and name in params
            neutral = _neutral(stage, name)
            if not listed and not neutral:
                unclassified.append(f"{stage}.{name}")
            if listed and neutral:
                both.append(f"{stage}.{name}")
    assert not unclassified, f"parameters with neither a case nor an OUTPUT_NEUTRAL reason: {unclassified}"
    assert not both, f"parameters both output-neutral and expected to change the output: {both}"
    gone = [f"{s}.{n}" for s, cases in CASES.items() for n in cases
            if n not in SCHEMA[s] and not (n in DATA and cases[n] is DATA[n])]
    gone += [k for k in OUTPUT_NEUTRAL if not any(
        (k.partition(".")[2] in SCHEMA.get(k.partition(".")[0], {})) if "." in k else k in p for p in SCHEMA.values())]
    assert not gone, f"cases or OUTPUT_NEUTRAL entries naming no parameter: {gone}"
    assert all(isinstance(v, str) and v.strip() and "\n" not in v for v in OUTPUT_NEUTRAL.values())


def test_fine_tuning_identity_and_the_neutral_list_agree():
    """A 03_finetune parameter listed output-neutral is one FinetuneConfig keeps out of a run's identity, and
    the other way round: the list and the identity cannot drift apart."""
    from workbench.finetune import FinetuneConfig

    config = {f.name for f in fields(FinetuneConfig)}
    declared = {n for n in SCHEMA["finetune"] if n in config}
    listed = {n for n in declared if _neutral("finetune", n)}
    assert listed == set(FinetuneConfig.OUTPUT_NEUTRAL) & declared


# ----------------------------------------------------------------------------- running a stage in-process
def _figure_digest(fig) -> list:
    """What a figure draws, as plain values: line data, bars and patches, images, collections, texts."""
    from matplotlib.collections import Collection
    from matplotlib.image import AxesImage
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.text import Text

    def arr(a):
        a = np.ma.filled(np.ma.asarray(a, dtype=float), np.nan) if a is not None else np.zeros(0)
        return hashlib.sha256(np.round(a, 5).tobytes() + str(a.shape).encode()).hexdigest()[:16]

    out = []
    for a in fig.findobj():
        if isinstance(a, Line2D):
            out.append(["line", arr(a.get_xydata())])
        elif isinstance(a, Text) and a.get_text():
            out.append(["text", a.get_text()])
        elif isinstance(a, AxesImage):
            out.append(["image", arr(a.get_array())])
        elif isinstance(a, Rectangle):
            out.append(["rect", arr([*a.get_xy(), a.get_width(), a.get_height()]), str(a.get_facecolor())])
        elif isinstance(a, Patch):
            out.append(["patch", arr(a.get_path().vertices)])
        elif isinstance(a, Collection):
            out.append(["collection", arr(a.get_offsets()), arr(a.get_array())])
    return out


def _savefig(fig, fname, *args, **kwargs):
    Path(fname).write_text(json.dumps(_figure_digest(fig)))


def _llm_text(be, req) -> str:
    h = hashlib.sha256(json.dumps([be.identity(), be.sampling(), req.messages, req.params], sort_keys=True,
                                  default=str).encode()).hexdigest()
    return f"The bird shows a plumage pattern {h[:12]} with a pale crown and dark wings."


def _stub_complete(self, requests):
    return [_llm_text(self, r) for r in requests]


def _fake_transformers() -> dict:
    """Stand-ins for what TransformersBackend takes from transformers: nothing is loaded."""
    class LM:
        generation_config = None

        def to(self, device):
            return self

        def eval(self):
            return self

    class Tok:
        padding_side, pad_token_id = "right", 0

    mod, utils = types.ModuleType("transformers"), types.ModuleType("transformers.utils")
    mod.__version__ = "4.56.0"
    mod.AutoModelForCausalLM = types.SimpleNamespace(from_pretrained=lambda *a, **k: LM())
    mod.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: Tok())
    utils.is_accelerate_available = lambda: True
    mod.utils = utils
    return {"transformers": mod, "transformers.utils": utils}


def _cells(stage: str) -> list[str]:
    nb = json.loads(NOTEBOOKS[stage].read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _execute(stage: str, params: dict, run_dir: Path) -> None:
    """The notebook's cells in a namespace of their own, as papermill runs them (cwd: the run folder)."""
    import matplotlib.pyplot as plt

    cells = _cells(stage)
    ns: dict = {"__name__": "__main__"}
    exec(compile(cells[0], f"{stage}[parameters]", "exec"), ns)
    assert set(params) <= set(ns["__annotations__"]), set(params) - set(ns["__annotations__"])
    ns.update(params, run_dir=str(run_dir))
    try:
        with _cwd(run_dir):
            for i, src in enumerate(cells[1:], 1):
                exec(compile(src, f"{stage}[{i}]", "exec"), ns)
    finally:
        plt.close("all")


def _flatten(x, path: tuple, run: str, out: dict) -> None:
    if isinstance(x, dict) and x:
        for k, v in x.items():
            if k not in VOLATILE:
                _flatten(v, (*path, str(k)), run, out)
    elif isinstance(x, list) and x:
        for i, v in enumerate(x):
            _flatten(v, (*path, i), run, out)
    else:
        out[path] = json.dumps(x, default=str).replace(run, "<run>")


def _snapshot(run_dir: Path) -> dict:
    """Every file in the run folder: JSON and JSONL values by path (volatile keys left out), others hashed."""
    run, out = str(run_dir), {}
    for f in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = str(f.relative_to(run_dir))
        if f.suffix == ".json":
            _flatten(json.loads(f.read_text()), (rel,), run, out)
        elif f.suffix == ".jsonl":
            _flatten([json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()], (rel,), run, out)
        elif f.suffix == ".png":  # the figure digest (_savefig)
            out[(rel,)] = hashlib.sha256(f.read_text().replace(run, "<run>").encode()).hexdigest()
        else:
            out[(rel,)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _resolve(v, env: dict):
    if isinstance(v, At):
        return str(env[v.name])
    if isinstance(v, dict):
        return {k: _resolve(x, env) for k, x in v.items()}
    if isinstance(v, list):
        return [_resolve(x, env) for x in v]
    return v


class Runs:
    """Stage outputs by configuration, each run in a fresh copy of its stage's starting folder (at the same
    path every time)."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.done, self.starts, self.n = root, env, {}, {}, 0

    def params(self, stage: str, changes: dict) -> dict:
        """The notebook's defaults < COMMON (the keys it declares) < BASE < ``changes``."""
        p = {k: ast.literal_eval(v["default"]) for k, v in SCHEMA[stage].items() if k != "run_dir"}
        p.update({k: v for k, v in COMMON.items() if k in SCHEMA[stage]})
        return _resolve({**p, **BASE[stage], **changes}, self.env)

    def start(self, stage: str) -> Path:
        """The folder a stage's cases start from: the earlier stages' outputs under the base parameters."""
        if stage not in self.starts:
            folder = self.root / f"start-{stage}"
            folder.mkdir()
            for earlier, changes in UPSTREAM.get(stage, []):
                _execute(earlier, self.params(earlier, changes), folder)
            self.starts[stage] = folder
        return self.starts[stage]

    def outcome(self, stage: str, params: dict, fresh: bool = False) -> dict:
        key = json.dumps([stage, params], sort_keys=True, default=str)
        if key not in self.done or fresh:
            self.n += 1
            run = self.root / f"run-{stage}"  # one path: outputs may hold digests of paths in the run folder
            shutil.copytree(self.start(stage), run)
            before = _snapshot(run)
            try:
                _execute(stage, params, run)
                out = _snapshot(run)
            except Exception as e:  # noqa: BLE001 - an outcome like any other (the case says which may fail)
                out = {("error",): f"{type(e).__name__}: {str(e).replace(str(run), '<run>')[:500]}"}
            else:
                assert out != before, f"{stage} wrote nothing"
            shutil.rmtree(run)
            self.done[key] = out
        return self.done[key]


def _make_env(root: Path) -> dict:
    """The files cases point at: datasets, a shot file, captions and description files, a model config."""
    from fixtures_datasets import make_mini_cub

    from workbench.data import load_dataset

    env = {}
    syn = load_dataset("synthetic", root / "synthetic", **OPTS)
    env["synthetic_root"] = syn.root
    env["noisy_root"] = load_dataset("synthetic", root / "noisy", **NOISY).root
    env["other_root"] = load_dataset("synthetic", root / "other", **OTHER).root
    bad = shutil.copytree(syn.root, root / "bad")
    (bad / syn.table.loc[syn.table["split"] == "train", "filename"].iloc[0]).write_bytes(b"not an image")
    env["bad_root"] = bad
    train = syn.table[syn.table["split"] == "train"].sort_values("filename")
    picked = pd.concat([train[train["label"] == y].iloc[[2]] for y in range(syn.num_classes)])
    env["shot_file"] = root / "metadata_1shot.csv"
    pd.concat([picked, syn.table[syn.table["split"] != "train"]])[["filename", "split", "label", "species"]].to_csv(
        env["shot_file"], index=False)
    env["captions_top5"] = root / "captions_top5.json"
    env["captions_top5"].write_text(json.dumps({f: [f"imported caption {i} of {f}" for i in range(5)]
                                                for f in train["filename"]}))
    for tag in ("a", "b"):
        env[f"long_captions_{tag}"] = root / f"long_captions_{tag}.json"
        env[f"long_captions_{tag}"].write_text(json.dumps(
            {c: [f"A {tag} bird with a {w} crown and long wings." for w in ("red", "blue")] for c in syn.classnames}))
    env["cub_root"] = make_mini_cub(root / "cub")
    shutil.copytree(env["cub_root"].parent, root / "cub-flipped")  # attributes.txt sits one level up
    flipped = root / "cub-flipped" / env["cub_root"].name
    labels = flipped / "attributes" / "image_attribute_labels.txt"
    labels.write_text("".join(" ".join([a, b, str(1 - int(c)), *rest]) + "\n"
                              for a, b, c, *rest in (ln.split() for ln in labels.read_text().splitlines())))
    env["cub_flipped"] = flipped
    return env


def _register_reach_model(folder: Path) -> None:
    """``wb-reach``: a smaller ViT CLIP than wb-tiny (random weights; a 32-token context)."""
    import open_clip

    folder.mkdir()
    (folder / "wb-reach.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}))
    open_clip.add_model_config(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import open_clip
    from matplotlib.figure import Figure

    from workbench.describe.hf_local import TransformersBackend
    from workbench.describe.openai_api import OpenAIBackend

    root = tmp_path_factory.mktemp("reach")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CACHE", str(root / "cache"))
        mp.delenv("OPENAI_API_KEY", raising=False)
        matplotlib.use("Agg")
        mp.setattr(Figure, "savefig", _savefig)
        mp.setattr(Figure, "tight_layout", lambda self, *a, **k: None)
        mp.setattr("IPython.display.display", lambda *a, **k: None)
        mp.setattr(OpenAIBackend, "complete", _stub_complete)
        mp.setattr(TransformersBackend, "complete", _stub_complete)
        for name, mod in _fake_transformers().items():
            mp.setitem(sys.modules, name, mod)
        mp.setattr(open_clip, "get_tokenizer", functools.lru_cache(open_clip.get_tokenizer))  # reads its vocabulary
        _register_reach_model(root / "model_configs")
        yield Runs(root, _make_env(root))


# ----------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("stage", list(BASE))
def test_a_stage_run_twice_writes_the_same(runs, stage):
    """The comparison means something: the base configuration twice gives the same outputs."""
    p = runs.params(stage, {})
    first = runs.outcome(stage, p)
    assert ("error",) not in first, first[("error",)]
    again = runs.outcome(stage, p, fresh=True)
    assert first == again, sorted(k for k in set(first) | set(again) if first.get(k) != again.get(k))[:10]


@pytest.mark.parametrize("stage,name", _ids())
def test_changing_a_parameter_changes_what_the_stage_writes(runs, stage, name):
    c = CASES[stage][name]
    base = runs.params(stage, c.base)
    changed = {**base, **_resolve(c.also or {}, runs.env), name: _resolve(c.value, runs.env)}
    assert json.dumps(changed[name], default=str) != json.dumps(base[name], default=str), "the case changes nothing"
    before, after = runs.outcome(stage, base), runs.outcome(stage, changed)
    assert ("error",) not in after, f"{stage}.{name}={changed[name]!r}: {after[('error',)]}"
    assert c.base_raises == (("error",) in before), before.get(("error",), "the base configuration runs")
    assert before != after, (f"{stage}.{name}: {base[name]!r} -> {changed[name]!r} leaves every output as it was; "
                             "if that is right, give the reason in config.OUTPUT_NEUTRAL")
