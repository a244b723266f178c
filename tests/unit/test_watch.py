"""``sslgrid status --once / --watch`` (pipeline/watch.py) on a real SQLite MLflow store: runs made by
``prepare_runs`` as the driver makes them, metrics and progress logged through the real MlflowSink,
real flock locks for the driver and the stage; no stage function runs."""
from __future__ import annotations

import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline import lock as L
from pipeline.cli import main
from pipeline.grid import load_grid
from pipeline.plan import Plan, Stage, build_plan
from pipeline.tracking import ERROR, MlflowSink, client, prepare_runs
from pipeline.watch import Frame, StageView, duration, frame_table, timing

GRID = """
name: g
defaults:
  dataset: {name: synthetic, num_train: 96, num_val: 48}
  pretrain: {method: none}
  linear_probe: {epochs: 1}
cells:
  - {name: a}
  - {name: b, pretrain.method: mocov2, pretrain.epochs: 5, pretrain.batch_size: 32, pretrain.K: 32}
evaluations: [linear_probe]
"""


def _store(tmp_path: Path) -> tuple[Plan, dict[str, str], list[str]]:
    """The grid's plan (work directory tmp_path/wd, not created) and its runs in a fresh SQLite store;
    also the CLI arguments that name both."""
    (tmp_path / "g.yaml").write_text(textwrap.dedent(GRID))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan = build_plan(load_grid(tmp_path / "g.yaml", workdir=str(tmp_path / "wd"), tracking_uri=uri))
    _, _, run_ids = prepare_runs(plan)
    return plan, run_ids, [str(tmp_path / "g.yaml"), "--workdir", str(tmp_path / "wd"), "--tracking-uri", uri]


def _flat(text: str) -> str:
    """``text`` with every run of whitespace as one space: a table's caption wraps at its width."""
    return " ".join(text.split())


def _stage(plan: Plan, kind: str, cell: str) -> Stage:
    return next(s for s in plan.stages.values() if s.kind == kind and cell in s.cells)


def _finish_all(plan: Plan, run_ids: dict[str, str], tmp_path: Path, but: Stage | None = None) -> None:
    """Every stage run FINISHED (but ``but``): MoCo's pretraining with a loss, a top-1 and 5/5
    epochs reported through MlflowSink from a folder outside the work directory (a compute node's
    disk); the MoCo probe with a top-1."""
    c = client(plan.grid.tracking_uri)
    moco, probe = _stage(plan, "pretrain", "b"), _stage(plan, "linear_probe", "b")
    sink = MlflowSink(plan.grid.tracking_uri, run_ids[moco.key], tmp_path / "node" / moco.key)
    sink.progress(0, 5)
    sink.log({"loss": 4.6512, "top1": 41.2}, step=4)
    sink.progress(5, 5)
    sink.flush(30)  # the sink sends from a thread of its own
    c.log_metric(run_ids[probe.key], "top1", 38.25)
    for s in plan.ordered():
        if s is not but:
            c.set_terminated(run_ids[s.key], "FINISHED")


def test_once_prints_one_frame_from_mlflow_alone(tmp_path, monkeypatch, capsys):
    plan, run_ids, args = _store(tmp_path)
    _finish_all(plan, run_ids, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["status", *args, "--once"]) == 0
    out = _flat(capsys.readouterr().out)
    for text in ("pretrain", "linear_probe", "epoch/total", "last loss", "top-1", "SLURM job", "elapsed", "ETA",
                 "4.651", "41.20", "38.25", "5/5", "4 finished, 0 running, 0 failed, 0 killed, 0 pending",
                 "no driver runs this grid"):
        assert text in out, (text, out)
    assert out.count("done") == 4
    assert out.count("┏") == 1 and "MLflow runs" not in out  # one frame, without plain status's second table
    assert not (tmp_path / "wd").exists()  # read from the store alone


def test_plain_status_adds_each_runs_id_status_and_error(tmp_path, monkeypatch, capsys):
    plan, run_ids, args = _store(tmp_path)
    moco = _stage(plan, "pretrain", "b")
    _finish_all(plan, run_ids, tmp_path, but=moco)
    c = client(plan.grid.tracking_uri)
    c.set_tag(run_ids[moco.key], ERROR, "CheckpointError: last.pt is damaged")
    c.set_terminated(run_ids[moco.key], "FAILED")
    monkeypatch.chdir(tmp_path)
    assert main(["status", *args]) == 0
    out = _flat(capsys.readouterr().out)
    assert "MLflow runs" in out and "CheckpointError: last.pt is damaged" in out and "FAILED" in out
    assert all(run_ids[s.key] in out and s.key in out for s in plan.ordered())
    assert "3 finished, 0 running, 1 failed" in out


@pytest.mark.timeout(60)
def test_watch_on_a_finished_grid_prints_a_frame_and_exits(tmp_path, monkeypatch, capsys):
    plan, run_ids, args = _store(tmp_path)
    _finish_all(plan, run_ids, tmp_path)
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    assert main(["status", *args, "--watch", "--interval", "0.2"]) == 0
    assert time.monotonic() - t0 < 10
    out = _flat(capsys.readouterr().out)
    assert "4 finished" in out and "4.651" in out and out.count("done") == 4


def test_watch_ends_when_nothing_runs_the_grid_and_says_so(tmp_path, monkeypatch, capsys):
    """Stages left pending with no driver (a grid never run, or one whose driver was killed outright):
    nothing will ever finish them, so the watch ends at once and says how to resume them."""
    plan, run_ids, args = _store(tmp_path)
    _finish_all(plan, run_ids, tmp_path, but=_stage(plan, "linear_probe", "b"))
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    assert main(["status", *args, "--watch", "--interval", "0.2"]) == 0
    assert time.monotonic() - t0 < 10
    out = _flat(capsys.readouterr().out)
    assert "1 stages are not finished and nothing runs them" in out and "resumes them" in out


