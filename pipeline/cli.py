"""``sslgrid``: plan, run, status, cancel, report, ui and server for a grid file.

Exit codes: 0 all stages done; 1 some stage failed (the rest of the grid finished); 2 bad input
(nothing was launched, nothing computed was touched).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.grid import Grid, GridError, data_problems, load_grid
from pipeline.state import StateError
from pipeline.plan import Plan, build_plan, describe
from pipeline.stages import ROOT, STAGE_KINDS, gpu_hours


EXIT_FAILED, EXIT_USAGE = 1, 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="grid YAML file, e.g. grids/quickstart.yaml")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set any field, e.g. -o pretrain.epochs=2 (repeatable)")
    p.add_argument("--workdir", help="default: runs/<grid name>")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    p.add_argument("--study", action="append", default=[], metavar="NAME",
                   help="only the cells of this named study (repeatable)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sslgrid", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="show the stages a grid needs; launches nothing")
    _common(p)
    p.add_argument("--decide", action="store_true", help="the first round of `run --decide` and its worst case")
    p = sub.add_parser("run", help="run (or resume) a grid")
    _common(p)
    p.add_argument("--backend", choices=("local", "ray", "slurm"),
                   help="local: a private Ray cluster (default); ray: join --ray-address; slurm: one SLURM job "
                        "per stage through submitit, with the grid's cluster: section")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a private local one "
                                         "(implies --backend ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the private local cluster (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the private local cluster (default: all)")
    p.add_argument("--decide", action="store_true",
                   help="spend seeds only where a claim is still open: rounds of one more seed for the cells of "
                        "open claims, with verdicts valid over every look (the grid's decide: section; "
                        "pipeline/decide.py); resumable")
    p = sub.add_parser("status", help="each stage's state, progress, loss, top-1, SLURM job, elapsed time and ETA "
                                      "(from MLflow: it works without the work directory), MLflow run and error")
    _common(p)
    p.add_argument("--watch", action="store_true",
                   help="a live table, read again every --interval seconds, until the grid is finished (every stage "
                        "finished or failed, and no driver runs it); Ctrl-C stops watching (exit 130)")
    p.add_argument("--once", action="store_true", help="print one frame of that table and exit")
    p.add_argument("--interval", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between reads of the tracking store with --watch (default: 10)")
    p = sub.add_parser("cancel", help="scancel the grid's queued and running SLURM jobs")
    _common(p)
    p = sub.add_parser("report", help="the grid's results as a table, and the paper's tables and Fig. 4 for "
                                      "its named studies (Markdown; CSV and PNG beside it)")
    _common(p)
    p.add_argument("--compare-paper", action="store_true", help="print the paper's own numbers beside ours")
    p.add_argument("--correction", choices=("holm", "bonferroni", "none"),
                   help="across the claims and across the starred differences (default: the grid's "
                        "decide.correction, holm); none shows the raw per-claim verdicts. Another correction "
                        "than the grid's own is printed only: no file, tag or look is written")
    p = sub.add_parser("ui", help="start the MLflow UI on a grid's tracking store (loopback)")
    p.add_argument("grid", nargs="?", help="grid YAML file (for its tracking URI and experiment)")
    p.add_argument("--tracking-uri")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p = sub.add_parser("export-detectron2", help="write a pretrained backbone as a detectron2 weights pickle")
    p.add_argument("checkpoint", help="a pretraining stage's checkpoints/final.pt")
    p.add_argument("out", help="the .pkl to write (detectron2: MODEL.WEIGHTS out.pkl)")
    p = sub.add_parser("server", help="start an MLflow tracking server that compute nodes can log to")
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow-server.db",
                   help="where runs are stored (default: sqlite:///mlflow-server.db here)")
    p.add_argument("--artifacts-destination", default="./mlflow-artifacts",
                   help="where the server keeps artifacts it receives (default: ./mlflow-artifacts)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 127.0.0.1 (default) serves this machine only. --host 0.0.0.0 "
                        "lets anyone who can reach this port read and write every run and artifact: "
                        "MLflow's server has no authentication")
    return ap


def _load(args: argparse.Namespace, check_data: bool = True) -> Plan:
    """The grid's plan; after a ``run --decide``, at the seeds the decision gave each cell (its
    state in the work directory), so that plan, status, cancel and report see what it ran."""
    from pipeline import decide as D

    grid = load_grid(args.grid, args.override, args.workdir, args.tracking_uri, args.study)
    state = None if grid.seeded else D.stored(grid)
    plan = build_plan(D.grid_at(grid, state) if state is not None else grid)
    if check_data:
        problems = data_problems(grid)
        if problems:
            raise GridError(str(grid.path), problems)
    return plan


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    plan = _load(args, check_data=False)
    decide_lines = []
    if args.decide:
        from pipeline import decide as D

        grid = plan.grid
        state = D.load(grid) or D.start(grid)
        plan = build_plan(D.grid_at(grid, state))
        worst = build_plan(D.worst_case(grid, state))
        d = state.settings
        pre = lambda p: sum(s.kind == ROOT for s in p.stages.values())  # noqa: E731
        decide_lines = [
            f"--decide: {len(state.family)} claim{'s' if len(state.family) != 1 else ''} decided together "
            f"({', '.join(state.family)}), family-wise alpha "
            f"{d.alpha:g}, {d.correction}, seeds {d.start_seeds}..{d.max_seeds} ({d.spending} spending)",
            f"{'round ' + str(state.rounds + 1) if state.rounds else 'first round'} (the table above): "
            f"{pre(plan)} pretrainings, {len(plan.stages)} stages, {D.plan_hours(plan):.4g} GPU-hours",
            f"worst case (every cell of the claims at {d.max_seeds} seeds): {pre(worst)} pretrainings, "
            f"{len(worst.stages)} stages, {D.plan_hours(worst):.4g} GPU-hours"
            + (f"; budget {d.budget_gpu_hours:g} GPU-hours" if d.budget_gpu_hours is not None else "")]
    groups = plan.grid.replicates()
    counts = plan.grid.seed_counts
    table = Table(title=f"{plan.grid.name}: {_cells_text(plan)}")
    rows = describe(plan)
    for col in rows[0]:
        table.add_column(col)
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    console.print(table)
    from pipeline.execute import stage_state

    done = sum(stage_state(s, plan.grid.workdir)["state"] == "done" for s in plan.ordered())
    console.print(f"stages: {plan.naive_count} naive, {len(plan.stages)} after dedup, {done} already done")
    hours = {s.key: gpu_hours(s.kind, s.config) for s in plan.ordered()}
    unknown = Counter(plan.stages[k].kind for k, h in hours.items() if h is None)
    naive = sum(hours[k] or 0.0 for c in plan.cells.values() for k in c.values())
    not_counted = ", ".join(f"{n} {kind}" + (" (no model)" if STAGE_KINDS[kind].cost is None else " (set dataset.size_hint)")
                            for kind, n in unknown.items())
    console.print(f"estimated GPU-hours (V100-class, see pipeline/cost.py): "
                  f"{sum(h for h in hours.values() if h is not None):.4g} after dedup, {naive:.4g} without"
                  + (f"; not counted: {not_counted}" if unknown else ""))
    if counts != {1}:
        first = {k for reps in groups.values() for k in plan.cells[reps[0].name].values()}
        one = sum(hours[k] or 0.0 for k in first)
        seed_lists = sorted({"one run" if reps[0].seed is None else ", ".join(str(c.seed) for c in reps)
                             for reps in groups.values()})
        console.print(f"replicates: {len(groups)} cells, each run once per seed ({'; '.join(seed_lists)}): "
                      f"{len(plan.grid.cells)} runs; GPU-hours of one seed {one:.4g}, of all seeds "
                      f"{sum(h for h in hours.values() if h is not None):.4g}. The report gives each cell's mean "
                      f"and 95% interval over its seeds", highlight=False)
    for line in decide_lines:
        console.print(line, highlight=False, soft_wrap=True)
    from pipeline.stores import shown

    console.print(f"workdir: {plan.grid.workdir}\ntracking: {shown(plan.grid.tracking_uri)}", highlight=False)
    _warn_shuffle_bn(plan, console)
    for where, problem in data_problems(plan.grid):
        console.print(f"[yellow]warning[/]: {where}{problem} (`sslgrid run` will refuse to start)", soft_wrap=True)
    return 0


def _cells_text(plan: Plan) -> str:
    """``16 cells × 3 seeds (48 runs)``, or ``3 cells`` without replicates."""
    counts, n = plan.grid.seed_counts, len(plan.grid.replicates())
    if counts == {1}:
        return f"{n} cells"
    return f"{n} cells × {'/'.join(map(str, sorted(counts)))} seeds ({len(plan.grid.cells)} runs)"


def _warn_shuffle_bn(plan, console: Console) -> None:
    """One warning per MoCo cell whose key encoder's BN sees the whole batch (pipeline/spec.py)."""
    from pipeline.stages import shuffle_bn_warning

    cells = [c.name for c in plan.grid.cells if shuffle_bn_warning(c.config, plan.grid.resources)]
    if cells:
        text = shuffle_bn_warning(next(c.config for c in plan.grid.cells if c.name == cells[0]), plan.grid.resources)
        console.print(f"[yellow]warning[/]: {plan.grid.path}: {text}. Cells: {', '.join(cells)}")


