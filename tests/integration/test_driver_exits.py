"""What a double submit, a Ctrl-C and a fresh store shared by two drivers leave behind (issue 11,
sections 3 and 4): real drivers as subprocesses, a real local Ray cluster, a real SQLite store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, all_runs, cli_args, sslgrid, write_grid

pytestmark = pytest.mark.integration

SLOW = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 384, num_val: 96}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 20, batch_size: 32, lr: 0.03, K: 64, m: 0.99}
  linear_probe: {epochs: 2, batch_size: 64}
evaluations: [linear_probe]
resources:
  pretrain: {cpus: 1}
"""
# 20 epochs: the pretraining must outlast a second driver's start and refusal under a loaded CI (with
# 8, a stage that no longer waits for its metrics to reach the store finished first, 33 s in all)

QUICK = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {method: none}
  linear_probe: {epochs: 1}
evaluations: [linear_probe]
"""


def _start(grid: Path, tmp: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(cli_args(grid, tmp, *extra), cwd=tmp, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_epoch(tmp: Path, epoch: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for f in (tmp / "runs" / "pretrain").glob("*/progress.json"):
            try:
                if json.loads(f.read_text())["done"] >= epoch:
                    return
            except (OSError, ValueError):
                pass
        time.sleep(0.1)
    raise AssertionError(f"no pretraining reached epoch {epoch}")


def test_double_submit_is_refused_and_ctrl_c_leaves_no_run_running(tmp_path):
    grid = write_grid(tmp_path, SLOW)
    first = _start(grid, tmp_path)
    try:
        _wait_for_epoch(tmp_path, 1)
        second = sslgrid(grid, tmp_path, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is in use by another `sslgrid run` (pid {first.pid} on" in second.stdout
        assert f"Watch it with `sslgrid status {grid}`" in second.stdout
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
        out, err = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, out + err
    states = {r.data.tags.get("sslgrid.stage", "grid"): r.info.status for r in all_runs(tmp_path)}
    assert states == {"grid": "KILLED", "pretrain": "KILLED", "linear_probe": "KILLED"}, states
    # one run per identity, and the rerun resumes the pretraining and finishes everything
    again = sslgrid(grid, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = all_runs(tmp_path)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}


def test_two_drivers_on_one_fresh_store(tmp_path):
    """Two grids in their own work directories create one new SQLite store at the same time (it
    was a 60-line alembic traceback); a third driver of the first grid's directory is refused."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    procs = [_start(write_grid(a, QUICK), a, *store), _start(write_grid(b, QUICK), b, *store),
             _start(write_grid(a, QUICK, "again.yaml"), a, *store)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for out, err, code in results:
        assert "Traceback" not in err and "alembic" not in err, err
    assert results[1][2] == 0, results[1]
    codes = sorted(r[2] for r in (results[0], results[2]))
    assert codes in ([0, 0], [0, 2]), results  # the third one ran after the first, or was refused
    if codes == [0, 2]:
        refused = next(r for r in (results[0], results[2]) if r[2] == 2)
        assert "is in use by another `sslgrid run`" in refused[0]


@pytest.mark.parametrize("group", [True, False], ids=["process-group", "driver-only"])
def test_sigterm_ends_the_driver_as_ctrl_c_does(tmp_path, group):
    """timeout, scancel and kill send SIGTERM. Ray's core worker installs its own handler (it logged
    "SIGTERM received" and aborted, leaving every run RUNNING or SCHEDULED); sslgrid's comes back."""
    grid = write_grid(tmp_path, SLOW)
    first = _start(grid, tmp_path)
    try:
        _wait_for_epoch(tmp_path, 1)
        (os.killpg if group else os.kill)(first.pid, signal.SIGTERM)
        out, err = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, out + err
    runs = all_runs(tmp_path)
    assert {r.data.tags.get("sslgrid.stage", "grid"): r.info.status for r in runs} == {
        "grid": "KILLED", "pretrain": "KILLED", "linear_probe": "KILLED"}, out + err
    assert {r.data.tags.get("sslgrid.error") for r in runs if r.data.tags.get("sslgrid.role") == "stage"} == {
        "interrupted: the driver was stopped (Ctrl-C or SIGTERM)"}
