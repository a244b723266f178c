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

from pipeline.sequential import ClaimLooks, Design, verdicts
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
    """A claim checked: its verdict (``holds``, ``reversed``, ``same``, ``differs``, ``inconclusive``
    or ``not tested``), the contrast's estimate over ``n`` seeds (the look that decided it, else the
    latest; None when not tested) with its interval at the claim's ``level``, the base cells of its
    terms (in the claim's order; "" for one not found), the K of those cells where the claim picks K,
    its sequential p-value ``p``, whether it is still ``open`` (undecided, seeds left to give) and,
    when not tested, why."""

    claim: Claim
    verdict: str
    estimate: Estimate | None = None
    cells: tuple[str, ...] = ()
    reason: str = ""
    p: float | None = None
    level: float | None = None
    open: bool = False
    ks: tuple[int, ...] = ()
    values: tuple[float, ...] = ()  # the contrast on each seed its cells finished, in seed order
    resolution: float = 0.0  # the step the contrast moves in (``resolution``): its tests' rounding variance

    @property
    def n(self) -> int:
        return self.estimate.n if self.estimate else 0

    @property
    def tested(self) -> bool:
        return self.verdict != NOT_TESTED

    def summary(self) -> str:
        """``holds: 5.20 [4.10, 6.30] n=3``; ``inconclusive: 5.20 no interval n=1``; ``not tested: <why>``."""
        e = self.estimate
        if e is None:
            return f"{self.verdict}: {self.reason}"
        ci = "no interval" if e.low is None else f"[{e.low:.2f}, {e.high:.2f}]"
        return f"{self.verdict}: {e.mean:.2f} {ci} n={e.n}"

    def line(self) -> str:
        """One line of the verdict summary, within 80 columns for every claim id:
        ``holds         table1.mlp-beats-none  n=5  +3.21 [1.02, 5.40]``."""
        e = self.estimate
        if e is None:
            return f"{self.verdict:<13} {self.claim.id}"
        ci = "no interval" if e.low is None else f"[{e.low:.2f}, {e.high:.2f}]"
        return f"{self.verdict:<13} {self.claim.id}  n={e.n}  {e.mean:+.2f} {ci}"


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


@dataclass(frozen=True)
class Picked:
    """A claim's cells in a grid: the base names of its terms, the K of each where the claim picks
    K, and why the grid cannot test it ("" when it can)."""

    names: tuple[str, ...]
    ks: tuple[int, ...]
    why: str


def picked(grid, claim: Claim) -> Picked | None:
    """``claim``'s cells in ``grid``, from the grid's structure alone (no results needed); None when
    the grid has no ``claim.study``."""
    cells = _bases(grid, claim.study)
    if not cells:
        return None
    chosen, why = [], []
    for _, sel in claim.terms:
        cell, reason = _select(cells, sel, claim.study)
        chosen.append(cell)
        if reason and reason not in why:
            why.append(reason)
    names = tuple(c.base if c else "" for c in chosen)
    found = [n for n in names if n]
    # every claim compares distinct cells; one picked twice (one K where two ranks are needed) is not a test
    if not why and len(set(found)) < len(found):
        why.append(f"{claim.study} gives one cell to two terms ({', '.join(sorted(set(found)))}): it needs more K values")
    kind = claim.metric[0]
    for cell, base in zip(chosen, names):
        if cell is not None and not _evaluated(grid, kind, cell):
            why.append(f"{base}: the grid runs no {kind} on it")
    ks = tuple(getattr(c.config.pretrain, "K", 0) or 0 for c, (_, sel) in zip(chosen, claim.terms)
               if c is not None and sel.k is not None)
    return Picked(names, ks, "; ".join(dict.fromkeys(why)))


