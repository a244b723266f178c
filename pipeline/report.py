"""The grid's results as a table, read back from MLflow (``search_runs`` → pandas), never from the
work directory: a user on another machine has only the tracking server."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.claims import NOT_TESTED
from pipeline.claims import TAG_PREFIX as CLAIM_TAG
from pipeline.claims import section as claims_section
from pipeline.plan import Plan
from pipeline.stages import ROOT, STAGE_KINDS
from pipeline.tracking import GRID, KEY, ROLE, _search, client, find_parent, show_report, store_exists
from trainers.files import atomic_write, write_text

PENDING = "pending"
# what write_report writes under <workdir>/report/ (an earlier report's files it no longer writes are
# removed; the copies logged on the parent run stay, as MLflow keeps artifacts)
REPORT_FILES = ("report.md", "report.csv", "claims.csv", "study-*.png", "cells.png", "table*.csv", "fig*.png",
                "fig*.csv")


def stage_runs(plan: Plan) -> pd.DataFrame:
    """One row per stage run of this grid, indexed by stage key (empty if nothing was tracked yet),
    in ``mlflow.search_runs``'s columns (run_id, status, metrics.*, params.*, tags.*). Read through
    a client for this grid's URI: ``mlflow.search_runs`` needs ``mlflow.set_tracking_uri``, which
    exports MLFLOW_TRACKING_URI to everything the process loads afterwards."""
    uri = plan.grid.tracking_uri
    if not store_exists(uri):  # asking MLflow would create an empty store
        return pd.DataFrame()
    exp = client(uri).get_experiment_by_name(plan.grid.name)
    if exp is None:
        return pd.DataFrame()
    runs = _search(uri, exp.experiment_id, f"tags.`{GRID}` = '{plan.grid.name}' and tags.`{ROLE}` = 'stage'")
    rows = [{"run_id": r.info.run_id, "status": r.info.status, "start_time": r.info.start_time,
             **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
             **{f"params.{k}": v for k, v in r.data.params.items()},
             **{f"tags.{k}": v for k, v in r.data.tags.items()}} for r in runs]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows).sort_values("start_time", ascending=False, kind="stable")
    return df.drop_duplicates(f"tags.{KEY}").set_index(f"tags.{KEY}")


def metric(df: pd.DataFrame, key: str | None, name: str) -> float | None:
    """The last logged value of metric ``name`` of the stage run ``key`` in ``stage_runs``'s frame;
    None when there is no such stage, run or metric yet. The one lookup of report and paper tables."""
    col = f"metrics.{name}"
    if key is None:
        return None
    if key not in df.index or col not in df.columns or pd.isna(df.at[key, col]):
        return None
    return float(df.at[key, col])


Values = dict[str, dict[tuple[str, str], dict[int, float]]]  # base cell → (kind, metric) → seed → value


def _metrics_of(kind: str) -> tuple[str, ...]:
    return ("loss",) if kind == ROOT else STAGE_KINDS[kind].reported


RESOLUTION = "val_images"  # logged by the probe and kNN stages: top-1 moves in steps of 100 / val_images


def replicate_values(plan: Plan, df: pd.DataFrame) -> Values:
    """Every finished value, by cell, metric and seed: base cell name (pipeline/grid.py ``Cell.base``)
    → (stage kind, metric) → {seed: value}. Only stages whose MLflow run FINISHED count: a running
    or killed stage logs partial metrics (a probe's top-1 after some epochs), which are no seed. A
    replicate's seed is its pretraining's seed, so cells of a grid without ``seeds:`` pair up too.
    Missing stages and metrics are absent; ``val_images`` is kept where a stage logged it."""
    out: Values = {}
    for base, reps in plan.grid.replicates().items():
        cell_values = out.setdefault(base, {})
        for cell in reps:
            for kind, key in plan.cells[cell.name].items():
                if key not in df.index or df.at[key, "status"] != "FINISHED":
                    continue
                for name in _metrics_of(kind) + (RESOLUTION,):
                    val = metric(df, key, name)
                    if val is not None:
                        cell_values.setdefault((kind, name), {})[cell.config.pretrain.seed] = val
    return out


def _state(statuses: list[str]) -> str:
    """A cell's state from its stage runs' MLflow statuses: failed, killed (stopped, e.g. by
    Ctrl-C: a rerun resumes it), done, running or pending."""
    return ("failed" if "FAILED" in statuses else "killed" if "KILLED" in statuses else
            "done" if all(s == "FINISHED" for s in statuses) else
            "running" if "RUNNING" in statuses else PENDING)


def _columns(plan: Plan) -> list[tuple[str, str, str]]:
    """(column, stage kind, metric) of the cell table: the pretraining's loss, then each
    evaluation's reported metrics, the headline as ``<kind>_<metric>``."""
    cols = [(f"{ROOT}_loss", ROOT, "loss")]
    for kind in plan.grid.evaluations:
        headline, *more = STAGE_KINDS[kind].reported
        cols += [(f"{kind}_{headline}", kind, headline)] + [(m, kind, m) for m in more]
    return cols


def cell_table(plan: Plan, df: pd.DataFrame | None = None, values: Values | None = None) -> pd.DataFrame:
    """One row per cell (its replicates together): its grid values, what it pretrained, its seeds,
    and each metric as an ``Estimate`` (mean and 95% interval over the seeds, pipeline/stats.py).
    A metric no seed has finished yet shows as pending; a stage the grid does not run, as "-"."""
    from pipeline.stats import estimate

    df = stage_runs(plan) if df is None else df
    values = replicate_values(plan, df) if values is None else values
    # the grid's values, less those the row shows resolved anyway (method, head, K, epochs, seeds)
    shown = {f"{ROOT}.{k}" for k in ("method", "head.kind", "K", "epochs", "seed")}
    value_keys: list[str] = []
    for cell in plan.grid.cells:
        value_keys += [k for k in cell.values if k not in value_keys and k not in shown]
    rows = []
    for base, reps in plan.grid.replicates().items():
        cell = reps[0]
        statuses = [str(df.at[k, "status"]) if k in df.index else "SCHEDULED"
                    for c in reps for k in plan.cells[c.name].values()]
        p = cell.config.pretrain
        trains = p.record.trains
        head = getattr(p.config, "head", None)
        row = {"cell": base}
        row.update({k: cell.values.get(k, "") for k in value_keys})
        row.update({"method": p.method, "head": head.kind if head is not None and trains else "-",
                    "K": p.negatives_count or "-", "epochs": p.epochs if trains else 0,
                    "seeds": ",".join(str(c.config.pretrain.seed) for c in reps)})
        for column, kind, name in _columns(plan):
            if kind not in plan.cells[cell.name] or (kind == ROOT and not trains):
                row[column] = "-"  # the grid does not run this stage for this cell
                continue
            est = estimate(list(values.get(base, {}).get((kind, name), {}).values()),
                           _tolerance(values, [base], kind, name))
            finished = all(k in df.index and df.at[k, "status"] == "FINISHED"
                           for k in (plan.cells[c.name][kind] for c in reps))
            # a finished stage without the metric did not compute it (e.g. a kNN stage from before top1_k20)
            row[column] = est if est is not None else "-" if finished else PENDING
        done = sum(_state([str(df.at[k, "status"]) if k in df.index else "SCHEDULED"
                           for k in plan.cells[c.name].values()]) == "done" for c in reps)
        state = _state(statuses)
        row["state"] = state if len(reps) == 1 or state == "done" else f"{state} ({done}/{len(reps)} seeds done)"
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(v: object) -> str:
    from pipeline.stats import Estimate

    if isinstance(v, Estimate):
        return v.text(2)
    if isinstance(v, float):
        return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.1e}"
    return str(v)


