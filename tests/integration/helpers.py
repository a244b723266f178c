from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]

TINY = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 192, num_val: 96}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: mocov2, epochs: 3, batch_size: 32, lr: 0.03, K: 64, m: 0.99, head: {kind: mlp, out_dim: 32}}
  linear_probe: {epochs: 3, batch_size: 64}
axes:
  pretrain.head.kind: [mlp]
cells:
  - {name: random, pretrain.method: none}
evaluations: [linear_probe]
resources:
  pretrain: {cpus: 1}
  linear_probe: {cpus: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_grid(tmp: Path, text: str = TINY, name: str = "grid.yaml") -> Path:
    p = tmp / name
    p.write_text(textwrap.dedent(text))
    return p


def cli_args(grid: Path, tmp: Path, *extra: str, sub: str = "run") -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", sub, str(grid), "--workdir", str(tmp / "runs"),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]


def sslgrid(grid: Path, tmp: Path, *extra: str, sub: str = "run", timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cli_args(grid, tmp, *extra, sub=sub), cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=timeout)


def stage_runs(tmp: Path, experiment: str = "tiny") -> list:
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    return [r for r in c.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("sslgrid.role") == "stage"]


def all_runs(tmp: Path, experiment: str = "tiny") -> list:
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=1000)


def history(tmp: Path, run_id: str, metric: str) -> list[tuple[int, float]]:
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, metric))


def start_server(store: str, folder: Path, port: int | None = None, log: Path | None = None
                 ) -> tuple[subprocess.Popen, str]:
    """``sslgrid server`` on loopback (its own process group) with ``store`` and artifacts under
    ``folder``, its output appended to ``log`` (default folder/server.log); returns (process, its
    http URI) once ``/health`` answers, at most 120 s. Raises AssertionError with the log otherwise."""
    port = port or free_port()
    log = log or folder / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "server", "--port", str(port), "--backend-store-uri",
                             store, "--artifacts-destination", str(folder / "artifacts")], cwd=folder,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.3)
