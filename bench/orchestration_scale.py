"""How the orchestration's cost grows with the grid (issue 21, item 3): grids of N trivial stages
through the real driver (``sslgrid run`` on a private local Ray cluster, a SQLite MLflow store in a
temporary folder), timing at each N:

- ``plan``;
- ``run``, and from it the per-stage overhead, three ways:
  - with fixed: the run's wall time less the report it writes at its end and less the stages' own
    work (the sum of their ``seconds``, measured inside each stage, over the cluster's CPUs), per stage;
  - driver overhead: the same less the fixed costs of any run (Ray's start and stop, the store's
    creation, the workers' start until the first stage began). What is left is MLflow run creation,
    submission, the workers' bookkeeping (spec.json, run status, tags, artifacts, DONE), the
    driver's polling and what it does after the last stage, plus the per-run costs not split out
    (the experiment, the code snapshot, the tail of the wait loop), which weigh on small grids;
  - steady: from the first stage's DONE to the last one's, per stage, less the stages' own work:
    the marginal cost while stages flow;
- a rerun with every stage cached;
- ``report``;
- ``status --once``.

The trivial stage kind is registered by this bench: the root kind's record (pipeline/stages.py
STAGE_KINDS) with its run function replaced by ``trivial`` below, which sleeps ``--sleep`` seconds
and logs a few metrics per epoch and its progress, as stages do. The identities are the plan's own
(``pretrain.method: none``, one seed per stage). The driver's process gets the record here; Ray's
workers get it from ``register`` as their ``worker_process_setup_hook``, imported through PYTHONPATH.

    python bench/orchestration_scale.py [--sizes 10,100,1000,5000] [--sleep 0.05] [--keep]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SLEEP_ENV = "SSLGRID_BENCH_SLEEP"
EPOCHS = 2
MODULE = "bench.orchestration_scale"  # as the workers import it, whatever __name__ is here


def trivial(cfg, workdir: Path, sink):
    """A root stage that does nothing but sleep and log: per epoch, three metrics and its progress."""
    from trainers.results import PretrainResult

    sleep = float(os.environ.get(SLEEP_ENV, "0.05"))
    for epoch in range(EPOCHS):
        time.sleep(sleep / EPOCHS)
        sink.log({"loss": 1.0 / (epoch + 1), "inst_acc": 10.0 * epoch, "lr": 0.1}, step=epoch)
        sink.progress(epoch + 1, EPOCHS)
    return PretrainResult(checkpoint=str(Path(workdir) / "none"), feat_dim=1, epochs=EPOCHS, epochs_trained=EPOCHS,
                          loss=1.0 / EPOCHS)


def register() -> None:
    """The trivial kind, in this process's STAGE_KINDS (the driver's, or a Ray worker's)."""
    import dataclasses

    from pipeline.stages import ROOT, STAGE_KINDS

    STAGE_KINDS[ROOT] = dataclasses.replace(STAGE_KINDS[ROOT], run=f"{MODULE}:trivial", artifacts=(),
                                            system_metrics=False, summary=lambda cfg: "trivial (bench)")