def render(table: pd.DataFrame) -> str:
    return table.map(_fmt).to_markdown(index=False, disable_numparse=True)


def numeric(table: pd.DataFrame) -> pd.DataFrame:
    """The table for report.csv: each Estimate column as its mean, and beside it ``<col>_ci_low``,
    ``<col>_ci_high`` (empty when n = 1) and ``<col>_n``."""
    from pipeline.stats import Estimate

    out = pd.DataFrame(index=table.index)
    for col in table.columns:
        cells = table[col]
        if not any(isinstance(v, Estimate) for v in cells):
            out[col] = cells
            continue
        out[col] = [v.mean if isinstance(v, Estimate) else v for v in cells]
        out[f"{col}_ci_low"] = [v.low if isinstance(v, Estimate) else None for v in cells]
        out[f"{col}_ci_high"] = [v.high if isinstance(v, Estimate) else None for v in cells]
        out[f"{col}_n"] = [v.n if isinstance(v, Estimate) else 0 for v in cells]
    return out


def _resolved(cell, key: str):
    """The value a dotted key resolves to in the cell's config (None when the cell's method has no
    such field, e.g. ``pretrain.K`` of SimCLR)."""
    node = cell.config
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def baselines(plan: Plan) -> dict[str, str]:
    """Each cell's baseline row (base names; a study's first cell has none).

    A study's first cell sets the study's axis keys (the first value of every axis, as the paper's
    tables put their baseline first). A cell that changes something beyond those keys (an explicit
    cell, such as table3's ``no-mlp-K1024``) is compared with the axis cell that resolves to the same
    axis values (``K=1024``); an axis cell, with the one that differs only in the last axis (table2a's
    supervised 2%/10% with supervised 20%/100%, as the paper prints its Δ rows). Where no such cell
    exists, the study's first cell. The grid's cells outside studies form one group the same way."""
    groups: dict[str, list] = {}
    for reps in plan.grid.replicates().values():
        groups.setdefault(reps[0].study, []).append(reps[0])
    seed = f"{ROOT}.seed"
    out: dict[str, str] = {}
    for cells in groups.values():
        first = cells[0]
        axes = [k for k in first.values if k != seed]
        plain = [c for c in cells if not set(c.values) - set(axes) - {seed}]
        index = _baseline_index(plain, first, axes)  # a scan of the study per cell would be cells² comparisons
        for c in cells[1:]:
            explicit = bool(set(c.values) - set(axes) - {seed})
            keys = axes if explicit else axes[:-1]
            try:
                found = index[explicit].get(tuple(_resolved(c, k) for k in keys), ()) if index else None
            except TypeError:  # a resolved value that cannot be hashed: scan, as for a study without an index
                found = None
            if found is None:
                match = next((b for b in plain if b is not c and all(_resolved(b, k) == _resolved(c, k) for k in keys)
                              and (b is first or keys != axes[:-1]
                                   or b.values.get(axes[-1]) == first.values.get(axes[-1]))), first)
            else:
                match = next((b for b in found if b is not c), first)
            out[c.base] = match.base
    return out


