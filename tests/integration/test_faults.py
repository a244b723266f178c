"""Faults under load, each on real parts (issue 21): the tracking server restarts while a stage logs,
a Ray worker node dies mid-stage, and the disk under the work directory fills during a checkpoint
write. Nothing computed is lost, nothing is logged twice, and the grid says what happened."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.integration.helpers import REPO, cli_args, free_port, history, stage_runs, start_server, write_grid

pytestmark = pytest.mark.integration


def _ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _skip_or_fail(why: str) -> None:
    if _ci():
        pytest.fail(f"CI is set and {why}")
    pytest.skip(why)


def _progress(stage_dir: Path) -> int:
    try:
        return int(json.loads((stage_dir / "progress.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return -1


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the grid ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        assert time.time() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


LONG = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 192, num_val: 96}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 24, batch_size: 32, lr: 0.03, K: 64, m: 0.99}
  linear_probe: {epochs: 2, batch_size: 64}
evaluations: [linear_probe]
resources:
  pretrain: {cpus: 1}
"""


def _server(store: Path, port: int, log: Path) -> subprocess.Popen:
    """``sslgrid server`` on loopback, with a SQLite store; returns once /health answers."""
    return start_server(f"sqlite:///{store}", store.parent, port, log)[0]


def test_tracking_server_restart_while_a_stage_logs(tmp_path):
    """The stage keeps training while the server is down (the old sink blocked in MLflow's retries),
    every point logged meanwhile lands once, and the stage's run ends FINISHED."""
    store, log, port = tmp_path / "server" / "store.db", tmp_path / "server.log", free_port()
    store.parent.mkdir()
    server = _server(store, port, log)
    uri = f"http://127.0.0.1:{port}"
    grid = write_grid(tmp_path, LONG)
    args = cli_args(grid, tmp_path)
    args[args.index("--tracking-uri") + 1] = uri
    proc = subprocess.Popen(args, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        dirs = lambda: list((tmp_path / "runs").glob("pretrain/*/"))  # noqa: E731
        _wait(lambda: dirs() and _progress(dirs()[0]) >= 2, 240, "two epochs", proc)
        stage = dirs()[0]
        os.killpg(server.pid, signal.SIGKILL)  # a crash, not a clean stop
        server.wait(timeout=30)
        down_at = _progress(stage)
        # training goes on without the server: three more epochs while it is down
        _wait(lambda: _progress(stage) >= down_at + 3, 120, "three epochs while the server is down", proc)
        server = _server(store, port, log)
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out
        c = MlflowClient(uri)
        run = next(r for r in c.search_runs([c.get_experiment_by_name("tiny").experiment_id], max_results=100)
                   if r.data.tags.get("sslgrid.stage") == "pretrain")
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss"))
        assert steps == list(range(25)), steps  # 24 epochs and the final value: none lost, none doubled
        assert json.loads(run.data.tags["sslgrid.progress"])["done"] == 24
    finally:
        if proc.poll() is None:
            proc.kill()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def _ray(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("ray")), *args], env=env, capture_output=True, text=True,
                          timeout=180)


