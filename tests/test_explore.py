"""Exploring a finished run (issue 25): ``open_run`` against the files of a small ``workbench run``, its
errors, the results-first HTML reports, and progress that reaches the terminal instead of the notebook.

One module-scoped run (describe -> align on a tiny synthetic set, progress on, the demo's two example
figures in 05_align) serves the tests that read a real run folder; the rest build what they need."""
from __future__ import annotations

import ast
import base64
import contextlib
import html
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import yaml
from nbutil import make_notebook
from PIL import Image
from toydata import QUICK_DEMO

import workbench
from workbench import cli, htmlreport, pipeline
from workbench.clip import features as F
from workbench.clip import image_features
from workbench.data import load_dataset
from workbench.explore import NoSuchCheckpoint, RunFileMissing, open_run
from workbench.io import CorruptFileError, read_json, read_jsonl
from workbench.progress import PROGRESS_ENV, _Relay, progress_bar

STAGES = ["describe", "match", "finetune", "evaluate", "align"]
SMALL = [*QUICK_DEMO, "dataset_options={n_species: 4, n_train: 6, n_val: 3, n_test: 4}", "model=tiny", "progress=true",
         "epochs=1", "shots=[full, 1]", "seeds=[0]", "bootstrap_n=200", "align.max_images=6", "align.n_examples=2",
         "match.n_examples=4", "describe.per_class=4"]
# tqdm's counter, elapsed<left and rate: "12/12 [00:03<00:00, 4.01img/s]" (or "6.72s/step" when slow)
PROGRESS = re.compile(r"(\d+)/(\d+) \[\d+:\d\d<\d+:\d\d, +\d+(?:\.\d+)?(?:s/\w+|\w+/s)")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A run folder written by ``workbench run demo`` with tiny sizes; yields (folder, the runner's stderr)."""
    root = tmp_path_factory.mktemp("explore")
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE", str(root / "cache"))  # the features evaluate stores are this run's alone
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["run", "demo", "--name", "demo", "--reports", str(root), "--stages", ",".join(STAGES),
                       *sum((["--set", s] for s in SMALL), [])])
    assert rc == 0, err.getvalue()
    yield root / "demo", err.getvalue()
    mp.undo()


# ----------------------------------------------------------------------------- open_run
def test_each_attribute_is_what_its_file_holds(demo):
    run_dir, _ = demo
    run = open_run(run_dir)
    assert run.name == "demo"
    assert run.params == yaml.safe_load((run_dir / "params.yaml").read_text())
    metrics = read_json(run_dir / "metrics.json")
    for attr, section in (("accuracy", "accuracy"), ("comparisons", "comparisons")):
        df = getattr(run, attr)
        assert len(df) == len(metrics[section]) > 0
        for got, row in zip(df.to_dict("records"), metrics[section]):
            assert {k: got[k] for k in row} == row
    assert list(run.accuracy.columns[:5]) == ["method", "shots", "seed", "top1", "ci95"]
    matches = read_jsonl(run_dir / "matches.jsonl")
    assert run.matches["image"].tolist() == [m["image"] for m in matches]
    assert run.matches["captions"].tolist() == [m["captions"] for m in matches]
    descriptions = read_jsonl(run_dir / "descriptions.jsonl")
    assert run.descriptions[["id", "class", "text"]].to_dict("records") == [
        {k: d[k] for k in ("id", "class", "text")} for d in descriptions]
    index = read_json(run_dir / "checkpoints" / "index.json")
    ck = run.checkpoints
    assert ck[["method", "seed", "path", "identity_digest"]].to_dict("records") == [
        {k: e[k] for k in ("method", "seed", "path", "identity_digest")} for e in index]
    assert ck["shots"].astype(str).tolist() == [str(e["shots"]) for e in index]
    assert ck["identity"].tolist() == [e["identity"] for e in index]
    assert all(Path(p) == (run_dir / e["path"]).resolve() for p, e in zip(ck["abspath"], index))
    assert run.figures == sorted((run_dir / "figures").glob("*.png")) and run.figures
    assert set(run.reports) == set(STAGES) and all(p.suffix == ".html" for p in run.reports.values())


