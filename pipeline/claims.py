"""The paper's directional claims as data, each with its source, checked against a grid's replicates.

Appalaraju et al., "Towards Good Practices in Self-supervised Representation Learning" (arXiv 2012.00868)
states its findings as directions: "X is better than Y", "X hurts A more than B", "X stays the same".
Each ``Claim`` here is one of them, written as a contrast Σ coef · metric(cell) that is > 0 when the
claim holds (or, for a "stays the same" claim with a ``margin``, lies within ±margin). ``check``
computes the contrast over the grid's seeds, paired by seed (pipeline/stats.py), and its verdict.

Values are in the metric's own points: linear-probe top-1 in percent, detection AP (IoU 0.5:0.95,
evaluators/detection.py) in percent points. The paper's numbers are ImageNet top-1 of a ResNet-50
pretrained 100 epochs ("unless otherwise stated", Sec. 2: Tables 1, 2) or 200 epochs (Fig. 4, Sec. 5);
Table 3 states no length (its baseline, 67.3 / 67.5, is above Table 1's 64.4). A grid at another scale
tests the direction, not the size.

Cells are picked from their resolved configs (``pretrain``), not from their names, as
pipeline/paper_tables.py does. K is picked by rank among the distinct K of the study's cells of the
same method, because grids/paper-mini.yaml scales it down:

====================  ==========================================  ===========================
claim                 grids/paper.yaml                            grids/paper-mini.yaml
====================  ==========================================  ===========================
fig4, smallest K      256                                         32
fig4, second K        512 (the paper's "from K = 512")            64
fig4, largest K       65536                                       1024
table3, smallest K    512                                         64
table3, largest K     65536                                       1024
====================  ==========================================  ===========================

No torch: this runs where the report runs.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import stats
from pipeline.stages import ROOT
from pipeline.stats import Estimate

NOT_TESTED = "not tested"
TOP1 = ("linear_probe", "top1")
DET_AP = ("detection", "det_AP")
TAG_PREFIX = "sslgrid.claim."
RANKS = {0: "smallest K", 1: "second smallest K", -1: "largest K"}

Values = Mapping[str, Mapping[tuple[str, str], Mapping[int, float]]]  # base cell → (kind, metric) → seed → value


def _head(p) -> str | None:
    """The cell's head kind, None for a method without a head (as in pipeline/paper_tables.py)."""
    head = getattr(p, "head", None)
    return None if head is None else head.kind


def _plain(p) -> bool:
    """Negatives taken as the method takes them (not Fig. 4's hard-negative sampling)."""
    return getattr(getattr(p, "negatives", None), "sampling", None) != "hard"


def _practices(p) -> tuple:
    """Table 3's four good practices, as (MLP head, GaussianBlur, cosine schedule, momentum not 0.5)."""
    return (_head(p) == "mlp", bool(p.augment.blur), p.schedule == "cosine", getattr(p, "m", None) != 0.5)


@dataclass(frozen=True)
class Select:
    """One base cell of the claim's study: the first, in grid order, of ``method`` whose pretrain config
    satisfies ``where``; with ``k``, also the one whose K has that rank (0 smallest, 1 second smallest,
    -1 largest) among the distinct K of the study's cells of ``method``. ``what`` says it in words."""

    what: str
    method: str
    where: Callable[[Any], bool] = lambda p: True
    k: int | None = None


@dataclass(frozen=True)
class Claim:
    """A directional claim of the paper: Σ coef · metric over ``terms`` is > 0 when it holds, or, with
    ``margin`` (a "stays the same" claim), lies within ±margin. ``paper``: the paper's own value of
    that contrast in the metric's points (None where the paper gives no number)."""

    id: str  # MLflow tag alphabet: alphanumerics, _ - . space /
    text: str
    source: str
    study: str
    terms: tuple[tuple[float, Select], ...]
    metric: tuple[str, str] = TOP1
    margin: float | None = None
    paper: float | None = None


