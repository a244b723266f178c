"""MLflow bookkeeping: one experiment per grid, one parent run per grid (reused on every rerun), one
child run per stage identity (never two), created in the driver before any task starts.

Several processes creating a fresh SQLite store at once fail with migration errors, so the driver
creates the store, the experiment and every run, and workers only log to run ids they are given.
"""
from __future__ import annotations

import json
import os
import queue
import threading
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
# The experiment tag by which MLflow 3's UI tells model training from GenAI experiments. Values: enum
# ExperimentKind in mlflow/server/js/src/experiment-tracking/constants.ts (GENAI_DEVELOPMENT =
# "genai_development", CUSTOM_MODEL_DEVELOPMENT = "custom_model_development").
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# 3.17 ignores that tag for its pages: they follow the sidebar's GenAI / model-training switch (default
# GenAI, remembered per browser), which this URL parameter overrides. Enum WorkflowType in
# mlflow/server/js/src/common/contexts/WorkflowTypeContext.tsx; tests/integration/test_ui_browser.py checks it.
UI_WORKFLOW = "workflowType=machine_learning"
REPORT = "report/report.md"  # the grid's report on its parent run (pipeline/report.py write_report)
NOTE = "mlflow.note.content"  # a run's description, rendered as Markdown on its page (mlflow/utils/mlflow_tags.py)
MAX_NOTE_CHARS = 8000  # MLflow truncates a run tag's value to this (MAX_TAG_VAL_LENGTH, mlflow/utils/validation.py)


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
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})
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


def find_parent(uri: str, experiment_id: str, grid: str) -> Any | None:
    """The grid's parent run (as ``find_runs`` gives it), read without its stage runs: one query
    whatever the grid's size."""
    runs = _search(uri, experiment_id, f"tags.`{GRID}` = '{grid}' and tags.`{ROLE}` = 'grid'")
    return runs[0] if runs else None


def unfinished(uri: str, grid: str) -> dict[str, str]:
    """{run id: status} of the grid's stage runs that are not FINISHED, in one search: a run of the
    grid absent from it is FINISHED. What the driver checks before and after running costs one
    query, and reads no finished run, however many stages the grid has."""
    exp = client(uri).get_experiment_by_name(grid)
    if exp is None:
        return {}
    runs = _search(uri, exp.experiment_id,
                   f"tags.`{GRID}` = '{grid}' and tags.`{ROLE}` = 'stage' and attributes.status != 'FINISHED'")
    return {r.info.run_id: r.info.status for r in runs}


def running_driver(uri: str, grid: str) -> dict[str, Any] | None:
    """The driver recorded on the grid's parent run while that run is RUNNING, else None. Creates
    nothing (no store, no experiment)."""
    if not store_exists(uri):
        return None
    exp = client(uri).get_experiment_by_name(grid)
    if exp is None:
        return None
    parent = find_parent(uri, exp.experiment_id, grid)
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
    if EXPERIMENT_KIND not in c.get_experiment(exp_id).tags:  # tracked by a release before the tag
        c.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_TRAINING)
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


def ui_page(experiment_id: str, run_id: str | None = None, artifact: str | None = None) -> str:
    """The UI route (after ``#``) of a run's artifact, or of a run's page, or without a run of the
    experiment's runs table; in the machine-learning workspace (``UI_WORKFLOW``)."""
    page = f"/experiments/{experiment_id}/runs"
    if run_id:
        page += f"/{run_id}" + (f"/artifacts/{artifact}" if artifact else "")
    return f"{page}?{UI_WORKFLOW}"


def landing_page(uri: str, experiment_id: str, grid: str) -> str:
    """Where ``sslgrid ui`` opens a grid: its report (``REPORT``, rendered as Markdown, tables in
    full, on the parent run's Artifacts tab), else its parent run, else the experiment's runs table."""
    parent = find_parent(uri, experiment_id, grid)
    if parent is None:
        return ui_page(experiment_id)
    logged = {f.path for f in client(uri).list_artifacts(parent.info.run_id, REPORT.rpartition("/")[0])}
    return ui_page(experiment_id, parent.info.run_id, REPORT if REPORT in logged else None)


