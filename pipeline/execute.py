"""Plan → tasks on a backend → outcomes, with resume and live progress.

- A stage whose directory holds ``DONE`` is cached: its ``result.json`` is reused and it never
  reaches the backend. When every stage is cached, no backend (no Ray cluster) is started at all.
- Every other stage is one task of the backend (cluster/backend.py). It gets its upstream results
  as the backend's handles (Ray ObjectRefs), so the backend starts it when they are ready and
  never starts it when one of them failed.
- A task opens no MLflow run: it logs to the run id the driver created for its identity, which is
  the same run on every rerun, so a resumed stage continues its run.
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cluster.backend import Backend
from cluster.slurm_jobs import current_job_id, live_state
from pipeline.backends import BackendError
from pipeline.lock import LockBusy, acquire, describe, held
from pipeline.plan import SCHEMA_VERSION, Plan, Stage
from pipeline.slurm import slurm_job
from pipeline.snapshot import source_root
from pipeline.state import StateError, read_json, read_json_or, rerun_fix
from pipeline.stages import STAGE_KINDS
from pipeline.tracking import ERROR, MlflowSink, TrackingError, client, unfinished, write_json
from trainers.files import StageDir
from trainers.results import SECONDS
from trainers.sink import NullSink


SLURM_TAG = "sslgrid.slurm_job_id"
FAILED_FLUSH_S = 60.0  # how long a failing stage waits for its last points to reach the store, seconds
CODE_TAG, CODE_PATH_TAG = "sslgrid.code", "sslgrid.code_path"


@dataclass
class Outcome:
    stage: Stage
    state: str  # cached | done | failed | upstream_failed
    result: dict | None = None
    error: str | None = None
    seconds: float = 0.0


def payload(plan: Plan, stage: Stage, run_id: str, code: str | None = None, cpus: float | None = None) -> dict[str, Any]:
    """What a worker needs to run ``stage``; ``cwd`` is the driver's, so that relative paths in the
    grid (dataset.root, $SSLGRID_CACHE) mean the same in a worker started in the code snapshot."""
    return {"kind": stage.kind, "key": stage.key, "config": stage.config, "spec": stage.spec,
            "identity": stage.identity, "upstream": list(stage.upstream), "dir": str(stage.directory(plan.grid.workdir).path),
            "tracking_uri": plan.grid.tracking_uri, "run_id": run_id, "code": code, "cwd": str(Path.cwd()),
            "cpus": cpus}


def run_stage(p: dict[str, Any], *upstream: Any) -> Any:
    """Run one stage where the backend put it. Raises on failure, after recording it in
    ``status.json`` and in the stage's MLflow run (status FAILED, tag ``sslgrid.error``).

    In a multi-process job (torch.distributed's env:// variables set, e.g. by a SLURM job of several
    tasks) every process trains; rank 0 alone writes files and talks to MLflow."""
    from trainers import distributed as D  # here: the driver (and `sslgrid plan`) need no torch

    if p.get("cwd") and Path(p["cwd"]).is_dir():
        os.chdir(p["cwd"])
    d = StageDir(p["dir"])
    if p.get("cpus"):  # the CPUs this process was given: trainers/loader.py sizes its DataLoader workers by it
        os.environ["SSLGRID_CPUS"] = str(p["cpus"])
    D.init_from_env()
    # one process runs a stage at a time, however it was reached (a second driver, a retried task
    # whose first attempt lives on, a requeued job); rank 0 holds the lock for its gang
    lock, busy, done = None, None, None
    if D.world().is_main:
        try:
            lock = acquire(d.lock, f"{p['kind']} {p['key']}")
            if d.done.exists():  # finished by another process while this one was queued
                done = read_result(p["kind"], d)
        except LockBusy as err:
            busy = f"stage {p['key']} is already running ({describe(err.holder)}); this copy did not run it"
    busy, done = D.broadcast_object((busy, done))
    try:
        if busy:
            raise StageBusy(busy)
        if done is not None:
            return done
        if not D.world().is_main:
            STAGE_KINDS[p["kind"]](p["config"], list(upstream), d, NullSink())
            return None  # rank 0's result is the stage's
        return _run_main(p, d, upstream)
    finally:
        if lock is not None:
            lock.release()


class StageBusy(RuntimeError):
    """Another process is running this stage; nothing was touched."""


def _run_main(p: dict[str, Any], d: StageDir, upstream: tuple[Any, ...]) -> Any:
    write_json(d.spec, {"schema": SCHEMA_VERSION, "kind": p["kind"], "key": p["key"], "spec": p["spec"],
                                 "identity": p["identity"], "upstream": p["upstream"], "code": p.get("code")})
    d.status.unlink(missing_ok=True)
    c = client(p["tracking_uri"])
    run_id = p["run_id"]
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, ERROR, "")
    if p.get("code"):  # which copy of the code ran, and where this worker imported it from
        c.set_tag(run_id, CODE_TAG, p["code"])
    c.set_tag(run_id, CODE_PATH_TAG, str(source_root()))
    job = current_job_id()
    if job:  # visible in the UI while the job runs; a requeued job keeps its id
        c.set_tag(run_id, SLURM_TAG, job)
    sink = MlflowSink(p["tracking_uri"], run_id, d)
    try:
        return _run_logged(p, d, upstream, c, sink)
    finally:
        sink.close()


def _run_logged(p: dict[str, Any], d: StageDir, upstream: tuple[Any, ...], c: Any, sink: MlflowSink) -> Any:
    """The stage itself, then its result, final metrics and artifacts, then FINISHED, then DONE; on
    failure, status.json and a FAILED run naming the error, then the error raised again."""
    run_id = p["run_id"]
    monitor = system_monitor(p["tracking_uri"], run_id) if STAGE_KINDS[p["kind"]].system_metrics else None
    t0 = time.time()
    try:
        result = STAGE_KINDS[p["kind"]](p["config"], list(upstream), d, sink)
    except BaseException as err:
        if monitor:
            monitor.finish()
        try:
            sink.flush(FAILED_FLUSH_S)  # what the stage logged before it failed
        except TrackingError:
            pass
        message = f"{type(err).__name__}: {err}"
        try:
            write_json(d.status, {"state": "failed", "error": message, "traceback": traceback.format_exc()})
        except OSError:  # a full disk (trainers/checkpoint.py DiskFullError): MLflow and the backend still say why
            pass
        try:
            c.set_tag(run_id, ERROR, message[:5000])
            c.set_terminated(run_id, "FAILED")
        finally:
            raise
    if monitor:
        monitor.finish()
    seconds = round(time.time() - t0, 3)
    write_json(d.result, {**result.to_json(), SECONDS: seconds})
    # final values at the step after the last epoch, so they never interleave with the streamed ones
    sink.log({**result.metrics, SECONDS: seconds}, step=result.step)
    for path in [d.spec, d.result] + [d / name for name in STAGE_KINDS[p["kind"]].artifacts]:
        if path.exists():
            sink.artifact(path)
    sink.flush()  # every point in the store before the run says FINISHED; raises TrackingError after the patience
    c.set_terminated(run_id, "FINISHED")
    write_json(d.done, {"finished": time.time()})  # last: its presence means all of the above happened
    return result


def system_monitor(uri: str, run_id: str):
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) for the stage's run,
    every 10 s or MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL; continued, not restarted, on resume."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def read_result(kind: str, d: StageDir) -> Any:
    """A finished stage's result, read back from its result.json as its kind's result class
    (trainers/results.py). Raises StateError naming the file and the fix when it is damaged,
    FileNotFoundError when it is absent."""
    data = read_json(d.result, rerun_fix(d.path))
    try:
        return STAGE_KINDS[kind].result.from_json(data)
    except (TypeError, AttributeError):  # not an object, or one that lacks a field
        raise StateError(f"{d.result} does not hold a {kind} result. {rerun_fix(d.path)}") from None


def stage_state(stage: Stage, workdir: Path) -> dict[str, Any]:
    """What the work directory says about a stage: done, failed, started (with progress) or pending."""
    d = stage.directory(workdir)
    if d.done.exists():
        try:
            return {"state": "done", "result": read_result(stage.kind, d)}
        except FileNotFoundError:
            raise StateError(f"{d.done} is there but {d.result} is not. {rerun_fix(d.path)}") from None
    info: dict[str, Any] = {"state": "pending"}
    prog = read_json_or(d.progress, None)
    if isinstance(prog, dict) and {"done", "total"} <= set(prog):
        info.update(state="started", done=prog["done"], total=prog["total"])
    status = read_json_or(d.status, None)
    if isinstance(status, dict):
        info.update(status)
    return info


# Progress files looked for per poll (every half second) among the stages that have not reported yet:
# the first POLL_HEAD in submission order (a backend starts them first) and POLL_WINDOW more in turn.
# Looking for all of them made each poll cost O(stages), and the run O(stages²): 44 ms a poll at
# 1,000 stages. A stage that has reported is read at every poll.
POLL_HEAD, POLL_WINDOW = 64, 192
# Above this many stages to run, only running and failed stages have a visible bar (the grid's bar
# counts the rest): rich renders every visible bar at each refresh, ten a second on a terminal, and a
# render of 5,000 bars takes 2.9 s here, so the display alone cost O(stages) per tenth of a second.
MAX_BARS = 40


class _Display:
    """Per-stage epoch bars and the grid's finished/running/failed counts, via rich."""

    def __init__(self, console: Console, plan: Plan, pending: list[Stage], cached: int):
        self.console, self.plan = console, plan
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console,
                                 transient=False)
        self.overall = self.progress.add_task("[bold]grid", total=len(plan.stages), completed=cached, note="")
        self.every_bar = len(pending) <= MAX_BARS
        self.tasks = {s.key: self.progress.add_task(f"  {s.kind}:{s.cells[0]} [dim]{s.key}", total=None, note="queued",
                                                    start=False, visible=self.every_bar) for s in pending}
        self.seen: dict[str, tuple[int, int]] = {}
        self.counts = {"finished": cached, "failed": 0}
        self.turn = 0  # where the next poll's window starts among the stages that have not reported

    def __enter__(self) -> _Display:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def polled(self, pending: list[Stage]) -> list[Stage]:
        """The stages whose progress this poll reads: every one that has reported, and a bounded
        number of the others (POLL_HEAD, POLL_WINDOW), so that a poll costs the same at any size."""
        quiet = [s for s in pending if s.key not in self.seen]
        if len(quiet) <= POLL_HEAD + POLL_WINDOW:
            return pending
        rest = quiet[POLL_HEAD:]
        start = self.turn % len(rest)
        self.turn = start + POLL_WINDOW
        window = rest[start:start + POLL_WINDOW] + rest[:max(0, start + POLL_WINDOW - len(rest))]
        return [s for s in pending if s.key in self.seen] + quiet[:POLL_HEAD] + window

    def poll(self, pending: list[Stage]) -> None:
        running = 0
        for s in self.polled(pending):
            f = s.directory(self.plan.grid.workdir).progress
            if not f.exists():
                continue
            try:
                prog = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            running += 1
            done, total = prog["done"], prog["total"]
            if self.seen.get(s.key) != (done, total):
                self.seen[s.key] = (done, total)
                if not self.console.is_terminal:  # a log file gets one line per epoch instead of bars
                    self.console.print(f"{s.kind}:{s.cells[0]} {s.key}: {done}/{total}", highlight=False)
                self.progress.start_task(self.tasks[s.key])
                self.progress.update(self.tasks[s.key], completed=done, total=total, note="epochs", visible=True)
        self.progress.update(self.overall, note=f"finished {self.counts['finished']} · running {running} · "
                                                f"failed {self.counts['failed']}")

    def finish(self, o: Outcome) -> None:
        t = self.tasks[o.stage.key]
        if not self.console.is_terminal:
            self.console.print(f"{o.stage.kind}:{o.stage.cells[0]} {o.stage.key}: {o.state}"
                               + (f" ({o.error})" if o.error else ""), highlight=False)
        if o.state == "done":
            self.counts["finished"] += 1
            total = self.progress.tasks[t].total or 1
            self.progress.update(t, note="[green]done", completed=total, total=total, visible=self.every_bar)
        else:
            self.counts["failed"] += 1
            self.progress.update(t, note=f"[red]{o.state}", visible=True)
        self.progress.advance(self.overall)
        self.progress.update(self.overall, note=f"finished {self.counts['finished']} · failed {self.counts['failed']}")