def _raylets() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray/core/src/ray/raylet/raylet"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_a_ray_worker_node_dies_mid_stage(tmp_path):
    """A two-node Ray cluster on this machine (a head without CPUs, a worker node with one): the
    worker node's raylet is killed while the pretraining runs there. A replacement node joins; the
    stage is rescheduled on it, resumes from its last checkpoint into the same MLflow run, and the
    grid ends with exit 0."""
    port = free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="sslgrid-faults-" + "0" * 40)
    head = _ray("start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                "--node-ip-address=127.0.0.1", "--disable-usage-stats", env=env)
    assert head.returncode == 0, head.stderr
    try:
        before = _raylets()
        join = ["start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                "--disable-usage-stats"]
        assert _ray(*join, env=env).returncode == 0
        node = _raylets() - before
        assert len(node) == 1, node
        grid = write_grid(tmp_path, LONG)
        proc = subprocess.Popen(cli_args(grid, tmp_path, "--ray-address", f"127.0.0.1:{port}"), cwd=tmp_path,
                                env=dict(env, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            dirs = lambda: list((tmp_path / "runs").glob("pretrain/*/"))  # noqa: E731
            _wait(lambda: dirs() and _progress(dirs()[0]) >= 2, 240, "two epochs on the worker node", proc)
            stage = dirs()[0]
            os.kill(node.pop(), signal.SIGKILL)
            lost_at = _progress(stage)
            assert _ray(*join, env=env).returncode == 0  # the replacement node
            out, _ = proc.communicate(timeout=500)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out
        assert "ran 2, cached 0, failed 0" in out, out
        runs = [r for r in stage_runs(tmp_path) if r.data.tags["sslgrid.stage"] == "pretrain"]
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same run, not a second one
        resumed = history(tmp_path, runs[0].info.run_id, "resumed_from_epoch")
        assert len(resumed) == 1 and 1 <= resumed[0][1] <= lost_at + 1, (resumed, lost_at)
        steps = [s for s, _ in history(tmp_path, runs[0].info.run_id, "loss")]
        assert steps == list(range(25)), steps
    finally:
        _ray("stop", "--force", env=env)


FULL = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 384, num_val: 96}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 6, batch_size: 32, lr: 0.03, K: 64, m: 0.99}
  linear_probe: {epochs: 2, batch_size: 64}
evaluations: [linear_probe]
resources:
  pretrain: {cpus: 1}
"""


@pytest.fixture
def small_disk(tmp_path):
    """A real 192 MiB filesystem (tmpfs) mounted at tmp_path/disk; root only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        _skip_or_fail("filling a disk needs root, to mount a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        _skip_or_fail(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Write zeros to ``disk`` until it is full; returns the filler file."""
    filler = disk / "filler.bin"
    size = 1 << 20
    with open(filler, "wb", buffering=0) as f:
        while size >= 4096:
            try:
                f.write(b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                size //= 2  # then the rest, in ever smaller pieces
    return filler


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_names_the_path(tmp_path, small_disk):
    grid = write_grid(tmp_path, FULL)
    workdir = small_disk / "runs"
    args = [a if a != str(tmp_path / "runs") else str(workdir) for a in cli_args(grid, tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ckpts = lambda: list(workdir.glob("pretrain/*/checkpoints/last.pt"))  # noqa: E731
        _wait(lambda: ckpts() and _progress(ckpts()[0].parent.parent) >= 1, 240, "the first checkpoint", proc)
        stage = ckpts()[0].parent.parent
        filler = _fill(small_disk)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out  # the report, on the same full disk, is said in one line too
    assert "report not written" in out and "sslgrid report" in out, out
    last = stage / "checkpoints" / "last.pt"
    # the driver and the stage's MLflow run both name the file, the free space and the fix
    assert f"{last}: no space left on the disk" in out and "bytes free" in out and "rerun `sslgrid run`" in out, out
    run = next(r for r in stage_runs(tmp_path) if r.data.tags["sslgrid.stage"] == "pretrain")
    assert run.info.status == "FAILED" and "no space left on the disk" in run.data.tags["sslgrid.error"]
    # the checkpoints before the failed write are intact, and no half-written file is left
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] >= 0 and len(saved["history"]) == saved["epoch"] + 1
    assert not list(stage.glob("checkpoints/.*.tmp*")), list(stage.glob("checkpoints/*"))
    done_epochs = saved["epoch"] + 1

    # with space again, a rerun resumes from that checkpoint and finishes
    filler.unlink()
    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (stage / "DONE").exists()
    assert history(tmp_path, run.info.run_id, "resumed_from_epoch") == [(done_epochs, float(done_epochs))]
    steps = [s for s, _ in history(tmp_path, run.info.run_id, "loss")]
    # each epoch's loss once (none lost, none doubled), then the final value at the step after the last
    assert steps == list(range(7)), steps


def test_a_full_disk_before_the_first_write_is_refused_before_launch(tmp_path, small_disk):
    """A work directory on a disk that is already full: `run` died in pipeline/lock.py with an ENOSPC
    traceback (exit 1). It refuses (exit 2) naming the folder and the free bytes, and starts nothing."""
    grid = write_grid(tmp_path, FULL)
    _fill(small_disk)
    args = [a if a != str(tmp_path / "runs") else str(small_disk / "runs") for a in cli_args(grid, tmp_path)]
    out = subprocess.run(args, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=120)
    text = " ".join(out.stdout.split())
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert f"--workdir: {small_disk / 'runs'} cannot be written: the disk under {small_disk} is full or nearly" in text, text
    assert not (small_disk / "runs").exists()
