"""MLflow bookkeeping: one experiment per grid, one parent run per grid (reused on every rerun), one
child run per stage identity (never two), created in the driver before any task starts.

Several processes creating a fresh SQLite store at once fail with migration errors, so the driver
creates the store, the experiment and every run, and workers only log to run ids they are given.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.plan import Plan, Stage
from pipeline.spec import flatten
from pipeline.state import read_json, rerun_fix
from trainers.files import StageDir, atomic_write

ROLE, GRID, KEY, STAGE = "sslgrid.role", "sslgrid.grid", "sslgrid.key", "sslgrid.stage"
ERROR = "sslgrid.error"
WARNINGS_TAG = "sslgrid.warnings"
DRIVER = "sslgrid.driver"  # on the parent run: JSON {pid, host, time, workdir, lock} of the driver running it
MAX_ARTIFACT_BYTES = 50 * 2**20  # larger checkpoints are referenced by path, not copied


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def store_exists(uri: str) -> bool:
    """Whether the tracking store at ``uri`` exists, asked without creating it (MLflow creates a
    SQLite or file store on first contact). A server's store is taken to exist."""
    db = sqlite_path(uri)
    if db is not None:
        return db.exists()
    if uri.startswith("file:") or "://" not in uri:
        from urllib.parse import urlparse

        return Path(urlparse(uri).path if uri.startswith("file:") else uri).exists()
    return True


def open_store(uri: str) -> None:
    """Create (and migrate) the store at ``uri`` if needed, one process at a time: two processes
    creating one SQLite store at once fail inside alembic's migrations. Waits for a process that is
    creating it."""
    from pipeline.lock import acquire

    db = sqlite_path(uri)
    if db is None or db.exists() and db.stat().st_size > 0:
        return
    with acquire(db.with_name(db.name + ".lock"), "creating the MLflow store", wait=True):
        client(uri).search_experiments(max_results=1)  # creates and migrates the database


def ensure_experiment(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # keep artifacts beside the database, not relative to whichever directory a worker runs in
        location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlruns").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by another driver
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _search(uri: str, experiment_id: str, filter_string: str) -> list:
    c = client(uri)
    runs, token = [], None
    while True:
        page = c.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_runs(uri: str, experiment_id: str, grid: str) -> tuple[Any | None, dict[str, Any]]:
    """(parent run, {stage key: run}) of a grid, read in one query."""
    parent, stages = None, {}
    for run in _search(uri, experiment_id, f"tags.`{GRID}` = '{grid}'"):
        role = run.data.tags.get(ROLE)
        if role == "grid":
            parent = parent or run
        elif role == "stage":
            stages.setdefault(run.data.tags[KEY], run)
    return parent, stages


def running_driver(uri: str, grid: str) -> dict[str, Any] | None:
    """The driver recorded on the grid's parent run while that run is RUNNING, else None. Creates
    nothing (no store, no experiment)."""
    if not store_exists(uri):
        return None
    exp = client(uri).get_experiment_by_name(grid)
    if exp is None:
        return None
    parent, _ = find_runs(uri, exp.experiment_id, grid)
    if parent is None or parent.info.status != "RUNNING":
        return None
    try:
        driver = json.loads(parent.data.tags.get(DRIVER, "") or "{}")
    except ValueError:
        return None
    return driver if isinstance(driver, dict) and driver else None


def _stage_tags(grid: str, parent_id: str, stage: Stage) -> dict[str, str]:
    tags = {ROLE: "stage", GRID: grid, KEY: stage.key, STAGE: stage.kind, "mlflow.parentRunId": parent_id,
            "sslgrid.cells": ", ".join(stage.cells)}
    for k, vals in stage.values.items():
        tags[f"sslgrid.axis.{k}"] = ", ".join(sorted(vals))
    return tags


def prepare_runs(plan: Plan) -> tuple[str, str, dict[str, str]]:
    """Create (or find) the experiment, the grid's parent run and one run per stage.

    Returns (experiment id, parent run id, {stage key: run id}). Existing runs get the current
    grid's cell and axis tags; a run is only created for a stage identity that has none."""
    from mlflow.entities import Metric, Param, RunTag

    g = plan.grid
    uri = g.tracking_uri
    open_store(uri)
    c = client(uri)
    exp_id = ensure_experiment(uri, g.name)
    parent, existing = find_runs(uri, exp_id, g.name)
    if parent is None:
        parent = c.create_run(exp_id, run_name=g.name, tags={ROLE: "grid", GRID: g.name, "sslgrid.grid_file": str(g.path)})
    run_ids: dict[str, str] = {}
    for stage in plan.ordered():
        tags = _stage_tags(g.name, parent.info.run_id, stage)
        run = existing.get(stage.key)
        if run is None:
            run = c.create_run(exp_id, run_name=f"{stage.kind}:{stage.cells[0]}", tags=tags)
            params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in flatten(stage.spec).items()]
            params.append(Param("sslgrid.upstream", ",".join(stage.upstream) or "-"))
            for i in range(0, len(params), 100):
                c.log_batch(run.info.run_id, params=params[i:i + 100])
            c.update_run(run.info.run_id, status="SCHEDULED")
            d = stage.directory(g.workdir)
            if d.done.exists():  # work from before the store existed: bring its final metrics back
                result = read_json(d.result, rerun_fix(d.path))
                now = int(time.time() * 1000)
                c.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in numeric(result).items()],
                            tags=[RunTag("sslgrid.restored", "true")])
                c.set_terminated(run.info.run_id, "FINISHED")
        else:
            changed = [RunTag(k, v) for k, v in tags.items() if run.data.tags.get(k) != v]
            if changed:
                c.log_batch(run.info.run_id, tags=changed)
        run_ids[stage.key] = run.info.run_id
    return exp_id, parent.info.run_id, run_ids


def numeric(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MlflowSink:
    """The sink a stage is given: metrics and artifacts go to its MLflow run; progress to a small
    JSON file in the stage directory, which the driver polls (it works on every backend that shares
    the work directory, SLURM included)."""

    def __init__(self, uri: str, run_id: str, stage_dir: Path):
        self.c = client(uri)
        self.run_id = run_id
        self.stage_dir = StageDir(stage_dir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def artifact(self, path: Path) -> None:
        path = Path(path)
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            self.c.set_tag(self.run_id, f"sslgrid.artifact.{path.name}", str(path.resolve()))
        else:
            self.c.log_artifact(self.run_id, str(path))

    def progress(self, done: int, total: int) -> None:
        write_json(self.stage_dir.progress, {"done": done, "total": total, "time": time.time()})

    def warn(self, message: str) -> None:
        """Appended to ``warnings.log`` in the stage folder (the driver prints it when the stage ends)
        and to the run's ``sslgrid.warnings`` tag; also on stderr, for the worker's log."""
        import sys

        print(f"warning: {message}", file=sys.stderr)
        with open(self.stage_dir.warnings, "a") as f:
            f.write(message.replace("\n", " ") + "\n")
        self.c.set_tag(self.run_id, WARNINGS_TAG, self.stage_dir.warnings.read_text()[-5000:])


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON, through ``atomic_write``: a reader or a crash never sees half a file."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
