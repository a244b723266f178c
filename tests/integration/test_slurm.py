"""--backend slurm on a real single-node slurmctld (cluster/slurm/local_cluster.sh), logging to a real
``mlflow server`` on loopback: results equal the local backend's, arrays, job ids in MLflow, a real
``scontrol requeue`` mid-pretraining, ``sslgrid cancel``, and bad cluster configs."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.integration.helpers import REPO, write_grid

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

GRID = """
name: {name}
defaults:
  dataset: {{name: synthetic, num_train: 384, num_val: 96}}
  backbone: {{name: tiny_resnet, bn_splits: 2}}
  pretrain: {{method: mocov2, epochs: 6, batch_size: 32, lr: 0.03, K: 64, m: 0.99, head: {{kind: mlp, out_dim: 32}}}}
  linear_probe: {{epochs: 3, batch_size: 64}}
axes:
  pretrain.head.kind: [mlp]
cells:
  - {{name: random, pretrain.method: none}}
evaluations: [linear_probe]
resources:
  pretrain: {{cpus: 1}}
  linear_probe: {{cpus: 1}}
cluster:
  default: {{timeout_min: 15, mem_gb: 2}}
"""


def cmd(grid: Path, workdir: Path, uri: str, *extra: str, sub: str = "run") -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", sub, str(grid), "--workdir", str(workdir), "--tracking-uri", uri,
            *extra]


def run(args: list[str], cwd: Path, timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(REPO), **env), capture_output=True,
                          text=True, timeout=timeout)


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """``sslgrid run`` in the background, its output in one pipe."""
    return subprocess.Popen(args, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def results(workdir: Path) -> dict[str, dict]:
    return {f"{d.parent.name}/{d.name}": json.loads((d / "result.json").read_text())
            for d in workdir.glob("*/*") if (d / "result.json").exists()}


def stage_runs(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return [r for r in c.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("sslgrid.role") == "stage"]


def marker(workdir: Path, kind: str = "pretrain", method: str = "mocov2") -> tuple[Path, dict]:
    """The stage directory and SLURM marker of the (one) ``method`` stage of ``kind``, once it has one."""
    for d in workdir.glob(f"{kind}/*"):
        spec = d / "spec.json"
        if (d / "slurm.json").exists() and spec.exists() and json.loads(spec.read_text())["spec"]["pretrain"]["method"] == method:
            data = json.loads((d / "slurm.json").read_text())
            if "job_id" in data:
                return d, data
    return None, {}


def wait_for_epoch(workdir: Path, epoch: int, proc: subprocess.Popen, timeout: float = 240) -> tuple[Path, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        d, m = marker(workdir)
        if d is not None and (d / "progress.json").exists():
            try:
                if json.loads((d / "progress.json").read_text())["done"] >= epoch:
                    return d, m["job_id"]
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.2)
    raise AssertionError(f"no pretraining reached epoch {epoch} in {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slurm_cluster, mlflow_server):
    """The grid run uninterrupted on the local backend: what every SLURM run must reproduce."""
    tmp = tmp_path_factory.mktemp("local")
    grid = write_grid(tmp, GRID.format(name="slurm-local"))
    out = run(cmd(grid, tmp / "runs", f"sqlite:///{tmp / 'mlflow.db'}"), tmp)
    assert out.returncode == 0, out.stdout + out.stderr
    return results(tmp / "runs")


def _same(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for metric in ("top1", "loss"):
            if metric in a[key]:
                assert a[key][metric] == pytest.approx(b[key][metric], abs=1e-4), (key, metric)


def test_slurm_backend_matches_local(tmp_path, reference, mlflow_server):
    grid = write_grid(tmp_path, GRID.format(name="slurm-plain"))
    t0 = time.time()
    out = run(cmd(grid, tmp_path / "runs", mlflow_server, "--backend", "slurm"), tmp_path,
              MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ran 4, cached 0, failed 0" in out.stdout
    print(f"slurm backend: {time.time() - t0:.1f} s")
    _same(reference, results(tmp_path / "runs"))
    runs = stage_runs(mlflow_server, "slurm-plain")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    moco = next(r for r in runs if r.data.tags["sslgrid.stage"] == "pretrain"
                and r.data.params["pretrain.method"] == "mocov2")
    assert "system/cpu_utilization_percentage" in moco.data.metrics, sorted(moco.data.metrics)  # from the compute node
    jobs = [r.data.tags.get("sslgrid.slurm_job_id", "") for r in runs]
    assert all(jobs), jobs
    # the jobs start in the run's code snapshot, on the shared filesystem, and import sslgrid from it
    (snap,) = [p for p in (tmp_path / "runs" / ".code").iterdir() if not p.name.startswith(".")]
    assert {(r.data.tags["sslgrid.code"], r.data.tags["sslgrid.code_path"]) for r in runs} == {(snap.name, str(snap))}
    # the two pretrainings were ready together: one array of two tasks. (Each probe is ready when
    # its own pretraining ends: random init ends seconds before MoCo, so they go out one by one.)
    pre = sorted(r.data.tags["sslgrid.slurm_job_id"] for r in runs if r.data.tags["sslgrid.stage"] == "pretrain")
    assert len(pre) == 2 and pre[0].split("_")[0] == pre[1].split("_")[0] and pre[0].endswith("_0"), pre
    st = run(cmd(grid, tmp_path / "runs", mlflow_server, sub="status"), tmp_path)
    assert all(j in st.stdout for j in jobs), st.stdout
    again = run(cmd(grid, tmp_path / "runs", mlflow_server, "--backend", "slurm"), tmp_path)
    assert again.returncode == 0 and "ran 0, cached 4" in again.stdout, again.stdout + again.stderr


def test_requeued_job_resumes_and_matches_uninterrupted(tmp_path, reference, mlflow_server):
    grid = write_grid(tmp_path, GRID.format(name="slurm-requeue"))
    proc = start(cmd(grid, tmp_path / "runs", mlflow_server, "--backend", "slurm"), tmp_path)
    try:
        d, job = wait_for_epoch(tmp_path / "runs", 2, proc)
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
        # SLURM holds a requeued job back (Reason=BeginTime); release it now, as an admin would
        for _ in range(100):
            if subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in shown, shown
    _same(reference, results(tmp_path / "runs"))
    runs = stage_runs(mlflow_server, "slurm-requeue")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    mine = [r for r in runs if r.data.tags.get("sslgrid.key") == d.name]
    assert len(mine) == 1 and mine[0].data.metrics["resumed_from_epoch"] >= 2


def test_cancelled_job_fails_the_stage_and_rerun_completes(tmp_path, reference, mlflow_server):
    grid = write_grid(tmp_path, GRID.format(name="slurm-cancel"))
    proc = start(cmd(grid, tmp_path / "runs", mlflow_server, "--backend", "slurm"), tmp_path)
    try:
        d, job = wait_for_epoch(tmp_path / "runs", 1, proc)
        cancelled = run(cmd(grid, tmp_path / "runs", mlflow_server, sub="cancel"), tmp_path, timeout=60)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        assert f"cancelled pretrain/{d.name} (head.kind=mlp): SLURM job {job}" in cancelled.stdout, cancelled.stdout
        out, _ = proc.communicate(timeout=120)  # scancel is seen through squeue/scontrol: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    assert "CANCELLED" in out, out
    runs = {r.data.tags["sslgrid.key"]: r for r in stage_runs(mlflow_server, "slurm-cancel")}
    assert runs[d.name].info.status == "FAILED" and "CANCELLED" in runs[d.name].data.tags["sslgrid.error"]
    rerun = run(cmd(grid, tmp_path / "runs", mlflow_server, "--backend", "slurm"), tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # the cancelled pretraining and its probe run again; the random-init cell's stages are cached, unless
    # its probe was running and got cancelled too (a race with scancel, which it may also win)
    ran, cached = (int(x) for x in re.search(r"ran (\d+), cached (\d+), failed 0", rerun.stdout).groups())
    assert ran + cached == 4 and ran in (2, 3), rerun.stdout
    _same(reference, results(tmp_path / "runs"))
    runs = {r.data.tags["sslgrid.key"]: r for r in stage_runs(mlflow_server, "slurm-cancel")}
    assert len(runs) == 4 and runs[d.name].info.status == "FINISHED"
    assert runs[d.name].data.metrics["resumed_from_epoch"] >= 1


@pytest.mark.parametrize("override, message", [
    ("cluster.default.partition=gpu-a100", "no such partition; this cluster has debug"),
    ("cluster.pretrain.gpus_per_node=1", "cluster.pretrain.gpus_per_node = 1: partition 'debug' has 0 GPUs"),
])
def test_bad_cluster_config_is_refused_before_submission(tmp_path, slurm_cluster, mlflow_server, override, message):
    grid = write_grid(tmp_path, GRID.format(name="slurm-bad"))
    out = run(cmd(grid, tmp_path / "runs", mlflow_server, "--backend", "slurm", "-o", override), tmp_path, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stdout and "Nothing was submitted" in out.stdout and str(grid) in out.stdout, out.stdout
    assert not list((tmp_path / "runs").glob("*/*/slurm.json"))


def test_slurm_refuses_a_tracking_store_the_nodes_cannot_reach(tmp_path, slurm_cluster):
    grid = write_grid(tmp_path, GRID.format(name="slurm-sqlite"))
    out = run(cmd(grid, tmp_path / "runs", f"sqlite:///{tmp_path / 'm.db'}", "--backend", "slurm"), tmp_path,
              timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot write to sqlite:///" in out.stdout and "sslgrid server" in out.stdout, out.stdout
    assert not (tmp_path / "runs").exists()


def test_two_task_job_trains_data_parallel_and_matches_one_process(tmp_path, reference, mlflow_server):
    """cluster.pretrain.tasks_per_node=2: one SLURM job, two processes joined by gloo (env:// from
    submitit), the same spec (so the same identity) and, within float-order noise, the same result."""
    grid = write_grid(tmp_path, GRID.format(name="slurm-ddp"))
    out = run(cmd(grid, tmp_path / "runs", mlflow_server, "--backend", "slurm",
                  "-o", "cluster.pretrain.tasks_per_node=2"), tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    res = results(tmp_path / "runs")
    assert res.keys() == reference.keys()  # same identities
    d, m = marker(tmp_path / "runs")
    shown = subprocess.run(["scontrol", "show", "job", "-o", m["job_id"]], capture_output=True, text=True).stdout
    assert "NumTasks=2" in shown, shown
    # rank 1 trained too (its own log), and rank 0 alone reported
    assert Path(m["stdout"].replace("_0_log.out", "_1_log.out")).exists()
    key = f"pretrain/{d.name}"
    assert res[key]["processes"] == 2 and reference[key]["processes"] == 1
    # 6 epochs amplify float-order differences (see tests/unit/test_distributed.py): 2% on the loss
    assert res[key]["loss"] == pytest.approx(reference[key]["loss"], rel=2e-2)
    runs = stage_runs(mlflow_server, "slurm-ddp")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
