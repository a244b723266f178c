"""The report's plots: one bar chart per study of each evaluation's headline metric per cell, with
95% confidence-interval error bars over seeds and every seed's value as a dot (pipeline/stats.py).

The grid's own cells (outside any study, e.g. the quickstart's random init) are drawn in every
study's chart, in grey, as the reference they are; a grid without studies gets one chart of its
cells. Files: ``<workdir>/report/study-<study>.png`` (``cells.png`` without studies), 100 dpi.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stages import STAGE_KINDS
from trainers.files import atomic_write

if TYPE_CHECKING:
    from pipeline.plan import Plan
    from pipeline.report import Values


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display: login nodes, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(base: str, study: str) -> str:
    return base.removeprefix(f"{study}/") if study else base


def study_charts(plan: Plan, values: Values, out: Path) -> list[Path]:
    """Write one chart per study that has at least one finished headline value; return their paths.
    A panel per evaluation (its headline metric, pipeline/stages.py ``reported[0]``); a cell with
    one seed gets its bar and dot but no error bar (no interval exists)."""
    from pipeline.stats import estimate

    groups = plan.grid.replicates()
    studies: dict[str, list[str]] = {}
    for base, reps in groups.items():
        studies.setdefault(reps[0].study, []).append(base)
    own = studies.pop("", [])
    charts = {study: cells + own for study, cells in studies.items()} if studies else {"": own}
    paths = []
    for study, cells in charts.items():
        panels = []
        for kind in plan.grid.evaluations:
            name = STAGE_KINDS[kind].reported[0]
            bars = []
            for base in cells:
                seeds = values.get(base, {}).get((kind, name), {})
                est = estimate(list(seeds.values()))
                if est is not None:
                    bars.append((_label(base, study), est, list(seeds.values()), base in own and bool(study)))
            if bars:
                panels.append((f"{kind} {name}", bars))
        if not panels:
            continue
        path = out / (f"study-{study}.png" if study else "cells.png")
        _draw(plt := pyplot(), panels, study or plan.grid.name, path)
        plt.close("all")
        paths.append(path)
    return paths


def _draw(plt, panels: list, title: str, path: Path) -> None:
    width = max(4.0, 0.9 * max(len(bars) for _, bars in panels) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.8), dpi=100, squeeze=False)
    for ax, (metric, bars) in zip(axes[0], panels):
        xs = range(len(bars))
        means = [est.mean for _, est, _, _ in bars]
        errs = [[0.0 if est.half is None else est.half for _, est, _, _ in bars]] * 2
        ax.bar(xs, means, yerr=errs, capsize=4, color=["#bbbbbb" if ref else "#4c72b0" for *_, ref in bars],
               edgecolor="black", linewidth=0.5)
        for x, (_, _, seeds, _) in zip(xs, bars):
            ax.scatter([x] * len(seeds), seeds, color="black", s=10, zorder=3)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([lab for lab, *_ in bars], rotation=30, ha="right", fontsize=8)
        ns = sorted({est.n for _, est, _, _ in bars})
        ax.set_title(f"{metric} (one seed: no interval)" if ns == [1] else
                     f"{metric} (mean, 95% CI; n={'/'.join(map(str, ns))})", fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
