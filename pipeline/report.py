"""The grid's results as a table, read back from MLflow (``search_runs`` → pandas), never from the
work directory: a user on another machine has only the tracking server."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.plan import Plan
from pipeline.stages import ROOT, STAGE_KINDS
from pipeline.tracking import GRID, KEY, ROLE, _search, client, find_runs, store_exists
from trainers.files import atomic_write, write_text

PENDING = "pending"


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


def cell_table(plan: Plan, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per cell: its grid values, what it pretrained, and each evaluation's headline metric.
    A cell whose stages have not finished shows as pending, not as missing."""
    df = stage_runs(plan) if df is None else df
    value_keys: list[str] = []
    for cell in plan.grid.cells:
        value_keys += [k for k in cell.values if k not in value_keys]
    rows = []
    for cell in plan.grid.cells:
        keys = plan.cells[cell.name]
        statuses = [str(df.at[k, "status"]) if k in df.index else "SCHEDULED" for k in keys.values()]
        state = ("failed" if any(s in ("FAILED", "KILLED") for s in statuses) else
                 "done" if all(s == "FINISHED" for s in statuses) else
                 "running" if any(s == "RUNNING" for s in statuses) else PENDING)
        p = cell.config.pretrain
        trains = p.record.trains
        head = getattr(p.config, "head", None)
        row = {"cell": cell.name}
        row.update({k: cell.values.get(k, "") for k in value_keys})
        row.update({"method": p.method, "head": head.kind if head is not None and trains else "-",
                    "K": p.negatives_count or "-", "epochs": p.epochs if trains else 0})
        loss = metric(df, keys[ROOT], "loss")
        row[f"{ROOT}_loss"] = loss if loss is not None else (PENDING if trains else "-")
        for kind in plan.grid.evaluations:
            headline, *more = STAGE_KINDS[kind].reported
            for column, name in [(f"{kind}_{headline}", headline)] + [(m, m) for m in more]:
                if kind not in keys:  # the grid does not evaluate this cell this way
                    row[column] = "-"
                    continue
                val = metric(df, keys[kind], name)
                row[column] = val if val is not None else PENDING
        row["state"] = state
        rows.append(row)
    return pd.DataFrame(rows)


def render(table: pd.DataFrame) -> str:
    shown = table.map(lambda v: (f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.1e}") if isinstance(v, float) else v)
    return shown.to_markdown(index=False, disable_numparse=True)


def write_report(plan: Plan, parent_run_id: str | None = None, compare_paper: bool = False
                 ) -> tuple[str, list[Path]]:
    """Markdown text, and the files written under ``<workdir>/report/`` (logged on the grid's
    parent run when its id is given): the cell table, then the paper's tables and Fig. 4 for the
    grid's named studies (pipeline/paper_tables.py)."""
    from pipeline.paper_tables import paper_tables

    df = stage_runs(plan)
    table = cell_table(plan, df)
    text = render(table)
    out = plan.grid.workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "report.csv"]
    with atomic_write(files[1]) as tmp:
        table.to_csv(tmp, index=False)
    extra, more = paper_tables(plan, df, out, compare_paper)
    if extra:
        text = f"{text}\n\n{extra}"
    write_text(files[0], f"# {plan.grid.name}\n\n{text}\n")
    files += more
    if parent_run_id is None:
        exp = client(plan.grid.tracking_uri).get_experiment_by_name(plan.grid.name)
        if exp is not None:
            parent, _ = find_runs(plan.grid.tracking_uri, exp.experiment_id, plan.grid.name)
            parent_run_id = parent.info.run_id if parent else None
    if parent_run_id is not None:
        c = client(plan.grid.tracking_uri)
        for f in files:
            c.log_artifact(parent_run_id, str(f), artifact_path="report")
    return text, files