def _baseline_index(plain: list, first, axes: list[str]) -> dict[bool, dict[tuple, list]] | None:
    """The candidates of ``baselines``, in grid order, by the values they must match: for a cell
    that changes something beyond the axes (True), every axis cell by its resolved axis values; for
    an axis cell (False), the axis cells at the last axis's first value (and the study's first
    cell) by their resolved values of the other axes. None when a value cannot be hashed."""
    index: dict[bool, dict[tuple, list]] = {True: {}, False: {}}
    try:
        for b in plain:
            index[True].setdefault(tuple(_resolved(b, k) for k in axes), []).append(b)
            if b is first or axes and b.values.get(axes[-1]) == first.values.get(axes[-1]):
                index[False].setdefault(tuple(_resolved(b, k) for k in axes[:-1]), []).append(b)
    except TypeError:
        return None
    return index


def _tolerance(values: Values, cells: list[str], kind: str, name: str) -> float | None:
    """Half of top-1's resolution (100 / val_images points) over ``cells``, where their stages logged
    it; None otherwise (pipeline/stats.py then ties values within 1e-6 of their size)."""
    counts = [v for c in cells for v in values.get(c, {}).get((kind, RESOLUTION), {}).values()]
    if not name.startswith("top1") or not counts:
        return None
    return 100.0 / max(1.0, min(counts)) / 2