class _Refused(Exception):
    """``sslgrid run`` refuses before launching anything: the message (rich markup) says why and
    how to fix it; the command exits 2."""


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    """Validate, refuse what cannot run (exit 2, nothing launched), lock the work directory, run."""
    plan = _load(args)
    decision = None
    if args.decide:  # refused here (exit 2) when it cannot start or its settings changed
        from pipeline import decide as D

        grid = plan.grid
        decision = (grid, D.load(grid) or D.start(grid))
        plan = build_plan(D.grid_at(grid, decision[1]))
    _warn_shuffle_bn(plan, console)
    try:
        factory, preflight = _backend(args, plan, console)
        from pipeline.tracking import patience_problem

        problem = unwritable(plan.grid) or patience_problem()
        if problem:  # escaped: a path or a pip requirement (psycopg[binary]) holds [brackets]
            raise _Refused(f"[red]{escape(problem)}[/] Nothing was launched.")
        refusal = _other_driver(plan, console)  # before the lock, which would create the work directory
        if refusal:
            return refusal
        lock = _lock_workdir(args, plan, console)
    except _Refused as err:
        console.print(str(err), highlight=False, soft_wrap=True)
        return EXIT_USAGE
    with lock, _terminate_as_interrupt():
        return _run_locked(args, plan, factory, preflight, console, decision)