@pytest.mark.timeout(60)
def test_watch_exits_once_the_running_stage_finishes_and_the_driver_lets_go(tmp_path, monkeypatch, capsys):
    plan, run_ids, args = _store(tmp_path)
    moco = _stage(plan, "pretrain", "b")
    _finish_all(plan, run_ids, tmp_path, but=moco)
    c = client(plan.grid.tracking_uri)
    d = moco.directory(plan.grid.workdir)
    driver = L.acquire(plan.grid.workdir / L.WORKDIR_LOCK, "sslgrid run g.yaml")
    worker = L.acquire(d.lock, f"pretrain {moco.key}")
    c.update_run(run_ids[moco.key], status="RUNNING")
    sink = MlflowSink(plan.grid.tracking_uri, run_ids[moco.key], d.path)
    sink.progress(3, 5)
    sink.flush(30)

    def finish() -> None:  # what run_stage does at a stage's end, then the driver's exit
        time.sleep(1.0)
        sink.progress(5, 5)
        sink.flush(30)
        (d / "result.json").write_text(json.dumps({"checkpoint": "final.pt", "feat_dim": 7, "epochs": 5}))
        c.set_terminated(run_ids[moco.key], "FINISHED")
        (d / "DONE").write_text("{}")
        worker.release()
        time.sleep(0.5)
        driver.release()

    thread = threading.Thread(target=finish)
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    thread.start()
    try:
        code = main(["status", *args, "--watch", "--interval", "0.2"])
    finally:
        thread.join()
    seconds = time.monotonic() - t0
    assert code == 0
    assert 1.5 <= seconds < 10, seconds  # it waited for the stage, then for the driver
    out = _flat(capsys.readouterr().out)
    assert "4 finished" in out and "5/5" in out and "no driver runs this grid" in out


@pytest.mark.timeout(60)
def test_ctrl_c_stops_watching_with_130_and_no_traceback(tmp_path, monkeypatch, capsys):
    plan, run_ids, args = _store(tmp_path)
    moco = _stage(plan, "pretrain", "b")
    client(plan.grid.tracking_uri).update_run(run_ids[moco.key], status="RUNNING")  # never finishes
    monkeypatch.chdir(tmp_path)
    # Python's own Ctrl-C handler, whatever an earlier test in this process left (a CI run timed out here)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code = main(["status", *args, "--watch", "--interval", "0.2"])
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    captured = capsys.readouterr()
    assert code == 130 and "stopped watching" in captured.out
    assert "Traceback" not in captured.out + captured.err


def test_elapsed_and_eta_from_a_progress_report_and_a_start_time():
    start, now = 1000.0, 1110.0
    # this attempt began at 1020 at epoch 0; 2 of 10 epochs by 1100: 40 s an epoch, 8 left, 10 s since
    fresh = {"done": 2, "total": 10, "time": 1100.0, "start_done": 0, "start_time": 1020.0}
    assert timing(start, None, fresh, now) == (90.0, 40.0 * 8 - 10)
    # resumed at epoch 4 at 1060: only this attempt's 2 epochs count for the rate (20 s each)
    resumed = {"done": 6, "total": 10, "time": 1100.0, "start_done": 4, "start_time": 1060.0}
    assert timing(start, None, resumed, now) == (50.0, 20.0 * 4 - 10)
    # a report without this attempt's start (older code): elapsed and rate from the run's start
    assert timing(start, None, {"done": 2, "total": 10, "time": 1100.0}, now) == (110.0, 50.0 * 8 - 10)
    # no unit done in this attempt yet: ETA unknown; ended: elapsed up to the end, no ETA
    assert timing(start, None, {**resumed, "done": 4, "time": 1060.0}, now) == (50.0, None)
    assert timing(start, 1300.0, fresh, now) == (280.0, None)
    assert timing(start, None, None, now) == (110.0, None) and timing(None, None, None, now) == (None, None)
    assert [duration(s) for s in (None, 42.4, 185, 7620, 97200)] == ["-", "42s", "3m05s", "2h07m", "1d03h"]


def test_the_frame_table_shows_elapsed_and_eta(tmp_path):
    from rich.console import Console

    (tmp_path / "g.yaml").write_text(textwrap.dedent(GRID))
    plan = build_plan(load_grid(tmp_path / "g.yaml", workdir=str(tmp_path / "wd"), tracking_uri="sqlite:///x.db"))
    moco = _stage(plan, "pretrain", "b")
    running = StageView("running", progress={"done": 2, "total": 10, "time": 1100.0, "start_done": 0,
                                             "start_time": 1020.0}, loss=5.1234, start=1000.0, job="77_1")
    frame = Frame({moco.key: running}, {"pid": 42, "host": "login1", "command": "sslgrid run g.yaml"}, 1110.0)
    console = Console(width=200, record=True)
    console.print(frame_table(plan, frame))
    lines = console.export_text().splitlines()
    row = next(line for line in lines if "running" in line)
    assert "2/10" in row and "5.123" in row and "77_1" in row and "1m30s" in row and "5m10s" in row, row
    text = _flat("\n".join(lines))
    assert "driver: sslgrid run g.yaml (pid 42 on login1" in text and "0 finished, 1 running" in text
    assert "3 pending" in text  # stages the frame has no view of yet
