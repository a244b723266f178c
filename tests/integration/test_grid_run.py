"""A tiny grid end to end on a real local Ray cluster and a real MLflow SQLite store."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from tests.integration.helpers import REPO, all_runs, cli_args, history, sslgrid, stage_runs, write_grid

pytestmark = pytest.mark.integration


def test_tiny_grid_runs_then_rerun_is_a_noop(tmp_path):
    grid = write_grid(tmp_path)
    first = sslgrid(grid, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "ran 4, cached 0, failed 0" in first.stdout

    runs = stage_runs(tmp_path)
    assert len(runs) == 4 and len(all_runs(tmp_path)) == 5  # 4 stages + the grid's parent run
    parent = [r for r in all_runs(tmp_path) if r.data.tags.get("sslgrid.role") == "grid"][0]
    for r in runs:
        t = r.data.tags
        assert r.info.status == "FINISHED"
        assert t["mlflow.parentRunId"] == parent.info.run_id
        assert t["sslgrid.stage"] in ("pretrain", "linear_probe") and len(t["sslgrid.key"]) == 12
        d = tmp_path / "runs" / t["sslgrid.stage"] / t["sslgrid.key"]
        assert {"spec.json", "result.json", "DONE"} <= {p.name for p in d.iterdir()}
        assert json.loads((d / "spec.json").read_text())["key"] == t["sslgrid.key"]
    moco = [r for r in runs if r.data.tags["sslgrid.stage"] == "pretrain" and "mocov2" in r.data.params["pretrain.method"]][0]
    assert moco.data.tags["sslgrid.axis.pretrain.head.kind"] == "mlp"
    assert [s for s, _ in history(tmp_path, moco.info.run_id, "loss")][:3] == [0, 1, 2]  # streamed per epoch
    assert moco.data.params["pretrain.K"] == "64"
    probes = [r for r in runs if r.data.tags["sslgrid.stage"] == "linear_probe"]
    assert all("top1" in r.data.metrics for r in probes)
    assert "| random" in first.stdout and "pending" not in first.stdout

    t0 = time.time()
    again = sslgrid(grid, tmp_path)
    elapsed = time.time() - t0
    assert again.returncode == 0, again.stderr
    assert "ran 0, cached 4, failed 0" in again.stdout
    assert len(all_runs(tmp_path)) == 5  # no new MLflow runs
    print(f"rerun of a finished grid: {elapsed:.1f} s")

    status = sslgrid(grid, tmp_path, sub="status")
    assert status.returncode == 0 and status.stdout.count("done") == 4 and "FINISHED" in status.stdout
    report = sslgrid(grid, tmp_path, sub="report")
    assert report.returncode == 0 and "linear_probe_top1" in report.stdout
    assert (tmp_path / "runs" / "report" / "report.csv").exists()

    # the same grid with two seeds: seed 0 is the finished work, seed 1 runs; the report's mean and
    # 95% interval are scipy's over the two probes' top-1 in MLflow
    two = sslgrid(grid, tmp_path, "-o", "repeats=2")
    assert two.returncode == 0, two.stdout + two.stderr
    assert "ran 4, cached 4, failed 0" in two.stdout and "2 cells × 2 seeds (4 runs)" in two.stdout
    probes = {r.data.tags["sslgrid.cells"]: r.data.metrics["top1"] for r in stage_runs(tmp_path)
              if r.data.tags["sslgrid.stage"] == "linear_probe"}
    mlp = [probes["head.kind=mlp@seed=0"], probes["head.kind=mlp@seed=1"]]
    csv = pd.read_csv(tmp_path / "runs" / "report" / "report.csv").set_index("cell")
    low, high = stats.t.interval(0.95, 1, loc=sum(mlp) / 2, scale=stats.sem(mlp))
    assert csv.at["head.kind=mlp", "linear_probe_top1"] == pytest.approx(sum(mlp) / 2)
    assert (csv.at["head.kind=mlp", "linear_probe_top1_ci_low"], csv.at["head.kind=mlp", "linear_probe_top1_ci_high"]) \
        == pytest.approx((low, high))
    assert csv.at["head.kind=mlp", "seeds"] == "0,1" and csv.at["head.kind=mlp", "linear_probe_top1_n"] == 2
    parent = [r for r in all_runs(tmp_path) if r.data.tags.get("sslgrid.role") == "grid"][0]
    logged = {a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(parent.info.run_id, "report")}
    assert {"report/cells.png", "report/report.md", "report/report.csv"} <= logged


def _one_run_per_key(tmp: Path) -> None:
    keys = [r.data.tags["sslgrid.key"] for r in stage_runs(tmp)]
    assert len(keys) == len(set(keys))


RESUME = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 384, num_val: 96}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 5, batch_size: 32, lr: 0.03, K: 64, m: 0.99}
  linear_probe: {epochs: 3, batch_size: 64}
evaluations: [linear_probe]
resources:
  pretrain: {cpus: 1}
"""