def test_a_loaded_checkpoint_has_the_features_the_evaluate_stage_computed(demo, monkeypatch):
    run_dir, _ = demo
    run = open_run(run_dir)
    entry = run.checkpoints.iloc[-1]
    bundle = run.load_model(entry["method"], entry["shots"], entry["seed"])
    assert bundle.pretrained == entry["abspath"]
    p = run.params
    ds = load_dataset(p["dataset"], p["data_root"], **p["dataset_options"])
    fresh = image_features(bundle, ds.paths(), use_cache=False)

    def no_encoding(*a, **k):
        raise AssertionError("not in the feature cache: the evaluate stage encoded with other weights")

    monkeypatch.setattr(F, "encode_uint8", no_encoding)
    stored = image_features(bundle, ds.paths())  # what the evaluate stage's kernel cached for this checkpoint
    assert stored.shape == (len(ds.table), fresh.shape[1])
    torch.testing.assert_close(stored, fresh)


def test_a_checkpoint_not_in_the_index_is_named_with_those_that_are(demo):
    run = open_run(demo[0])
    with pytest.raises(NoSuchCheckpoint, match=r"has no checkpoint method='oracle'.*gist/full/s0"):
        run.load_model("oracle", "full", 0)


def test_the_summary_shows_the_run_on_one_screen(demo):
    run_dir, _ = demo
    text = open_run(run_dir)._repr_html_()
    metrics = read_json(run_dir / "metrics.json")
    assert "<code>demo</code>" in text and f"checkpoints: {len(read_json(run_dir / 'checkpoints/index.json'))}" in text
    assert all(f"<th>{m}</th>" in text for m in {r["method"] for r in metrics["accuracy"]})
    warned = [r["run"] for r in metrics["finetune"]["runs"] if r.get("warning")]
    assert (f"{len(warned)} fine-tuning run(s)" in text) == bool(warned)


def test_explore_builds_the_match_browser_and_the_alignment_explorer(demo):
    pytest.importorskip("ipywidgets")
    run = open_run(demo[0])
    box = run.explore(max_images=2, device="cpu")
    browser, aligner = box.children[1], box.children[3]
    assert list(browser.class_dropdown.options) == sorted(set(run.matches["class"]))
    assert len(aligner.children[0].children[0].options) == 2  # the image dropdown: max_images pointing images


def test_opening_a_run_reads_no_file_and_loads_no_model(tmp_path):
    (tmp_path / "params.yaml").write_text("# Resolved configuration\ndataset: synthetic\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": [
        {"method": "zero-shot", "shots": "full", "seed": 0, "top1": 50.0, "top3": 80.0, "ci95": [40.0, 60.0]}]}))
    (tmp_path / "matches.jsonl").write_text('{not json\n{"image": "a.png"}\n')
    code = (f"import sys; from workbench import open_run; run = open_run({str(tmp_path)!r}); "
            "print(run.accuracy['top1'].tolist(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[50.0]", "False"]  # the broken matches.jsonl is never read
    with pytest.raises(CorruptFileError, match="matches.jsonl"):
        _ = open_run(tmp_path).matches


@pytest.mark.parametrize("attr, file, stage", [
    ("params", "params.yaml", None), ("metrics", "metrics.json", None),
    ("matches", "matches.jsonl", "match"), ("descriptions", "descriptions.jsonl", "describe"),
    ("checkpoints", "checkpoints/index.json", "finetune"), ("figures", "figures", None),
])
def test_a_missing_file_names_itself_and_its_writer(tmp_path, attr, file, stage):
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    with pytest.raises(RunFileMissing) as e:
        getattr(open_run(run_dir), attr)
    assert f"{run_dir / file} is missing" in str(e.value)
    assert (f"the {stage} stage writes it" in str(e.value) and f"--name x --stages {stage}" in str(e.value)
            if stage else "workbench run <preset or config> --name x" in str(e.value))


@pytest.mark.parametrize("attr", ["accuracy", "comparisons"])
def test_a_missing_metrics_section_names_the_evaluate_stage(tmp_path, attr):
    (tmp_path / "metrics.json").write_text(json.dumps({"matching": {}}))
    with pytest.raises(RunFileMissing, match=rf"metrics.json has no '{attr}' section: the evaluate stage writes it "
                                             r"\(workbench run .* --stages evaluate\)"):
        getattr(open_run(tmp_path), attr)


def test_open_run_of_no_folder_says_so(tmp_path):
    with pytest.raises(RunFileMissing, match="is not a run folder"):
        workbench.open_run(tmp_path / "nothing")