def show_report(uri: str, run_id: str, markdown: str, images: list[Path]) -> None:
    """Make ``markdown`` (the grid's report) the description of the run ``run_id``, which the UI
    renders on the run's page. ``images`` were logged under the run's ``report/`` artifacts: links to
    them by file name point at the server's ``get-artifact`` endpoint (relative to the UI's page, so
    that a ``--static-prefix`` works too), and those the text does not show are appended. Longer
    than a tag holds, the text is cut at a line and says where the rest is."""
    from urllib.parse import quote

    def src(image: Path) -> str:
        return f"get-artifact?path={quote(f'report/{image.name}')}&run_uuid={run_id}"

    for image in images:
        markdown = markdown.replace(f"]({image.name})", f"]({src(image)})")
    shown = [f"![{i.stem}]({src(i)})" for i in images if src(i) not in markdown]
    note = "\n\n".join([markdown, *shown])
    if len(note) > MAX_NOTE_CHARS:
        tail = f"\n\n*Cut to fit an MLflow tag: the whole report is `{REPORT}` under Artifacts.*"
        room = MAX_NOTE_CHARS - len(tail) - sum(len(i) + 2 for i in shown)
        note = "\n\n".join([markdown[:max(room, 0)].rsplit("\n", 1)[0] + tail, *shown])
    client(uri).set_tag(run_id, NOTE, note[:MAX_NOTE_CHARS])