# --- the cells the claims compare -------------------------------------------------------------
def _t1(kind: str) -> Select:
    return Select(f"MoCo v2, head {kind}", "mocov2", lambda p: _head(p) == kind)


def _crop(method: str, scale: tuple[float, float]) -> Select:
    return Select(f"{method}, crop {scale[0]:g}-{scale[1]:g}", method,
                  lambda p: tuple(p.augment.crop_scale) == scale)


def _colour(method: str, s: float) -> Select:
    return Select(f"{method}, colour strength {s:g}", method, lambda p: p.augment.color_strength == s)


def _fig4(method: str, k: int) -> Select:
    return Select(f"{method}, {RANKS[k]}", method, _plain, k)


def _t3(what: str, practices: tuple, k: int) -> Select:
    return Select(f"MoCo v2 {what}, {RANKS[k]}", "mocov2", lambda p: _practices(p) == practices, k)


BASE3 = (True, True, True, True)
NO_MLP3 = (False, True, True, True)
M05_3 = (True, True, True, False)
SAME = "the margin of {m:g} {unit} is sslgrid's choice; the paper gives no number"


CLAIMS: tuple[Claim, ...] = (
    Claim("table1.mlp-beats-none", "MoCo v2 with the MLP projection head beats MoCo v2 without a head",
          "Table 1, Sec. 3: 64.4 (MoCo v2) vs 59.2 ((a) without projection head)",
          "table1", ((1, _t1("mlp")), (-1, _t1("none"))), paper=64.4 - 59.2),
    Claim("table1.frozen-beats-none", "a fixed (frozen random) projection head beats no head",
          "Table 1, Sec. 3: 62.9 ((b) with fixed projection head) vs 59.2 ((a))",
          "table1", ((1, _t1("frozen")), (-1, _t1("none"))), paper=62.9 - 59.2),
    Claim("table1.mlp-beats-narrow", "a head of reduced output dimension is worse than the MLP head",
          "Table 1, Sec. 3: 62.2 ((d) with reduced feature dimension) vs 64.4 (MoCo v2)",
          "table1", ((1, _t1("mlp")), (-1, _t1("narrow"))), paper=64.4 - 62.2),
    Claim("table1.narrow-beats-none", "a head of reduced output dimension still beats no head",
          "Table 1, Sec. 3: 62.2 ((d)) vs 59.2 ((a)), 'outperforms setting (a) by a large margin'",
          "table1", ((1, _t1("narrow")), (-1, _t1("none"))), paper=62.2 - 59.2),
    Claim("table2a.small-crop-hurts-supervised-more",
          "the smallest crops (2%-10%) cost supervised training more than MoCo v2: "
          "(sup[20/100] - sup[2/10]) - (moco[20/100] - moco[2/10]) > 0",
          "Table 2a, Sec. 4: supervised 75.5 -> 52.0 (-23.5), MoCo v2 64.4 -> 47.1 (-17.3); "
          "'MoCov2 still suffers less than its supervised counterparts'",
          "table2a", ((1, _crop("supervised", (0.2, 1.0))), (-1, _crop("supervised", (0.02, 0.1))),
                      (-1, _crop("mocov2", (0.2, 1.0))), (1, _crop("mocov2", (0.02, 0.1)))),
          paper=23.5 - 17.3),
    Claim("table2b.strong-colour-helps-mocov2", "colour jitter of strength 1 beats strength 1/8 for MoCo v2",
          "Table 2b, Sec. 4: 64.3 (s = 1) vs 63.1 (s = 1/8); 'stronger color jittering benefits MoCov2'",
          "table2b", ((1, _colour("mocov2", 1.0)), (-1, _colour("mocov2", 0.125))), paper=64.3 - 63.1),
    Claim("table2b.strong-colour-hurts-supervised", "colour jitter of strength 1 is worse than 1/8 for supervised training",
          "Table 2b, Sec. 4: 74.6 (s = 1) vs 75.8 (s = 1/8); 'but hurts supervised learning'",
          "table2b", ((1, _colour("supervised", 0.125)), (-1, _colour("supervised", 1.0))), paper=75.8 - 74.6),
    Claim("fig4.mocov2-flat-in-K", "MoCo v2's top-1 is the same with K = 512 and K = 65536 negatives "
          "(second smallest vs largest K), within 1.0 point",
          "Fig. 4, Sec. 5: 'Its accuracy on ImageNet stays the same ranging from K = 512 to K = 65536' "
          "(Table 3's baseline: 67.3 vs 67.5); " + SAME.format(m=1.0, unit="top-1 point"),
          "fig4", ((1, _fig4("mocov2", 1)), (-1, _fig4("mocov2", -1))), margin=1.0),
    Claim("fig4.instdisc-drops-with-fewer-K", "InstDisc's top-1 is lower with the fewest negatives than with the most",
          "Fig. 4, Sec. 5: 'the performance of InstDisc and MoCo drops when number of negatives decreases' "
          "(K 256 vs 65536; a figure, no number in the text)",
          "fig4", ((1, _fig4("instdisc", -1)), (-1, _fig4("instdisc", 0)))),
    Claim("fig4.mocov1-drops-with-fewer-K", "MoCo (v1)'s top-1 is lower with the fewest negatives than with the most",
          "Fig. 4, Sec. 5: 'the performance of InstDisc and MoCo drops when number of negatives decreases' "
          "(K 256 vs 65536; a figure, no number in the text)",
          "fig4", ((1, _fig4("mocov1", -1)), (-1, _fig4("mocov1", 0)))),
    Claim("fig4.mocov2-detection-flat-in-K", "detection AP after MoCo v2 pretraining is the same with K = 512 "
          "and K = 65536 negatives, within 1.0 AP point",
          "Sec. 5: 'AP stay the same no matter the features are learned using 512 or 65536 negative samples' "
          "(VOC test2007); " + SAME.format(m=1.0, unit="AP point"),
          "fig4", ((1, _fig4("mocov2", 1)), (-1, _fig4("mocov2", -1))), metric=DET_AP, margin=1.0),
    Claim("table3.no-mlp-hurts-at-small-K", "at K = 512, MoCo v2 without its MLP head is worse than with it",
          "Table 3, Sec. 5: 67.3 (MoCo v2) vs 61.7 ((a) without MLP projection head) at K = 512",
          "table3", ((1, _t3("baseline", BASE3, 0)), (-1, _t3("without MLP head", NO_MLP3, 0))), paper=67.3 - 61.7),
    Claim("table3.m0.5-hurts-at-small-K", "at K = 512, MoCo v2 with momentum 0.5 is worse than the baseline",
          "Table 3, Sec. 5: 67.3 (MoCo v2) vs 59.8 ((d) with smaller momentum (0.5)) at K = 512",
          "table3", ((1, _t3("baseline", BASE3, 0)), (-1, _t3("with m 0.5", M05_3, 0))), paper=67.3 - 59.8),
    Claim("table3.no-mlp-hurts-more-at-small-K", "dropping the MLP head costs more at K = 512 than at K = 65536: "
          "(base[512] - x[512]) - (base[65536] - x[65536]) > 0",
          "Table 3, Sec. 5: 67.3 - 61.7 = 5.6 at K = 512 vs 67.5 - 63.6 = 3.9 at K = 65536; "
          "'Without these two techniques, the performance quickly drops as the number of negative samples decreases'",
          "table3", ((1, _t3("baseline", BASE3, 0)), (-1, _t3("without MLP head", NO_MLP3, 0)),
                     (-1, _t3("baseline", BASE3, -1)), (1, _t3("without MLP head", NO_MLP3, -1))),
          paper=(67.3 - 61.7) - (67.5 - 63.6)),
    Claim("table3.m0.5-hurts-more-at-small-K", "momentum 0.5 costs more at K = 512 than at K = 65536: "
          "(base[512] - x[512]) - (base[65536] - x[65536]) > 0",
          "Table 3, Sec. 5: 67.3 - 59.8 = 7.5 at K = 512 vs 67.5 - 64.5 = 3.0 at K = 65536",
          "table3", ((1, _t3("baseline", BASE3, 0)), (-1, _t3("with m 0.5", M05_3, 0)),
                     (-1, _t3("baseline", BASE3, -1)), (1, _t3("with m 0.5", M05_3, -1))),
          paper=(67.3 - 59.8) - (67.5 - 64.5)),
)


