"""pipeline/stores.py: a database store that cannot be used is refused in one line, with exit 2 and
nothing launched or started, before MLflow is asked (its answers are tracebacks, after about 100 s
of retries for an unreachable server). The old-schema case needs a PostgreSQL:
tests/integration/test_postgres.py."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.stores import database_problem, is_database, shown

GRID = "name: g\ndefaults:\n  pretrain: {method: none}\nevaluations: []\n"


def _grid(tmp_path: Path) -> Path:
    p = tmp_path / "g.yaml"
    p.write_text(GRID)
    return p


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_which_uris_are_database_stores_and_passwords_are_hidden():
    assert is_database("postgresql://u:p@h/db") and is_database("postgresql+psycopg://u@h/db")
    assert is_database("mysql://u@h/db") and not is_database("sqlite:///x.db")
    assert not is_database("http://127.0.0.1:5000") and not is_database("/tmp/mlruns")
    assert shown("postgresql://u:s3cret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert database_problem("sqlite:///x.db") is None and database_problem("http://127.0.0.1:1") is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["run", "server"])
def test_missing_driver_names_the_package_and_the_pip_fix(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` now fails as if not installed
    monkeypatch.chdir(tmp_path)
    uri = f"postgresql://sslgrid:s3cret@127.0.0.1:{_closed_port()}/db"
    args = ["run", str(_grid(tmp_path)), "--tracking-uri", uri] if command == "run" else \
        ["server", "--backend-store-uri", uri, "--port", str(_closed_port())]
    assert main(args) == 2
    out = " ".join(capsys.readouterr().out.split())
    flag = "--tracking-uri" if command == "run" else "--backend-store-uri"
    assert f"{flag}: postgresql://sslgrid:***@127.0.0.1:" in out and "s3cret" not in out
    assert "needs the Python package psycopg[binary], which is not installed here" in out
    assert "pip install 'psycopg[binary]'" in out
    assert ("Nothing was launched." if command == "run" else "Nothing was started.") in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["run", "server", "status"])
def test_unreachable_server_names_the_uri_and_what_to_check(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    port = _closed_port()
    uri = f"postgresql://sslgrid:s3cret@127.0.0.1:{port}/db"
    args = {"run": ["run", str(_grid(tmp_path)), "--tracking-uri", uri],
            "status": ["status", str(_grid(tmp_path)), "--tracking-uri", uri],
            "server": ["server", "--backend-store-uri", uri, "--port", str(_closed_port())]}[command]
    assert main(args) == 2
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    flag = "--backend-store-uri" if command == "server" else "--tracking-uri"
    assert f"{flag}: postgresql://sslgrid:***@127.0.0.1:{port}/db cannot be reached:" in out and "s3cret" not in out
    assert "Connection refused" in out
    assert "Check that the database server runs and listens at that host and port" in out
    assert "Traceback" not in out and not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_server_pool_outlasts_mlflows_nested_sessions(tmp_path, monkeypatch):
    """MLflow's log_batch holds a pooled connection while taking a second; with SQLAlchemy's default
    pool (5 + 10) 64 writers through `sslgrid server` got "400 QueuePool limit ... reached" after 30 s
    waits (bench/tracking_load.py, bench/README.md). The server gets 41 connections per worker, one
    more than the 40 requests a worker serves at once; settings in the environment win."""
    import pipeline.cli as cli

    seen = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env=None: seen.update(cmd=cmd, env=env) or 0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", raising=False)
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "50")
    assert main(["server", "--backend-store-uri", f"sqlite:///{tmp_path / 's.db'}", "--port", "5999"]) == 0
    assert seen["env"]["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"] == "10"
    assert seen["env"]["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"] == "50"
    assert seen["cmd"][seen["cmd"].index("--workers") + 1] == "2"  # 2 × (10 + 31) = 82 < PostgreSQL's 100


def test_a_tracking_server_that_is_down_is_refused_at_once(tmp_path, capsys):
    """A forgotten `sslgrid server`: `run` waited about 4 minutes in MLflow's retries, then printed a
    traceback with exit 1. Now one line, exit 2, within the server check's timeout."""
    import time

    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.time()
    code = main(["run", str(_grid(tmp_path)), "--workdir", str(tmp_path / "runs"), "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert code == 2 and time.time() - t0 < 60, out
    assert f"no MLflow tracking server answers at {uri}" in " ".join(out.split()) and "sslgrid server" in out
    assert not (tmp_path / "runs").exists()


def test_postgres_spelling_and_plan_hide_nothing_secret(tmp_path, capsys):
    """`postgres://` (Heroku's spelling) ended in a traceback that printed the password; `plan`
    printed the password in its `tracking:` line."""
    grid = str(_grid(tmp_path))
    code = main(["run", grid, "--workdir", str(tmp_path / "runs"), "--tracking-uri", "postgres://u:s3cret@127.0.0.1/db"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "Write postgresql://" in out and "s3cret" not in out, out
    assert main(["server", "--backend-store-uri", "postgres://u:s3cret@127.0.0.1/db", "--port", str(_closed_port())]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "Write postgresql://" in out and "s3cret" not in out, out
    code = main(["run", grid, "--workdir", str(tmp_path / "runs"), "--tracking-uri",
                 f"http://u:s3cret@127.0.0.1:{_closed_port()}"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "no MLflow tracking server answers at http://u:***@127.0.0.1" in out and "s3cret" not in out
    assert main(["plan", grid, "--tracking-uri", "postgresql://u:s3cret@127.0.0.1/db"]) == 0
    out = capsys.readouterr().out
    assert "postgresql://u:***@127.0.0.1/db" in out and "s3cret" not in out, out


def test_an_older_sqlite_schema_names_mlflow_db_upgrade(tmp_path, capsys):
    """The default store, an mlflow.db from an older MLflow: MLflow's "Detected out-of-date database
    schema" traceback (exit 1) becomes one line naming `mlflow db upgrade` (exit 2)."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    db = tmp_path / "old.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # a current store
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '17e22815139b'")  # an older MLflow's revision
    code = main(["run", str(_grid(tmp_path)), "--workdir", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{db}"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "mlflow db upgrade" in out and str(db) in out, out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["abc", "nan", "0", "-5", "inf"])
def test_a_tracking_patience_that_is_no_duration_is_refused(tmp_path, capsys, monkeypatch, value):
    """`abc` silently became 1800 s and `nan` made a stage wait forever for an unanswering store."""
    from pipeline.tracking import PATIENCE_S, patience_s

    monkeypatch.setenv("SSLGRID_TRACKING_PATIENCE_S", value)
    assert patience_s() == PATIENCE_S  # a worker never waits forever
    code = main(["run", str(_grid(tmp_path)), "--workdir", str(tmp_path / "runs"), "--tracking-uri",
                 f"sqlite:///{tmp_path / 'm.db'}"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and f"SSLGRID_TRACKING_PATIENCE_S={value!r} is not a number of seconds above 0" in out, out
    assert not (tmp_path / "runs").exists()