def _backend(args: argparse.Namespace, plan: Plan, console: Console):
    """(factory(code_dir) → the backend, preflight(backend) check) for ``--backend``; raises
    _Refused for a backend that cannot run this grid (the stages could not reach its store)."""
    from cluster.ray_backend import RayBackend, local_env
    from pipeline.backends import BackendError, loopback_tracking_warning, remote_tracking_problem
    from pipeline.slurm import slurm_backend

    backend_name = args.backend or ("ray" if args.ray_address else "local")
    if backend_name == "ray" and not args.ray_address:
        raise _Refused("[red]--backend ray needs --ray-address HOST:PORT of a running cluster.[/] Nothing was launched.")
    if backend_name == "slurm":
        where = "--backend slurm runs stages on other machines"
        problem = remote_tracking_problem(plan.grid.tracking_uri, where)
        if problem:
            raise _Refused(f"[red]{problem}[/] Nothing was launched.")
        warning = loopback_tracking_warning(plan.grid.tracking_uri, where)
        if warning:  # a one-node SLURM reaches loopback, so this is not refused
            console.print(f"[yellow]warning[/]: {warning}", highlight=False, soft_wrap=True)
        try:
            factory = slurm_backend(plan, local_env())
        except BackendError as err:
            raise _Refused(f"[red]{err}[/]") from None
    else:
        def factory(code_dir: Path | None = None) -> RayBackend:
            return RayBackend(args.ray_address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                              env_vars=local_env(), code_dir=code_dir)

    def preflight(b) -> None:
        # a joined Ray cluster that spans machines has the compute-node problem of SLURM
        if backend_name == "ray" and len(b.hosts()) > 1:
            where = f"the Ray cluster at {args.ray_address} spans {len(b.hosts())} machines"
            problem = (remote_tracking_problem(plan.grid.tracking_uri, where)
                       or loopback_tracking_warning(plan.grid.tracking_uri, where))
            if problem:
                raise BackendError(problem)
    return factory, preflight


def _lock_workdir(args: argparse.Namespace, plan: Plan, console: Console):
    """The work directory's lock (pipeline/lock.py); raises _Refused naming the live holder."""
    from pipeline.lock import WORKDIR_LOCK, LockBusy, acquire, describe

    try:
        lock = acquire(plan.grid.workdir / WORKDIR_LOCK, f"sslgrid run {args.grid}")
    except LockBusy as err:
        raise _Refused(f"[red]{plan.grid.workdir} is in use by another `sslgrid run` ({describe(err.holder)}: "
                       f"{err.holder.get('command', '?')}).[/] Watch it with `sslgrid status {args.grid}`, and run "
                       f"this again once it has ended. Nothing was launched.") from None
    if lock.stale:
        console.print(f"[yellow]taking over {lock.path}: its holder ({describe(lock.stale)}) is gone[/]",
                      highlight=False, soft_wrap=True)
    return lock


def _refusal(err: Exception, plan: Plan) -> str:
    """What the driver prints when the backend refuses the grid before any stage ran."""
    from cluster.backend import ResourceError
    from cluster.ray_backend import ConnectError

    if isinstance(err, ResourceError):
        kind = str(err).split()[0]
        return (f"[red]{plan.grid.path}: {err}.[/] Fix: lower {kind}.gpus/cpus in the grid's resources, or pass "
                f"--ray-address of a cluster that has them. Nothing was launched.")
    if isinstance(err, ConnectError):
        return f"[red]--ray-address: {err}[/] Nothing was launched."
    return f"[red]{err}[/] Nothing was launched."


