"""N concurrent stage writers through a real `sslgrid server`, backed by SQLite and by PostgreSQL side
by side: does every metric point land exactly once, how fast, and where does a store stop holding?

    python bench/tracking_load.py [--writers 16 64 256] [--stores sqlite postgresql] [--steps 30]
                                  [--artifact-mb 4] [--processes 4] [--postgres URI]

Each writer logs what a stage's MlflowSink logs (pipeline/tracking.py): per step one ``log_batch`` of
the training loop's record (loss, lr, epoch_seconds, images_per_second, top1), every ``--system-every``
steps one ``log_batch`` of MLflow's eight ``system/...`` metric names (mlflow/system_metrics/metrics),
the ``sslgrid.progress`` tag, and at the end one checkpoint-sized artifact (``--artifact-mb`` MiB,
uploaded through the server) before the run ends FINISHED. Runs are created first, as the driver
does. 256 Python processes with MLflow do not fit the machine, so the writers are threads spread
over ``--processes`` processes; each thread has its own MlflowClient, and each process's HTTP pool
holds one connection per thread (MLFLOW_HTTP_POOL_MAXSIZE), so every writer keeps its own connection.
MLflow's client retries (7 tries with backoff on 429/5xx and connection errors) stay on, as in stages.

After the writers end, every (run, metric) history is read back through the server and compared with
what the writers were told was written: ``lost`` counts points a successful call wrote that are not
there, ``doubled`` points there more than once, ``errors`` the calls that raised after MLflow's retries
and the runs that did not end FINISHED with their last progress tag and their artifact at its size.
PostgreSQL needs ``--postgres`` or $SSLGRID_TEST_POSTGRES (cluster/postgres/local_postgres.sh): a
database is created for the run and dropped after it.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_METRICS = ("loss", "lr", "epoch_seconds", "images_per_second", "top1")  # trainers/loop.py's record
SYSTEM_METRICS = tuple(f"system/{k}" for k in (  # MLflow's system metrics (mlflow/system_metrics/metrics/*.py)
    "cpu_utilization_percentage", "system_memory_usage_megabytes", "system_memory_usage_percentage",
    "disk_usage_percentage", "disk_usage_megabytes", "disk_available_megabytes", "network_receive_megabytes",
    "network_transmit_megabytes"))
PROGRESS = "sslgrid.progress"  # MlflowSink.PROGRESS_TAG


@dataclass(frozen=True)
class Workload:
    """What one writer logs: ``steps`` training records, system metrics every ``system_every`` steps,
    an artifact of ``artifact_bytes`` bytes; ``interval_s`` seconds of "training" between steps."""
    steps: int = 30
    system_every: int = 5
    artifact_bytes: int = 4 * 2**20
    interval_s: float = 0.0

    def batches(self, writer: int) -> list[tuple[int, dict[str, float]]]:
        """(step, {metric: value}) of every log_batch call of writer ``writer``, in order; values are
        distinct per (writer, metric, step), so that a point read back names the call that wrote it."""
        out = []
        for step in range(self.steps):
            out.append((step, {k: writer * 1e3 + step + i / 10 for i, k in enumerate(TRAIN_METRICS)}))
            if step % self.system_every == 0:
                out.append((step, {k: writer * 1e3 + step + i / 100 for i, k in enumerate(SYSTEM_METRICS)}))
        return out


@dataclass
class Outcome:
    """One store at one N: the calls' latencies (seconds), errors, and the points check."""
    store: str
    writers: int
    spread: str
    wall_s: float = 0.0
    points: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lost: int = 0
    doubled: int = 0

    def row(self) -> dict[str, object]:
        lat = sorted(self.latencies)
        q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000) if lat else (lambda p: float("nan"))
        return {"store": self.store, "writers": self.writers, "spread": self.spread, "log_batch calls": len(lat),
                "points": self.points, "points/s": round(self.points / self.wall_s) if self.wall_s else 0,
                "p50 ms": round(q(0.50), 1), "p99 ms": round(q(0.99), 1), "errors": len(self.errors),
                "lost": self.lost, "doubled": self.doubled, "wall s": round(self.wall_s, 1)}