def per_seed(values: Values, claim: Claim, names: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The claim's contrast on each seed all its cells finished, in seed order: (seeds, values)."""
    series = [values.get(base, {}).get(claim.metric, {}) for base in names]
    common = sorted(set.intersection(*(set(v) for v in series))) if series else []
    return tuple(common), tuple(sum(float(c) * v[s] for (c, _), v in zip(claim.terms, series)) for s in common)


RELATIVE_TIE = 1e-6  # float32 metrics agree to about 7 digits


def resolution(values: Values, claim: Claim, names: tuple[str, ...]) -> float:
    """The step h the contrast's per-seed value is quantised in, for the rounding (Sheppard)
    variance h²/12 its tests add to the seeds' variance (pipeline/sequential.py): top-1 moves in
    steps of hᵢ = 100 / val_images points where the stages logged val_images, and a contrast
    Σ cᵢxᵢ of values rounded independently has rounding variance Σ (cᵢhᵢ)²/12, so h² = Σ (cᵢhᵢ)²;
    at least twice 1e-6 of the cells' values, summed over the terms (float32 noise)."""
    kind, name = claim.metric
    squares, scale = 0.0, 0.0
    for (coef, _), base in zip(claim.terms, names):
        cell = values.get(base, {})
        count = cell.get((kind, "val_images"), {})
        if name.startswith("top1") and count:
            squares += (coef * 100.0 / max(1.0, min(count.values()))) ** 2
        scale += abs(coef) * max((abs(v) for v in cell.get(claim.metric, {}).values()), default=0.0)
    return max(squares ** 0.5, 2 * RELATIVE_TIE * scale)


def check(grid, values: Values, claims: tuple[Claim, ...] = CLAIMS, design: Any = None,
          looks: Mapping[str, tuple[int, ...]] | None = None, family: tuple[str, ...] | None = None) -> list[Result]:
    """Every claim whose study the grid has, in ``claims``' order, decided together (pipeline/sequential.py):
    the claims the grid can test form one family, corrected as ``design`` says (Holm at 0.05 by
    default). ``looks`` (claim id → the numbers of seeds it was looked at): sequential verdicts that
    spend ``design``'s alpha over those looks (``sslgrid run --decide``); without it, one fixed-n
    look at the seeds there are. ``family``: only these claim ids are decided (the rest: not tested).
    A claim without results yet stays in the family (it counts for the correction) and reads
    ``not tested``. ``values``: base cell name → (stage kind, metric) → {seed: value}, finished
    stages only."""
    design = design or Design()
    rows: list[tuple[Claim, Picked]] = [(c, pk) for c in claims if (pk := picked(grid, c)) is not None]
    members = [(c, pk) for c, pk in rows if not pk.why and (family is None or c.id in family)]
    data = {c.id: per_seed(values, c, pk.names) for c, pk in members}
    steps = {c.id: resolution(values, c, pk.names) for c, pk in members}
    looked = [ClaimLooks(data[c.id][1], tuple((looks or {}).get(c.id, ())), c.margin, steps[c.id])
              for c, pk in members]
    decided = dict(zip((c.id for c, _ in members), verdicts(looked, design, sequential=looks is not None)))
    out: list[Result] = []
    for c, pk in rows:
        if pk.why or c.id not in decided:
            why = pk.why or "not among the claims this decision decides (decide.claims)"
            out.append(Result(c, NOT_TESTED, None, pk.names, why, ks=pk.ks))
            continue
        v = decided[c.id]
        if v.n == 0:
            missing = [f"{base}: no {c.metric[0]} {c.metric[1]} yet" for base in pk.names
                       if not values.get(base, {}).get(c.metric)] or ["its cells share no finished seed yet"]
            out.append(Result(c, NOT_TESTED, None, pk.names, "; ".join(missing), v.p, v.level, True, pk.ks))
            continue
        est = Estimate(v.mean, v.low, v.high, v.n, paired=True)
        out.append(Result(c, v.verdict, est, pk.names, "", v.p, v.level, v.open, pk.ks, data[c.id][1],
                          steps[c.id]))
    return out


def check_claim(grid, values: Values, claim: Claim) -> Result | None:
    """``claim`` alone (a family of one, fixed-n) against the grid's cells and ``values``; None when
    the grid has no ``claim.study``."""
    found = check(grid, values, (claim,))
    return found[0] if found else None


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _paper(claim: Claim) -> str:
    if claim.paper is not None:
        return f"{claim.paper:+.1f}"
    return "same" if claim.margin is not None else "> 0 (no number)"


def compared(r: Result) -> str:
    """The cells a claim compares, as the contrast it computes: ``a − b``, ``(a − b) − (c − d)``."""
    terms = [(coef, base or "?") for (coef, _), base in zip(r.claim.terms, r.cells)]
    if len(terms) == 4:
        (c1, a), (_, b), (_, c), (_, d) = terms
        first, second = (f"{a} − {b}", f"{c} − {d}") if c1 > 0 else (f"{b} − {a}", f"{d} − {c}")
        return f"({first}) − ({second})" if terms[2][0] < 0 else f"({first}) + ({second})"
    plus = [b for c, b in terms if c > 0]
    minus = [b for c, b in terms if c < 0]
    return " + ".join(plus) + "".join(f" − {b}" for b in minus)


def _k_note(r: Result) -> str:
    ks = sorted(set(r.ks))
    return f" (K here: {', '.join(map(str, ks))})" if ks else ""


def _row(r: Result) -> list[str]:
    c, e = r.claim, r.estimate
    verdict = f"**{r.verdict}**" + (f": {r.reason}" if r.reason else "")
    if c.margin is not None:
        verdict += f" (margin ±{c.margin:g})"
    level = "-" if r.level is None or e is None else f"{100 * (1 - (2 if c.margin is not None else 1) * r.level):.4g}%"
    cells = [f"{c.id}: {c.text}{_k_note(r)}", compared(r), c.source, _paper(c), e.text(sign=True) if e else "-",
             e.interval() if e else "-", level, str(r.n) if e else "-", verdict]
    return [s.replace("|", "\\|") for s in cells]


def statistics_line(results: list[Result], design: Any, sequential: bool, looks_taken: Mapping[str, list[int]]) -> str:
    """The report's first words on its statistics: claims tested, the correction, the looks and
    whether the intervals are fixed-n or sequential; after several fixed-n looks, that they
    overstate certainty."""
    family = [r for r in results if r.level is not None]
    tested = [r for r in family if r.tested]
    corr = {"holm": f"Holm across the {len(family)} claims", "bonferroni": f"Bonferroni across the {len(family)} claims",
            "none": "no correction across claims (--correction none)"}[design.correction]
    text = (f"Statistics: {len(tested)} of {len(family)} claims tested, {corr}, family-wise alpha "
            f"{design.alpha:g}. ")
    if sequential:
        text += (f"Sequential: looks at {design.start_seeds} to {design.max_seeds} seeds, alpha spent over them "
                 f"({design.spending}" + (f", rho {design.rho:g}" if design.spending == "power" else "") +
                 "); each interval is at its claim's share of alpha, so it holds over every look.")
        return text
    text += "Intervals are fixed-n (one look at the seeds there are)."
    taken = {cid: list(ns) for cid, ns in looks_taken.items()}
    for r in tested:  # this report is a look too
        ns = taken.setdefault(r.claim.id, [])
        if r.n and (not ns or ns[-1] != r.n):
            ns.append(r.n)
    several = {cid: ns for cid, ns in taken.items() if len(ns) > 1}
    if several:
        cid, ns = max(several.items(), key=lambda kv: len(kv[1]))
        text += (f" This grid's claims were looked at before with fewer seeds ({cid}: n = "
                 f"{', '.join(map(str, ns))}): fixed-n intervals after several looks overstate certainty. "
                 f"`sslgrid run --decide` gives verdicts that hold over every look.")
    return text


def summary(results: list[Result]) -> str:
    """The verdict summary: one line per claim the grid can test, within 80 columns, then the
    claims it cannot test (their cells are not in the grid) by id."""
    lines = [r.line() for r in results if r.level is not None]
    rest = [r.claim.id for r in results if r.level is None]
    text = "## Verdicts\n\n```\n" + "\n".join(lines) + "\n```"
    if rest:
        text += f"\n\nNot tested by this grid (cells or evaluations it lacks; see Claims): {', '.join(rest)}."
    return text


def markdown(results: list[Result]) -> str:
    """The "## Claims" section for ``results``: the wide table."""
    head = ["claim", "compared", "source", "paper", "ours", "interval", "level", "n", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(":--" for _ in head) + "|"]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return ("## Claims\n\n"
            "Each claim is a contrast of cells (linear-probe top-1 in percent points unless it says detection "
            "AP), paired by seed. Its interval is a Student-t interval over the seeds at the claim's level "
            "(the family's correction, and in a sequential decision the look's share of alpha; "
            "pipeline/sequential.py). A claim **holds** when its interval lies above 0 and is **reversed** when "
            "it lies below; a \"same\" claim is **same** when two one-sided tests place it inside ±margin and "
            "**differs** when it lies wholly outside; otherwise **inconclusive**. Top-1 moves in steps of one "
            "image (h = 100 / val_images points): the rounding variance h²/12 is added to the seeds' variance "
            "in every test and interval, so seeds that agree are neither certainty nor nothing. Cells are picked by config (pipeline/claims.py), K by "
            "rank; the paper's numbers are ImageNet ResNet-50, ours test the direction."
            "\n\n" + "\n".join(lines))


def write_csv(results: list[Result], path: Path) -> Path:
    """``path`` (claims.csv): one row per result; mean, low, high, n, p, level numeric (empty when absent)."""
    from trainers.files import write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "study", "claim", "source", "kind", "metric", "margin", "paper", "mean", "low", "high", "n",
                "p", "level", "verdict", "reason", "cells", "K"])
    for r in results:
        c, e = r.claim, r.estimate
        w.writerow([c.id, c.study, c.text, c.source, *c.metric, _num(c.margin), _num(c.paper),
                    _num(e.mean if e else None), _num(e.low if e else None), _num(e.high if e else None),
                    r.n if e else "", "" if r.p is None or e is None else f"{r.p:.6g}",
                    "" if r.level is None or e is None else f"{r.level:.6g}", r.verdict, r.reason, ";".join(r.cells),
                    ";".join(map(str, r.ks))])
    write_text(path, buf.getvalue())
    return path


def tags(results: list[Result]) -> dict[str, str]:
    """MLflow tags for the grid's parent run: ``sslgrid.claim.<id>`` → ``Result.summary()``."""
    return {TAG_PREFIX + r.claim.id: r.summary() for r in results}


def section(grid, values: Values, out: Path, design: Any = None, looks: Mapping[str, tuple[int, ...]] | None = None,
            looks_taken: Mapping[str, list[int]] | None = None, family: tuple[str, ...] | None = None,
            name: str = "claims.csv") -> tuple[str, str, list[Path], dict[str, str], list[Result]]:
    """The report's claims: its opening (the statistics line and the verdict summary), the wide
    "## Claims" table, the files written (``out``/``name``), the parent run's tags and the results;
    ("", "", [], {}, []) when the grid has none of the claims' studies."""
    design = design or Design()
    results = check(grid, values, design=design, looks=looks, family=family)
    if not results:
        return "", "", [], {}, []
    head = statistics_line(results, design, looks is not None, looks_taken or {}) + "\n\n" + summary(results)
    return head, markdown(results), [write_csv(results, Path(out) / name)], tags(results), results