def differences(plan: Plan, values: Values, alpha: float = 0.05, correction: str = "holm") -> pd.DataFrame:
    """Each cell against its baseline row (``baselines``), on every evaluation's headline metric:
    the difference (cell − baseline), paired by seed where the seeds match, with its 95% interval
    and p-value; ``marked`` only where the difference is settled after ``correction`` (Holm by
    default) across all the differences of the report (pipeline/sequential.py ``decide``)."""
    import numpy as np

    from pipeline.sequential import decide
    from pipeline.stats import difference, difference_p, number

    rows, ps = [], []
    for base, ref in baselines(plan).items():
        for kind in plan.grid.evaluations:
            name = STAGE_KINDS[kind].reported[0]
            a = values.get(base, {}).get((kind, name))
            b = values.get(ref, {}).get((kind, name))
            if not a or not b:
                continue
            tol = _tolerance(values, [base, ref], kind, name)
            d = difference(a, b, tol)
            ps.append(difference_p(a, b, tol))
            rows.append({"cell": base, "baseline": ref, "metric": f"{kind}_{name}", "difference": number(d.mean, 2, sign=True),
                         "95% interval": d.interval(2), "n": d.n, "paired": "by seed" if d.paired else "no",
                         "p": f"{ps[-1]:.2g}"})
    if rows:
        marked, _ = decide(np.array(ps), alpha, correction)
        for row, m in zip(rows, marked):
            row["marked"] = "*" if m else ""
    return pd.DataFrame(rows)


def _notes(plan: Plan) -> list[str]:
    """Each evaluation's ``report_note`` (pipeline/stages.py), once per distinct text."""
    notes: list[str] = []
    for kind in plan.grid.evaluations:
        note = STAGE_KINDS[kind].report_note
        for cell in plan.grid.cells:
            if note is not None and plan.grid.evaluates(kind, cell) and f"- {note(cell.config)}" not in notes:
                notes.append(f"- {note(cell.config)}")
    return ["\n".join(notes)] if notes else []


def _seed_note(plan: Plan) -> str:
    counts = plan.grid.seed_counts
    if counts == {1}:
        return ("One seed per cell (n=1): no confidence interval exists, so no difference below is settled. "
                "Give the grid `seeds: [0, 1, 2]` or `repeats: 3` (or run with `-o repeats=3`) to get "
                "95% intervals; seed 0's finished stages are reused.")
    return (f"Cells have {' or '.join(map(str, sorted(counts)))} seeds each (the seeds column). Values are the mean "
            f"± the half-width of the 95% Student-t interval over the seeds that finished (n; scipy.stats); "
            f"with n=1, or seeds that all agree, no interval exists.")


LOOKS = "sslgrid/looks.json"  # on the parent run: claim id → the seed counts its verdict was looked at
OVERRIDES = "sslgrid.overrides"  # on the parent run: the -o flags and --study of its last `sslgrid run`


def _scope(plan: Plan) -> str:
    """"" for the whole grid; ``-<study>[+<study>…]`` for a report of ``--study`` only."""
    return "" if not plan.grid.only_studies else "-" + "+".join(sorted(plan.grid.only_studies))


def _flags(overrides: list[str]) -> list[str]:
    """``-o`` texts in a canonical order and spelling (``repeats = 3`` is ``repeats=3``), for comparing."""
    return sorted("=".join(part.strip() for part in o.split("=", 1)) for o in overrides)


