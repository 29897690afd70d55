"""Project-level checks: environment.yml in sync, notebooks well-formed and stripped."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_environment_yml_in_sync_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = env["dependencies"]
    python = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert python == ["python=3.11"]
    m = re.match(r">=\s*3\.(\d+)", project["requires-python"])
    assert m and int(m.group(1)) <= 11
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    # pyproject.toml is the one list of dependencies; environment.yml installs the project from it.
    assert pip == ["-e .[dev]"]
    assert "dev" in project["optional-dependencies"]
    conda_pkgs = [d for d in deps if isinstance(d, str) and not d.startswith(("python", "pip"))]
    assert conda_pkgs == [], "declare dependencies in pyproject.toml only"


def test_readme_shows_the_two_commands_first():
    text = (ROOT / "README.md").read_text()
    first = text[: text.find("\n## ", text.find("\n## ") + 1)]
    assert "make demo" in first and "make test" in first


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_parameters_all_parsed(nb):
    """papermill silently drops parameter lines it cannot parse (e.g. `x: str | None = ...`)."""
    import papermill as pm

    cells = json.loads(nb.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), "first code cell must be tagged"
    src = "".join(code[0]["source"])
    declared = re.findall(r"^([A-Za-z_]\w*)\s*:", src, flags=re.M)
    parsed = pm.inspect_notebook(str(nb))
    assert set(declared) == set(parsed), f"not parsed by papermill: {set(declared) - set(parsed)}"
    assert "run_dir" in parsed
    for name, p in parsed.items():
        assert p["inferred_type_name"] not in ("None", None), f"{name} has no type"
        assert p["help"], f"{name} has no comment"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_committed_without_outputs(nb):
    cells = json.loads(nb.read_text())["cells"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "workbench" / "presets").glob("*.yaml")))
def test_every_preset_resolves_against_the_notebooks(preset):
    from workbench import pipeline
    from workbench.config import NOT_STAGES

    plan = pipeline.plan(preset)
    assert list(plan.stages) == [p.name[3:-6] for p in NOTEBOOKS if p.name[3:-6] not in NOT_STAGES]


def _stage_code(stage: str) -> str:
    pkg = ROOT / "workbench" / stage
    nb = next(p for p in NOTEBOOKS if p.stem.endswith(stage))
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"][1:]
    return "\n".join(p.read_text() for p in pkg.rglob("*.py")) + "\n".join("".join(c["source"]) for c in cells)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_every_parameter_reaches_the_code(nb):
    """A setting is declared once, in the parameters cell, and read by name: by the stage package
    (``p.<name>``, or a FinetuneConfig field) or by the notebook itself. A parameter nothing reads is dead."""
    import papermill as pm

    from workbench.config import COMMON
    from workbench.finetune import FinetuneConfig

    stage = nb.stem[3:]
    code = _stage_code(stage)
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)} if stage == "finetune" else set()
    unread = [name for name in pm.inspect_notebook(str(nb))
              if name not in fields and name not in COMMON and name != "run_dir"
              and not re.search(rf"\bp\.{name}\b|\bp\[\"{name}\"\]|^(?!\s*#).*\b{name}\b(?!\s*[:=][^=])", code, flags=re.M)]
    assert not unread, f"{nb.name}: parameters nothing reads: {unread}"


def test_finetune_config_defaults_are_the_notebooks():
    """FinetuneConfig (the library's API) and 03_finetune (the stage's schema) must not drift apart."""
    import ast

    import papermill as pm

    from workbench.finetune import FinetuneConfig

    params = pm.inspect_notebook(str(next(p for p in NOTEBOOKS if p.stem.endswith("finetune"))))
    shared = [f for f in dataclasses.fields(FinetuneConfig) if f.name in params]
    assert len(shared) >= 15
    for f in shared:
        default = ast.literal_eval(params[f.name]["default"])
        assert tuple(default) == f.default if isinstance(default, list) else default == f.default, f.name


# ----------------------------------------------------------------------------- README, docs, ARCHITECTURE.md
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GENERATED = {"reports/RESULTS.md", "reports/figures/align_default.png"}  # written by `make results`
README_WORDS = 1200  # the budget every later README section counts against (`wc -w README.md`)


def test_readme_fits_its_word_budget_and_links_the_generated_results():
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) <= README_WORDS, f"README.md has {len(text.split())} words (budget {README_WORDS})"
    assert "(reports/RESULTS.md)" in text and "make results" in text
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in text, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_of_readme_and_docs_resolve(page):
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists() and str(path.relative_to(ROOT)) not in GENERATED:
            missing.append(target)
    assert not missing, f"{page.name}: links to nothing: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hand_copied_figures_in_readme_or_docs(page):
    """Results (accuracies, intervals, p-values, timings) are generated into reports/RESULTS.md, never copied."""
    text = page.read_text()
    found = (re.findall(r"\[[−+-]?\d+\.\d+, [−+-]?\d+\.\d+\]", text) + re.findall(r"\b\d+\.\d+ ?%", text)
             + re.findall(r"\bp [=<] 0\.\d+", text) + re.findall(r"\b\d+ min \d+ s\b", text))
    assert not found, f"{page.name}: figures copied by hand (generate them with `make results`): {found}"


def test_make_results_runs_the_package_generator():
    make = (ROOT / "Makefile").read_text()
    target = make[make.index("\nresults:"):].split("\n\n")[0]
    assert "-m workbench.results" in target and "reports/RESULTS.md" in target and "workbench run demo" in target
    ignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "!/reports/RESULTS.md" in ignore, "reports/RESULTS.md must be committable"


def _architecture_map() -> dict[str, str]:
    """The entries of ARCHITECTURE.md's module map: ``{"io.py": text, "data/": text, ...}`` for every line at
    two spaces' indent under ``workbench/`` (continuation lines added to the entry's text)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    start = text.index("```\nworkbench/\n") + len("```\nworkbench/\n")
    block = text[start: text.index("```", start)]
    entries, current = {}, []
    for line in block.splitlines():
        m = re.match(r"^  ([\w.]+/?(?:, [\w.]+/?)*)(?:\s{2,}(.*))?$", line)
        if m:
            current = m.group(1).split(", ")
            entries.update({n: m.group(2) or "" for n in current})
        elif line.startswith("    ") and current:
            for n in current:
                entries[n] += " " + line.strip()
        else:
            current = []  # a line at column 0 (notebooks/) is outside the package's map
    return entries


def test_architecture_names_every_module():
    """ARCHITECTURE.md's module map matches the tree as it is now: every package (``workbench/*/`` with an
    ``__init__.py``) and top-level module (``workbench/*.py``) has an entry, every entry exists, and every
    ``name.py`` a package's entry names is a module of that package."""
    pkg = ROOT / "workbench"
    packages = {p.parent.name + "/" for p in pkg.glob("*/__init__.py")}
    modules = {p.name for p in pkg.glob("*.py") if not p.name.startswith("__")}
    entries = _architecture_map()
    assert packages and modules and entries
    assert not (packages | modules) - set(entries), f"missing from ARCHITECTURE.md: {sorted((packages | modules) - set(entries))}"
    assert not set(entries) - (packages | modules), f"ARCHITECTURE.md names what is gone: {sorted(set(entries) - (packages | modules))}"
    gone = [f"{name}{mod}" for name, desc in entries.items() if name.endswith("/")
            for mod in re.findall(r"\b(\w+\.py)\b", desc) if not (pkg / name / mod).is_file()]
    assert not gone, f"ARCHITECTURE.md names modules that are gone: {gone}"
