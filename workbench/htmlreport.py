"""The HTML of an executed stage notebook, results first.

The ``.ipynb`` keeps everything; its HTML copy (``NN_<stage>.html``) is for reading: a summary on top (what
ran, with its status and time, the stage's key figures from ``metrics.json``, the warnings its cells
printed, the figures it saved), the parameters once, as the resolved table, then the notebook's text and
outputs with the code left out. Large embedded images are re-encoded (JPEG where it is much smaller,
at most :data:`MAX_WIDTH` pixels wide), so a report of many maps stays a few megabytes.
"""
from __future__ import annotations

import ast
import base64
import copy
import html
import io
import json
import re
from pathlib import Path

import nbformat
import papermill as pm
from nbconvert import HTMLExporter
from PIL import Image

from . import results as R
from .evaluate import gist_answers
from .io import atomic_write_text
from .runs import METRICS, read_metrics, unmoved_counts

PARAMETER_TAGS = ("parameters", "injected-parameters")
MAX_WIDTH = 1600  # pixels: wider embedded images are scaled down to this
REENCODE_BYTES = 100_000  # a PNG above this is re-encoded as JPEG when that is at most half its size
JPEG_QUALITY = 85
_STAGE = re.compile(r"^\d\d_([a-z0-9_]+)$")


def export_html(nb_path: str | Path) -> Path:
    """Write ``nb_path``'s results-first HTML beside it (``.html``); returns its path."""
    nb_path = Path(nb_path).resolve()
    nb = nbformat.read(nb_path, as_version=4)
    report = report_notebook(nb, nb_path)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(report, resources={"metadata": {"name": nb_path.stem}})
    out = nb_path.with_suffix(".html")
    atomic_write_text(out, body)
    return out


def report_notebook(nb, nb_path: Path):
    """The notebook as the report shows it: a summary cell first, no parameter cells, smaller images."""
    nb = copy.deepcopy(nb)
    title = _take_title(nb)
    summary = summary_markdown(nb, nb_path, title)
    nb.cells = [c for c in nb.cells if not set(c.metadata.get("tags", [])) & set(PARAMETER_TAGS)]
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            shrink_image(out)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(summary))
    return nb