def check_matches(plan: Plan, df: pd.DataFrame, parent, overrides: list[str] | None) -> None:
    """Refuse (StateError, exit 2, nothing written, no tag touched) a report whose ``-o`` flags,
    compared order-insensitively, differ from those of the grid's last ``sslgrid run`` (the parent
    run's ``sslgrid.overrides`` tag). Such a report is of another plan, even where every one of its
    stages was tracked: without the run's ``-o repeats=3``, seed 0 of each cell is the stage the
    grid runs without seeds, so the report would read three-seed cells at one seed and overwrite the
    stored report, verdicts and looks with it. ``--study`` is not compared (a report of one study
    is allowed). With the run's flags, a plan with stages the store has never seen (the grid file was
    edited since the run) is refused too. ``overrides``: the report's ``-o`` texts (None: the
    driver's own report, which is its plan)."""
    from pipeline.state import StateError

    if overrides is None or parent is None:
        return
    try:
        last = json.loads(parent.data.tags.get(OVERRIDES, "") or "{}")
    except ValueError:
        last = {}
    if not isinstance(last, dict) or not isinstance(last.get("overrides"), list):
        return
    def shown(flags: list[str]) -> str:
        return " ".join(f"-o {o}" for o in flags) or "(no -o flags)"

    if _flags(last["overrides"]) == _flags(overrides):
        # the stages the last run ran: all, or after `run --study S` those of S's cells (the others
        # are pending, not a sign of an edited file)
        ran = set(last.get("studies") or [])
        needed = {k for c in plan.grid.cells if not ran or c.study in ran for k in plan.cells[c.name].values()}
        never = [k for k in plan.stages if k in needed and k not in df.index]
        if never:  # the same flags over an edited grid file: its stages are not the run's
            raise StateError(
                f"{plan.grid.path}: {len(never)} of this plan's {len(plan.stages)} stages were never run (e.g. "
                f"{plan.stages[never[0]].label}): the grid file differs from the one its last `sslgrid run` ran, "
                f"so this report would replace that run's report and verdicts with \"not tested\". Run it first "
                f"(`sslgrid run {plan.grid.path}{' ' + shown(list(overrides)) if overrides else ''}`), or report "
                f"the grid file that ran. Nothing was written.")
        return

    studies = " ".join(f"--study {x}" for x in last.get("studies", []))
    run = " ".join(x for x in (f"sslgrid run {plan.grid.path}", shown(last["overrides"]) if last["overrides"] else "",
                               studies) if x)
    raise StateError(f"{plan.grid.path}: this report's -o flags ({shown(list(overrides))}) are not those of the grid's "
                     f"last run ({shown(last['overrides'])}; `{run}`): it would report another plan over that run's "
                     f"results and replace its report, verdicts and looks. Pass the run's flags: `sslgrid report "
                     f"{plan.grid.path}{' ' + shown(last['overrides']) if last['overrides'] else ''}` (order does not "
                     f"matter; --study and --correction may be added). Nothing was written.")