def execute(plan: Plan, run_ids: dict[str, str], backend_factory: Callable[[], Backend],
            console: Console | None = None, preflight: Callable[[Backend], None] | None = None,
            code: str | None = None) -> dict[str, Outcome]:
    """Run every stage that is not done, on the ``Backend`` (cluster/backend.py) that
    ``backend_factory()`` gives; it is only called when there is something to run. ``preflight``
    gets the entered backend before anything is submitted, and may raise. Raises ResourceError
    (cluster/backend.py) when a stage asks for more than the backend has."""
    console = console or Console()
    outcomes, pending = _cached(plan, run_ids)
    if not pending:
        return outcomes
    with backend_factory() as backend:
        if preflight is not None:
            preflight(backend)  # may raise: nothing has been submitted yet
        refs = _submit(plan, run_ids, backend, pending, outcomes, code)
        started = time.time()
        by_ref = {refs[s.key]: s for s in pending}
        waiting = list(by_ref)
        order = {k: i for i, k in enumerate(plan.stages)}
        with _Display(console, plan, pending, len(outcomes)) as display:
            while waiting:
                ready, waiting = backend.wait(waiting, timeout=0.5)
                display.poll([by_ref[r] for r in waiting])
                for ref in sorted(ready, key=lambda r: order[by_ref[r].key]):  # upstream before dependents
                    s = by_ref[ref]
                    ok, value = backend.outcome(ref)
                    o = Outcome(s, "done", value, seconds=time.time() - started) if ok else \
                        _failure(plan, s, value, outcomes)
                    outcomes[s.key] = o
                    display.finish(o)
                    warned = s.directory(plan.grid.workdir).warnings
                    if warned.exists():  # stage output goes to Ray's worker logs; this must be seen
                        for line in warned.read_text().splitlines():
                            console.print(f"[yellow]warning[/]: {s.kind}:{s.cells[0]} {s.key}: {line}",
                                          highlight=False, soft_wrap=True)
    _record(plan, run_ids, pending, outcomes)
    return outcomes


