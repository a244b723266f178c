"""The paper's tables and Fig. 4, built from a grid's named studies and its runs in MLflow.

A table is drawn when the grid has the study it needs (``table1``, ``table2a``, ``table2b``, ``table3``,
``fig4``, as in grids/paper.yaml and grids/paper-mini.yaml); rows and columns are found from each
cell's resolved config, not from its name. Values are the linear probe's top-1, as mean ± the
half-width of the 95% interval over the cell's seeds (pipeline/stats.py; "(n=1)" where one seed gives
no interval). A cell whose stages have not finished shows as ``pending``. With ``compare=True`` the paper's own numbers (Appalaraju et
al., arXiv 2012.00868, Tables 1–3) are printed beside ours.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipeline.grid import Cell
from pipeline.plan import Plan
from pipeline.report import Values
from trainers.files import atomic_write
from trainers.methods import METHODS

PENDING = "pending"



def _head(p) -> str | None:
    """The cell's head kind, None for a method without a head (its own fields read as the spec's)."""
    head = getattr(p, "head", None)
    return None if head is None else head.kind


TABLE1 = [  # (row, predicate on the cell's pretrain config, paper top-1)
    ("MoCov2", lambda p: _head(p) == "mlp", 64.4),
    ("(a) without projection head", lambda p: _head(p) == "none", 59.2),
    ("(b) with fixed projection head", lambda p: _head(p) == "frozen", 62.9),
    ("(c) with more hidden layers in projection head", lambda p: _head(p) == "deep", 63.9),
    ("(d) with reduced feature dimension in projection head", lambda p: _head(p) == "narrow", 62.2),
]
TABLE2A_PAPER = {"mocov2": [64.4, 63.7, 47.1], "supervised": [75.5, 74.8, 52.0]}
TABLE2B_PAPER = {"mocov2": [63.1, 63.9, 64.2, 64.3], "supervised": [75.8, 75.7, 75.6, 74.6]}
TABLE3 = [
    ("MoCov2", lambda p: _head(p) == "mlp" and p.augment.blur and p.schedule == "cosine" and getattr(p, "m", None) != 0.5,
     (67.3, 67.5)),
    ("(a) without MLP projection head", lambda p: _head(p) != "mlp", (61.7, 63.6)),
    ("(b) without GaussianBlur", lambda p: not p.augment.blur, (65.5, 66.4)),
    ("(c) without cosine learning schedule", lambda p: p.schedule != "cosine", (67.2, 67.3)),
    ("(d) with smaller momentum (0.5) in momentum encoder", lambda p: getattr(p, "m", None) == 0.5, (59.8, 64.5)),
]


def _fmt(v: object) -> str:
    from pipeline.stats import Estimate

    if isinstance(v, Estimate):
        return v.text(1)
    return f"{v:.1f}" if isinstance(v, float) else str(v)


class _Lookup:
    """A cell's linear-probe top-1 over its seeds (an Estimate), or pending."""

    def __init__(self, plan: Plan, values: Values):
        self.plan, self.values = plan, values

    def seeds(self, cell: Cell) -> dict[int, float]:
        return self.values.get(cell.base, {}).get(("linear_probe", "top1"), {})

    def top1(self, cell: Cell):
        from pipeline.stats import estimate

        est = estimate(list(self.seeds(cell).values()))
        return PENDING if est is None else est


def _cells(plan: Plan, study: str) -> list[Cell]:
    """The study's cells, one per base cell (its first replicate: the config without the seed)."""
    return [reps[0] for reps in plan.grid.replicates().values() if reps[0].study == study]


def _find(cells: list[Cell], pred: Callable) -> Cell | None:
    return next((c for c in cells if pred(c.config.pretrain)), None)


def table1(plan: Plan, look: _Lookup, compare: bool) -> pd.DataFrame | None:
    cells = _cells(plan, "table1")
    if not cells:
        return None
    rows = []
    for name, pred, paper in TABLE1:
        c = _find(cells, pred)
        row = {"Method": name, "Top-1 (ours)": look.top1(c) if c else "-"}
        if compare:
            row["Top-1 (paper)"] = paper
        rows.append(row)
    return pd.DataFrame(rows)


def _delta(v: object, base: object) -> str:
    return f"{v - base:+.1f}" if isinstance(v, float) and isinstance(base, float) else ""


def _delta_est(look: _Lookup, cell: Cell | None, base: Cell | None) -> str:
    """cell − base, paired by seed; ``*`` when its 95% interval excludes 0 (pipeline/stats.py)."""
    from pipeline.stats import difference

    if cell is None or base is None:
        return ""
    d = difference(look.seeds(cell), look.seeds(base))
    if d is None:
        return ""
    return f"{d.mean:+.1f}" + (f" ± {d.half:.1f}" if d.half is not None else "") + ("*" if d.excludes_zero() else "")