class Timer:
    """Wall time spent in wrapped functions, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.saved: list[tuple[object, str, object]] = []
        self.marks: dict[str, float] = {}

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.seconds[label] += time.perf_counter() - t0

        self.saved.append((owner, name, original))
        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.marks.clear()

    def restore(self) -> None:
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


def instrument(timer: Timer) -> None:
    import ray

    import pipeline.execute
    import pipeline.report
    import pipeline.tracking
    from cluster.ray_backend import RayBackend

    original_init = ray.init

    def init(*a, **kw):  # the workers register the trivial kind as they start
        env = dict(kw.get("runtime_env") or {})
        env["worker_process_setup_hook"] = f"{MODULE}.register"
        return original_init(*a, **{**kw, "runtime_env": env})

    timer.saved.append((ray, "init", original_init))
    ray.init = init
    timer.wrap(RayBackend, "__enter__", "ray_start")
    timer.wrap(RayBackend, "__exit__", "ray_stop")
    timer.wrap(pipeline.tracking, "prepare_runs", "prepare_runs")
    timer.wrap(pipeline.tracking, "open_store", "store_creation")
    timer.wrap(pipeline.execute, "_submit", "submit")
    original_submit = pipeline.execute._submit

    def submitted(*a, **kw):  # the first task is submitted just after: the workers' warm-up starts
        timer.marks.setdefault("submit", time.time())
        return original_submit(*a, **kw)

    pipeline.execute._submit = submitted
    timer.wrap(pipeline.execute, "settle", "settle")
    timer.wrap(pipeline.report, "write_report", "report")


def grid_text(n: int) -> str:
    return (f"name: scale{n}\ndefaults:\n  pretrain: {{method: none}}\naxes:\n  pretrain.seed: {list(range(n))}\n"
            "evaluations: []\nresources:\n  pretrain: {cpus: 1}\n")


def cli(argv: list[str], profile: Path | None = None) -> tuple[int, float, str]:
    """``sslgrid argv`` in this process: (exit code, seconds, output); with ``profile``, the driver's
    cProfile statistics are written there (they slow it down: time without it)."""
    import cProfile

    from pipeline.cli import main

    out = io.StringIO()
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        if prof:
            prof.enable()
        try:
            code = main(argv)
        finally:
            if prof:
                prof.disable()
    seconds = time.perf_counter() - t0
    if prof:
        prof.dump_stats(str(profile))
    return code, seconds, out.getvalue()


def measure(n: int, root: Path, timer: Timer, cpus: int, profile: Path | None = None) -> dict[str, float]:
    folder = root / f"n{n}"
    folder.mkdir(parents=True)
    grid = folder / "grid.yaml"
    grid.write_text(grid_text(n))
    where = [str(grid), "--workdir", str(folder / "runs"), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    row: dict[str, float] = {"n": n}

    def step(name: str, argv: list[str]) -> str:
        timer.reset()
        code, seconds, out = cli(argv, profile / f"n{n}-{name}.prof" if profile else None)
        if code != 0:
            raise SystemExit(f"`sslgrid {' '.join(argv)}` exited {code}:\n{out[-4000:]}")
        row[name] = seconds
        for label, s in timer.seconds.items():
            row[f"{name}.{label}"] = s
        return out

    step("plan", ["plan", *where])
    out = step("run", ["run", *where, "--num-cpus", str(cpus)])
    if f"ran {n}, cached 0, failed 0" not in out:
        raise SystemExit(f"the first run did not run every stage:\n{out[-4000:]}")
    stages = folder / "runs" / "pretrain"
    work = sum(json.loads(p.read_text())["seconds"] for p in stages.glob("*/result.json"))
    row["work"] = work
    # the workers' start (a Ray worker process importing MLflow and torch) until the first stage began
    row["warmup"] = max(0.0, min(p.stat().st_mtime for p in stages.glob("*/spec.json")) - timer.marks["submit"])
    row["fixed"] = sum(row.get(f"run.{k}", 0.0) for k in ("ray_start", "ray_stop", "store_creation")) + row["warmup"]
    slots = min(n, cpus)
    # while stages flow: from the first stage's DONE to the last's, per stage, less the stages' own work
    done = sorted(json.loads(p.read_text())["finished"] for p in stages.glob("*/DONE"))
    row["steady"] = ((done[-1] - done[0]) / (n - 1) - work / n / slots) if n > 1 else float("nan")
    row["overhead_all"] = (row["run"] - row.get("run.report", 0) - work / slots) / n
    row["overhead"] = row["overhead_all"] - row["fixed"] / n
    out = step("rerun", ["run", *where, "--num-cpus", str(cpus)])
    if f"ran 0, cached {n}, failed 0" not in out or "run.ray_start" in row and row.get("rerun.ray_start"):
        raise SystemExit(f"the rerun was not all cached:\n{out[-4000:]}")
    step("report", ["report", *where])
    step("status", ["status", "--once", *where])
    return row


def table(rows: list[dict[str, float]]) -> str:
    def ms(r: dict, k: str) -> str:
        return f"{r[k] / r['n'] * 1000:.1f}"

    head = ["stages", "plan s (ms/stage)", "run s", "fixed s", "stage work s", "prepare_runs ms/stage",
            "overhead ms/stage (with fixed)", "driver overhead ms/stage", "steady ms/stage",
            "cached rerun s (ms/stage)", "report s (ms/stage)", "status --once s (ms/stage)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            f"{r['n']:,}", f"{r['plan']:.2f} ({ms(r, 'plan')})", f"{r['run']:.1f}",
            f"{r['fixed']:.1f}", f"{r['work']:.1f}",
            f"{(r.get('run.prepare_runs', 0) - r.get('run.store_creation', 0)) / r['n'] * 1000:.1f}",
            f"{r['overhead_all'] * 1000:.1f}", f"{r['overhead'] * 1000:.1f}", f"{r['steady'] * 1000:.1f}",
            f"{r['rerun']:.2f} ({ms(r, 'rerun')})", f"{r['report']:.2f} ({ms(r, 'report')})",
            f"{r['status']:.2f} ({ms(r, 'status')})"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000,5000", help="grid sizes, comma-separated")
    ap.add_argument("--sleep", type=float, default=0.05, help="seconds each stage sleeps")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray cluster")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    ap.add_argument("--json", help="also write the measured rows here")
    ap.add_argument("--profile", type=Path, help="write the driver's cProfile statistics of each step to this folder")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    os.environ[SLEEP_ENV] = str(args.sleep)
    # the workers import this module (their setup hook) from the checkout; the stages' own packages
    # still come from the run's code snapshot, which Ray puts first on their path
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "10")
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    register()
    # what the first `sslgrid run` of a process imports (MLflow, torch for the cache check), imported
    # before any size is timed, so that the smallest grid does not carry it alone
    import mlflow  # noqa: F401

    import trainers.data  # noqa: F401
    timer = Timer()
    instrument(timer)
    rows = []
    try:
        cwd = os.getcwd()
        os.chdir(root)  # MLflow's default ./mlruns, if anything asked for it, lands here
        for n in sizes:
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            rows.append(measure(n, root, timer, args.cpus, args.profile))
            r = rows[-1]
            print(f"{n} stages: run {r['run']:.1f} s, overhead {r['overhead'] * 1000:.1f} ms/stage, cached rerun "
                  f"{r['rerun']:.2f} s, report {r['report']:.2f} s, status {r['status']:.2f} s", flush=True)
        os.chdir(cwd)
    finally:
        timer.restore()
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{os.cpu_count()} cores, CPU only; each stage sleeps {args.sleep:g} s and logs {EPOCHS} x 3 metrics "
          f"and its progress; local Ray cluster of {args.cpus} CPUs, SQLite store\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