# ----------------------------------------------------------------------------- the HTML reports
def _top(text: str) -> str:
    """A report's body up to its first output (the summary cell is Markdown, not an output)."""
    body = text[text.index("<body"):]
    return body[: body.index('class="jp-OutputArea')]


def _html_images(text: str) -> list[tuple[str, bytes]]:
    return [(kind, base64.b64decode(data)) for kind, data in
            re.findall(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=\s]+)"', text)]


@pytest.mark.parametrize("stage", STAGES)
def test_a_report_shows_its_summary_first_its_parameters_once_and_no_code(demo, stage):
    run_dir, _ = demo
    nb_path = next(run_dir.glob(f"0?_{stage}.ipynb"))
    nb = nbformat.read(nb_path, as_version=4)
    text = nb_path.with_suffix(".html").read_text()
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "notebook_params(globals())" in "".join(code)
    assert "notebook_params(globals())" not in text and "hl-ipython3" not in text  # no code cell shown
    assert "<strong>Summary</strong>" in _top(text)
    assert f"stage <code>{stage}</code> finished" in text
    injected = nb.metadata["papermill"]["parameters"]
    for name, value in injected.items():  # each parameter once, with the value the run gave it
        assert text.count(f"<td><code>{name}</code></td>") == 1, name
        row = text[text.index(f"<td><code>{name}</code></td>"):].split("</tr>")[0]
        shown = re.search(r"</td><td><code>(.*?)</code></td>", row, re.S).group(1)
        assert ast.literal_eval(html.unescape(shown)) == value, name
    defaults = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert defaults.splitlines()[-1] not in text  # the parameters cell's source is not shown


def test_the_evaluate_report_leads_with_the_accuracy_table(demo):
    run_dir, _ = demo
    text = (run_dir / "04_evaluate.html").read_text()
    top = _top(text)
    methods = {r["method"] for r in read_json(run_dir / "metrics.json")["accuracy"]}
    assert "Key figures" in top and all(f"<td>{m}</td>" in top for m in methods)


def test_the_align_report_at_demo_figure_settings_stays_under_2_mb(demo):
    run_dir, _ = demo
    text = (run_dir / "05_align.html").read_text()
    images = _html_images(text)
    assert len(images) >= 2 * 4 and len(text.encode()) < 2_000_000  # 2 examples x 4 figures, as in the demo
    assert all(Image.open(io.BytesIO(b)).width <= htmlreport.MAX_WIDTH for _, b in images)
    assert any(kind == "jpeg" for kind, _ in images)  # the maps, re-encoded