def _cached(plan: Plan, run_ids: dict[str, str]) -> tuple[dict[str, Outcome], list[Stage]]:
    """The outcomes of the stages that are done, and the stages that are not. A done stage's run
    is FINISHED; a stage queued again (KILLED or FAILED by an earlier driver, RUNNING for one
    killed outright) is SCHEDULED unless something still runs it."""
    outcomes: dict[str, Outcome] = {}
    pending: list[Stage] = []
    c = client(plan.grid.tracking_uri)
    status = unfinished(plan.grid.tracking_uri, plan.grid.name)  # one query, not one per stage
    for s in plan.ordered():
        info = stage_state(s, plan.grid.workdir)
        was = status.get(run_ids[s.key], "FINISHED")
        if info["state"] == "done":
            outcomes[s.key] = Outcome(s, "cached", info["result"])
            if was != "FINISHED":  # a crash between DONE and the status update
                c.set_terminated(run_ids[s.key], "FINISHED")
        else:
            pending.append(s)
            if was != "SCHEDULED" and stage_live(s, plan.grid.workdir) is None:
                c.update_run(run_ids[s.key], status="SCHEDULED")
    return outcomes, pending


def _submit(plan: Plan, run_ids: dict[str, str], backend: Backend, pending: list[Stage],
            outcomes: dict[str, Outcome], code: str | None) -> dict[str, Any]:
    """Check that every pending stage fits the backend, then submit each (upstream first, a cached
    upstream's result as a value): stage key → handle. Raises ResourceError or BackendError (a stage
    whose unset ``gpus`` resolves to fewer GPUs than its processes) before submitting any."""
    has_gpu = backend.resources().get("GPU", 0) >= 1
    wants, checked = {}, {}
    for s in pending:
        if s.kind in checked:  # resources are per kind: checked once, not once per stage (a call to Ray each)
            wants[s.key] = checked[s.kind]
            continue
        res = plan.grid.resources[s.kind]
        gpus = res.gpus if res.gpus is not None else (1.0 if has_gpu else 0.0)
        if res.gpus is None and gpus and res.process_count(gpus) > gpus:
            # pipeline/grid.py refuses processes > gpus when gpus is written; null is only known here
            raise BackendError(f"{plan.grid.path}: resources.{s.kind}.gpus is unset, which means {gpus:g} GPU on "
                               f"this backend, but resources.{s.kind}.processes is {res.processes}: each process "
                               f"needs a GPU of its own (NCCL refuses two ranks on one device). Set "
                               f"resources.{s.kind}.gpus to {res.processes}, or to 0 to run the processes on CPUs.")
        backend.check_fits(f"resources.{s.kind}", res.cpus, gpus)
        wants[s.key] = checked[s.kind] = res.per_process(gpus)
    refs: dict[str, Any] = {}
    for s in pending:
        args = [outcomes[u].result if u in outcomes else refs[u] for u in s.upstream]
        processes, cpus, gpus = wants[s.key]
        # retries=1: a crashed worker is retried once, and resumes from its checkpoint
        refs[s.key] = backend.submit(run_stage, [payload(plan, s, run_ids[s.key], code, cpus), *args],
                                     name=f"{s.kind}:{s.key}", cpus=cpus, gpus=gpus, retries=1, processes=processes)
    return refs


