"""The widgets where users see them: JupyterLab served on 127.0.0.1, driven in headless Chromium.

Building a widget in a kernel proves little: a version mismatch between ipywidgets and JupyterLab's
widget manager only shows in a browser ("Error displaying widget"). This test opens 02_match and
05_align with their default ``interactive`` (None: explorers in JupyterLab) on a run folder the earlier
stages wrote, runs all cells, checks that the widgets render, and that choosing another value in a dropdown
changes what they show. Screenshots stay in the test's temporary folder. It uses Debian's chromium (``/usr/bin/chromium``, installed by
``.ci/run``) through the ``playwright`` package; playwright's own browser download is never used.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import papermill as pm
import pytest

from workbench import describe, finetune, match, pipeline
from workbench.config import notebooks_dir, stage_params

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
TINY = {"dataset_options": {"n_species": 3, "n_train": 3, "n_val": 1, "n_test": 2}, "progress": False,
        "device": "cpu", "seed": 0}
# As root Chromium needs --no-sandbox; the rest keeps it off a network it cannot reach anyway.
FLAGS = ["--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"] + (["--no-sandbox"] if os.geteuid() == 0 else [])

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here: `apt-get install chromium` (Debian) "
                                "installs the browser this test drives; .ci/run does it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A run folder written by describe, match and finetune (tiny random-init CLIP), the two notebooks with
    their default ``interactive`` pointing at it, and JupyterLab serving them; yields (base URL, folder)."""
    root = tmp_path_factory.mktemp("browser")
    run_dir = root / "run"
    common = {**TINY, "run_dir": str(run_dir)}
    unseeded = {k: v for k, v in common.items() if k != "seed"}  # describe and match have seeds of their own
    describe.run(stage_params("describe", **unseeded, per_class=3))
    match.run(stage_params("match", **unseeded, pretrained=None, n_examples=2))
    finetune.run(stage_params("finetune", **unseeded, pretrained=None,
                              methods=["gist"], shots=["full"], seeds=[0], epochs=1, batch_size=16))
    kernel = pipeline.ensure_kernel()  # the notebooks' kernel runs this Python
    nbs = root / "lab"
    nbs.mkdir()
    # no `interactive`: the notebooks' default (None) builds the explorers in JupyterLab, which starts its
    # kernels with JPY_SESSION_NAME set (workbench.params.interactive_view)
    params = {"02_match": {**unseeded, "pretrained": None, "n_examples": 2},
              "05_align": {**common, "pretrained": None, "max_images": 3, "n_examples": 1}}
    for stem, values in params.items():
        pm.execute_notebook(str(notebooks_dir() / f"{stem}.ipynb"), str(nbs / f"{stem}.ipynb"), parameters=values,
                            prepare_only=True, kernel_name=kernel, progress_bar=False)
    port, token = _free_port(), "wb-browser-test"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "jcfg"), "JUPYTER_RUNTIME_DIR": str(root / "jrun"),
           "IPYTHONDIR": str(root / "ipython"), "OMP_NUM_THREADS": "1"}
    # no "would you like news?" toast over the notebook
    (root / "jcfg" / "labconfig").mkdir(parents=True)
    (root / "jcfg" / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={nbs}", "--LabApp.expose_app_in_browser=True",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "jupyterlab.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=nbs)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, (root / "jupyterlab.log").read_text()[-3000:]
                assert time.time() < deadline, "JupyterLab did not start within 90 s"
                time.sleep(0.5)
        yield base, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # a dev dependency, loaded only by this test

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def _run_all(page, base: str, token: str, stem: str, shots: Path):
    """Open the notebook, run all cells, wait until every cell ran; fail on any error output."""
    page.goto(f"{base}/lab/tree/{stem}.ipynb?token={token}&reset")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel", timeout=60_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # done: no cell is queued or running ("[*]"), and the last code cell has a prompt number
    page.wait_for_function("""() => {
        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
        return prompts.length > 0 && !prompts.some(t => t.includes('*')) && /\\d/.test(prompts[prompts.length - 1]);
    }""", timeout=120_000, polling=500)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    assert errors.count() == 0, errors.first.inner_text()[:2000]
    body = page.inner_text("body")
    assert "Error displaying widget" not in body and "Failed to load model class" not in body


def _widget_view(page, shot: Path):
    view = page.locator(".jp-OutputArea-output .widget-vbox").last
    view.wait_for(state="visible", timeout=30_000)
    view.scroll_into_view_if_needed()
    page.screenshot(path=str(shot))
    return view


def _changes_picture(page, view, action):
    """Do ``action`` and wait until the explorer's figure is redrawn (its image data changes)."""
    before = view.locator(".widget-output img").first.get_attribute("src")
    action()
    page.wait_for_function("([root, old]) => { const img = root.querySelector('.widget-output img');"
                           " return img && img.getAttribute('src') !== old; }",
                           arg=[view.element_handle(), before], timeout=60_000)


def test_widgets_render_and_respond_in_jupyterlab(lab, browser):
    base, token, root = lab
    shots = root / "screenshots"
    shots.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    try:
        _run_all(page, base, token, "02_match", shots)
        view = _widget_view(page, shots / "02_match_ran.png")
        classes = view.locator(".widget-dropdown select").first
        table = view.locator(".widget-html").first
        first = table.inner_text()
        options = [o.replace("\xa0", " ") for o in classes.locator("option").all_inner_texts()]  # widgets use nbsp
        assert len(options) == 3 and options[0] in first
        classes.select_option(index=2)
        page.wait_for_function("([el, name]) => el.innerText.includes(name)", arg=[table.element_handle(), options[2]],
                               timeout=20_000)
        assert table.inner_text() != first
        page.screenshot(path=str(shots / "02_match_changed.png"))

        _run_all(page, base, token, "05_align", shots)
        view = _widget_view(page, shots / "05_align_ran.png")
        view.locator(".widget-output img").first.wait_for(state="visible", timeout=30_000)
        assert view.locator(".widget-toggle-button", has_text="finetuned").count() == 1  # the checkpoint was found
        images = view.locator(".widget-dropdown select").first
        assert images.locator("option").count() >= 2
        _changes_picture(page, view, lambda: images.select_option(index=1))
        page.screenshot(path=str(shots / "05_align_changed.png"))
        _changes_picture(page, view, lambda: view.locator(".widget-toggle-button", has_text="finetuned").click())
        page.screenshot(path=str(shots / "05_align_finetuned.png"))
        # the default method reads the caption's sentence; with the word query, another word is another map
        selects = view.locator(".widget-dropdown select")
        assert selects.nth(2).input_value() == "surgery-qqkk"  # the default method is shown first
        _changes_picture(page, view, lambda: view.locator(".widget-toggle-button", has_text="word").click())
        words = selects.nth(1)
        assert words.locator("option").count() >= 2
        _changes_picture(page, view, lambda: words.select_option(index=1))
        page.screenshot(path=str(shots / "05_align_word.png"))
    finally:
        page.close()