def table2(plan: Plan, look: _Lookup, compare: bool, study: str, field: Callable, columns: list,
           labels: list[str], paper: dict[str, list[float]]) -> pd.DataFrame | None:
    """Rows: methods, each followed by its Δ to the first column, as the paper prints them (ours
    paired by seed, ± the 95% interval's half-width, ``*`` when that interval excludes 0)."""
    cells = _cells(plan, study)
    if not cells:
        return None
    rows = []
    for method in ("mocov2", "supervised"):
        found = [_find(cells, lambda p: p.method == method and field(p) == col) for col in columns]
        rows.append({"Method": METHODS[method].title, **{lab: look.top1(c) if c else "-"
                                                         for lab, c in zip(labels, found)}})
        rows.append({"Method": "  Δ", **{lab: _delta_est(look, c, found[0]) if i else "" for i, (lab, c)
                                        in enumerate(zip(labels, found))}})
        if compare:
            rows.append({"Method": "  paper", **dict(zip(labels, paper[method]))})
            rows.append({"Method": "  paper Δ", **{lab: _delta(v, paper[method][0]) if i else "" for i, (lab, v)
                                                  in enumerate(zip(labels, paper[method]))}})
    return pd.DataFrame(rows)


def table3(plan: Plan, look: _Lookup, compare: bool) -> pd.DataFrame | None:
    cells = _cells(plan, "table3")
    if not cells:
        return None
    ks = sorted({getattr(c.config.pretrain, "K", None) for c in cells} - {None})
    if len(ks) != 2:
        return None
    small, large = ks
    rows = []
    for name, pred, paper in TABLE3:
        row = {"Method": name}
        for k, label in ((small, f"K={small}"), (large, f"K={large}")):
            c = _find([c for c in cells if getattr(c.config.pretrain, "K", None) == k], pred)
            row[label] = look.top1(c) if c else "-"
        if compare:
            row["paper K=512"], row["paper K=65536"] = paper
        rows.append(row)
    return pd.DataFrame(rows)


def fig4(plan: Plan, look: _Lookup) -> pd.DataFrame | None:
    """Long table: method, K, top-1 (SimCLR's K is 2B−2)."""
    cells = _cells(plan, "fig4")
    if not cells:
        return None
    rows = []
    for c in cells:
        p = c.config.pretrain
        line = p.record.title
        if getattr(getattr(p, "negatives", None), "sampling", None) == "hard":
            line += " + hard negatives"
        k = p.negatives_count
        rows.append({"method": line, "K": k, "top1": look.top1(c)})
    return pd.DataFrame(rows).sort_values(["method", "K"]).reset_index(drop=True)


