"""The package reads as the pipeline: one home per concept, lower layers that know nothing of stages,
functions that fit on a screen."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "workbench"
STAGES = ("pretrain", "describe", "match", "finetune", "evaluate", "align")
LOWER = ("clip", "data")  # and finetune/losses.py: plain PyTorch
MAX_LINES = 80


def _sources():
    return {p: p.read_text() for p in sorted(PKG.rglob("*.py"))}


def test_no_function_is_longer_than_80_lines():
    long = []
    for path, src in _sources().items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 80 lines: " + "; ".join(long)


def test_stage_packages_and_nothing_of_a_stage_at_the_top_level():
    for stage in STAGES:
        assert (PKG / stage / "__init__.py").is_file(), f"workbench/{stage}/ is not a package"
        assert (PKG / stage / "stage.py").is_file(), f"workbench/{stage}/stage.py: what its notebook calls"
    top = {p.stem for p in PKG.glob("*.py")}
    assert not [n for n in top if n.startswith("match_") or n.endswith("_match")]
    assert not top & {"models", "trainer", "losses", "augment", "pretrain", "finetune", "match"}
    assert (PKG / "finetune" / "trainer.py").is_file() and (PKG / "finetune" / "losses.py").is_file()
    assert {p.stem for p in (PKG / "clip").glob("*.py")} >= {"load", "encode", "text", "features"}


def _imports(src: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_lower_layers_know_nothing_of_stages_runs_or_notebooks():
    banned = set(STAGES) | {"runs", "config", "pipeline", "params", "cli"}
    found = []
    for path, src in _sources().items():
        rel = path.relative_to(PKG).parts
        if rel[0] not in LOWER and rel != ("finetune", "losses.py"):
            continue
        for mod in _imports(src):
            name = mod.lstrip(".").removeprefix("workbench.").split(".")[0] if mod.startswith((".", "workbench")) else None
            depth = len(mod) - len(mod.lstrip("."))
            if name in banned and (depth >= 2 or mod.startswith("workbench")):
                found.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not found, found


def _absolute_imports(path: Path, src: str) -> set[str]:
    """Every module a file imports, relative imports resolved (``from .. import match`` -> workbench.match)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(x for x in (base, node.module) if x)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # from .. import match
    return out


def _layer_breaches(stage: str, banned: str) -> list[str]:
    found = []
    for path, src in _sources().items():
        if path.relative_to(PKG).parts[0] != stage:
            continue
        for mod in _absolute_imports(path, src):
            if mod == f"workbench.{banned}" or mod.startswith(f"workbench.{banned}."):
                found.append(f"{path.relative_to(ROOT)} imports {mod}")
    return sorted(found)


def test_layer_check_resolves_relative_imports():
    path = PKG / "align" / "x.py"
    src = "from ..match.diagnostics import f\nfrom .. import match\nimport workbench.match\nfrom .match import g\n"
    assert _absolute_imports(path, src) >= {"workbench.match.diagnostics", "workbench.match", "workbench.align.match"}
    assert "workbench.match" not in _absolute_imports(path, "from .match import g\n")


def test_alignment_does_not_import_matching():
    """align/ needs no part of the match stage (statistics live in workbench/stats.py)."""
    assert not _layer_breaches("align", "match")


def test_the_lower_layers_do_not_draw():
    """data/ and clip/ make pixels with PIL; figures are the stages' (plot_samples: pretrain/plots.py)."""
    found = [f"{p.relative_to(ROOT)} imports {m}" for p, src in _sources().items()
             if p.relative_to(PKG).parts[0] in LOWER for m in _absolute_imports(p, src) if m.split(".")[0] == "matplotlib"]
    assert not found, found


def test_evaluation_does_not_import_finetuning():
    """evaluate/ reads fine-tuning's results through the run folder (runs.py), never from finetune/."""
    assert not _layer_breaches("evaluate", "finetune")


def test_the_config_layer_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, workbench.config, workbench.params; print('torch' in sys.modules or 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def _defining(pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return sorted(str(p.relative_to(PKG)) for p, src in _sources().items() if rx.search(src))


def test_one_home_for_each_concept():
    # the text tower forward (token embedding + positions through the transformer)
    assert _defining(r"\.token_embedding\(") == ["clip/text.py"]
    # the token mask: positions up to the EOT (argmax) token
    assert _defining(r"arange\([^\n]*<=[^\n]*argmax") == ["clip/text.py"]
    # the resize + centre-crop geometry
    assert _defining(r"size / min\(") == ["data/geometry.py"]
    # the image feature cache, and run-directory file names
    assert _defining(r'cached_tensors\("features"') == ["clip/features.py"]
    assert _defining(r'"(?:matches|descriptions)\.jsonl"|"index\.json"') == ["runs.py"]
    # metrics.json is merged by one rule
    assert _defining(r"def update_metrics") == ["runs.py"]
    # figures are saved one way
    assert _defining(r"\.savefig\(") == ["plots.py"]
    # statistics: bootstrap resampling, intervals, paired differences, p-values
    for name in ("bootstrap_ci", "paired_difference", "sign_flip_p", "bootstrap_p", "wilson_interval", "holm"):
        assert _defining(rf"def {name}\(") == ["stats.py"], name
    assert _defining(r"(?i)\.integers\(0, n\b") == ["stats.py"]  # bootstrap indices are drawn in one place
    # device choice ("auto" -> cuda or cpu); results.py only names the machine's GPU in the report
    assert _defining(r"cuda\.is_available\(\)") == ["clip/device.py", "results.py"]
    # zero-shot classification from class names: prompts, classifier, scores (templates are parameters)
    for name in ("classname_prompts", "classname_classifier", "classname_scores"):
        assert _defining(rf"def {name}\(") == ["clip/zeroshot.py"], name
    assert _defining(r"\.format\(c\)|for t in templates") == ["clip/zeroshot.py"]
    # augmentation: crops, shifts and flips of training batches
    assert _defining(r"grid_sample\(|mode=\"reflect\"|\.flip\(-1\)") == ["finetune/augment.py"]
    # normalisation: the model's mean/std as device constants
    assert _defining(r"def channel_constants\(") == ["clip/encode.py"]
