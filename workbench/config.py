"""Run configuration and the stage schema: presets, YAML files and ``--set`` overrides, validated
against the notebooks' parameters cells; and :class:`Params`, a stage's parameter section as one value.

A config is a plain dict:

    dataset: synthetic          # common keys, passed to every stage that declares them
    seed: 0
    match: {k: 5}               # one section per stage; keys are that notebook's parameters

The schema of a stage section is the parameters cell of its notebook (papermill's inspection),
so a parameter added to a notebook is configurable with no other change. Resolution order:
notebook defaults < preset < config file < ``--set``.
"""
from __future__ import annotations

import ast
import copy
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import papermill as pm
import yaml

from .params import Params

PRESET_DIR = Path(__file__).parent / "presets"
NOT_STAGES = {"compare"}  # numbered notebooks that are not pipeline stages (06_compare: `workbench compare`)
_STAGE_RE = re.compile(r"^(\d\d)_([a-z0-9_]+)\.ipynb$")

# Keys shared by all stages: name -> (type, default). A stage gets those its notebook declares.
COMMON: dict[str, tuple[str, Any]] = {
    "dataset": ("str", "synthetic"),
    "data_root": ("Optional[str]", None),
    "dataset_options": ("dict", {}),
    "seed": ("int", 0),
    "shot_files": ("dict", {}),  # k -> GIST metadata_<k>shot.csv: one fixed draw for fine-tuning and evaluation
    "val_policy": ("str", "full"),  # how k-shot runs choose checkpoints and probe weight decay (full | k_shot)
    "device": ("str", "auto"),
    "progress": ("bool", True),
    "interactive": ("Optional[bool]", None),  # None: widgets in JupyterLab, none headless (params.interactive_view)
}
# Values a common key may take (checked before any notebook runs; the stages check again).
CHOICES: dict[str, tuple] = {"val_policy": ("full", "k_shot")}
# Top-level keys that are not passed to notebooks.
META: dict[str, tuple[str, Any]] = {
    "stages": ("Optional[list]", None),  # stages to run, in pipeline order (None: all)
}
# Keys the pipeline sets itself; not configurable.
RESERVED = {"run_dir"}
# Parameters that change no output of their stage, each with the reason: ``name`` (every stage that declares
# it) or ``stage.name``. Every other parameter must change what its stage writes
# (tests/test_parameter_reach.py); 03_finetune's are the ones FinetuneConfig.OUTPUT_NEUTRAL keeps out of a
# run's identity.
OUTPUT_NEUTRAL: dict[str, str] = {
    "run_dir": "where the outputs go, not what they are",
    "progress": "progress bars only",
    "interactive": "builds ipywidgets explorers in the notebook; writes nothing",
    "device": "the hardware that computes (clip/device.py auto_device): the same computation up to rounding",
    "describe.api_key_env": "the name of the variable holding the API key, not the endpoint or the model",
    "describe.max_concurrency": "HTTP requests in flight at once: the same requests are sent",
    "describe.timeout_s": "how long one HTTP request may take before it is retried, not what it answers",
    "describe.max_retries": "how often a failed HTTP request is retried, not what an answer says",
    "describe.examples_per_class": "how many descriptions per class the notebook shows; nothing is written",
    "match.batch_size": "images per encoder batch: the same features",
    "evaluate.batch_size": "images per encoder batch: the same features",
    "align.batch_size": "image-caption pairs per forward pass: the same maps",
    "finetune.compile": "torch.compile of the same blocks: the same kernels and the same run",
    "finetune.grad_checkpointing": "activations recomputed in backward: the same gradients, less memory",
    "finetune.attention": "which GPU kernel computes attention (the default one on a CPU): the same attention",
    "finetune.resume": "an interrupted run continues from its checkpoint to the run it would have been",
}
# ``model=<arch>`` also switches a stage's ``pretrained`` to the tag the workbench provides for it.
DEFAULT_TAGS = {"tiny": "synthetic", "wb-tiny": "synthetic"}


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str):
    """``yaml.safe_load`` that also reads ``1e-4``, ``5E3`` and ``.5`` as floats."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """The configuration names unknown keys or has values of the wrong type."""


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the first comment line of the YAML)."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.yaml")):
        first = p.read_text().splitlines()[0] if p.read_text().strip() else ""
        out[p.stem] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return out


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(path, e)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def _yaml_error(path, e: yaml.YAMLError) -> str:
    """``<file>, line L, column C: <problem>`` and the offending line, like the other config errors."""
    mark = getattr(e, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None:  # where the construct that went wrong began
        problem += f" ({context} that began at line {cmark.line + 1}, column {cmark.column + 1})"
    snippet = mark.get_snippet() if mark is not None else None
    return f"{path}{where}: YAML syntax error: {problem}" + (f"\n{snippet}" if snippet else "")


def load_source(target: str) -> dict:
    """A preset name or a YAML path -> its dict; a file may name a preset to start from with ``base:``."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        data = load_yaml(path)
        base = data.pop("base", None)
        return deep_merge(load_source(base), data) if base else data
    preset = PRESET_DIR / f"{target}.yaml"
    if not preset.exists():
        raise ConfigError(f"unknown preset {target!r}; presets: {sorted(list_presets())} (or give a .yaml path)")
    data = load_yaml(preset)
    base = data.pop("base", None)
    return deep_merge(load_source(base), data) if base else data


