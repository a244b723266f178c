"""The grid's results as a table, read back from MLflow (``search_runs`` → pandas), never from the
work directory: a user on another machine has only the tracking server."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.claims import TAG_PREFIX as CLAIM_TAG
from pipeline.claims import section as claims_section
from pipeline.plan import Plan
from pipeline.stages import ROOT, STAGE_KINDS
from pipeline.tracking import GRID, KEY, ROLE, _search, client, find_runs, show_report, store_exists
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


def replicate_values(plan: Plan, df: pd.DataFrame) -> Values:
    """Every finished value, by cell, metric and seed: base cell name (pipeline/grid.py ``Cell.base``)
    → (stage kind, metric) → {seed: value}. A replicate's seed is its pretraining's seed, so cells
    of a grid without ``seeds:`` pair up too. Missing stages and metrics are absent."""
    out: Values = {}
    for base, reps in plan.grid.replicates().items():
        cell_values = out.setdefault(base, {})
        for cell in reps:
            for kind, key in plan.cells[cell.name].items():
                for name in _metrics_of(kind):
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
            est = estimate(list(values.get(base, {}).get((kind, name), {}).values()))
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
        for c in cells[1:]:
            if set(c.values) - set(axes) - {seed}:
                keys = axes
            else:
                keys = axes[:-1]
            match = next((b for b in plain if b is not c and all(_resolved(b, k) == _resolved(c, k) for k in keys)
                          and (b is first or keys != axes[:-1] or b.values.get(axes[-1]) == first.values.get(axes[-1]))),
                         first)
            out[c.base] = match.base
    return out


def differences(plan: Plan, values: Values) -> pd.DataFrame:
    """Each cell against its baseline row (``baselines``), on every evaluation's headline metric:
    the difference (cell − baseline), paired by seed where the seeds match, with its 95% interval;
    ``marked`` only when the interval excludes 0 (pipeline/stats.py ``difference``)."""
    from pipeline.stats import difference, number

    rows = []
    for base, ref in baselines(plan).items():
        for kind in plan.grid.evaluations:
            name = STAGE_KINDS[kind].reported[0]
            a = values.get(base, {}).get((kind, name))
            b = values.get(ref, {}).get((kind, name))
            if not a or not b:
                continue
            d = difference(a, b)
            rows.append({"cell": base, "baseline": ref, "metric": f"{kind}_{name}", "difference": number(d.mean, 2, sign=True),
                         "95% interval": d.interval(2), "n": d.n, "paired": "by seed" if d.paired else "no",
                         "marked": "*" if d.excludes_zero() else ""})
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


def write_report(plan: Plan, parent_run_id: str | None = None, compare_paper: bool = False
                 ) -> tuple[str, list[Path]]:
    """Markdown text, and the files written under ``<workdir>/report/`` (logged on the grid's
    parent run, with the claims' verdicts as its tags, when it has one): the cell table (mean ± 95%
    interval over seeds), a bar chart per study, the differences to each study's baseline, the
    paper's claims checked (pipeline/claims.py), then the paper's tables and figures for the grid's
    named studies (pipeline/paper_tables.py)."""
    from pipeline.paper_tables import paper_tables
    from pipeline.plots import study_charts

    df = stage_runs(plan)
    values = replicate_values(plan, df)
    table = cell_table(plan, df, values)
    out = plan.grid.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "report.csv"]
    with atomic_write(files[1]) as tmp:
        numeric(table).to_csv(tmp, index=False)
    parts = [f"# {plan.grid.name}", _seed_note(plan), "## Cells", render(table)] + _notes(plan)
    charts = study_charts(plan, values, out)
    parts += [f"![{path.stem}]({path.name})" for path in charts]
    files += charts
    diffs = differences(plan, values)
    if len(diffs):
        parts += ["## Differences to each study's baseline",
                  "Cell − its baseline row, paired by seed. A cell's baseline row is the study's cell with the "
                  "first value of its last axis (the paper's Δ rows), or, for a cell that changes something "
                  "else, the axis cell with the same axis values (table3's no-mlp-K1024 against K=1024). `*` "
                  "marks a difference whose 95% interval excludes 0, and only those.",
                  diffs.to_markdown(index=False, disable_numparse=True)]
    claims_text, claims_files, verdicts = claims_section(plan.grid, values, out)
    if claims_text:
        parts.append(claims_text)
        files += claims_files
    extra, more = paper_tables(plan, df, out, compare_paper, values)
    if extra:
        parts += ["## The paper's tables", extra]
    files += more
    text = "\n\n".join(parts)
    write_text(files[0], text + "\n")
    for stale in set(out.iterdir()) - set(files):  # an earlier report's plots and tables of studies now gone
        if stale.is_file() and any(stale.match(p) for p in REPORT_FILES):
            stale.unlink()
    if parent_run_id is None:
        exp = client(plan.grid.tracking_uri).get_experiment_by_name(plan.grid.name)
        if exp is not None:
            parent, _ = find_runs(plan.grid.tracking_uri, exp.experiment_id, plan.grid.name)
            parent_run_id = parent.info.run_id if parent else None
    if parent_run_id is not None:
        c = client(plan.grid.tracking_uri)
        for f in files:
            c.log_artifact(parent_run_id, str(f), artifact_path="report")
        show_report(plan.grid.tracking_uri, parent_run_id, text, [f for f in files if f.suffix == ".png"])
        _log_verdicts(c, parent_run_id, verdicts)
    return text, files


def _log_verdicts(c, run_id: str, verdicts: dict[str, str]) -> None:
    """The claims' verdicts as the run's ``sslgrid.claim.<id>`` tags, replacing an earlier report's
    (a claim this grid no longer tests loses its tag)."""
    from mlflow.entities import RunTag

    for k in c.get_run(run_id).data.tags:
        if k.startswith(CLAIM_TAG) and k not in verdicts:
            c.delete_tag(run_id, k)
    if verdicts:
        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in verdicts.items()])
