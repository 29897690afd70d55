"""Weights from a Hugging Face mirror, through a proxy, offline, and through open_clip's own loading.

The mirror is a loopback server speaking the hub's download protocol: HEAD and GET on
``/<org>/<name>/resolve/<rev>/<file>`` answering X-Repo-Commit, ETag and Content-Length, and 404 with
``X-Error-Code: EntryNotFound`` for a missing file. huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE
when it is imported, so each setting is checked in a fresh subprocess.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import open_clip
import pytest
import torch
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file

from workbench.clip import load_clip
from workbench.clip.features import weights_digest
from workbench.clip.load import _CONFIG_DIR
from workbench.clip.tiny import adapt

REPO = Path(__file__).resolve().parents[1]
HUB_REPO = "wb-test/tiny-clip"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tiny_repo_files(seed: int) -> tuple[dict[str, bytes], str]:
    """The hub layout of a tiny open_clip model (config + safetensors) and its weights digest: a plain
    open_clip ViT, as a hub repo holds (the workbench's conv stem is wb-tiny's own, not the config's)."""
    torch.manual_seed(seed)
    model = open_clip.create_model("wb-tiny")
    cfg = {"model_cfg": json.loads((_CONFIG_DIR / "wb-tiny.json").read_text()), "preprocess_cfg": {}}
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    files = {"open_clip_config.json": json.dumps(cfg).encode(), "open_clip_model.safetensors": save_bytes(sd)}
    return files, weights_digest(model)


class _Hub(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _serve(self, with_body: bool):
        url = urlsplit(self.path)  # a proxy receives the absolute URL
        self.server.seen.append((self.command, url.netloc or self.headers.get("Host"), url.path))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
        data = self.server.files.get((m.group(1), m.group(3))) if m else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._serve(False)

    def do_GET(self):
        self._serve(True)


@pytest.fixture(scope="module")
def mirror():
    files, digest = _tiny_repo_files(seed=0)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    srv.daemon_threads = True
    srv.files = {(HUB_REPO, name): data for name, data in files.items()}
    srv.seen, srv.digest, srv.url = [], digest, f"http://127.0.0.1:{srv.server_address[1]}"
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


_CHILD = r"""
import json, sys, time
from workbench.clip import WeightsUnavailableError, load_clip
from workbench.clip.features import weights_digest
out = []
for item in sys.argv[1:]:
    name, _, pretrained = item.partition("|")
    t0 = time.perf_counter()
    try:
        b = load_clip(name, pretrained or None, device="cpu")
        out.append({"digest": weights_digest(b.model)})
    except WeightsUnavailableError as e:
        out.append({"error": str(e)})
    out[-1]["s"] = time.perf_counter() - t0
print("RESULT " + json.dumps(out))
"""


def _load_in_subprocess(tmp_path, env: dict, *items: str) -> list[dict]:
    base = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("HF_")}
    env = {**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WORKBENCH_CACHE": str(tmp_path / "wbcache"),
           **env}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *items], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_weights_from_a_mirror_through_a_proxy_and_offline(mirror, tmp_path):
    """HF_ENDPOINT names the mirror: it is asked (the old reachability probe of huggingface.co:443
    refused without sending it a request) and its weights are the ones loaded. Through an HTTP proxy
    the mirror's own host need not resolve. Offline, the cached copy loads and an uncached model fails
    within seconds, saying how to pass a local file."""
    hf_home = str(tmp_path / "hf")
    ckpt = tmp_path / "finetuned.safetensors"
    other, other_digest = _tiny_repo_files(seed=1)
    ckpt.write_bytes(other["open_clip_model.safetensors"])

    direct = _load_in_subprocess(tmp_path, {"HF_ENDPOINT": mirror.url, "HF_HOME": hf_home},
                                 f"hf-hub:{HUB_REPO}", f"hf-hub:{HUB_REPO}|{ckpt}", "hf-hub:wb-test/missing")
    assert direct[0]["digest"] == mirror.digest, (direct, mirror.digest)
    assert direct[1]["digest"] == other_digest  # a local checkpoint of a hub architecture loads over its weights
    assert "'hf-hub:wb-test/missing'" in direct[2]["error"] and "local path" in direct[2]["error"]
    asked = {(m, p.rsplit("/", 1)[-1]) for m, host, p in mirror.seen if HUB_REPO in p}
    assert {("GET", "open_clip_config.json"), ("GET", "open_clip_model.safetensors")} <= asked

    mirror.seen.clear()
    proxied = _load_in_subprocess(tmp_path, {"HF_ENDPOINT": "http://hub-mirror.invalid", "HF_HOME": str(tmp_path / "hf2"),
                                             "HTTP_PROXY": mirror.url, "http_proxy": mirror.url},
                                  f"hf-hub:{HUB_REPO}")
    assert proxied[0]["digest"] == mirror.digest
    assert mirror.seen and all(host == "hub-mirror.invalid" for _, host, _ in mirror.seen)

    mirror.seen.clear()
    offline = _load_in_subprocess(tmp_path, {"HF_ENDPOINT": mirror.url, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1"},
                                  f"hf-hub:{HUB_REPO}", "hf-hub:wb-test/not-cached")
    assert offline[0]["digest"] == mirror.digest and not mirror.seen
    err = offline[1]["error"]
    assert offline[1]["s"] < 10 and "'hf-hub:wb-test/not-cached'" in err and "HF_HUB_OFFLINE" in err
    assert "pretrained='/path/to/open_clip_model.safetensors'" in err


def test_local_files_load_through_open_clip(tmp_path):
    """open_clip's own loading: a checkpoint trained at another image size loads with its position
    embedding resized (the hand-written loader refused it), and a folder in the hub layout loads as
    ``local-dir:``."""
    torch.manual_seed(0)
    big = open_clip.create_model("wb-tiny", force_image_size=96)  # a 12 x 12 patch grid instead of 8 x 8
    adapt("wb-tiny", big)  # the workbench's wb-tiny (conv stem)
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(tmp_path / "at96.safetensors"))
    b = load_clip("tiny", pretrained=str(tmp_path / "at96.safetensors"), device="cpu")
    assert b.model.visual.positional_embedding.shape[0] == 8 * 8 + 1
    assert torch.equal(b.model.visual.conv1.weight, big.visual.conv1.weight)
    with pytest.raises(ValueError, match="does not fit 'tiny'"):
        save_file({"nope": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        load_clip("tiny", pretrained=str(tmp_path / "bad.safetensors"), device="cpu")

    files, digest = _tiny_repo_files(seed=2)
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    local = load_clip(f"local-dir:{folder}", device="cpu")
    assert weights_digest(local.model) == digest
