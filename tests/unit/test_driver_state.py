"""One driver per work directory, one process per stage, and a store that tells the truth after any
exit (issue 11, sections 3 and 4). Real flock locks, a real SQLite MLflow store, real subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import lock as L
from pipeline.cli import main
from pipeline.grid import load_grid
from pipeline.plan import build_plan
from trainers.results import PretrainResult

REPO = Path(__file__).resolve().parents[2]
GRID = """
name: g
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {method: none}
  linear_probe: {epochs: 1}
cells:
  - {name: a}
  - {name: b, pretrain.method: mocov2, pretrain.epochs: 1, pretrain.batch_size: 32, pretrain.K: 32}
evaluations: [linear_probe]
"""


def _grid(tmp_path: Path, text: str = GRID) -> Path:
    p = tmp_path / "g.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def _holder(path: Path) -> subprocess.Popen:
    """Another process that takes the lock at ``path`` and holds it until killed."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from pipeline.lock import acquire; "
            f"acquire({str(path)!r}, 'test'); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_names_its_live_holder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    path = tmp_path / "wd" / L.WORKDIR_LOCK
    proc = _holder(path)
    try:
        with pytest.raises(L.LockBusy) as err:
            L.acquire(path)
        assert err.value.holder["pid"] == proc.pid and err.value.holder["host"] == os.uname().nodename
        assert L.held(path)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert L.held(path) is None  # the kernel released it with the process
    with L.acquire(path) as lock:
        assert lock.stale["pid"] == proc.pid  # whose lock it was, for the takeover message
        assert L.held(path)["pid"] == os.getpid()
    assert L.held(path) is None and L.acquire(path).stale is None


def test_a_second_driver_refuses_with_exit_2_naming_the_holder(tmp_path, monkeypatch, capsys):
    grid = _grid(tmp_path)
    monkeypatch.chdir(tmp_path)
    proc = _holder(tmp_path / "runs" / "g" / L.WORKDIR_LOCK)
    try:
        assert main(["run", str(grid)]) == 2
    finally:
        proc.kill()
        proc.wait()
    out = capsys.readouterr().out
    assert f"{tmp_path / 'runs' / 'g'} is in use by another `sslgrid run` (pid {proc.pid} on" in out
    assert f"Watch it with `sslgrid status {grid}`" in out and "Nothing was launched." in out
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was touched


@pytest.mark.parametrize("case", ["under_a_file", "read_only", "cache_under_a_file"])
def test_an_unwritable_workdir_or_store_exits_2_before_anything(tmp_path, monkeypatch, capsys, case):
    grid = _grid(tmp_path)
    monkeypatch.chdir(tmp_path)
    if case == "under_a_file":
        (tmp_path / "afile").write_text("")
        args = ["--workdir", str(tmp_path / "afile" / "wd")]
        expected = f"--workdir: {tmp_path / 'afile' / 'wd'} cannot be created: {tmp_path / 'afile'} is a file"
    elif case == "cache_under_a_file":  # the synthetic set is written there
        (tmp_path / "afile").write_text("")
        monkeypatch.setenv("SSLGRID_CACHE", str(tmp_path / "afile" / "cache"))
        args = []
        expected = f"$SSLGRID_CACHE: {tmp_path / 'afile' / 'cache'} cannot be created: {tmp_path / 'afile'} is a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        args = ["--tracking-uri", f"sqlite:///{tmp_path / 'ro' / 'db' / 'mlflow.db'}"]
        expected = f"--tracking-uri: {tmp_path / 'ro' / 'db'} cannot be written: {tmp_path / 'ro'} is not writable"
    assert main(["run", str(grid), *args]) == 2
    assert expected in capsys.readouterr().out.replace("\n", "")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("store", ["none", "other_grids"])