def _run_locked(args: argparse.Namespace, plan: Plan, factory, preflight, console: Console,
                decision: tuple | None = None) -> int:
    """``sslgrid run`` once the work directory is locked. Whatever ends it (the grid finishing, a
    refusal, Ctrl-C, an exception in the driver or the report), the grid's parent run is closed and
    no stage run is left RUNNING or SCHEDULED unless something still runs it (``settle``).
    ``decision``: (the grid without seeds, its pipeline/decide.py State) for ``--decide``."""
    from cluster.backend import ResourceError
    from cluster.ray_backend import ConnectError
    from pipeline.backends import BackendError
    from pipeline.execute import execute, settle
    from pipeline.lock import WORKDIR_LOCK
    from pipeline.report import OVERRIDES as REPORT_OVERRIDES
    from pipeline.snapshot import snapshot
    from pipeline.tracking import DRIVER, client, prepare_runs

    # the stages import this copy of the code, whatever happens to the checkout while they run
    code = snapshot(plan.grid.workdir)
    console.print(f"[bold]{plan.grid.name}[/]: {_cells_text(plan)}, {plan.naive_count} stages, "
                  f"{len(plan.stages)} after dedup · workdir {plan.grid.workdir}")
    exp_id, parent_id, run_ids = prepare_runs(plan)
    c = client(plan.grid.tracking_uri)
    c.update_run(parent_id, status="RUNNING")
    c.set_tag(parent_id, DRIVER, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                                              "workdir": str(plan.grid.workdir),
                                              "lock": str(plan.grid.workdir / WORKDIR_LOCK)}))
    c.set_tag(parent_id, REPORT_OVERRIDES, json.dumps({"overrides": list(args.override), "studies": list(args.study)}))
    parent_status, reason = "FAILED", "not run: the driver stopped on an error (see its output)"
    live = {"plan": plan, "run_ids": run_ids}  # the latest round's, for settle
    try:
        try:
            if decision is None:
                outcomes = execute(plan, run_ids, lambda: factory(code_dir=code), console, preflight, code=code.name)
            else:
                outcomes = _decide_rounds(decision, live, lambda: factory(code_dir=code), preflight, code.name,
                                          parent_id, console)
                plan = live["plan"]
        except (ResourceError, ConnectError, BackendError) as err:
            reason = f"not run: {err}"
            console.print(_refusal(err, plan), highlight=False, soft_wrap=True)
            return EXIT_USAGE
        except KeyboardInterrupt:
            parent_status, reason = "KILLED", "interrupted: the driver was stopped (Ctrl-C or SIGTERM)"
            console.print("interrupted: finished stages are kept; rerun the same command to resume")
            return 130
        failed, reported = _summarise(args, plan, outcomes, parent_id, exp_id, console,
                                      decision[1] if decision else None)
        parent_status = "FAILED" if failed else "FINISHED"
        return EXIT_FAILED if failed or not reported else 0
    finally:
        import signal

        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        try:
            killed = settle(live["plan"], live["run_ids"], reason)
            c.set_terminated(parent_id, parent_status)
        finally:
            signal.signal(signal.SIGINT, previous)
        if killed and parent_status != "FINISHED":
            console.print(f"{len(killed)} stage runs that were not finished are marked KILLED in MLflow: {reason}",
                          highlight=False, soft_wrap=True)


def _decide_rounds(decision: tuple, live: dict, factory, preflight, code: str, parent_id: str,
                   console: Console) -> dict:
    """``--decide``'s rounds (pipeline/decide.py): run the seeds, look, give open claims' cells one
    more seed, until every claim is decided or nothing more may run. The state is saved before the
    first round and after each look (and logged on the parent run), so a killed decision resumes at
    its look with the settings it started with. Returns the
    outcomes of the last round's plan; a failed stage ends the rounds (rerun to retry it)."""
    from pipeline.tracking import client

    grid, state = decision
    c = client(grid.tracking_uri)
    kept = _KeptBackend(factory)  # one Ray cluster for every round: no start-up (or its signal window) per round
    try:
        return _rounds(grid, state, live, kept, preflight, code, parent_id, console, c)
    finally:
        kept.close()


class _KeptBackend:
    """A backend factory whose backend is entered once and kept open across ``execute`` calls."""

    def __init__(self, factory) -> None:
        self.factory, self.ctx, self.backend = factory, None, None

    def __call__(self) -> "_KeptBackend":
        return self

    def __enter__(self):
        if self.backend is None:
            self.ctx = self.factory()
            self.backend = self.ctx.__enter__()
        return self.backend

    def __exit__(self, *exc: object) -> None:
        pass  # kept for the next round

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = self.backend = None