def _read_run_json(c, run_id: str, path: str) -> Any:
    """A JSON artifact of a run, or None when it has none."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = c.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
    except Exception:  # MLflow raises its own, OSError or others for a missing artifact
        return None


def _write_run_json(c, run_id: str, path: str, obj: Any) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / Path(path).name
        f.write_text(json.dumps(obj, indent=1, sort_keys=True))
        c.log_artifact(run_id, str(f), artifact_path=str(Path(path).parent))


def _parent(plan: Plan, parent_run_id: str | None):
    if not store_exists(plan.grid.tracking_uri):
        return None
    c = client(plan.grid.tracking_uri)
    if parent_run_id is not None:
        return c.get_run(parent_run_id)
    exp = c.get_experiment_by_name(plan.grid.name)
    if exp is None:
        return None
    return find_parent(plan.grid.tracking_uri, exp.experiment_id, plan.grid.name)


def write_report(plan: Plan, parent_run_id: str | None = None, compare_paper: bool = False,
                 correction: str | None = None, decision: Any = None, overrides: list[str] | None = None
                 ) -> tuple[str, list[Path]]:
    """Markdown text, and the files written under ``<workdir>/report/`` (logged on the grid's
    parent run, with the claims' verdicts as its tags, when it has one). It opens with the
    statistics line, the verdict summary and what ``--decide`` would run next; then the cell table
    (mean ± 95% interval over finished seeds), a bar chart per study, the differences to each
    study's baseline (Holm across them), the paper's claims (pipeline/claims.py; sequential
    verdicts when ``decision``, a pipeline/decide.py State, or the one stored on the parent run
    exists), then the paper's tables and figures for the grid's named studies.

    ``correction`` other than the grid's own (its decision's, else ``decide.correction``) is a
    preview: the text says so, and nothing is written or logged (files: []).

    A report of ``--study`` only writes ``report-<study>.md``/``.csv`` and ``claims-<study>.csv``,
    and touches no other study's files or tags. A claim's stored verdict tag is never replaced by
    "not tested". Raises StateError (nothing written) when the report's ``overrides`` are not the
    last run's (``check_matches``)."""
    from pipeline import decide as D
    from pipeline.paper_tables import paper_tables
    from pipeline.plots import study_charts
    from pipeline.sequential import Design

    df = stage_runs(plan)
    parent = _parent(plan, parent_run_id)
    check_matches(plan, df, parent, overrides)
    c = client(plan.grid.tracking_uri) if parent is not None else None
    if decision is None and parent is not None:
        stored = _read_run_json(c, parent.info.run_id, D.ARTIFACT)
        decision = D.State.from_dict(stored) if isinstance(stored, dict) else None
    design = decision.settings if decision is not None else plan.grid.decide
    preview = correction is not None and correction != design.correction
    if correction is not None:
        own = design.correction
        design = Design(**{**D._design_dict(design), "claims": design.claims, "correction": correction})
    looks_taken = {}
    if parent is not None and decision is None:
        looks_taken = _read_run_json(c, parent.info.run_id, LOOKS) or {}
    values = replicate_values(plan, df)
    table = cell_table(plan, df, values)
    if preview:  # another correction than the grid's own: shown, never stored over the grid's verdicts
        import tempfile

        scratch = tempfile.TemporaryDirectory(prefix="sslgrid-preview-")
        out = Path(scratch.name)
    else:
        out = plan.grid.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    scope = _scope(plan)
    files = [out / f"report{scope}.md", out / f"report{scope}.csv"]
    with atomic_write(files[1]) as tmp:
        numeric(table).to_csv(tmp, index=False)
    head, claims_table, claims_files, verdicts, results = claims_section(
        plan.grid, values, out, design, looks=decision.looks if decision is not None else None,
        looks_taken=looks_taken, family=tuple(decision.family) if decision is not None else None,
        name=f"claims{scope}.csv")
    parts = [f"# {plan.grid.name}" + (f" (study {', '.join(plan.grid.only_studies)})" if scope else "")]
    if preview:
        parts.append(f"Printed only: --correction {correction} is not this grid's correction ({own}), so this report "
                     f"wrote no file and changed no tag or look; report.md, claims.csv and the run's claim tags keep "
                     f"the {own} verdicts.")
    if head:
        parts.append(head)
        parts.append(_next_text(plan, results, decision, _unfinished(plan, df)))
    parts += [_seed_note(plan), "## Cells", render(table)] + _notes(plan)
    charts = study_charts(plan, values, out)
    parts += [f"![{path.stem}]({path.name})" for path in charts]
    files += charts
    diffs = differences(plan, values, design.alpha, design.correction)
    if len(diffs):
        parts += ["## Differences to each study's baseline",
                  "Cell − its baseline row, paired by seed. A cell's baseline row is the study's cell with the "
                  "first value of its last axis (the paper's Δ rows), or, for a cell that changes something "
                  "else, the axis cell with the same axis values (table3's no-mlp-K1024 against K=1024). `*` "
                  f"marks a difference settled at family-wise {design.alpha:g} after "
                  + ({"holm": f"Holm's correction across the {len(diffs)} differences",
                      "bonferroni": f"Bonferroni's correction across the {len(diffs)} differences",
                      "none": "no correction (--correction none)"}[design.correction])
                  + ", and only those; the interval is the plain 95% one.",
                  diffs.to_markdown(index=False, disable_numparse=True)]
    if claims_table:
        parts.append(claims_table)
        files += claims_files
    extra, more = paper_tables(plan, df, out, compare_paper, values)
    if extra:
        parts += ["## The paper's tables", extra]
    files += more
    text = "\n\n".join(parts)
    if preview:
        scratch.cleanup()
        return text, []
    write_text(files[0], text + "\n")
    if not scope:
        for stale in set(out.iterdir()) - set(files):  # an earlier report's plots and tables of studies now gone
            if stale.is_file() and any(stale.match(p) for p in REPORT_FILES):
                stale.unlink()
    if parent is not None:
        run_id = parent.info.run_id
        for f in files:
            c.log_artifact(run_id, str(f), artifact_path="report")
        if not scope:
            show_report(plan.grid.tracking_uri, run_id, text, [f for f in files if f.suffix == ".png"])
        _log_verdicts(c, run_id, verdicts, results, whole=not scope)
        if decision is None and results:
            _record_looks(c, run_id, looks_taken, results)
    return text, files