def _take_title(nb) -> str | None:
    """The first Markdown cell's ``# heading``, removed from that cell (the summary carries it)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            first, _, rest = cell.source.partition("\n")
            if first.startswith("# "):
                cell.source = rest.lstrip("\n")
                return first[2:].strip()
            return None
    return None


# ----------------------------------------------------------------------------- the summary
def summary_markdown(nb, nb_path: Path, title: str | None = None) -> str:
    """What ran (stage, status, time), its key figures, warnings, figures and the resolved parameters."""
    stage = stage_of(nb_path)
    lines = [f"# {title or nb_path.stem}", "", f"**Summary** · {status_line(nb, nb_path, stage)}", ""]
    failed = bool((nb.metadata.get("papermill") or {}).get("exception"))
    figures = key_figures(nb_path.parent, stage) if not failed else []
    if figures:
        lines += ["## Key figures", "", *figures, ""]
    elif failed:
        lines += ["_No key figures: the stage failed, so metrics.json may hold an earlier run's._", ""]
    lines += ["## Warnings", "", warnings_html(warnings_in(nb)), ""]
    saved = sorted((nb_path.parent / "figures").glob(f"{stage}_*.png")) if stage else []
    if saved:
        lines += ["Figures saved: " + ", ".join(f"[{p.name}](figures/{p.name})" for p in saved), ""]
    lines += [parameters_html(nb, nb_path), "", "---"]
    return "\n".join(lines)


def stage_of(nb_path: Path) -> str | None:
    m = _STAGE.match(nb_path.stem)
    return m.group(1) if m else None


def status_line(nb, nb_path: Path, stage: str | None) -> str:
    pm_meta = nb.metadata.get("papermill") or {}
    what = f"stage `{stage}`" if stage else "notebook"
    when = ""
    if pm_meta.get("start_time") and pm_meta.get("duration") is not None:
        when = f", started {pm_meta['start_time'][:19].replace('T', ' ')} UTC, {pm_meta['duration']:.1f} s"
    where = f"run folder `{nb_path.parent.name}`, notebook `{nb_path.name}`"
    if pm_meta.get("exception"):
        return f"{what} **failed** ({error_text(nb) or 'see the error below'}){when}; {where}"
    if not pm_meta:
        return f"{what}, not executed by papermill; {where}"
    return f"{what} finished{when}; {where}"


def error_text(nb) -> str | None:
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return html.escape(f"cell {i}: {out.get('ename')}: {out.get('evalue')}"[:300])
    return None


def _describe_figures(m: dict) -> list[str]:
    d = m.get("describe") or {}
    if not d:
        return []
    dropped = sum((d.get("dropped") or {}).values())
    return [f"{d.get('descriptions')} descriptions of {d.get('classes')} classes (backend `{d.get('backend')}`, "
            f"model `{d.get('model')}`); {d.get('new')} new this run, {dropped} dropped; missing classes: "
            f"{len(d.get('missing_classes') or [])}."]


def _matching_figures(m: dict) -> list[str]:
    d = m.get("matching") or {}
    if not d:
        return []
    out = [f"{d.get('n_images')} images matched, top-{d.get('k')} of {d.get('n_descriptions')} descriptions "
           f"(`{d.get('model')}` / `{d.get('pretrained')}`); {d.get('n_bad_images', 0)} unreadable images."]
    if d.get("variant_precision") is not None:
        out.append(f"Top-1 description of the image's own variant: {R.num(d['variant_precision'], 3)} "
                   f"{R.interval(d.get('variant_precision_ci95'), 3) or ''} against {R.num(d.get('random_precision'), 3)} "
                   "for a random description of the class.")
    return out


def _finetune_figures(m: dict) -> list[str]:
    runs = (m.get("finetune") or {}).get("runs") or []
    if not runs:
        return []
    done = sum(r.get("status") == "done" for r in runs)
    out = [f"{done} of {len(runs)} fine-tuning runs finished. Kept checkpoints that are their starting weights "
           "(unmoved), per method and shots:", ""]
    return out + R.table(["method", "shots", "unmoved", "runs"],
                         [[g["method"], g["shots"], g["unmoved"], g["runs"]] for g in unmoved_counts(runs)])


def _evaluate_figures(m: dict) -> list[str]:
    out = R.accuracy_section(m, every_row=False) if m.get("accuracy") else []
    comps = m.get("comparisons") or []
    if comps:  # the GIST question's answers per shots setting; the unanswered ones (method not run) are counted
        answered, unanswered = gist_answers(comps)
        out += ["", "The GIST question (paired comparisons; every pair is in the notebook below):", ""]
        out += [f"- {s}" for s in answered] or ["- no question could be answered: its methods did not run"]
        if unanswered:
            out.append(f"- {unanswered} question(s) not answered: their methods did not run here")
    return out


# Which of metrics.json's figures each stage's summary shows (all read from the run's metrics.json).
KEY_FIGURES = {
    "pretrain": lambda m: R.pretrain_section(m) if m.get("pretrain") else [],
    "describe": _describe_figures,
    "match": _matching_figures,
    "finetune": _finetune_figures,
    "evaluate": _evaluate_figures,
    "align": lambda m: R.pointing_section(m) if (m.get("alignment") or {}).get("pointing_game") else [],
}


def key_figures(run_dir: Path, stage: str | None) -> list[str]:
    """Markdown lines of the stage's key figures from ``run_dir/metrics.json`` ([] when it has none)."""
    if stage not in KEY_FIGURES or not (run_dir / METRICS).is_file():
        return []
    try:
        return KEY_FIGURES[stage](read_metrics(run_dir))
    except Exception as e:  # a report is written after the stage succeeded: a summary bug must not fail it
        return [f"_The key figures could not be read from {METRICS}: {type(e).__name__}: {html.escape(str(e))}_"]


# "UserWarning: ...", "Warning: ...", "**Warning:** ...": not "import warnings" (the source line Python echoes)
_WARNING = re.compile(r"\w*warning\b", re.IGNORECASE)