def _write(uri: str, run_id: str, writer: int, work: Workload, artifact: Path, barrier, out: dict) -> None:
    """One writer (a thread): its own MlflowClient; records per call (latency s, ok, points)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    calls, errors = [], []
    barrier.wait()
    for step, metrics in work.batches(writer):
        now = int(time.time() * 1000)
        t0 = time.perf_counter()
        try:
            c.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
            calls.append((time.perf_counter() - t0, True, step, tuple(metrics)))
        except Exception as err:  # counted, not raised: the table says how many
            calls.append((time.perf_counter() - t0, False, step, tuple(metrics)))
            errors.append(f"log_batch: {type(err).__name__}: {str(err)[:200]}")
        if metrics.keys() == set(TRAIN_METRICS):
            try:
                c.set_tag(run_id, PROGRESS, f'{{"done": {step + 1}, "total": {work.steps}}}')
            except Exception as err:
                errors.append(f"set_tag: {type(err).__name__}: {str(err)[:200]}")
        if work.interval_s:
            time.sleep(work.interval_s)
    try:
        c.log_artifact(run_id, str(artifact), "checkpoints")
        c.set_terminated(run_id, "FINISHED")
    except Exception as err:
        errors.append(f"artifact/end: {type(err).__name__}: {str(err)[:200]}")
    out[writer] = (calls, errors)


def _process(uri: str, jobs: list[tuple[int, str]], work: Workload, barrier, results, artifact: str) -> None:
    """One process of writers: one thread per (writer, run id) in ``jobs``; puts {writer: (calls,
    errors)} on ``results``."""
    out: dict[int, tuple] = {}
    threads = [threading.Thread(target=_write, args=(uri, run_id, w, work, Path(artifact), barrier, out))
               for w, run_id in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(out)


def run_load(uri: str, store: str, writers: int, work: Workload, processes: int = 4,
             tmp: Path | None = None) -> Outcome:
    """``writers`` concurrent writers against the tracking server at ``uri`` (http), as threads over
    ``min(processes, writers)`` spawned processes; then every point read back and compared.
    Returns the Outcome (latencies in seconds). Raises RuntimeError when a process dies."""
    from mlflow.tracking import MlflowClient

    tmp = Path(tmp or tempfile.mkdtemp(prefix="tracking-load-"))
    artifact = tmp / "checkpoint.pt"
    if not artifact.exists() or artifact.stat().st_size != work.artifact_bytes:
        artifact.write_bytes(os.urandom(work.artifact_bytes))
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment(f"load-{store}-{writers}-{uuid.uuid4().hex[:6]}")
    run_ids = [c.create_run(exp, run_name=f"writer-{w}").info.run_id for w in range(writers)]
    n_proc = min(processes, writers)
    chunks = [[(w, run_ids[w]) for w in range(p, writers, n_proc)] for p in range(n_proc)]
    per = sorted({len(ch) for ch in chunks})
    spread = f"{n_proc} proc × {'/'.join(map(str, per))} threads"
    ctx = mp.get_context("spawn")  # no forked MLflow or HTTP state
    barrier, results = ctx.Barrier(writers + 1), ctx.Queue()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line per ended run otherwise
    env_before = os.environ.get("MLFLOW_HTTP_POOL_MAXSIZE")
    os.environ["MLFLOW_HTTP_POOL_MAXSIZE"] = str(max(per) + 2)  # inherited by the spawned processes
    try:
        procs = [ctx.Process(target=_process, args=(uri, ch, work, barrier, results, str(artifact))) for ch in chunks]
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_HTTP_POOL_MAXSIZE")
        else:
            os.environ["MLFLOW_HTTP_POOL_MAXSIZE"] = env_before
    barrier.wait()  # every writer has its client: the clock starts
    t0 = time.perf_counter()
    got: dict[int, tuple] = {}
    while len(got) < writers:
        try:
            got.update(results.get(timeout=5))
        except Exception:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a writer process died (exit {dead[0].exitcode})") from None
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    outcome = Outcome(store, writers, spread, wall)
    for w, (calls, errors) in got.items():
        outcome.errors += errors
        for latency, ok, step, names in calls:
            outcome.latencies.append(latency)
            outcome.points += len(names) if ok else 0
    outcome.lost, outcome.doubled = _check(c, run_ids, work, got)
    outcome.errors += _check_runs(c, run_ids, work)
    return outcome


def _check_runs(c, run_ids: list[str], work: Workload) -> list[str]:
    """What is wrong with the runs besides their metrics: not FINISHED, a last progress tag that is not
    the last step's, an artifact missing or of another size."""
    wrong = []
    for run_id in run_ids:
        run = c.get_run(run_id)
        if run.info.status != "FINISHED":
            wrong.append(f"check: run {run_id} is {run.info.status}")
        if run.data.tags.get(PROGRESS) != f'{{"done": {work.steps}, "total": {work.steps}}}':
            wrong.append(f"check: run {run_id} has progress {run.data.tags.get(PROGRESS)!r}")
        sizes = [a.file_size for a in c.list_artifacts(run_id, "checkpoints")]
        if sizes != [work.artifact_bytes]:
            wrong.append(f"check: run {run_id} has checkpoint artifacts of {sizes} bytes")
    return wrong