def test_a_large_image_is_re_encoded_and_a_small_plot_kept():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (1400, 2400, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    big = {"output_type": "display_data", "data": {"image/png": base64.b64encode(buf.getvalue()).decode()}}
    htmlreport.shrink_image(big)
    jpeg = base64.b64decode(big["data"]["image/jpeg"])
    assert "image/png" not in big["data"] and len(jpeg) < len(buf.getvalue()) / 2
    assert Image.open(io.BytesIO(jpeg)).size == (htmlreport.MAX_WIDTH, round(1400 * htmlreport.MAX_WIDTH / 2400))
    small = Image.new("RGB", (300, 200), "white")
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    plot = {"output_type": "display_data", "data": {"image/png": base64.b64encode(buf.getvalue()).decode()}}
    before = dict(plot["data"])
    htmlreport.shrink_image(plot)
    assert plot["data"] == before
    # a small but wide plot (a bar chart of many methods) is scaled down and stays a PNG
    wide = Image.new("RGB", (2000, 300), "white")
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    assert len(buf.getvalue()) < htmlreport.REENCODE_BYTES
    bars = {"output_type": "display_data", "data": {"image/png": base64.b64encode(buf.getvalue()).decode()}}
    htmlreport.shrink_image(bars)
    assert Image.open(io.BytesIO(base64.b64decode(bars["data"]["image/png"]))).size == (htmlreport.MAX_WIDTH, 240)


def test_a_failed_notebook_says_so_first(tmp_path):
    nb = make_notebook(tmp_path / "nb" / "02_second.ipynb", 'run_dir: str = "x"  # where',
                       "import warnings; warnings.warn('watch out')", "raise ValueError('broken on purpose')")
    with pytest.raises(pipeline.StageFailed):
        pipeline.run_notebook(nb, tmp_path / "02_second.ipynb", {"run_dir": str(tmp_path)}, cwd=tmp_path)
    text = (tmp_path / "02_second.html").read_text()
    top = _top(text)
    assert "stage <code>second</code> <strong>failed</strong>" in top and "ValueError: broken on purpose" in top
    assert "UserWarning: watch out" in top
    assert "No key figures" in top


# ----------------------------------------------------------------------------- progress
def test_long_stages_print_one_line_per_unit_of_work_with_rate_and_time_left(demo):
    run_dir, err = demo
    lines = err.splitlines()
    for stage in ("describe", "match", "finetune", "evaluate"):
        done = [ln for ln in lines if ln.startswith(f"[{stage}] ") and PROGRESS.search(ln)]
        assert done, f"no progress line of {stage}: {err}"
    runs = {r["run"] for r in read_json(run_dir / "metrics.json")["finetune"]["runs"]}
    for name in runs:  # each fine-tuning run: exactly one finished line
        finished = [ln for ln in lines if ln.startswith(f"[finetune] {name}: 100%")]
        assert len(finished) == 1, (name, finished)
    checkpoints = [ln for ln in lines if ln.startswith("[evaluate] fine-tuned encoders: 100%")]
    assert len(checkpoints) == 1 and PROGRESS.search(checkpoints[0]).groups() == (str(len(runs)),) * 2


def test_progress_is_not_stored_in_the_notebooks(demo):
    run_dir, _ = demo
    for nb_path in run_dir.glob("0*.ipynb"):
        nb = nbformat.read(nb_path, as_version=4)
        assert "widgets" not in nb.metadata, nb_path.name
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                assert "application/vnd.jupyter.widget-view+json" not in out.get("data", {}), nb_path.name
                assert not PROGRESS.search(out.get("text", "")), (nb_path.name, out.get("text"))


def test_a_bar_outside_a_run_is_tqdm_auto_and_inside_one_is_relayed(tmp_path, monkeypatch):
    from tqdm.auto import tqdm as auto

    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert isinstance(progress_bar(range(3), disable=True), auto)  # in Lab: tqdm.auto's widget bar
    relay_file = tmp_path / "p.jsonl"
    monkeypatch.setenv(PROGRESS_ENV, str(relay_file))
    for _ in progress_bar(range(5), desc="work", unit="img"):
        pass
    events = read_jsonl(relay_file)
    assert events[-1]["event"] == "close" and events[-1]["line"].startswith("work: 100%")
    assert PROGRESS.search(events[-1]["line"]).groups() == ("5", "5")


def test_the_relay_prints_finished_bars_and_redraws_a_terminal_status_line():
    def events(*recs):
        return "\n".join(json.dumps(r) for r in recs)

    log = io.StringIO()
    r = _Relay(log, "[s] ", tty=False, every=3600)
    r.feed(events({"id": "a", "event": "update", "line": "a 1/2"}, {"id": "b", "event": "update", "line": "b 0/1"}))
    assert log.getvalue() == ""  # not yet: a log file gets finished bars (and a status line now and then)
    r.feed(events({"id": "b", "event": "close", "line": "b 1/1"}, {"id": "a", "event": "close", "line": "a 2/2"}))
    assert log.getvalue().splitlines() == ["[s] b 1/1", "[s] a 2/2"]
    tty = io.StringIO()
    r = _Relay(tty, "[s] ", tty=True)
    r.feed(events({"id": "a", "event": "update", "line": "a 1/2"}, {"id": "b", "event": "update", "line": "b 0/1"}))
    assert tty.getvalue().endswith("\r\x1b[K[s] a 1/2 · b 0/1")
    r.feed(events({"id": "b", "event": "close", "line": "b 1/1"}))
    assert tty.getvalue().endswith("\r\x1b[K[s] b 1/1\n\r\x1b[K[s] a 1/2")


def test_a_report_is_written_when_its_key_figures_cannot_be_read(tmp_path):
    """The HTML is written after the stage succeeded: an odd metrics.json must not fail the run."""
    nb = make_notebook(tmp_path / "04_evaluate.ipynb", 'run_dir: str = "x"  # where', "1 + 1")
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": [{"method": "gist"}]}))  # no shots, no top1
    text = htmlreport.export_html(nb).read_text()
    assert "The key figures could not be read from metrics.json: KeyError" in text
    assert "not executed by papermill" in text
