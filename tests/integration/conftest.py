"""Real services for integration tests: a single-node SLURM (cluster/slurm/local_cluster.sh) and a
real ``mlflow server`` on loopback, each started once per session."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.integration.helpers import REPO, start_server

LOCAL_CLUSTER = REPO / "cluster" / "slurm" / "local_cluster.sh"


def _sinfo_ok() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """A SLURM that answers sinfo: the one SLURM_CONF points at, else the project's local cluster,
    started here when it is not running (root only). Skipped only when sbatch is not installed."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not installed: SLURM tests need Debian's slurm-wlm and munge "
                    "(cluster/slurm/local_cluster.sh start installs and starts them)")
    if "SLURM_CONF" not in os.environ:
        out = subprocess.run([str(LOCAL_CLUSTER), "env"], capture_output=True, text=True, check=True)
        os.environ["SLURM_CONF"] = out.stdout.strip().split("=", 1)[1]
    if not _sinfo_ok():
        started = subprocess.run([str(LOCAL_CLUSTER), "start"], capture_output=True, text=True, timeout=300)
        assert started.returncode == 0 and _sinfo_ok(), f"could not start the local SLURM:\n{started.stderr}"
    return os.environ["SLURM_CONF"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``sslgrid server`` on a free loopback port; yields its http URI."""
    d = tmp_path_factory.mktemp("mlflow-server")
    proc, uri = start_server(f"sqlite:///{d / 'store.db'}", d)
    yield uri
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