@dataclass(frozen=True)
class Result:
    """A claim checked: its verdict (``holds``, ``reversed``, ``inconclusive`` or ``not tested``), the
    contrast's estimate over ``n`` seeds (None when not tested), the base cells of its terms (in the
    claim's order; "" for one not found), and, when not tested, why."""

    claim: Claim
    verdict: str
    estimate: Estimate | None = None
    cells: tuple[str, ...] = ()
    reason: str = ""

    @property
    def n(self) -> int:
        return self.estimate.n if self.estimate else 0

    def summary(self) -> str:
        """``holds: 5.20 [4.10, 6.30] n=3``; ``inconclusive: 5.20 no interval n=1``; ``not tested: <why>``."""
        e = self.estimate
        if e is None:
            return f"{self.verdict}: {self.reason}"
        ci = "no interval" if e.low is None else f"[{e.low:.2f}, {e.high:.2f}]"
        return f"{self.verdict}: {e.mean:.2f} {ci} n={e.n}"


def _bases(grid, study: str) -> list:
    """One cell per base name of ``study`` (its first replicate), in grid order."""
    return [reps[0] for reps in grid.replicates().values() if reps[0].study == study]


def _select(cells: list, sel: Select, study: str) -> tuple[Any | None, str]:
    """The cell ``sel`` picks among ``cells`` (the study's), or None and why not."""
    mine = [c for c in cells if c.config.pretrain.method == sel.method]
    if sel.k is not None:
        ks = sorted({k for c in mine if (k := getattr(c.config.pretrain, "K", None)) is not None})
        if len(ks) < (2 if sel.k == 1 else 1):
            return None, f"{study} has {len(ks)} K value(s) for {sel.method}; needs its {RANKS[sel.k]}"
        mine = [c for c in mine if getattr(c.config.pretrain, "K", None) == ks[sel.k]]
    found = next((c for c in mine if sel.where(c.config.pretrain)), None)
    return found, "" if found else f"{study} has no cell {sel.what}"


