"""``sslgrid status GRID [--once | --watch]``: the grid's stages as one table, read from MLflow, so
that it works from any machine that reaches the tracking store (over SSH, without the work
directory). Where this machine has the work directory too, it adds what only that holds: the
freshest progress (``progress.json``), ``DONE``, a failed attempt's error, the SLURM job of a stage
that has not started, and whether a process still runs a stage.

``read_frame`` reads the store (and the work directory) once; ``frame_table`` turns a frame into a
rich Table and reads nothing; ``watch`` redraws it every ``interval`` seconds until the grid is
finished. Times are Unix seconds; durations are seconds.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.plan import Plan, Stage
from pipeline.stages import STAGE_KINDS
from pipeline.tracking import ERROR, MlflowSink, client, find_runs, running_driver, store_exists

# MLflow run status → the state column; a stage without a run yet is pending
STATES = {"FINISHED": "done", "FAILED": "failed", "KILLED": "killed", "RUNNING": "running", "SCHEDULED": "pending"}
TERMINAL = ("done", "failed", "killed")
STOPPED = "stopped"  # MLflow says RUNNING or SCHEDULED, but no process or SLURM job runs it any more
NOTHING_RUNS_IT = " (nothing runs it)"


@dataclass(frozen=True)
class StageView:
    """What one frame knows of a stage.

    ``state``: done, failed, killed, running, pending or stopped (see STATES, STOPPED).
    ``progress``: the latest report, {done, total, time[, start_done, start_time]} (MlflowSink.progress).
    ``start``/``end``: the run's start and end (Unix seconds), None when it has not started or ended.
    """

    state: str
    run_id: str = ""
    mlflow_status: str = ""
    progress: dict[str, float] | None = None
    loss: float | None = None
    top1: float | None = None
    job: str = ""
    start: float | None = None
    end: float | None = None
    error: str = ""


@dataclass(frozen=True)
class Frame:
    """One read of a grid: each stage's view by stage key, the driver running the grid (its lock
    holder or the record on the grid's MLflow run; None: no driver runs it) and when it was read."""

    stages: dict[str, StageView]
    driver: dict[str, Any] | None
    now: float


def timing(start: float | None, end: float | None, progress: dict[str, float] | None,
           now: float) -> tuple[float | None, float | None]:
    """(elapsed, ETA) of a stage in seconds, None where unknown.

    - elapsed: from this attempt's start (``progress["start_time"]``, its first progress report: a
      resumed stage does not count the time before it resumed) or else the run's ``start``, until
      ``end`` when the run has ended, else until ``now``.
    - ETA (only while the run has not ended): seconds per unit × units left, less the time since the
      last report. Seconds per unit come from this attempt's reports ((time − start_time) /
      (done − start_done)), or, for a report without them, from the run's start ((time − start) / done).
    """
    p = progress or {}
    began = p.get("start_time", start)
    if began is None:
        return None, None
    elapsed = max(0.0, (end if end is not None else now) - began)
    if end is not None or not p:
        return elapsed, None
    done, total, at = p["done"], p["total"], p["time"]
    if "start_time" in p:
        units, seconds = done - p.get("start_done", 0), at - p["start_time"]
    else:
        units, seconds = done, (at - start if start is not None else 0.0)
    if units <= 0 or seconds <= 0:
        return elapsed, None
    return elapsed, max(0.0, seconds / units * (total - done) - (now - at))


