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