@pytest.mark.parametrize("command", ["status", "report", "ui"])
def test_read_only_commands_on_a_grid_that_never_ran_create_nothing(tmp_path, monkeypatch, capsys, command, store):
    grid = _grid(tmp_path)
    monkeypatch.chdir(tmp_path)
    if store == "other_grids":  # a store shared with grids that did run
        from pipeline.tracking import client

        client(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("another-grid")
        if command == "ui":
            pytest.skip("the UI serves an existing store")
    before = {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*")}
    assert main([command, str(grid)]) == 0
    assert {f: f.stat().st_mtime_ns for f in tmp_path.rglob("*")} == before  # no mlflow.db, no runs/g/report/
    out = capsys.readouterr().out.replace("\n", "")
    assert "nothing tracked yet" in out
    assert ("no experiment 'g' in" if store == "other_grids" else f"no store at sqlite:///{tmp_path / 'mlflow.db'}") in out


def _store(tmp_path: Path):
    """A plan of GRID with its runs prepared in a real SQLite store."""
    from pipeline.tracking import client, prepare_runs

    plan = build_plan(load_grid(_grid(tmp_path), workdir=str(tmp_path / "wd"),
                                tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    _, _, run_ids = prepare_runs(plan)
    return plan, run_ids, client(plan.grid.tracking_uri)


def test_settle_leaves_no_run_running_or_scheduled_that_nothing_runs(tmp_path):
    from pipeline.execute import settle

    plan, run_ids, c = _store(tmp_path)
    stages = plan.ordered()
    live, done = stages[0], stages[1]
    for s in stages:
        c.update_run(run_ids[s.key], status="RUNNING")
    done.directory(plan.grid.workdir).path.mkdir(parents=True)
    (done.directory(plan.grid.workdir) / "DONE").write_text("{}")
    with L.acquire(live.directory(plan.grid.workdir).lock):  # a process still runs it
        killed = settle(plan, run_ids, "interrupted: test", wait_s=0)
    status = {s.key: c.get_run(run_ids[s.key]).info.status for s in stages}
    assert status[live.key] == "RUNNING" and status[done.key] == "FINISHED"
    assert set(killed) == {s.key for s in stages[2:]} and len(killed) == len(stages) - 2
    for key in killed:
        run = c.get_run(run_ids[key])
        assert run.info.status == "KILLED" and run.data.tags["sslgrid.error"] == "interrupted: test"


def test_a_stage_runs_in_one_process_at_a_time(tmp_path):
    from pipeline.execute import StageBusy, payload, run_stage

    plan, run_ids, c = _store(tmp_path)
    s = next(s for s in plan.ordered() if s.kind == "pretrain" and not s.upstream)
    p = payload(plan, s, run_ids[s.key])
    d = s.directory(plan.grid.workdir)
    with L.acquire(d.lock, "the other copy"):
        with pytest.raises(StageBusy, match=rf"stage {s.key} is already running \(pid {os.getpid()} on"):
            run_stage(p)
    assert c.get_run(run_ids[s.key]).info.status == "SCHEDULED"  # the running copy's run is left alone
    assert not (d / "status.json").exists() and not (d / "spec.json").exists()
    # a copy that was queued while another finished it returns that result and trains nothing
    (d / "result.json").write_text(json.dumps({"checkpoint": "elsewhere.pt", "feat_dim": 7, "epochs": 1}))
    (d / "DONE").write_text("{}")
    assert run_stage(p) == PretrainResult("elsewhere.pt", 7, 1)
    assert c.get_run(run_ids[s.key]).info.status == "SCHEDULED" and not (d / "spec.json").exists()


def test_a_damaged_state_file_is_named_with_the_fix(tmp_path, monkeypatch, capsys):
    plan, run_ids, c = _store(tmp_path)
    s = plan.ordered()[0]
    d = s.directory(plan.grid.workdir)
    d.mkdir(parents=True)
    (d / "DONE").write_text("{}")
    (d / "result.json").write_text('{"top1": 0.')  # cut short
    (d / "progress.json").write_text("{")  # a progress report is only skipped
    monkeypatch.chdir(tmp_path)
    code = main(["status", str(tmp_path / "g.yaml"), "--workdir", str(tmp_path / "wd"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{d / 'result.json'}: cannot be read" in err
    assert f"Delete {d / 'DONE'} so that `sslgrid run` runs this stage again." in err


def test_an_exception_in_the_driver_closes_every_run(tmp_path, monkeypatch):
    """The driver itself failing (here: execute raising, as a bug or the report would) still closes
    the parent run and leaves no stage run SCHEDULED; the exception is not swallowed."""
    import pipeline.execute
    from pipeline.tracking import client

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the driver")

    monkeypatch.setattr(pipeline.execute, "execute", broken)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="a bug in the driver"):
        main(["run", str(_grid(tmp_path))])
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("g").experiment_id])
    assert {r.data.tags["sslgrid.role"]: r.info.status for r in runs} == {"grid": "FAILED", "stage": "KILLED"}
    assert L.held(tmp_path / "runs" / "g" / L.WORKDIR_LOCK) is None  # and the work directory is free again


def test_the_same_grid_from_another_workdir_is_refused_while_it_runs(tmp_path, monkeypatch, capsys):
    """A double submit with another --workdir but the same store would log to the same MLflow runs."""
    import socket as S

    from pipeline.tracking import DRIVER, client

    plan, run_ids, c = _store(tmp_path)  # the grid's runs, as a first driver made them
    parent = c.search_runs([c.get_experiment_by_name("g").experiment_id], "tags.`sslgrid.role` = 'grid'")[0]
    first_lock = tmp_path / "wd" / L.WORKDIR_LOCK
    c.set_tag(parent.info.run_id, DRIVER, json.dumps({"pid": 1, "host": S.gethostname(), "time": time.time(),
                                                      "workdir": str(tmp_path / "wd"), "lock": str(first_lock)}))
    monkeypatch.chdir(tmp_path)
    args = ["run", str(tmp_path / "g.yaml"), "--workdir", str(tmp_path / "other"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = _holder(first_lock)
    try:
        assert main(args) == 2
    finally:
        proc.kill()
        proc.wait()
    out = capsys.readouterr().out.replace("\n", "")
    assert f"grid g is already running in sqlite:///{tmp_path / 'mlflow.db'}" in out
    assert f"work directory {tmp_path / 'wd'}" in out and "Nothing was launched." in out
    assert {r.info.status for r in c.search_runs([parent.info.experiment_id])} == {"RUNNING", "SCHEDULED"}


def test_report_with_the_wrong_store_writes_nothing(tmp_path, monkeypatch, capsys):
    """A work directory with results, and a --tracking-uri that is not the grid's store: the report
    would have overwritten report.csv with 'pending' rows and created the store."""
    grid = _grid(tmp_path)
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "runs" / "g" / "report" / "report.csv"
    report.parent.mkdir(parents=True)
    report.write_text("the good report")
    assert main(["report", str(grid), "--tracking-uri", f"sqlite:///{tmp_path / 'other.db'}"]) == 0
    assert report.read_text() == "the good report" and not (tmp_path / "other.db").exists()
    out = capsys.readouterr().out.replace("\n", "")
    assert f"no store at sqlite:///{tmp_path / 'other.db'}, though {tmp_path / 'runs' / 'g'} exists" in out


@pytest.mark.parametrize("command", ["run", "status", "report"])
@pytest.mark.parametrize("case", ["folder", "not_sqlite"])
def test_a_store_that_is_not_a_database_exits_2_naming_it(tmp_path, monkeypatch, capsys, command, case):
    grid = _grid(tmp_path)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    if case == "folder":
        store.mkdir()
        expected = f"--tracking-uri: {store} is a folder, not a database file"
    else:
        store.write_text("name,top1\n")
        expected = f"--tracking-uri: {store} is not an SQLite database"
    assert main([command, str(grid), "--tracking-uri", f"sqlite:///{store}"]) == 2
    captured = capsys.readouterr()
    assert expected in (captured.out + captured.err).replace("\n", "")
    assert not (tmp_path / "runs").exists()