def deep_merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in COMMON:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``3`` -> int, ``null`` -> None, ``[1,3]`` -> list)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, _, raw = item.partition("=")
    key = key.strip()
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


# ---------------------------------------------------------------- schema from notebooks
def notebooks_dir() -> Path:
    """The stage notebooks: ``$WORKBENCH_NOTEBOOKS``, else the copy installed with the package (a wheel
    holds them as ``workbench/notebooks``), else the source checkout's ``notebooks/`` (editable installs,
    ``PYTHONPATH``), the one copy everything else is built from."""
    env = os.environ.get("WORKBENCH_NOTEBOOKS")
    if env:
        return Path(env)
    installed = resources.files("workbench") / "notebooks"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[1] / "notebooks"


def discover_stages(nb_dir: str | Path | None = None) -> dict[str, Path]:
    """Stage name -> notebook, in pipeline order (``NN_<stage>.ipynb``)."""
    nb_dir = Path(nb_dir) if nb_dir else notebooks_dir()
    found = sorted(p for p in nb_dir.glob("*.ipynb") if _STAGE_RE.match(p.name)
                   and _STAGE_RE.match(p.name).group(2) not in NOT_STAGES)
    if not found:
        raise FileNotFoundError(f"no stage notebooks (NN_<stage>.ipynb) in {nb_dir}; set WORKBENCH_NOTEBOOKS to "
                                "the folder that holds them")
    return {_STAGE_RE.match(p.name).group(2): p for p in found}


def notebook_parameters(path: str | Path) -> dict[str, dict]:
    """papermill's inspection of the ``parameters`` cell: name -> {inferred_type_name, default, help}."""
    params = pm.inspect_notebook(str(path))
    if "run_dir" not in params:
        raise ValueError(f"{path}: the parameters cell must declare `run_dir: str = ...`")
    return params


def load_schema(nb_dir: str | Path | None = None) -> dict[str, dict[str, dict]]:
    """Every stage's parameters cell: stage -> name -> {inferred_type_name, default, help}."""
    return {stage: notebook_parameters(p) for stage, p in discover_stages(nb_dir).items()}


def defaults_from_schema(schema: dict[str, dict[str, dict]]) -> dict:
    """Notebook defaults -> a full config (common defaults + one section per stage)."""
    cfg: dict[str, Any] = {k: copy.deepcopy(d) for k, (_, d) in {**COMMON, **META}.items()}
    for stage, params in schema.items():
        cfg[stage] = {
            name: _literal(p["default"], f"{stage}.{name}")
            for name, p in params.items()
            if name not in COMMON and name not in RESERVED
        }
    return cfg


def _literal(src: str, where: str) -> Any:
    try:
        return ast.literal_eval(src)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"default of {where} is not a literal: {src!r}") from e


def resolve(
    schema: dict[str, dict[str, dict]],
    sources: list[dict] = (),
    sets: list[str] = (),
) -> dict:
    """Merge notebook defaults < each source < ``--set`` items, then validate. Returns the full config.

    A bare key that is not common (``--set k=3``, or a top-level ``k: 3`` in a file) sets that
    parameter in every stage that has it. ``model=<arch>`` also switches those stages' ``pretrained``
    to the architecture's own default tag (``tiny`` -> ``synthetic``) unless ``pretrained`` is given.
    """
    cfg = defaults_from_schema(schema)
    unknown: list[str] = []
    for src in sources:
        for key, value in src.items():
            _assign(cfg, schema, key, value, unknown, explicit=_bare_keys(src))
    pairs = [parse_set(s) for s in sets]
    explicit = {k for k, _ in pairs}
    for key, value in pairs:
        _assign(cfg, schema, key, value, unknown, explicit)
    if unknown:
        raise ConfigError(
            "unknown configuration key(s): " + ", ".join(unknown)
            + f". Stages: {list(schema)}; common keys: {sorted(COMMON) + sorted(META)}; "
            "see `workbench params <stage>`."
        )
    validate(cfg, schema)
    return cfg


def _bare_keys(src: dict) -> set[str]:
    return {k for k in src if "." not in k}