def _evaluated(grid, kind: str, cell) -> bool:
    """Whether the grid runs stage ``kind`` on ``cell`` (the pretraining always runs)."""
    return kind == ROOT or grid.evaluates(kind, cell)


def check_claim(grid, values: Values, claim: Claim) -> Result | None:
    """``claim`` against the grid's cells and ``values``; None when the grid has no ``claim.study``."""
    cells = _bases(grid, claim.study)
    if not cells:
        return None
    picked, why = [], []
    for _, sel in claim.terms:
        cell, reason = _select(cells, sel, claim.study)
        picked.append(cell)
        if reason and reason not in why:
            why.append(reason)
    names = tuple(c.base if c else "" for c in picked)
    found = [n for n in names if n]
    # every claim compares distinct cells; one picked twice (one K where two ranks are needed) is not a test
    if not why and len(set(found)) < len(found):
        why.append(f"{claim.study} gives one cell to two terms ({', '.join(sorted(set(found)))}): it needs more K values")
    kind, name = claim.metric
    for cell, base in zip(picked, names):
        if cell is None:
            continue
        if not _evaluated(grid, kind, cell):
            why.append(f"{base}: the grid runs no {kind} on it")
        elif not values.get(base, {}).get(claim.metric):
            why.append(f"{base}: no {kind} {name} yet")
    if why:
        return Result(claim, NOT_TESTED, None, names, "; ".join(dict.fromkeys(why)))
    est = stats.contrast([(float(coef), values[base][claim.metric]) for (coef, _), base in zip(claim.terms, names)])
    return Result(claim, stats.verdict(est, claim.margin), est, names)


