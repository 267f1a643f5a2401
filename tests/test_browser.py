"""What a person sees, in a real (headless Chromium) browser: the DVC plots page offline, the Prefect UI on
a non-default port, the MLflow UI on the ``wsss`` experiment's runs.

Chromium is Debian's package (``apt-get install chromium``); without it these tests are skipped, saying so.
Every page is loaded with all host names unresolvable except this machine's, so nothing can come from a
network: the plots page must carry its own libraries.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
OFFLINE = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"  # nothing resolves but loopback


def browse(url: str, tmp: Path, screenshot: Path | None = None, budget_ms: int = 15000) -> str:
    """The page's DOM after its scripts ran (``budget_ms`` of virtual time); optionally a screenshot too."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--host-resolver-rules={OFFLINE}",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        f"--virtual-time-budget={budget_ms}",
        "--window-size=1400,1000",
    ]
    if screenshot is not None:
        subprocess.run([CHROMIUM, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    result = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_dvc_plots_page_shows_every_declared_plot_with_no_network(pipeline_repo: Path, tmp_path: Path):
    """`wsss plots` on the files the stages leave (written here in their formats: the renderer is tested)."""
    history = [[e, 1.0 / e, 0.1 * e] for e in (1, 2, 3)]
    _csv(pipeline_repo / "artifacts/classifier/history.csv", ["epoch", "loss", "val_map"], history)
    _csv(pipeline_repo / "artifacts/segmenter/history.csv", ["epoch", "loss", "val_miou"], history)
    rows = [[c, s, 0.5] for c in ("background", "bird") for s in ("pseudo_mask", "segmenter")]
    _csv(pipeline_repo / "plots/per_class_iou.csv", ["class", "source", "iou"], rows)
    pairs = [["bird", "bird"], ["bird", "background"], ["background", "background"]]
    for name in ("confusion_pseudo_masks.csv", "confusion_segmenter.csv"):
        _csv(pipeline_repo / "plots" / name, ["actual", "predicted"], pairs)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pipeline_repo / "plots/grid.png")
    result = subprocess.run(
        [sys.executable, "-m", "wsss.tools.cli", "plots", "--out", "dvc_plots"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    page = pipeline_repo / "dvc_plots" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text()
    dom = browse(page.as_uri(), tmp_path, screenshot=tmp_path / "plots.png")
    # vega-embed replaces each plot's div content with a rendered chart (class "vega-embed", an svg or canvas)
    declared = page.read_text().count("vegaEmbed(")  # dvc.yaml's 6 Vega plots (5 stage plots + the mask-ratio curve)
    rendered = dom.count('class="vega-embed')
    assert declared == 6 and rendered == declared, f"{rendered} of the {declared} declared Vega plots rendered"
    assert dom.count("<img") >= 1  # grid.png (the ablation PNGs are declared too, committed in reports/)


def test_prefect_ui_on_another_port_shows_the_flow_run(tmp_path: Path):
    """The server as `make prefect-server PREFECT_PORT=...` starts it: its UI asks its own API, not 4200's."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api,
    }
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(f"{api}/health", server)
        flow = "from prefect import flow\n@flow(name='wsss-browser-check')\ndef f():\n    return 1\nf()\n"
        run = subprocess.run(
            [sys.executable, "-c", flow], env={**env, "PREFECT_API_URL": api}, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        dom = browse(f"http://127.0.0.1:{port}/runs", tmp_path, screenshot=tmp_path / "prefect.png", budget_ms=20000)
        assert "Can't connect to Server API" not in dom
        assert "wsss-browser-check" in dom, "the flow run is not listed"
    finally:
        stop(server)


def test_mlflow_ui_opens_the_wsss_experiment_on_its_runs(tmp_path: Path, tiny_params, monkeypatch):
    from tests.test_tracking import _finished_pipeline
    from wsss.lib import tracking
    from wsss.tasks.register import register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    _finished_pipeline(tiny_params, 0.3, seed=0)
    record = register(tiny_params, tmp_path, out=None)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking.tracking_uri(tmp_path),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        # The link the pipeline prints: MLflow 3's UI opens on the GenAI overview unless told the workflow.
        url = f"http://127.0.0.1:{port}/{tracking.experiment_link(record['experiment_id'])}"
        dom = browse(url, tmp_path, screenshot=tmp_path / "mlflow.png", budget_ms=20000)
        client = tracking.get_client(tmp_path)
        name = client.get_run(record["run_id"]).info.run_name
        assert name in dom, "the experiment page does not list the pipeline run"
    finally:
        stop(server)