def numeric(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TrackingError(RuntimeError):
    """A stage's metrics could not be delivered to its MLflow store within the patience; ``str()``
    names the store, how long it has not answered, what is kept and the fix."""


PATIENCE_S = 1800.0  # how long a stage's points wait for an unanswering store (SSLGRID_TRACKING_PATIENCE_S), seconds


def patience_problem() -> str | None:
    """Why ``$SSLGRID_TRACKING_PATIENCE_S`` is not a number of seconds above 0 (``sslgrid run`` refuses
    it before anything is launched), or None."""
    import math

    raw = os.environ.get("SSLGRID_TRACKING_PATIENCE_S")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        return (f"SSLGRID_TRACKING_PATIENCE_S={raw!r} is not a number of seconds above 0. Unset it (default "
                f"{PATIENCE_S:.0f} s) or set e.g. SSLGRID_TRACKING_PATIENCE_S=3600.")
    return None


def patience_s() -> float:
    """How long a stage's points wait for an unanswering store, seconds: ``$SSLGRID_TRACKING_PATIENCE_S``,
    or ``PATIENCE_S`` when it is unset or not a number above 0 (the driver refuses that first)."""
    return PATIENCE_S if patience_problem() else float(os.environ.get("SSLGRID_TRACKING_PATIENCE_S", PATIENCE_S))


def _transient(err: BaseException) -> bool:
    """Whether ``err`` from the store may pass when the store is back (a refused or dropped
    connection, a 5xx, a database that restarts), not a request the store will always refuse."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return True


class _Sender(threading.Thread):
    """Delivers a stage's points and tags to its run, in order, from one thread with one client: the
    training loop never waits for the store. Each call is MLflow's, with its HTTP retries
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, about 4 minutes by default); when those run out, or a database
    store refuses a connection, the same batch is sent again every few seconds until it lands or the
    store has not answered for ``patience_s()`` seconds. A batch sent again after a lost answer is
    the same batch (same keys, steps, values and timestamps), which MLflow's SQL store keeps once.

    MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``) sends from a pool of
    10 threads and drops a batch when its retries run out, so it neither keeps order nor outlives
    a longer outage: tests/integration/test_faults.py restarts a real server under a stage."""

    def __init__(self, uri: str, run_id: str):
        super().__init__(name=f"sslgrid-sink-{run_id[:8]}", daemon=True)
        self.uri, self.run_id = uri, run_id
        self.c = client(uri)
        self.q: queue.Queue = queue.Queue()
        self.error: str | None = None
        self.outage_s = 0.0  # the longest time the store did not answer, seconds
        self.start()

    def put(self, metrics: list = (), tags: list = ()) -> None:
        self.q.put((list(metrics), list(tags)))

    def run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:  # close(): a Ray worker runs many stages, each with its own sender
                    return
                if self.error is None:
                    self._deliver(*item)
            finally:
                self.q.task_done()

    def close(self) -> None:
        """End the thread once what was put before is delivered (or given up)."""
        self.q.put(None)

    def _deliver(self, metrics: list, tags: list) -> None:
        from pipeline.stores import shown

        first_failure, delay = None, 1.0
        while True:
            try:
                for i in range(0, max(len(metrics), 1), 1000):  # MLflow's limit per batch
                    self.c.log_batch(self.run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [])
                return
            except Exception as err:  # noqa: BLE001 — sorted by _transient
                now = time.time()
                first_failure = first_failure or now
                self.outage_s = max(self.outage_s, now - first_failure)
                if not _transient(err) or now - first_failure > patience_s():
                    lost = self.q.qsize() + 1
                    self.error = (f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                                  f"(the store {shown(self.uri)} did not take this stage's points for "
                                  f"{now - first_failure:.0f} s; {lost} batches of them are not in MLflow)")
                    return
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def flush(self, timeout_s: float) -> None:
        """Wait until every batch put so far is delivered, at most ``timeout_s`` seconds. Raises
        TrackingError when one could not be delivered or the time ran out."""
        from pipeline.stores import shown

        deadline = time.time() + timeout_s
        while self.q.unfinished_tasks and time.time() < deadline and self.error is None:
            time.sleep(0.05)
        if self.error is None and self.q.unfinished_tasks:
            self.error = (f"the store {shown(self.uri)} has not taken this stage's last points after "
                          f"{timeout_s:.0f} s; {self.q.unfinished_tasks} batches of them are not in MLflow")
        if self.error is not None:
            raise TrackingError(f"{self.error}. The stage's results are in its folder; when the store answers "
                                f"again, rerun `sslgrid run`: the stage resumes from its last checkpoint. "
                                f"SSLGRID_TRACKING_PATIENCE_S (now {patience_s():.0f} s) sets how long a stage waits.")


class MlflowSink:
    """The sink a stage is given: metrics and artifacts go to its MLflow run; progress to a small
    JSON file in the stage directory, which the driver polls (it works on every backend that shares
    the work directory, SLURM included), and to the run's ``sslgrid.progress`` tag, which
    ``sslgrid status`` reads on machines without the work directory (pipeline/watch.py).

    Points, progress and warning tags go through one background sender (``_Sender``): a tracking
    server that restarts or a database that is briefly away does not stop training, and nothing
    logged meanwhile is lost or doubled. ``flush()`` waits for them; the stage's run is marked
    FINISHED only after it."""

    PROGRESS_TAG = "sslgrid.progress"

    def __init__(self, uri: str, run_id: str, stage_dir: Path):
        self.c = client(uri)
        self.run_id = run_id
        self.stage_dir = StageDir(stage_dir)
        self.first_progress: tuple[int, float] | None = None  # (done, time) of this attempt's first report
        self.sender = _Sender(uri, run_id)

    def log(self, metrics: dict[str, float], step: int, *, timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        self.sender.put(metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def flush(self, timeout_s: float | None = None) -> None:
        """Return once every point, progress and warning given so far is in the store; waits at
        most ``timeout_s`` seconds (default ``patience_s()``). Raises TrackingError naming the store
        and the fix when they could not be delivered."""
        self.sender.flush(patience_s() if timeout_s is None else timeout_s)

    def close(self) -> None:
        """Stop the sender's thread after what it holds; call ``flush`` first to know it landed."""
        self.sender.close()

    def artifact(self, path: Path) -> None:
        path = Path(path)
        if path.stat().st_size > MAX_ARTIFACT_BYTES:
            self.c.set_tag(self.run_id, f"sslgrid.artifact.{path.name}", str(path.resolve()))
        else:
            self.c.log_artifact(self.run_id, str(path))

    def progress(self, done: int, total: int) -> None:
        """``done`` of ``total`` units (epochs, iterations) finished, at ``time`` (Unix seconds); with
        ``start_done``/``start_time``, this attempt's first report (a resumed stage starts at its
        checkpoint's epoch), so that a rate counts only the units this attempt did."""
        from mlflow.entities import RunTag

        now = time.time()
        if self.first_progress is None:
            self.first_progress = (done, now)
        record = {"done": done, "total": total, "time": now,
                  "start_done": self.first_progress[0], "start_time": self.first_progress[1]}
        write_json(self.stage_dir.progress, record)
        self.sender.put(tags=[RunTag(self.PROGRESS_TAG, json.dumps(record, sort_keys=True))])

    def warn(self, message: str) -> None:
        """Appended to ``warnings.log`` in the stage folder (the driver prints it when the stage ends)
        and to the run's ``sslgrid.warnings`` tag; also on stderr, for the worker's log."""
        import sys

        from mlflow.entities import RunTag

        print(f"warning: {message}", file=sys.stderr)
        with open(self.stage_dir.warnings, "a") as f:
            f.write(message.replace("\n", " ") + "\n")
        self.sender.put(tags=[RunTag(WARNINGS_TAG, self.stage_dir.warnings.read_text()[-5000:])])


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON, through ``atomic_write``: a reader or a crash never sees half a file."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