def _record_looks(c, run_id: str, looks: dict[str, list[int]], results: list) -> None:
    """Add this report's look to the history on the parent run: each tested claim's seed count,
    where it differs from the claim's last recorded look (rereading the same seeds is no new look)."""
    changed = False
    for r in results:
        if r.tested and r.n and (not looks.get(r.claim.id) or looks[r.claim.id][-1] != r.n):
            looks.setdefault(r.claim.id, []).append(r.n)
            changed = True
    if changed:
        _write_run_json(c, run_id, LOOKS, looks)


def _unfinished(plan: Plan, df: pd.DataFrame) -> int:
    """The plan's stages that failed or were killed (not run because an upstream stage failed)."""
    return sum(k in df.index and df.at[k, "status"] in ("FAILED", "KILLED") for k in plan.stages)


def _next_text(plan: Plan, results: list, decision: Any, failed: int = 0) -> str:
    """What ``sslgrid run --decide`` would do next, in one paragraph; with ``failed`` stages of a
    decision's round, that the same command retries them before any new round."""
    from pipeline import decide as D

    try:
        grid = plan.grid
        if decision is None:
            if grid.seeded:
                return ("Next: this grid gives its own seeds; without them (no seeds/repeats), `sslgrid run "
                        f"{grid.path} --decide` would spend seeds only where a claim is still open.")
            state = D.start(grid)
            open_ids = [r.claim.id for r in results if r.claim.id in state.family and r.verdict in ("inconclusive", NOT_TESTED)]
            if not open_ids:
                return "Next: every claim this grid tests is decided; `--decide` would run nothing more."
            now = {b: len(reps) for b, reps in grid.replicates().items()}
            after = {b: max(n, now.get(b, 1)) for b, n in state.seeds.items()}
            d = grid.decide
            return (f"Next: `sslgrid run {grid.path} --decide` would first run {D.describe_round(grid, now, after)}, "
                    f"then one seed at a time, up to {d.max_seeds}, only for cells of the {len(open_ids)} open "
                    f"claim(s) ({', '.join(open_ids)}), until each is decided (family-wise alpha {d.alpha:g}, "
                    f"{d.correction}).")
        if decision.finished:
            return f"Decision finished after {decision.rounds} round(s): {decision.why}. Rerunning it spends nothing."
        if failed:
            return (f"Next: {failed} stage(s) of round {decision.rounds + 1} failed or were stopped, and round "
                    f"{decision.rounds + 1}'s look waits for them: rerun `sslgrid run {grid.path} --decide` (with the "
                    f"same -o flags) to retry them first; its finished stages are kept.")
        base = _unseeded(grid)
        after, why = D.next_seeds(base, decision, results)
        if why:
            return f"Next: nothing more to run ({why})."
        return f"Next round of `--decide`: {D.describe_round(base, decision.seeds, after)}."
    except Exception as err:  # the report must not fail on its forecast
        return f"Next: (cannot forecast --decide: {err})"


def _unseeded(grid):
    """The grid with one replicate per cell (the seeds --decide starts from)."""
    from pipeline.grid import reseed

    return reseed(grid, {b: 1 for b in grid.replicates()})


def _log_verdicts(c, run_id: str, verdicts: dict[str, str], results: list, whole: bool = True) -> None:
    """The claims' verdicts as the run's ``sslgrid.claim.<id>`` tags. A tested verdict is never
    replaced by "not tested" (a report of another plan, or before stages finished); a whole-grid
    report removes the tags of claims the grid no longer has, a ``--study`` report touches only
    its claims."""
    from mlflow.entities import RunTag

    stored = c.get_run(run_id).data.tags
    if whole:
        for k in stored:
            if k.startswith(CLAIM_TAG) and k not in verdicts:
                c.delete_tag(run_id, k)
    keep = {CLAIM_TAG + r.claim.id for r in results if not r.tested}
    new = [RunTag(k, v) for k, v in verdicts.items()
           if not (k in keep and k in stored and not stored[k].startswith(NOT_TESTED))]
    if new:
        c.log_batch(run_id, tags=new)