def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir(), run_dir.mkdir()
    ref = sslgrid(write_grid(ref_dir, RESUME), ref_dir)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    grid = write_grid(run_dir, RESUME)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cli_args(grid, run_dir), cwd=run_dir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    progress = None
    while time.time() < deadline:
        files = list((run_dir / "runs" / "pretrain").glob("*/progress.json"))
        if files:
            try:
                progress = json.loads(files[0].read_text())
            except json.JSONDecodeError:
                progress = None
            if progress and progress["done"] >= 2:
                break
        time.sleep(0.05)
    assert progress and 2 <= progress["done"] < progress["total"], progress
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray cluster and the training worker
    proc.wait()
    time.sleep(1)

    again = sslgrid(grid, run_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    runs = {r.data.tags["sslgrid.stage"]: r for r in stage_runs(run_dir)}
    ref_runs = {r.data.tags["sslgrid.stage"]: r for r in stage_runs(ref_dir)}
    _one_run_per_key(run_dir)
    assert len(runs) == 2 and runs["pretrain"].info.status == "FINISHED"
    resumed = history(run_dir, runs["pretrain"].info.run_id, "resumed_from_epoch")
    assert resumed and resumed[0][1] >= 2  # resumed from a checkpoint, not from epoch 0
    ours = [v for _, v in history(run_dir, runs["pretrain"].info.run_id, "loss")]
    theirs = [v for _, v in history(ref_dir, ref_runs["pretrain"].info.run_id, "loss")]
    assert ours[-5:] == theirs[-5:]
    assert runs["linear_probe"].data.metrics["top1"] == ref_runs["linear_probe"].data.metrics["top1"]


FAILING = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 192, num_val: 96}
  pretrain: {method: none}
  linear_probe: {epochs: 2}
cells:
  - {name: good}
  - {name: bad, dataset.name: imagefolder, dataset.root: ROOT, pretrain.method: mocov2, pretrain.epochs: 1,
     pretrain.batch_size: 32, pretrain.K: 32}