def _assign(cfg, schema, key: str, value, unknown: list, explicit: set) -> None:
    if key in RESERVED:
        unknown.append(f"{key} (set by the pipeline)")
        return
    if key in COMMON or key in META:
        cfg[key] = value
        return
    head, _, rest = key.partition(".")
    if head in COMMON and isinstance(cfg.get(head), dict) and rest:  # dataset_options.metadata=...
        cfg[head] = {**cfg[head], rest: value}
        return
    if "." in key:
        stage, _, name = key.partition(".")
        if stage in schema and name in schema[stage] and name not in COMMON and name not in RESERVED:
            cfg[stage][name] = value
        else:
            unknown.append(key)
        return
    if key in schema and isinstance(value, dict):  # a whole stage section
        for name, v in value.items():
            _assign(cfg, schema, f"{key}.{name}", v, unknown, explicit)
        return
    hit = [s for s, params in schema.items() if key in params]
    if not hit:
        unknown.append(key)
        return
    for stage in hit:
        cfg[stage][key] = value
        if key == "model" and "pretrained" in schema[stage] and "pretrained" not in explicit:
            tag = DEFAULT_TAGS.get(str(value))
            if tag is not None:
                cfg[stage]["pretrained"] = tag


# ---------------------------------------------------------------- type checking
_BASIC = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,), "list": (list,),
          "dict": (dict,), "None": (type(None),), "tuple": (list, tuple)}


def type_ok(value: Any, annotation: str | None) -> bool:
    """Check ``value`` against a parameter annotation as papermill reports it (``Optional[str]``...)."""
    if not annotation or annotation == "None":
        return True  # untyped parameter: nothing to check
    ann = annotation.replace("typing.", "").strip()
    m = re.fullmatch(r"Optional\[(.*)\]", ann)
    if m:
        return value is None or type_ok(value, m.group(1))
    m = re.fullmatch(r"Union\[(.*)\]", ann)
    if m:
        return any(type_ok(value, a) for a in _split_args(m.group(1)))
    if "|" in ann:
        return any(type_ok(value, a) for a in ann.split("|"))
    base = re.sub(r"\[.*\]$", "", ann).strip().lower()
    types = _BASIC.get(base)
    if types is None:
        return True  # an annotation we do not model
    if isinstance(value, bool) and bool not in types:
        return False  # True is an int in Python; not a valid int parameter
    return isinstance(value, types)


def _split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def validate(cfg: dict, schema: dict[str, dict[str, dict]]) -> None:
    """Raise :class:`ConfigError` listing every key whose value has the wrong type."""
    bad = []
    for key, (ann, _) in {**COMMON, **META}.items():
        if not type_ok(cfg.get(key), ann):
            bad.append(f"{key}={cfg.get(key)!r} (expected {ann})")
    for key, allowed in CHOICES.items():
        if cfg.get(key) not in allowed:
            bad.append(f"{key}={cfg.get(key)!r} (expected one of {list(allowed)})")
    if cfg.get("stages"):
        unknown = [s for s in cfg["stages"] if s not in schema]
        if unknown:
            bad.append(f"stages: unknown stage(s) {unknown}; stages are {list(schema)}")
    for stage, params in schema.items():
        for name, value in cfg.get(stage, {}).items():
            ann = params.get(name, {}).get("inferred_type_name")
            if not type_ok(value, ann):
                bad.append(f"{stage}.{name}={value!r} (expected {ann})")
    if bad:
        raise ConfigError("invalid configuration value(s): " + "; ".join(bad))


def stage_parameters(cfg: dict, stage: str, schema: dict[str, dict[str, dict]]) -> dict:
    """The parameters to pass to one stage's notebook (common keys it declares + its section)."""
    declared = schema[stage]
    params = {k: cfg[k] for k in COMMON if k in declared}
    if "interactive" in params and params["interactive"] is None:
        params["interactive"] = False  # a run is headless (even when started from a JupyterLab kernel)
    params.update(cfg.get(stage, {}))
    return params


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------- a stage's parameters outside a notebook
def stage_params(stage: str, nb_dir: str | Path | None = None, **overrides) -> Params:
    """A stage's parameters outside a notebook (tests, ``torchrun``): its notebook's defaults, then
    ``overrides``, validated like a run configuration."""
    schema = load_schema(nb_dir)
    if stage not in schema:
        raise ConfigError(f"unknown stage {stage!r}; stages: {list(schema)}")
    params = {name: _literal(p["default"], f"{stage}.{name}") for name, p in schema[stage].items()}
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise ConfigError(f"unknown parameter(s) of stage {stage!r}: {unknown}; see `workbench params {stage}`")
    params.update(overrides)
    bad = [f"{k}={v!r} (expected {schema[stage][k]['inferred_type_name']})" for k, v in overrides.items()
           if not type_ok(v, schema[stage][k]["inferred_type_name"])]
    if bad:
        raise ConfigError(f"invalid parameter value(s) of stage {stage!r}: " + "; ".join(bad))
    return Params(params)