def _check(c, run_ids: list[str], work: Workload, got: dict[int, tuple]) -> tuple[int, int]:
    """(lost, doubled): points of successful calls missing from the store; points stored more than
    once (or stored without having been written)."""
    lost = doubled = 0
    for w, run_id in enumerate(run_ids):
        calls = got[w][0]
        expected = Counter((name, step) for _, ok, step, names in calls if ok for name in names)
        attempted = {(name, step) for _, _, step, names in calls for name in names}
        stored: Counter = Counter()
        for name in (*TRAIN_METRICS, *SYSTEM_METRICS):
            stored.update((m.key, m.step) for m in c.get_metric_history(run_id, name))
        lost += sum(1 for p in expected if stored[p] == 0)
        doubled += sum(n - 1 for p, n in stored.items() if n > 1) + sum(n for p, n in stored.items() if p not in attempted)
    return lost, doubled


@contextmanager
def tracking_server(store_uri: str, tmp: Path):
    """``sslgrid server`` (pipeline/cli.py) on a free loopback port with ``store_uri``; yields its http
    URI. Raises RuntimeError with the server's log when it does not answer /health within 120 s."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "server", "--port", str(port),
                             "--backend-store-uri", store_uri, "--artifacts-destination", str(tmp / f"artifacts-{port}")],
                            cwd=tmp, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"sslgrid server on {store_uri} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


@contextmanager
def scratch_postgres(admin_uri: str, prefix: str = "sslgrid_load"):
    """A fresh database beside the one ``admin_uri`` names (its role must have CREATEDB); yields its
    URI; dropped afterwards (WITH (FORCE): PostgreSQL ≥ 13). Raises psycopg.Error when it cannot."""
    import psycopg
    from sqlalchemy import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_uri.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin_uri).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_uri.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def store(kind: str, tmp: Path, postgres: str | None):
    """The backend-store URI of a fresh store of ``kind`` (sqlite or postgresql)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'load-store.db'}"
    else:
        if not postgres:
            raise SystemExit("postgresql needs --postgres URI or $SSLGRID_TEST_POSTGRES "
                             "(cluster/postgres/local_postgres.sh start; eval \"$(… env)\")")
        with scratch_postgres(postgres) as uri:
            yield uri


def table(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (Outcome.row())."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--writers", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--stores", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite", "postgresql"])
    ap.add_argument("--steps", type=int, default=30, help="training records per writer (default 30)")
    ap.add_argument("--system-every", type=int, default=5, help="a system-metrics batch every this many steps")
    ap.add_argument("--artifact-mb", type=float, default=4.0, help="the checkpoint artifact, MiB (default 4)")
    ap.add_argument("--interval", type=float, default=0.0, help="seconds each writer waits between steps (default 0)")
    ap.add_argument("--processes", type=int, default=4, help="processes the writers are spread over (default 4)")
    ap.add_argument("--postgres", default=os.environ.get("SSLGRID_TEST_POSTGRES"),
                    help="postgresql:// URI of a role with CREATEDB (default $SSLGRID_TEST_POSTGRES)")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    work = Workload(args.steps, args.system_every, int(args.artifact_mb * 2**20), args.interval)
    tmp = Path(tempfile.mkdtemp(prefix="tracking-load-"))
    per_writer = len(work.batches(0))
    print(f"{os.cpu_count()} cores; per writer: {per_writer} log_batch calls "
          f"({sum(len(m) for _, m in work.batches(0))} points), {work.steps} progress tags, "
          f"one {args.artifact_mb:g} MiB artifact; server: sslgrid server (mlflow server, 2 workers)", flush=True)
    rows = []
    for kind in args.stores:
        with store(kind, tmp, args.postgres) as store_uri, tracking_server(store_uri, tmp) as uri:
            for n in args.writers:
                try:
                    out = run_load(uri, kind, n, work, args.processes, tmp)
                except Exception:
                    traceback.print_exc()
                    continue
                rows.append(out.row())
                print(table([rows[-1]]).splitlines()[-1], flush=True)
                for e in Counter(out.errors).most_common(3):
                    print(f"  {e[1]}× {e[0]}", flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
