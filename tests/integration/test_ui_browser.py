"""`sslgrid ui` on a finished grid, rendered by a real headless Chromium: the page it opens shows the
grid's cells and their headline metrics without a click, in MLflow's model-training workspace (not
the GenAI one). Needs Debian's `chromium`; .ci/run installs it, and under CI its absence fails."""
from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.helpers import REPO, free_port, sslgrid, stage_runs, write_grid

pytestmark = pytest.mark.integration


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        why = "chromium is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI is set and {why}")
        pytest.skip(why)
    return path


def _start_ui(tmp: Path, grid: Path, port: int) -> tuple[subprocess.Popen, str]:
    """``sslgrid ui`` in its own process group; returns it and the URL it printed once the server
    answers HTTP."""
    log = tmp / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", str(grid), "--port", str(port),
                                 "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"], cwd=tmp,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.5)
    printed = re.search(r"open (http://\S+)", log.read_text())
    assert printed, log.read_text()
    return proc, printed.group(1)


def _stop(proc: subprocess.Popen) -> None:
    """End ``sslgrid ui`` and the ``mlflow ui`` it started: its whole process group, which outlives
    ``sslgrid ui`` itself by a few seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 30
    try:
        while time.time() < deadline:
            proc.poll()  # reaps sslgrid ui, the group's leader, once it exits
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _render(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM once the single-page app has loaded its data: virtual time does not advance
    while requests are pending, so the budget waits for the API calls and the artifact fetch."""
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                          "--window-size=1920,1080", "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return re.sub(r"<(script|style)\b.*?</\1>", " ", out.stdout, flags=re.S)


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def _rows(dom: str) -> list[list[str]]:
    """The texts of the cells of each table row (MLflow draws Markdown tables as role="row"/"cell" divs)."""
    return [[_text(c) for c in re.findall(r'role="cell"[^>]*>(.*?)</div>', row, flags=re.S)]
            for row in re.split(r'<div[^>]*role="row"', dom)[1:]]


def test_sslgrid_ui_opens_on_the_grids_cells_and_metrics(tmp_path):
    chromium = _chromium()
    grid = write_grid(tmp_path)
    run = sslgrid(grid, tmp_path, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert c.get_experiment_by_name("tiny").tags.get("mlflow.experimentKind") == "custom_model_development"
    top1 = {r.data.tags["sslgrid.cells"]: r.data.metrics["top1"] for r in stage_runs(tmp_path)
            if r.data.tags["sslgrid.stage"] == "linear_probe"}
    assert set(top1) == {"head.kind=mlp", "random"}

    proc, url = _start_ui(tmp_path, grid, free_port())
    try:
        assert url.endswith("/artifacts/report/report.md?workflowType=machine_learning"), url
        for _ in range(2):  # a cold server can miss the budget once; a second render finds it warm
            dom = _render(chromium, url, tmp_path / "chromium")
            if "linear_probe_top1" in dom:
                break
    finally:
        _stop(proc)
    text = _text(dom)
    assert "Model training" in text and "Judges" not in text, text[:3000]  # the ML workspace's sidebar, not GenAI's
    rows = _rows(dom)
    assert {"cell", "linear_probe_top1"} <= set(re.findall(r'title="([^"]+)"', dom)), text[:3000]  # column heads
    for cell, value in top1.items():  # a row of the cell, with its top-1 as the report prints it (2 decimals)
        assert any(r[0] == cell and f"{value:.2f}" in (v.split(" ")[0] for v in r) for r in rows if r), \
            (cell, value, rows)