def _rounds(grid, state, live: dict, factory, preflight, code: str, parent_id: str, console: Console, c) -> dict:
    from pipeline import decide as D
    from pipeline.execute import execute
    from pipeline.report import _write_run_json, replicate_values, stage_runs
    from pipeline.tracking import prepare_runs

    # the settings are fixed before round 1 runs: a first round that is killed or fails keeps them
    # (a rerun with other decide.* settings is refused) and report/status read the grid at its seeds
    D.save(grid, state)
    _write_run_json(c, parent_id, D.ARTIFACT, json.loads(state.to_json()))
    while True:
        plan = build_plan(D.grid_at(grid, state))
        _, _, run_ids = prepare_runs(plan)
        live.update(plan=plan, run_ids=run_ids)
        console.print(f"[bold]--decide[/] round {state.rounds + (0 if state.finished else 1)}: {_cells_text(plan)}, "
                      f"{len(plan.stages)} stages, {D.plan_hours(plan):.4g} GPU-hours so far", highlight=False)
        outcomes = execute(plan, run_ids, factory, console, preflight, code=code)
        if state.finished or any(o.state in ("failed", "upstream_failed") for o in outcomes.values()):
            return outcomes
        results = D.look(grid, state, replicate_values(plan, stage_runs(plan)))
        state.rounds += 1
        for r in results:
            if r.claim.id in state.family:
                console.print(f"  {r.line()}", markup=False, highlight=False)
        after, why = D.next_seeds(grid, state, results)
        if why:
            state.finished, state.why = True, why
            console.print(f"--decide: done after {state.rounds} round(s): {why}", highlight=False)
        else:
            console.print(f"--decide: next, {D.describe_round(grid, state.seeds, after)}", highlight=False,
                          soft_wrap=True)
            state.seeds = after
        D.save(grid, state)
        _write_run_json(c, parent_id, D.ARTIFACT, json.loads(state.to_json()))
        if state.finished:
            return outcomes


def _summarise(args: argparse.Namespace, plan: Plan, outcomes: dict, parent_id: str, exp_id: str,
               console: Console, decision=None) -> tuple[list, bool]:
    """Print what ran, what failed and why, the report (written and logged on the parent run) and
    where the MLflow UI shows it; returns the failed outcomes and whether the report was written (a
    full disk under the work directory is said in one line, not a traceback)."""
    from pipeline.report import write_report
    from pipeline.tracking import REPORT, ui_page

    failed = [o for o in outcomes.values() if o.state in ("failed", "upstream_failed")]
    cached = sum(o.state == "cached" for o in outcomes.values())
    ran = sum(o.state == "done" for o in outcomes.values())
    console.print(f"ran {ran}, cached {cached}, failed {len(failed)}")
    for o in failed:
        console.print(f"[red]{o.state}[/] {o.stage.label} ({', '.join(o.stage.cells)}): {o.error}", highlight=False,
                      soft_wrap=True)  # whole lines: an error names paths a user copies
    try:
        text, files = write_report(plan, parent_id, decision=decision)
    except OSError as err:  # a full disk or quota under the work directory: the results are in MLflow still
        import shutil

        folder = plan.grid.workdir / "report"
        free = shutil.disk_usage(plan.grid.workdir).free if plan.grid.workdir.exists() else 0
        console.print(f"[red]report not written[/]: {err} ({free:,} bytes free under {plan.grid.workdir}). Every "
                      f"result is in the work directory and in MLflow; once {folder} can be written, "
                      f"`sslgrid report {args.grid}` writes it.", highlight=False, soft_wrap=True)
        return failed, False
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {files[0]}")
    page = ui_page(exp_id, parent_id, REPORT)  # the report, rendered; not MLflow's GenAI pages
    if plan.grid.tracking_uri.startswith(("http://", "https://")):
        console.print(f"MLflow UI: {plan.grid.tracking_uri.rstrip('/')}/#{page}")
    else:
        console.print(f"MLflow UI: sslgrid ui {args.grid}  →  http://127.0.0.1:5000/#{page}")
    return failed, True


def _other_driver(plan: Plan, console: Console) -> int | None:
    """Exit 2 when another driver runs this grid's MLflow runs from another work directory (the same
    grid and store, another --workdir): both would log to the same runs. Warn when that driver's
    lock is on a disk this machine cannot see."""
    from pipeline.lock import WORKDIR_LOCK, describe, held
    from pipeline.tracking import running_driver

    other = running_driver(plan.grid.tracking_uri, plan.grid.name)
    if not other or other.get("lock") == str(plan.grid.workdir / WORKDIR_LOCK):
        return None
    lock = Path(other.get("lock", ""))
    where = f"{describe(other)}, work directory {other.get('workdir', '?')}"
    if lock.parent.is_dir():
        if held(lock):
            console.print(f"[red]grid {plan.grid.name} is already running in {plan.grid.tracking_uri} ({where}).[/] "
                          f"Two drivers would log to the same MLflow runs. Watch it with `sslgrid status`, or give "
                          f"this grid another name or --tracking-uri. Nothing was launched.", highlight=False,
                          soft_wrap=True)
            return EXIT_USAGE
        return None  # it ended without closing its run
    console.print(f"[yellow]warning[/]: the grid's MLflow run says it is being run ({where}), from a disk this "
                  f"machine cannot see; if it is, both drivers log to the same runs.", highlight=False, soft_wrap=True)
    return None