def warnings_in(nb) -> list[str]:
    """The warnings a run's cells printed (stderr lines, Markdown outputs) and its errors, each once."""
    found: list[str] = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "error":
                found.append(f"{out.get('ename')}: {out.get('evalue')}")
            elif kind == "stream" and out.get("name") == "stderr":
                found += [ln[m.start():].strip() for ln in out.get("text", "").splitlines() if (m := _WARNING.search(ln))]
            elif kind in ("display_data", "execute_result"):
                text = (out.get("data") or {}).get("text/markdown") or ""
                found += [ln.strip().lstrip("-* ").replace("**", "") for ln in text.splitlines() if _WARNING.search(ln)]
    return list(dict.fromkeys(w[:400] for w in found if w))


def warnings_html(found: list[str], shown: int = 5) -> str:
    """The first ``shown`` warnings as a list, the rest folded under them."""
    if not found:
        return "None."
    items = [f"<li>{html.escape(w)}</li>" for w in found]
    more = (f"<details><summary>{len(items) - shown} more</summary><ul>{''.join(items[shown:])}</ul></details>"
            if len(items) > shown else "")
    return f"<ul>{''.join(items[:shown])}</ul>{more}"


# ----------------------------------------------------------------------------- the parameters, once
def parameters_html(nb, nb_path: Path) -> str:
    """The resolved parameters as one HTML table: each value the notebook ran with (papermill's injected
    value, else the parameters cell's default), the default where the run set another value, the help."""
    try:
        declared = pm.inspect_notebook(str(nb_path))
    except Exception:  # a notebook without a parameters cell: papermill's injected values only
        declared = {}
    injected = (nb.metadata.get("papermill") or {}).get("parameters") or {}
    rows, n_set = [], 0
    for name in list(declared) + [n for n in injected if n not in declared]:
        d = declared.get(name) or {}
        default = d.get("default")
        value = _literal(injected[name]) if name in injected else default
        changed = bool(d) and name in injected and _parsed(default) != injected[name]
        n_set += changed
        shown_default = f"<code>{html.escape(str(default))}</code>" if changed else ""
        rows.append(f"<tr><td><code>{html.escape(name)}</code></td><td><code>{html.escape(str(value))}</code></td>"
                    f"<td>{shown_default}</td><td>{html.escape(d.get('help') or '')}</td></tr>")
    if not rows:
        return ""
    head = "<tr><th>parameter</th><th>value</th><th>default (where the run set another)</th><th>help</th></tr>"
    return (f"<details><summary><b>Parameters</b> ({len(rows)}; {n_set} differ from the notebook's defaults)"
            f"</summary>\n<table class='wb-parameters'>{head}{''.join(rows)}</table></details>")


def _literal(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _parsed(source):
    try:
        return ast.literal_eval(source) if isinstance(source, str) else source
    except (ValueError, SyntaxError):
        return object()  # not a literal: count the injected value as set


# ----------------------------------------------------------------------------- images
def shrink_image(out) -> None:
    """Scale an embedded PNG down to :data:`MAX_WIDTH` (a small one too) and, when it is large, re-encode it as
    JPEG if that is at most half the size (maps over photos compress; line plots stay crisp PNGs). In place."""
    data = out.get("data") or {}
    if "image/png" not in data:
        return
    raw = base64.b64decode(data["image/png"])
    try:
        png, jpeg = _encodings(raw)
    except (OSError, ValueError):  # an image PIL cannot read stays as it is
        return
    if len(raw) > REENCODE_BYTES and len(jpeg) * 2 <= len(png):
        del data["image/png"]
        data["image/jpeg"] = base64.b64encode(jpeg).decode()
    elif png is not raw:
        data["image/png"] = base64.b64encode(png).decode()


def _encodings(raw: bytes) -> tuple[bytes, bytes]:
    """The PNG at most :data:`MAX_WIDTH` wide (``raw`` itself when it is narrower) and a JPEG of it on white."""
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        scaled = im.width > MAX_WIDTH
        if scaled:
            im = im.resize((MAX_WIDTH, round(im.height * MAX_WIDTH / im.width)), Image.LANCZOS)
        png = _encode(im, "PNG") if scaled else raw
        rgb = Image.new("RGB", im.size, "white")
        rgb.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[3])
        jpeg = _encode(rgb, "JPEG")
    return png, jpeg


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, optimize=True, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return buf.getvalue()