def _record(plan: Plan, run_ids: dict[str, str], pending: list[Stage], outcomes: dict[str, Outcome]) -> None:
    """What the workers could not tell MLflow themselves: SLURM job ids, why a stage did not run,
    and the failure of a worker that died."""
    c = client(plan.grid.tracking_uri)
    for s in pending:
        o = outcomes[s.key]
        job = slurm_job(s, plan.grid.workdir)
        if job and "job_id" in job:  # also for jobs that died before they could tag their run
            c.set_tag(run_ids[s.key], SLURM_TAG, job["job_id"])
        if o.state == "upstream_failed":  # record why it did not run
            c.set_tag(run_ids[s.key], ERROR, o.error)
            c.set_terminated(run_ids[s.key], "KILLED")
        elif o.state == "failed" and StageBusy.__name__ in (o.error or ""):
            continue  # another process runs it and owns its run
        elif o.state == "failed" and c.get_run(run_ids[s.key]).info.status != "FAILED":
            c.set_tag(run_ids[s.key], ERROR, o.error[:5000])  # the worker died before it could say so
            c.set_terminated(run_ids[s.key], "FAILED")


def stage_live(stage: Stage, workdir: Path) -> str | None:
    """What is running ``stage`` right now, or None: a process holding its lock, or a SLURM job
    that is queued or running for it."""
    d = stage.directory(workdir)
    holder = held(d.lock)
    if holder:
        return describe(holder)
    job = slurm_job(stage, workdir)
    state = live_state(job["job_id"]) if job and "job_id" in job else None
    if state:
        return f"SLURM job {job['job_id']} ({state})"
    return None