class _terminate_as_interrupt:
    """SIGTERM (scancel, kill, a closing terminal's SIGHUP) ends the driver as Ctrl-C does, so its
    cleanup runs; Python's default for them exits without running ``finally`` blocks."""

    def __enter__(self) -> None:
        import signal

        self.old = {sig: signal.signal(sig, self._raise) for sig in (signal.SIGTERM, signal.SIGHUP)}

    @staticmethod
    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self.old.items():
            signal.signal(sig, handler)


def unwritable(grid: Grid) -> str | None:
    """Why the work directory, or the folder of a SQLite store, cannot be written (naming the path
    and the fix), or None. Checked before anything is written."""
    from pipeline.tracking import sqlite_path

    places = [("--workdir", grid.workdir)]
    db = sqlite_path(grid.tracking_uri)
    if db is not None:
        places.append(("--tracking-uri", db.parent))
    if any(c.config.dataset.name in ("synthetic", "fashion_mnist") or any(
            k.uses_cache is not None and (k.name == ROOT or grid.evaluates(k.name, c)) and k.uses_cache(c.config)
            for k in STAGE_KINDS.values()) for c in grid.cells):
        from trainers.data import cache_dir

        places.append(("$SSLGRID_CACHE", cache_dir()))  # where the synthetic sets and Fashion-MNIST's files go
    for flag, folder in places:
        p = Path(folder)
        while not p.exists() and not p.is_symlink() and p != p.parent:
            p = p.parent
        if not p.is_dir():
            return (f"{flag}: {folder} cannot be created: {p} is a file, not a folder. Choose another {flag} "
                    f"(or move that file).")
        if not os.access(p, os.W_OK | os.X_OK):
            return (f"{flag}: {folder} cannot be written: {p} is not writable by this user. Choose another "
                    f"{flag}, or make {p} writable.")
        free = shutil.disk_usage(p).free
        if free < MIN_FREE_BYTES:
            return (f"{flag}: {folder} cannot be written: the disk under {p} is full or nearly ({free:,} bytes free; "
                    f"a run needs {MIN_FREE_BYTES >> 20} MiB to start). Free space there, or choose another {flag}.")
    problem = store_problem(grid.tracking_uri)
    if problem:
        return problem
    if db is not None and db.exists() and not os.access(db, os.W_OK):
        return f"--tracking-uri: {db} is not writable by this user. Choose another store, or make it writable."
    if db is not None and (db.parent / "mlruns").exists() and not os.access(db.parent / "mlruns", os.W_OK | os.X_OK):
        return (f"--tracking-uri: {db.parent / 'mlruns'}, where the store keeps artifacts, is not writable by this "
                f"user. Make it writable, or choose another store.")
    return None


MIN_FREE_BYTES = 64 << 20  # below this free under --workdir, the store or the cache, `run` refuses before launching
# (a new SQLite store alone is about 1 MB, a tiny ResNet's checkpoint pair about 30 MB)


def spelling_problem(uri: str, flag: str = "--tracking-uri") -> str | None:
    """``postgres://`` (Heroku's spelling), which SQLAlchemy 2 does not read (MLflow's answer is a
    traceback that prints the password), or None."""
    from pipeline.stores import shown

    if uri.startswith("postgres://"):
        return (f"{flag}: {shown(uri)}: SQLAlchemy reads PostgreSQL stores as postgresql://, not postgres://. "
                f"Write postgresql://USER:PASSWORD@HOST:PORT/DATABASE.")
    return None


def store_problem(uri: str) -> str | None:
    """What makes ``uri`` unusable as a store before MLflow is asked (its errors are SQLAlchemy
    tracebacks): for SQLite a folder, or a file that is not an SQLite database; for a database server
    what pipeline/stores.py ``database_problem`` finds (driver, connection, schema)."""
    from pipeline.stores import database_problem, shown
    from pipeline.tracking import sqlite_path

    db = sqlite_path(uri)
    if spelling_problem(uri):
        return spelling_problem(uri)
    if uri.startswith(("http://", "https://")):
        return server_problem(uri)
    if db is None:
        return database_problem(uri)
    if db.is_dir():
        return f"--tracking-uri: {db} is a folder, not a database file. Pass sqlite:///<folder>/mlflow.db."
    if db.is_file() and db.stat().st_size > 0:
        try:
            with open(db, "rb") as f:
                header = f.read(16)
        except OSError as err:
            return f"--tracking-uri: {db} cannot be read ({err}). Choose another store."
        if header != b"SQLite format 3\0":
            return (f"--tracking-uri: {db} is not an SQLite database (it holds something else). Pass the path of "
                    f"an MLflow store, or of a file that does not exist yet.")
        return sqlite_schema_problem(uri, db)
    return None


def sqlite_schema_problem(uri: str, db: Path) -> str | None:
    """An existing SQLite store whose MLflow tables are at another alembic revision than this
    MLflow's (MLflow raises "Detected out-of-date database schema" as a traceback): the fix is
    ``mlflow db upgrade``. A file without MLflow's tables is left to MLflow, which creates them."""
    import sqlite3

    from pipeline.stores import _schema_problem

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:  # no alembic_version table yet (a new or empty store), or a locked one: MLflow decides
        return None
    return _schema_problem(f"--tracking-uri: {db}", uri, row[0] if row else None)


