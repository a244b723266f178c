"""A real PostgreSQL store (Debian's postgresql, started by .ci/run on loopback): a tiny grid run
straight to it and through `sslgrid server --backend-store-uri postgresql://…`, landing as it does in
SQLite; and a store whose MLflow schema is older than the installed MLflow's, refused before launch."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import psycopg
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient

from tests.integration.helpers import REPO, free_port, sslgrid, start_server, write_grid
from tests.integration.postgres import pg_database  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

PROBE_ONLY = """
name: tiny
defaults:
  dataset: {name: synthetic, num_train: 192, num_val: 96}
  backbone: {name: tiny_resnet, bn_splits: 2}
  pretrain: {method: none}
  linear_probe: {epochs: 3, batch_size: 64}
evaluations: [linear_probe]
"""


def _runs(uri: str, experiment: str = "tiny") -> dict[tuple[str, str], object]:
    """{(stage kind, cells): run} of the grid's stage runs, and ("grid", "") for its parent run."""
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    out = {}
    for r in c.search_runs([exp.experiment_id], max_results=1000):
        t = r.data.tags
        out[(t.get("sslgrid.stage", "grid"), t.get("sslgrid.cells", ""))] = r
    return out


TIMINGS = ("seconds", "epoch_seconds", "images_per_second")  # wall-clock metrics: only their steps compare


def _histories(uri: str, runs: dict) -> dict:
    """{(run, metric): its distinct (step, value) points}, steps only for TIMINGS. Distinct: a stage
    may log one value at one step twice (its last epoch, then its result), and two such calls in the
    same millisecond are one row (MLflow's metrics key includes the timestamp)."""
    c = MlflowClient(uri)
    return {(where, key): sorted({(m.step, None if key in TIMINGS else m.value)
                                  for m in c.get_metric_history(r.info.run_id, key)})
            for where, r in runs.items() for key in r.data.metrics}


def test_grid_straight_to_postgres_lands_as_in_sqlite(tmp_path, pg_database):
    sq, pg = tmp_path / "sqlite", tmp_path / "postgres"
    sq.mkdir(), pg.mkdir()
    ref = sslgrid(write_grid(sq), sq)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    grid = write_grid(pg)
    out = sslgrid(grid, pg, "--tracking-uri", pg_database)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ran 4, cached 0, failed 0" in out.stdout

    ours, theirs = _runs(pg_database), _runs(f"sqlite:///{sq / 'mlflow.db'}")
    assert ours.keys() == theirs.keys() and len(ours) == 5  # 4 stages and the grid's parent run
    for where, run in ours.items():
        assert run.info.status == "FINISHED", where
        assert run.data.params == theirs[where].data.params
        assert run.data.tags["sslgrid.key" if where[0] != "grid" else "sslgrid.role"] == \
            theirs[where].data.tags["sslgrid.key" if where[0] != "grid" else "sslgrid.role"]
    assert _histories(pg_database, ours) == _histories(f"sqlite:///{sq / 'mlflow.db'}", theirs)
    assert len(_histories(pg_database, {k: v for k, v in ours.items() if k[0] == "pretrain"})) > 0
    parent = ours[("grid", "")]
    logged = {a.path for a in MlflowClient(pg_database).list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.csv"} <= logged
    assert pd.read_csv(pg / "runs" / "report" / "report.csv").equals(pd.read_csv(sq / "runs" / "report" / "report.csv"))

    again = sslgrid(grid, pg, "--tracking-uri", pg_database)
    assert again.returncode == 0 and "ran 0, cached 4, failed 0" in again.stdout, again.stdout + again.stderr
    assert len(_runs(pg_database)) == 5  # no new runs
    status = sslgrid(grid, pg, "--tracking-uri", pg_database, sub="status")
    assert status.returncode == 0 and status.stdout.count("done") == 4, status.stdout + status.stderr
    report = sslgrid(grid, pg, "--tracking-uri", pg_database, sub="report")
    assert report.returncode == 0 and "linear_probe_top1" in report.stdout


def _start_server(store: str, tmp) -> tuple[subprocess.Popen, str]:
    return start_server(store, tmp)


def test_grid_through_a_server_backed_by_postgres(tmp_path, pg_database):
    proc, uri = _start_server(pg_database, tmp_path)
    try:
        grid = write_grid(tmp_path, PROBE_ONLY)
        out = sslgrid(grid, tmp_path, "--tracking-uri", uri)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "ran 2, cached 0, failed 0" in out.stdout
        assert (tmp_path / "server.log").read_text().count("***") >= 1  # the store's password is not printed
        assert pg_database.split("//", 1)[1].split("@")[0] not in (tmp_path / "server.log").read_text()
        runs = _runs(pg_database)  # straight from the database the server wrote
        assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs.values())
        probe = runs[("linear_probe", "default")] if ("linear_probe", "default") in runs else \
            next(r for k, r in runs.items() if k[0] == "linear_probe")
        assert "top1" in probe.data.metrics
        parent = runs[("grid", "")]
        logged = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "report")}
        assert {"report/report.md", "report/report.csv"} <= logged  # uploaded through the server
        again = sslgrid(grid, tmp_path, "--tracking-uri", uri)
        assert again.returncode == 0 and "ran 0, cached 2, failed 0" in again.stdout, again.stdout + again.stderr
        assert len(_runs(pg_database)) == 3
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def _revision(uri: str) -> str | None:
    with psycopg.connect(uri) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def _older_store(uri: str, how: str) -> str:
    """Make ``uri`` an MLflow store at an older schema revision than the installed MLflow's: either
    a current store whose alembic_version is set back one revision ("rewound": MLflow raises
    "Detected out-of-date database schema"), or a store migrated only up to an older MLflow's
    revision, lacking newer tables ("old": MLflow 3.17 would migrate it silently on first open)."""
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    revisions = list(ScriptDirectory.from_config(_get_alembic_config("")).walk_revisions())  # newest first
    if how == "rewound":
        MlflowClient(uri).search_experiments()  # creates a current store
        with psycopg.connect(uri) as conn:
            conn.execute("UPDATE alembic_version SET version_num = %s", (revisions[1].revision,))
        return revisions[1].revision
    engine = sqlalchemy.create_engine(uri)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(uri)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revisions[30].revision)
    engine.dispose()
    return revisions[30].revision


@pytest.mark.parametrize("how", ["rewound", "old"])
def test_store_with_an_older_schema_is_refused_naming_mlflow_db_upgrade(tmp_path, pg_database, how):
    old = _older_store(pg_database, how)
    grid = write_grid(tmp_path, PROBE_ONLY)
    out = sslgrid(grid, tmp_path, "--tracking-uri", pg_database, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert f"has an MLflow schema older than this MLflow" in text and f"revision {old}" in text
    assert "mlflow db upgrade postgresql://" in text and "Nothing was launched." in text
    assert "Traceback" not in out.stdout + out.stderr and not (tmp_path / "runs").exists()

    server = subprocess.run([sys.executable, "-m", "pipeline.cli", "server", "--port", str(free_port()),
                             "--backend-store-uri", pg_database], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert server.returncode == 2, server.stdout + server.stderr
    assert "--backend-store-uri" in server.stdout and "mlflow db upgrade" in " ".join(server.stdout.split())
    assert _revision(pg_database) == old  # neither command migrated it