def duration(seconds: float | None) -> str:
    """``seconds`` as 42s, 3m05s, 2h07m or 1d03h; "-" for None."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _number(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def frame_table(plan: Plan, frame: Frame) -> Table:
    """The frame as a table, one row per stage in plan order. Columns:

    - stage: the stage kind; cells: the grid cells that share it.
    - state: done, failed, killed, running, pending (queued, or no run yet), or stopped: MLflow says
      running or scheduled but no process or SLURM job runs it (known only with the work directory).
    - epoch/total: units done of the total in the latest progress report (epochs; detection:
      iterations; inversion: encoders).
    - last loss: the last logged ``loss``; top-1: the last logged ``top1`` (or the first other
      status metric of the stage kind, pipeline/stages.py).
    - SLURM job; elapsed and ETA: see ``timing`` (ETA only while the stage runs).

    The caption names the driver and counts the states."""
    from pipeline.lock import describe

    table = Table(title=plan.grid.name)
    for col in ("stage", "cells", "state", "epoch/total", "last loss", "top-1", "SLURM job", "elapsed", "ETA"):
        table.add_column(col, overflow="fold", justify="right" if col in ("last loss", "top-1", "elapsed", "ETA") else "left")
    counts: dict[str, int] = {}
    for s in plan.ordered():
        v = frame.stages.get(s.key, StageView("pending"))
        counts[v.state] = counts.get(v.state, 0) + 1
        elapsed = eta = None
        if v.progress or v.state in ("running", STOPPED, "done", "failed"):  # a killed run may never have run
            elapsed, eta = timing(v.start, v.end, v.progress, frame.now)
        if v.state != "running":
            eta = None
        prog = f"{v.progress['done']:g}/{v.progress['total']:g}" if v.progress else "-"
        table.add_row(s.kind, ", ".join(s.cells), v.state, prog, _number(v.loss, ".3f"), _number(v.top1, ".2f"),
                      v.job or "-", duration(elapsed), duration(eta))
    driver = (f"driver: {frame.driver.get('command') or 'sslgrid run'} ({describe(frame.driver)})"
              if frame.driver else "no driver runs this grid")
    tally = ", ".join(f"{counts.get(k, 0)} {label}" for k, label in
                      (("done", "finished"), ("running", "running"), ("failed", "failed"), ("killed", "killed"),
                       ("pending", "pending"), (STOPPED, STOPPED)) if counts.get(k) or k != STOPPED)
    table.caption = f"{tally} · read {time.strftime('%H:%M:%S', time.localtime(frame.now))}\n{driver}"
    return table


def runs_table(plan: Plan, frame: Frame) -> Table:
    """Each stage's identity, MLflow run and status (marked "(nothing runs it)" when stopped) and
    the error of a stage that has not finished: what plain ``sslgrid status`` adds to the frame."""
    table = Table(title=f"{plan.grid.name}: MLflow runs")
    for col in ("stage", "key", "mlflow run", "mlflow status", "error"):
        table.add_column(col, overflow="fold")
    for s in plan.ordered():
        v = frame.stages.get(s.key, StageView("pending"))
        status = v.mlflow_status + (NOTHING_RUNS_IT if v.state == STOPPED else "")
        table.add_row(s.kind, s.key, v.run_id, status, v.error)
    return table


def finished(frame: Frame) -> bool:
    """Whether watching can end: no driver runs the grid and no stage is running (each is done,
    failed or killed, or pending or stopped with nothing left to run it: a rerun would resume it).
    A stage still running without its driver (a SLURM job) is waited for."""
    return frame.driver is None and not any(v.state == "running" for v in frame.stages.values())


def ending(frame: Frame) -> str:
    """What the watch says when it stops: the grid is done, or how many stages nothing runs."""
    left = [v for v in frame.stages.values() if v.state not in TERMINAL]
    if not left:
        return "the grid is over: every stage finished, failed or was killed"
    return (f"{len(left)} stages are not finished and nothing runs them (no `sslgrid run` drives this grid); "
            f"`sslgrid run` with the same grid resumes them")


def grid_driver(plan: Plan) -> dict[str, Any] | None:
    """The ``sslgrid run`` running this grid, or None: the holder of the work directory's lock where
    this machine sees it; else the driver recorded on the grid's MLflow run while that run is
    RUNNING, checked against that driver's lock when this machine sees the lock's folder (a driver
    killed outright leaves its run RUNNING)."""
    from pipeline.lock import WORKDIR_LOCK, held

    holder = held(plan.grid.workdir / WORKDIR_LOCK)
    if holder:
        return holder
    other = running_driver(plan.grid.tracking_uri, plan.grid.name)
    if not other:
        return None
    lock = other.get("lock")
    if lock and Path(lock).parent.is_dir():
        return held(Path(lock))
    return other


def _runs(plan: Plan) -> dict[str, Any]:
    """{stage key: MLflow run} of the grid; creates nothing (no store, no experiment)."""
    uri = plan.grid.tracking_uri
    if not store_exists(uri):
        return {}
    exp = client(uri).get_experiment_by_name(plan.grid.name)
    return {} if exp is None else find_runs(uri, exp.experiment_id, plan.grid.name)[1]


def _progress(raw: Any) -> dict[str, float] | None:
    """A progress record (a dict, or its JSON text in the run's tag) with numeric done, total and
    time; None for anything else."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    if not isinstance(raw, dict):
        return None
    fields = ("done", "total", "time", "start_done", "start_time")
    p = {k: raw[k] for k in fields if isinstance(raw.get(k), (int, float)) and not isinstance(raw.get(k), bool)}
    return p if {"done", "total", "time"} <= set(p) else None


def _top1(kind: str, metrics: dict[str, float]) -> float | None:
    names = [n for n in ("top1", *STAGE_KINDS[kind].status_metrics) if n != "loss"]
    return next((metrics[n] for n in names if n in metrics), None)


def _view(stage: Stage, run: Any | None) -> StageView:
    """A stage as its MLflow run says (works without the work directory)."""
    from pipeline.execute import SLURM_TAG

    if run is None:
        return StageView("pending")
    info, tags, metrics = run.info, run.data.tags, run.data.metrics
    return StageView(
        state=STATES.get(info.status, "pending"), run_id=info.run_id, mlflow_status=info.status,
        progress=_progress(tags.get(MlflowSink.PROGRESS_TAG)), loss=metrics.get("loss"),
        top1=_top1(stage.kind, metrics), job=tags.get(SLURM_TAG, ""),
        start=info.start_time / 1000 if info.start_time else None,
        end=info.end_time / 1000 if info.end_time and info.status in ("FINISHED", "FAILED", "KILLED") else None,
        error=tags.get(ERROR, "") or "")


def _with_workdir(stage: Stage, v: StageView, plan: Plan, driver: dict[str, Any] | None) -> StageView:
    """``v`` with what the work directory adds: DONE, progress.json (fresher than the tag), a failed
    attempt's error, the SLURM job, and whether anything still runs a stage MLflow says is running.
    Raises StateError (naming the file and the fix) for a damaged result.json."""
    from pipeline.execute import stage_live, stage_state
    from pipeline.slurm import slurm_job
    from pipeline.state import read_json_or

    workdir = plan.grid.workdir
    info = stage_state(stage, workdir)
    state = "done" if info["state"] == "done" else v.state
    if (v.mlflow_status in ("RUNNING", "SCHEDULED") and state != "done"
            and not (driver and v.mlflow_status == "SCHEDULED") and not stage_live(stage, workdir)):
        state = STOPPED  # a driver or worker killed outright could not say so
    return replace(v, state=state,
                   progress=_progress(read_json_or(stage.directory(workdir).progress, None)) or v.progress,
                   job=(slurm_job(stage, workdir) or {}).get("job_id") or v.job,
                   error="" if state == "done" else str(info.get("error") or v.error))


def read_frame(plan: Plan) -> Frame:
    """The grid as the store says now, with what the work directory adds where this machine has it."""
    runs = _runs(plan)
    driver = grid_driver(plan)
    local = plan.grid.workdir.is_dir()
    views = {}
    for s in plan.ordered():
        v = _view(s, runs.get(s.key))
        views[s.key] = _with_workdir(s, v, plan, driver) if local else v
    return Frame(views, driver, time.time())


def show(plan: Plan, console: Console) -> int:
    """Plain ``sslgrid status``: one frame, then each stage's MLflow run and error."""
    frame = read_frame(plan)
    console.print(frame_table(plan, frame))
    console.print(runs_table(plan, frame))
    return 0


def watch(plan: Plan, console: Console, interval: float = 10.0, once: bool = False) -> int:
    """``--once``: print one frame. ``--watch``: a live table that reads the store every ``interval``
    seconds (elapsed and ETA tick every second in between) and returns 0 once ``finished`` (the grid
    is over, or nothing runs it any more: a watch started before ``sslgrid run`` ends at once);
    Ctrl-C returns 130. On a console that is not a terminal, rich's Live prints the
    last frame only."""
    from rich.live import Live

    try:
        frame = read_frame(plan)
        if once:
            console.print(frame_table(plan, frame))
            return 0
        with Live(frame_table(plan, frame), console=console, auto_refresh=False) as live:
            while not finished(frame):
                next_read = time.monotonic() + interval
                while (left := next_read - time.monotonic()) > 0:
                    time.sleep(min(left, 1.0))
                    live.update(frame_table(plan, replace(frame, now=time.time())), refresh=True)
                frame = read_frame(plan)
                live.update(frame_table(plan, frame), refresh=True)
        console.print(ending(frame), highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        console.print("stopped watching; the grid itself is not affected")
        return 130
    return 0
