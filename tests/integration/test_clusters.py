"""--ray-address against a real `ray start --head` on loopback, and `sslgrid ui` against a real MLflow server."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, free_port, sslgrid, stage_runs, write_grid

pytestmark = pytest.mark.integration

SMALL = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {method: none}
  linear_probe: {epochs: 2}
"""


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def test_join_existing_ray_cluster(tmp_path):
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="sslgrid-test-" + "0" * 40)
    subprocess.run([ray_bin(), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=120)
    try:
        grid = write_grid(tmp_path, SMALL)
        bad = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(grid), "--workdir", str(tmp_path / "r0"),
                              "--tracking-uri", f"sqlite:///{tmp_path / 'm0.db'}", "--ray-address", f"127.0.0.1:{port}"],
                             env=dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled"), cwd=tmp_path,
                             capture_output=True, text=True, timeout=180)
        assert bad.returncode == 2 and "RAY_AUTH_MODE=token" in bad.stdout, bad.stdout + bad.stderr
        os.environ.update(RAY_AUTH_MODE=env["RAY_AUTH_MODE"], RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])
        try:
            out = sslgrid(grid, tmp_path, "--ray-address", f"127.0.0.1:{port}")
        finally:
            os.environ.pop("RAY_AUTH_MODE"), os.environ.pop("RAY_AUTH_TOKEN")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "ran 2, cached 0, failed 0" in out.stdout
        assert len(stage_runs(tmp_path)) == 2
        # the cluster outlives the grid: we joined it, we did not own it
        status = subprocess.run([ray_bin(), "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0, status.stderr
    finally:
        subprocess.run([ray_bin(), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ui_serves_the_grid_experiment(tmp_path):
    grid = write_grid(tmp_path, SMALL)
    assert sslgrid(grid, tmp_path).returncode == 0
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", str(grid), "--tracking-uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny"
        deadline, body = time.time() + 90, None
        while time.time() < deadline and body is None:
            try:
                body = json.loads(urllib.request.urlopen(url, timeout=2).read())
            except OSError:
                time.sleep(0.5)
        assert body and body["experiment"]["name"] == "tiny"
        first = proc.stdout.readline() + proc.stdout.readline()
        assert f"#/experiments/{body['experiment']['experiment_id']}/runs" in first
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_backend_ray_without_an_address_is_refused(tmp_path):
    grid = write_grid(tmp_path, SMALL)
    out = sslgrid(grid, tmp_path, "--backend", "ray")
    assert out.returncode == 2 and "--backend ray needs --ray-address" in out.stdout, out.stdout + out.stderr
    assert not (tmp_path / "runs").exists()


DP = """
name: dp
defaults:
  dataset: {name: synthetic, num_train: 192, num_val: 48}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 3, batch_size: 32, K: 64, m: 0.99}
  linear_probe: {epochs: 2}
evaluations: [linear_probe]
"""


def test_two_process_stage_on_ray_matches_one_process(tmp_path):
    """resources.pretrain.processes=2: a gang of two Ray tasks in one placement group, joined by gloo;
    the same identity and, within float-order noise (tests/unit/test_distributed.py), the same loss."""
    grid = write_grid(tmp_path, DP)
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = sslgrid(grid, tmp_path / "one")
    assert one.returncode == 0, one.stdout + one.stderr
    two = sslgrid(grid, tmp_path / "two", "-o", "resources.pretrain.processes=2", "-o", "resources.pretrain.cpus=1")
    assert two.returncode == 0, two.stdout + two.stderr
    res = {}
    for name in ("one", "two"):
        res[name] = {d.name: json.loads((d / "result.json").read_text())
                     for d in (tmp_path / name / "runs" / "pretrain").iterdir()}
    assert res["one"].keys() == res["two"].keys()
    for key in res["one"]:
        assert (res["one"][key]["processes"], res["two"][key]["processes"]) == (1, 2)
        assert res["two"][key]["loss"] == pytest.approx(res["one"][key]["loss"], rel=2e-2)
    assert len(stage_runs(tmp_path / "two", "dp")) == 2