def check(grid, values: Values, claims: tuple[Claim, ...] = CLAIMS) -> list[Result]:
    """Every claim whose study the grid has, in ``claims``' order: tested (holds / reversed /
    inconclusive) when all its cells have the metric for some seed, else ``not tested`` with the
    reason. ``values``: base cell name → (stage kind, metric) → {seed: value}."""
    return [r for c in claims if (r := check_claim(grid, values, c)) is not None]


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _paper(claim: Claim) -> str:
    if claim.paper is not None:
        return f"{claim.paper:+.1f}"
    return "same" if claim.margin is not None else "> 0 (no number)"


def _row(r: Result) -> list[str]:
    c, e = r.claim, r.estimate
    verdict = f"**{r.verdict}**" + (f": {r.reason}" if r.reason else "")
    if c.margin is not None:
        verdict += f" (margin ±{c.margin:g})"
    cells = [f"{c.id}: {c.text}", c.source, _paper(c), e.text(sign=True) if e else "-",
             e.interval() if e else "-", str(r.n) if e else "-", verdict]
    return [s.replace("|", "\\|") for s in cells]


def markdown(results: list[Result]) -> str:
    """The "## Claims" section for ``results``."""
    head = ["claim", "source", "paper", "ours", "95% CI", "n", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(":--" for _ in head) + "|"]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return ("## Claims\n\n"
            "Each claim is a contrast of cells (linear-probe top-1 in percent points unless it says detection "
            "AP), paired by seed, with a Student-t 95% CI over the seeds (pipeline/stats.py). A claim **holds** "
            "when the CI lies above 0, is **reversed** when it lies below 0, and is otherwise **inconclusive**; "
            "a \"same\" claim holds when the CI lies inside ±margin and is reversed when it lies wholly outside. "
            "With n=1 there is no interval, so every claim is then inconclusive. Cells are picked by config "
            "(pipeline/claims.py), K by rank; the paper's numbers are ImageNet ResNet-50, ours test the direction."
            "\n\n" + "\n".join(lines))


def write_csv(results: list[Result], path: Path) -> Path:
    """``path`` (claims.csv): one row per result; mean, low, high, n numeric (empty when absent)."""
    from trainers.files import write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "study", "claim", "source", "kind", "metric", "margin", "paper", "mean", "low", "high", "n",
                "verdict", "reason", "cells"])
    for r in results:
        c, e = r.claim, r.estimate
        w.writerow([c.id, c.study, c.text, c.source, *c.metric, _num(c.margin), _num(c.paper),
                    _num(e.mean if e else None), _num(e.low if e else None), _num(e.high if e else None),
                    r.n if e else "", r.verdict, r.reason, ";".join(r.cells)])
    write_text(path, buf.getvalue())
    return path


def tags(results: list[Result]) -> dict[str, str]:
    """MLflow tags for the grid's parent run: ``sslgrid.claim.<id>`` → ``Result.summary()``."""
    return {TAG_PREFIX + r.claim.id: r.summary() for r in results}


def section(grid, values: Values, out: Path) -> tuple[str, list[Path], dict[str, str]]:
    """The report's "## Claims" Markdown, the files written (``out``/claims.csv) and the parent run's
    tags; ("", [], {}) when the grid has none of the claims' studies."""
    results = check(grid, values)
    if not results:
        return "", [], {}
    return markdown(results), [write_csv(results, Path(out) / "claims.csv")], tags(results)