SERVER_TIMEOUT_S = 10.0  # how long `run`, `status` and `report` wait for a tracking server's first answer, seconds


def server_problem(uri: str) -> str | None:
    """Why no MLflow tracking server answers at ``uri`` (http/https), asked once with a
    ``SERVER_TIMEOUT_S`` timeout before anything is launched; MLflow's client would retry for about
    4 minutes and end in a traceback. None when ``/health`` answers 200."""
    import base64
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit, urlunsplit

    from pipeline.stores import shown

    parts = urlsplit(uri)
    request = urllib.request.Request(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")
                                     + "/health")
    if parts.username is not None:  # credentials in the URI: asked with them, shown without the password
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=SERVER_TIMEOUT_S) as r:
            if r.status == 200:
                return None
            reason = f"HTTP {r.status}"
    except urllib.error.HTTPError as err:
        reason = f"HTTP {err.code} {err.reason}"
    except (OSError, ValueError) as err:
        reason = str(getattr(err, "reason", None) or err)
    return (f"--tracking-uri: no MLflow tracking server answers at {shown(uri)} ({reason}). Start one there with "
            f"`sslgrid server` (docs/slurm.md), or pass the address it printed.")


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    """The stages' table (pipeline/watch.py): plain, one frame and each stage's MLflow run and error;
    ``--once``, one frame; ``--watch``, redrawn until the grid is finished."""
    from pipeline.watch import show, watch

    if args.watch and not 0 < args.interval < float("inf"):
        console.print(f"[red]--interval: {args.interval:g} is not a number of seconds above 0.[/] Pass e.g. "
                      f"--interval 10.", highlight=False)
        return EXIT_USAGE
    plan = _load(args, check_data=False)
    if _nothing_tracked(plan, args, console):
        return 0
    if args.watch or args.once:
        return watch(plan, console, args.interval, once=args.once)
    return show(plan, console)


def _nothing_tracked(plan: Plan, args: argparse.Namespace, console: Console, need_store: bool = False) -> bool:
    """For read-only commands: say so, and create nothing, when the grid has neither a store nor a
    work directory yet (asking MLflow would create an empty store where the command was typed);
    with ``need_store`` (the report, made from MLflow), when the store lacks the grid."""
    from pipeline.tracking import client, store_exists

    uri = plan.grid.tracking_uri
    problem = store_problem(uri)
    if problem:
        raise StateError(problem)
    tracked = store_exists(uri) and client(uri).get_experiment_by_name(plan.grid.name) is not None
    if tracked or plan.grid.workdir.exists() and not need_store:
        return False
    where = f"no experiment {plan.grid.name!r} in {uri}" if store_exists(uri) else f"no store at {uri}"
    if plan.grid.workdir.exists():
        console.print(f"{plan.grid.name}: nothing tracked yet: {where}, though {plan.grid.workdir} exists; is "
                      f"--tracking-uri the store the grid ran with? Nothing was written.", highlight=False, soft_wrap=True)
    else:
        console.print(f"{plan.grid.name}: nothing tracked yet: {where} and no work directory {plan.grid.workdir}. "
                      f"`sslgrid run {args.grid}` starts the grid.", highlight=False, soft_wrap=True)
    return True


def cmd_cancel(args: argparse.Namespace, console: Console) -> int:
    from cluster.slurm_jobs import cancel, job_state
    from pipeline.slurm import slurm_job
    from pipeline.execute import stage_state

    plan = _load(args, check_data=False)
    live = []
    for s in plan.ordered():
        job = slurm_job(s, plan.grid.workdir)
        if not job or "job_id" not in job or stage_state(s, plan.grid.workdir)["state"] == "done":
            continue
        state, _ = job_state(job["job_id"])
        if state.split()[0] in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "SUSPENDED", "RESIZING"):
            live.append((s, job["job_id"], state))
    if not live:
        console.print(f"{plan.grid.name}: no queued or running SLURM jobs")
        return 0
    out = cancel([j for _, j, _ in live])
    if out.returncode != 0:
        console.print(f"[red]scancel failed:[/] {out.stderr.strip()}")
        return EXIT_FAILED
    for s, job, state in live:
        console.print(f"cancelled {s.label} ({', '.join(s.cells)}): SLURM job {job}, was {state}", highlight=False)
    console.print("a rerun of `sslgrid run` resumes them from their last checkpoints")
    return 0