def settle(plan: Plan, run_ids: dict[str, str], reason: str, wait_s: float = 15.0) -> list[str]:
    """Make the store tell the truth after the driver stops, however it stops: a stage run left
    RUNNING or SCHEDULED that nothing runs any more becomes KILLED (FINISHED if its DONE is there),
    tagged ``sslgrid.error`` = ``reason``. Processes of this machine that still hold a stage's lock
    (a local Ray worker being torn down) get ``wait_s`` seconds to exit. Returns the keys it killed."""
    c = client(plan.grid.tracking_uri)
    host = socket.gethostname()
    deadline = time.time() + wait_s
    killed = []
    # one query finds the runs left RUNNING or SCHEDULED; only those are read again, one by one
    left = {r for r, status in unfinished(plan.grid.tracking_uri, plan.grid.name).items()
            if status in ("RUNNING", "SCHEDULED")}
    for s in plan.ordered():
        if s.key not in run_ids or run_ids[s.key] not in left:
            continue
        status = c.get_run(run_ids[s.key]).info.status
        if status not in ("RUNNING", "SCHEDULED"):
            continue
        d = s.directory(plan.grid.workdir)
        while (h := held(d.lock)) and h.get("host") == host and time.time() < deadline:
            time.sleep(0.2)
        if d.done.exists():
            c.set_terminated(run_ids[s.key], "FINISHED")
        elif stage_live(s, plan.grid.workdir) is None:
            c.set_tag(run_ids[s.key], ERROR, reason)
            c.set_terminated(run_ids[s.key], "KILLED")
            killed.append(s.key)
    return killed


def _failure(plan: Plan, s: Stage, err: BaseException, outcomes: dict[str, Outcome]) -> Outcome:
    for u in s.upstream:
        if u in outcomes and outcomes[u].state in ("failed", "upstream_failed"):
            return Outcome(s, "upstream_failed", error=f"not run: upstream {outcomes[u].stage.label} failed")
    status = s.directory(plan.grid.workdir).status
    recorded = read_json_or(status, {})
    if isinstance(recorded, dict) and "error" in recorded:
        return Outcome(s, "failed", error=recorded["error"])
    return Outcome(s, "failed", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