def _estimates_to_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A table for CSV: each Estimate as its mean, with ``<col> ci_low``, ``<col> ci_high`` and
    ``<col> n`` beside it (the interval empty when n = 1)."""
    from pipeline.stats import Estimate

    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        vals = df[col]
        out[col] = [v.mean if isinstance(v, Estimate) else v for v in vals]
        if any(isinstance(v, Estimate) for v in vals):
            for part in ("low", "high"):
                out[f"{col} ci_{part}"] = [getattr(v, part) if isinstance(v, Estimate) else None for v in vals]
            out[f"{col} n"] = [v.n if isinstance(v, Estimate) else 0 for v in vals]
    return out


def plot_fig4(df: pd.DataFrame, path: Path) -> int:
    """Top-1 against K per method: the mean over seeds, and a band of its 95% interval where a
    point has several seeds (``df``: fig4's table, top1 as Estimates or pending). Returns the
    number of bands drawn."""
    from pipeline.plots import pyplot
    from pipeline.stats import Estimate

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    bands = 0
    for method, part in df.groupby("method"):
        done = part[part["top1"].map(lambda v: isinstance(v, Estimate))]
        if not len(done):
            continue
        ests = list(done["top1"])
        line, = ax.plot(done["K"], [e.mean for e in ests], marker="o", label=method,
                        linestyle="--" if "hard" in method else "-")
        banded = [(k, e) for k, e in zip(done["K"], ests) if e.low is not None]
        if banded:
            ax.fill_between([k for k, _ in banded], [e.low for _, e in banded], [e.high for _, e in banded],
                            color=line.get_color(), alpha=0.2, linewidth=0)
            bands += 1
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of negatives K (log scale)")
    ax.set_ylabel("linear probe top-1 (%)")
    n = sorted({e.n for e in df["top1"] if isinstance(e, Estimate)})
    ax.set_title("Fig. 4: top-1 against K" + (f" (bands: 95% CI, n={'/'.join(map(str, n))})" if n and max(n) > 1 else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return bands


def fig2(plan: Plan, df: pd.DataFrame, out: Path) -> list[Path]:
    """Fig. 2 from two cells' inversion stages, read back from MLflow: per image, original | h of a
    model without a head | h of a model with the MLP head | z of that model. The cells are the first
    MoCo cells with head ``none`` and ``mlp`` (table1's, when the grid has that study). Writes
    ``fig2.png`` (a row per image) and ``fig2-image<N>.png`` (one grid per image)."""
    if "inversion" not in plan.grid.evaluations:
        return []
    import tempfile

    import torch

    from pipeline.tracking import client

    cells = sorted((reps[0] for reps in plan.grid.replicates().values()), key=lambda c: c.study != "table1")
    moco = [c for c in cells if c.config.pretrain.record.negatives == "queue" and "inversion" in plan.cells[c.name]]
    picked = {kind: next((c for c in moco if _head(c.config.pretrain) == kind), None) for kind in ("none", "mlp")}
    if None in picked.values():
        return []
    data = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, cell in picked.items():
            key = plan.cells[cell.name]["inversion"]
            if key not in df.index or df.at[key, "status"] != "FINISHED":
                return []
            path = client(plan.grid.tracking_uri).download_artifacts(df.at[key, "run_id"], "inversion.pt", tmp)
            data[kind] = torch.load(path)
    from pipeline.plots import pyplot

    plt = pyplot()
    panels = [("original", data["mlp"]["originals"]), ("h, no head", data["none"]["h"]),
              ("h, MLP head", data["mlp"]["h"]), ("z, MLP head", data["mlp"].get("z"))]
    panels = [(t, v) for t, v in panels if v is not None]
    n = min(len(v) for _, v in panels)
    paths = [_panel_grid(plt, panels, range(n), out / "fig2.png")]  # every image, one row each
    paths += [_panel_grid(plt, panels, [r], out / f"fig2-image{r}.png") for r in range(n)]  # one grid per image
    return paths


def _panel_grid(plt, panels: list, rows, path: Path) -> Path:
    rows = list(rows)
    fig, axes = plt.subplots(len(rows), len(panels), figsize=(1.5 * len(panels), 1.5 * len(rows)), dpi=100,
                             squeeze=False)
    for i, r in enumerate(rows):
        for c, (title, imgs) in enumerate(panels):
            axes[i][c].imshow(imgs[r].permute(1, 2, 0).numpy())
            axes[i][c].axis("off")
            if i == 0:
                axes[i][c].set_title(title, fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def render(df: pd.DataFrame) -> str:
    return df.map(_fmt).to_markdown(index=False, disable_numparse=True)


def paper_tables(plan: Plan, df: pd.DataFrame, out: Path, compare: bool = False, values: Values | None = None
                 ) -> tuple[str, list[Path]]:
    """Markdown of every table the grid's studies allow, and the files written (CSV per table,
    fig4.png and fig4.csv). Values are means ± the 95% interval's half-width over seeds; ``values``
    (pipeline/report.py ``replicate_values``) is read from ``df`` when not given."""
    from pipeline.report import replicate_values

    look = _Lookup(plan, replicate_values(plan, df) if values is None else values)
    tables = {
        "Table 1: projection head (MoCo v2)": ("table1", table1(plan, look, compare)),
        "Table 2a: random cropping (min/max size)": ("table2a", table2(
            plan, look, compare, "table2a", lambda p: tuple(p.augment.crop_scale),
            [(0.2, 1.0), (0.2, 0.5), (0.02, 0.1)], ["20%/100%", "20%/50%", "2%/10%"], TABLE2A_PAPER)),
        "Table 2b: colour jittering strength": ("table2b", table2(
            plan, look, compare, "table2b", lambda p: p.augment.color_strength, [0.125, 0.25, 0.5, 1.0],
            ["1/8", "1/4", "1/2", "1"], TABLE2B_PAPER)),
        "Table 3: good practices against K": ("table3", table3(plan, look, compare)),
    }
    parts, files = [], []
    for title, (name, table) in tables.items():
        if table is None:
            continue
        parts.append(f"### {title}\n\n{render(table)}")
        files.append(out / f"{name}.csv")
        _estimates_to_columns(table).to_csv(files[-1], index=False)
    f2 = fig2(plan, df, out)
    if f2:
        files += f2
        parts.append(f"### Fig. 2: feature inversion ({f2[0].name}, and one grid per image in fig2-image<N>.png: "
                     "original | h, no head | h, MLP head | z, MLP head)")
    f4 = fig4(plan, look)
    if f4 is not None:
        files += [out / "fig4.csv", out / "fig4.png"]
        _estimates_to_columns(f4).to_csv(files[-2], index=False)
        plot_fig4(f4, files[-1])
        wide = f4.pivot_table(index="method", columns="K", values="top1", aggfunc="first").reset_index()
        parts.append(f"### Fig. 4: top-1 against K\n\n{render(wide.fillna('-'))}\n\n![fig4]({files[-1].name})")
    return "\n\n".join(parts), files