evaluations: [linear_probe]
"""


def test_failed_stage_fails_only_its_dependents_then_rerun_completes(tmp_path):
    from trainers.data import ensure_synthetic

    src = ensure_synthetic(96, 48, 32, 0)
    root = tmp_path / "data"
    shutil.copytree(src / "train", root / "train")
    shutil.copytree(src / "val", root / "val")
    bad = root / "train" / "star" / "zz-broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    grid = write_grid(tmp_path, FAILING.replace("ROOT", str(root)))

    out = sslgrid(grid, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ran 2, cached 0, failed 2" in out.stdout
    assert f"{bad}: cannot be read as an image" in out.stdout
    assert "upstream_failed" in out.stdout
    runs = stage_runs(tmp_path)
    by_cell = {(r.data.tags["sslgrid.cells"], r.data.tags["sslgrid.stage"]): r for r in runs}
    assert by_cell[("good", "linear_probe")].info.status == "FINISHED"
    failed = by_cell[("bad", "pretrain")]
    assert failed.info.status == "FAILED" and str(bad) in failed.data.tags["sslgrid.error"]
    assert by_cell[("bad", "linear_probe")].info.status == "KILLED"
    status = sslgrid(grid, tmp_path, sub="status")
    assert "failed" in status.stdout and "zz-broken.png" in status.stdout
    report = sslgrid(grid, tmp_path, sub="report")
    assert "pending" in report.stdout and "failed" in report.stdout

    bad.unlink()
    fixed = sslgrid(grid, tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "ran 2, cached 2, failed 0" in fixed.stdout
    runs = stage_runs(tmp_path)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    _one_run_per_key(tmp_path)
    assert [r for r in runs if r.info.run_id == failed.info.run_id]  # the same run continued


def test_bad_grid_exits_2_and_launches_nothing(tmp_path):
    grid = write_grid(tmp_path, "name: tiny\ndefaults:\n  pretrain: {method: mocov3, K: 0}\n")
    out = sslgrid(grid, tmp_path)
    assert out.returncode == 2
    assert f"{grid}: defaults.pretrain.method = 'mocov3': did you mean 'mocov2'?" in out.stderr
    assert "defaults.pretrain.K = 0: must be >= 1" in out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_gpus_the_cluster_lacks_exit_2_before_launch(tmp_path):
    grid = write_grid(tmp_path)
    out = sslgrid(grid, tmp_path, "-o", "resources.pretrain.gpus=1", "--num-gpus", "0")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "resources.pretrain asks for 1 GPUs but the Ray cluster has 0" in out.stdout
    assert not (tmp_path / "runs" / "pretrain").exists()
    # the runs it had prepared say why they never ran, instead of staying SCHEDULED
    states = {r.data.tags.get("sslgrid.role"): r.info.status for r in all_runs(tmp_path)}
    assert states == {"grid": "FAILED", "stage": "KILLED"}, states
    assert {r.data.tags.get("sslgrid.error") for r in stage_runs(tmp_path)} == {
        "not run: resources.pretrain asks for 1 GPUs but the Ray cluster has 0"}


def test_gpu_scheduling_with_logical_gpus(tmp_path):
    """Ray schedules by logical GPUs, so a GPU request can be tested on a CPU machine."""
    grid = write_grid(tmp_path)
    out = sslgrid(grid, tmp_path, "-o", "resources.pretrain.gpus=1", "-o", "pretrain.epochs=1", "--num-gpus", "1")
    assert out.returncode == 0, out.stdout + out.stderr


def test_edits_to_the_checkout_during_a_run_do_not_reach_its_stages(tmp_path):
    """The stages import the copy `sslgrid run` made at its start (pipeline/snapshot.py), not the
    checkout, which a user may be editing while the grid runs."""
    from pipeline.snapshot import PACKAGES

    checkout = tmp_path / "checkout"
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, checkout / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    grid = write_grid(tmp_path)
    # a relative path means the same to the stages as to the driver, though they start in the copy
    env = dict(os.environ, PYTHONPATH=str(checkout), SSLGRID_CACHE="relative-cache")
    proc = subprocess.Popen(cli_args(grid, tmp_path), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    code = tmp_path / "runs" / ".code"
    deadline = time.time() + 120
    while not (code.is_dir() and [p for p in code.iterdir() if not p.name.startswith(".")]):
        assert proc.poll() is None and time.time() < deadline, "no code snapshot appeared"
        time.sleep(0.05)
    # The driver imported trainers/pretrain.py before it made the copy; a worker that imported the
    # checkout's from now on would fail.
    with open(checkout / "trainers" / "pretrain.py", "a") as f:
        f.write("\nraise RuntimeError('a half-edited checkout')\n")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    (snap,) = [p for p in code.iterdir() if not p.name.startswith(".")]
    runs = stage_runs(tmp_path)
    assert len(runs) == 4 and {r.data.tags["sslgrid.code"] for r in runs} == {snap.name}
    assert not any(r.data.tags["sslgrid.code_path"].startswith(str(checkout)) for r in runs)
    assert list((tmp_path / "relative-cache" / "data").glob("shapes-*"))
    assert not any((Path(r.data.tags["sslgrid.code_path"]) / "relative-cache").exists() for r in runs)
    specs = list((tmp_path / "runs").glob("*/*/spec.json"))
    assert len(specs) == 4 and all(json.loads(s.read_text())["code"] == snap.name for s in specs)