def cmd_server(args: argparse.Namespace, console: Console) -> int:
    """A real ``mlflow server`` with a SQLite or database store (``postgresql://…``, checked first:
    pipeline/stores.py) and proxied artifacts (clients upload through it, so compute nodes need only
    HTTP access, no shared disk)."""
    from pipeline.backends import advertised_host, http_url
    from pipeline.grid import _absolute_uri
    from pipeline.stores import SERVER_POOL, database_problem, shown

    store = _absolute_uri(args.backend_store_uri, Path.cwd())
    problem = spelling_problem(store, "--backend-store-uri") or database_problem(store, "--backend-store-uri")
    if problem:
        console.print(f"[red]{escape(problem)}[/] Nothing was started.", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    artifacts = str(Path(args.artifacts_destination).expanduser().resolve())
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
           artifacts, "--serve-artifacts", "--host", args.host, "--port", str(args.port), "--workers", "2"]
    if args.host not in ("127.0.0.1", "localhost"):
        # MLflow ≥ 3.5 checks Host headers; nodes address this machine by names we cannot know here
        cmd += ["--allowed-hosts", "*"]
        console.print(f"[yellow]serving on {args.host}:{args.port}: anyone who can reach this port can read and "
                      f"write every run and artifact (no authentication)[/]")
    host = advertised_host(args.host)  # for the wildcard, an address the compute nodes can reach
    url = http_url(host, args.port)
    console.print(f"tracking URI: {url}   (store {shown(store)}, artifacts {artifacts})\n"
                  f"use it with: sslgrid run GRID --tracking-uri {url}", markup=False, highlight=False)
    if host != args.host:  # markup=False: rich would eat an IPv6 URL's [brackets] as a style tag
        console.print(f"(--host {args.host} serves every address of this machine; nodes that know it by another "
                      f"address or name than {host} can use that instead.)", markup=False, highlight=False)
    sys.stdout.flush()
    return subprocess.call(cmd, env={**SERVER_POOL, **os.environ})  # the caller's settings win


def cmd_export_detectron2(args: argparse.Namespace, console: Console) -> int:
    from evaluators.export import ExportError, to_detectron2
    from trainers.checkpoint import CheckpointError

    try:
        shapes = to_detectron2(Path(args.checkpoint).expanduser(), Path(args.out).expanduser())
    except (ExportError, CheckpointError, FileNotFoundError) as err:
        console.print(f"[red]{err}[/] Nothing was written.", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    console.print(f"wrote {args.out}: {len(shapes)} tensors (stem, res2-res5) in detectron2's names")
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from pipeline.report import write_report

    from pipeline import decide as D

    plan = _load(args, check_data=False)  # a --decide run's cells at the seeds it gave them
    decision = None if plan.grid.seeded else D.stored(plan.grid)
    if _nothing_tracked(plan, args, console, need_store=True):
        return 0
    text, files = write_report(plan, compare_paper=args.compare_paper, correction=args.correction, decision=decision,
                               overrides=list(args.override))
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    if files:
        console.print(f"written: {', '.join(map(str, files))}")
    else:  # another --correction than the grid's own: a preview (pipeline/report.py write_report)
        console.print(f"nothing written: --correction {args.correction} is a preview; the stored report and "
                      f"verdicts keep the grid's own correction", highlight=False, soft_wrap=True)
    return 0


def cmd_ui(args: argparse.Namespace, console: Console) -> int:
    from pipeline.grid import DEFAULT_TRACKING_URI, _absolute_uri
    from pipeline.tracking import client, landing_page, store_exists

    uri, experiment = args.tracking_uri, None
    if args.grid:
        grid = load_grid(args.grid, tracking_uri=args.tracking_uri)
        uri, experiment = grid.tracking_uri, grid.name
    uri = uri or _absolute_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI), Path.cwd())
    url = f"http://{args.host}:{args.port}/"
    if not store_exists(uri):  # mlflow ui would create an empty store where this was typed
        console.print(f"nothing tracked yet: no store at {uri}. `sslgrid run GRID` creates it (or pass "
                      f"--tracking-uri of an existing one).", highlight=False, soft_wrap=True)
        return 0
    if experiment:
        exp = client(uri).get_experiment_by_name(experiment)
        if exp is not None:
            url += f"#{landing_page(uri, exp.experiment_id, experiment)}"  # the report, not the GenAI pages
    console.print(f"MLflow UI on {uri}\nopen {url}  (Ctrl-C stops it)")
    # one worker serves one person's browser; MLflow's default 4 each import MLflow, which doubles the start-up
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    return subprocess.call(cmd)


COMMANDS = {"plan": cmd_plan, "run": cmd_run, "status": cmd_status, "cancel": cmd_cancel, "report": cmd_report,
            "ui": cmd_ui, "server": cmd_server, "export-detectron2": cmd_export_detectron2}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # MLflow sets its logger's level when imported; this quiets "Creating initial MLflow database tables..."
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line per run on http stores
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    console = Console(width=None if sys.stdout.isatty() else 180)
    try:
        return COMMANDS[args.command](args, console)
    except GridError as err:
        print(str(err), file=sys.stderr)
        print("nothing was launched.", file=sys.stderr)
        return EXIT_USAGE
    except StateError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
