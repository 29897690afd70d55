"""notebooks/01_describe.ipynb end to end: the OpenAI-compatible backend against a loopback server."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from test_describe_http import KEY, KEY_ENV, server_factory  # noqa: F401  (fixture)

from workbench.data import load_dataset
from workbench.io import read_json, read_jsonl

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_species=4, seed=3, n_train=2, n_val=1, n_test=1)


def test_notebook_openai_backend(server_factory, tmp_path, monkeypatch):  # noqa: F811
    from workbench.pipeline import run_notebook

    monkeypatch.setenv(KEY_ENV, KEY)  # the kernel inherits the environment; the key is never a parameter
    data = tmp_path / "syn"
    ds = load_dataset("synthetic", data, **SMALL)
    srv = server_factory(faults=["500", "malformed", "refusal"], classes=ds.classnames)
    run = tmp_path / "run"
    run.mkdir()
    params = dict(run_dir=str(run), dataset="synthetic", data_root=str(data), dataset_options=SMALL,
                  backend="openai", llm="fake-llm", api_base=srv.url, api_key_env=KEY_ENV, domain="birds",
                  per_class=3, max_concurrency=2, progress=False)
    run_notebook(REPO / "notebooks" / "01_describe.ipynb", run / "01_describe.ipynb", params, cwd=run)

    recs = read_jsonl(run / "descriptions.jsonl")
    assert Counter(r["class"] for r in recs) == {c: 3 for c in ds.classnames}
    assert len({r["id"] for r in recs}) == len(recs)
    m = read_json(run / "metrics.json")["describe"]
    assert m["backend"] == "openai" and m["prompt_set"] == "birds-v1"
    assert m["rejected"]["refusal"] == 1 and m["session"]["retries"] == 2
    assert m["session"]["requests"] == srv.requests
    assert m["tokens"]["limit"] == 77 and m["tokens"]["summary_max"] <= 77
    assert (run / "figures" / "describe_token_lengths.png").stat().st_size > 1000
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"01_describe.ipynb", "01_describe.html", "describe_responses.jsonl"} <= {p.name for p in files}
    for p in files:
        assert KEY.encode() not in p.read_bytes(), f"API key leaked into {p}"


def test_template_backend_on_the_synthetic_benchmark(tmp_path):
    from workbench.describe import generate_descriptions

    ds = load_dataset("synthetic", tmp_path / "syn", **SMALL)
    res = generate_descriptions(ds, "template", n_per_class=6, run_dir=tmp_path / "run", progress=False)
    assert Counter(r["class"] for r in res.records) == {c: 6 for c in ds.classnames}
    for c in ds.classnames:  # variants taken in turn: male, female, both
        assert Counter(r["variant"] for r in res.records if r["class"] == c) == {"male": 2, "female": 2, None: 2}
    assert res.metrics["dropped"] == {"empty": 0, "refusal": 0, "other_class": 0, "duplicate": 0}
