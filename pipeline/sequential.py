"""Verdicts whose error rate holds over every look and every claim.

A claim (pipeline/claims.py) is a contrast of cells; each seed gives one value of it (paired by
seed). A **look** computes the claim's test from its first ``n`` seeds. Users look again after
adding seeds, and a report tests many claims at once; a fixed-n 95% interval at each look, on each
claim, then calls false effects far more often than 5% of the time (the naive procedure:
tests/unit/test_sequential.py simulates both).

The procedure here, for a family of C claims decided together, at level ``alpha``:

1. **Each look's test** (``look_pvalues``), from the n per-seed values d₁…dₙ of the contrast:
   - a directional claim ("X beats Y"): the two-sided one-sample t-test of mean 0 (scipy
     ``ttest_1samp``, i.e. ``ttest_rel`` of the two cells); the verdict's direction is the sign of
     the mean: **holds** above 0, **reversed** below;
   - an equivalence claim ("X and Y are the same within ±m"): two one-sided tests (TOST, Schuirmann
     1987) for **same**, p = max(p(mean > −m), p(mean < m)); and for **differs**, twice the smaller
     of p(mean > m) and p(mean < −m). The claim's p is the smaller of the two; at most one of the
     two null hypotheses is true, so a false verdict of either kind has probability ≤ p's level.
   - **the metric's resolution is part of the spread**: top-1 moves in steps of one image,
     h = 100 / val_images points, so a per-seed value is known only to within its rounding, whose
     variance is h²/12 (Sheppard's). Every t statistic (the directional test, both TOSTs and the
     interval) uses s_eff² = s² + h²/12 in place of the sample variance s², with n − 1 degrees of
     freedom (scipy's t distribution). For a contrast of values each rounded at hᵢ the rounding
     variance is Σ cᵢ²hᵢ²/12, i.e. h² = Σ (cᵢhᵢ)² (pipeline/claims.py ``resolution``; at least the
     float32 noise, 1e-6 relative). So seeds that agree (+5, +5, +5 images) are not certainty, nor
     are they nothing: p falls as the effect grows, whatever the spread. A directional claim whose mean
     is within h of 0 is a tie (p = 1: issue 20's "values within one image count as equal"), so +1
     image on every seed decides nothing at any n. On continuous data (h = 0) this is the plain t-test; h > 0 only makes
     a test more conservative. Exact float equality plays no part.
2. **Looks are paid from a budget of α** (an α-spending function, Lan & DeMets 1983): the look at
   n seeds may spend the share s(n) = F(n/N) − F((n−1)/N) of α, N = ``max_seeds`` (the first look,
   at ``start_seeds``, spends F(start/N)); looks outside start..N spend nothing. F is the design's
   ``spending``: ``power`` t^ρ (Kim & DeMets 1987; ρ = 1 is close to Pocock's boundary, ρ = 3 to
   O'Brien-Fleming's), ``pocock`` ln(1 + (e − 1)t) and ``obrien-fleming`` 2 − 2Φ(z_{1−α/2}/√t)
   (Lan & DeMets), or ``uniform`` (α split equally over the looks). A claim's **sequential
   p-value** is min over its looks of p(n)/s(n): by the union bound over the fixed shares,
   P(min ≤ u) ≤ u whatever looks were taken and whenever they stopped (a Bonferroni split of α over
   the looks, the simplest valid group-sequential design; it ignores the looks' correlation, so it
   is conservative: 2.9% family-wise at α = 0.05 in the simulation of tests/unit/test_sequential.py).
3. **Claims are corrected together**: Holm's step-down procedure (Holm 1979) over the claims'
   sequential p-values (``correction: holm``; ``bonferroni`` or ``none`` on request). Rejections
   only grow as looks are added (sequential p-values only fall), so a claim decided at an earlier
   look stays decided, and the family-wise error rate over all looks and claims is at most α.
   A decided claim gets no more seeds.

With one look at share 1 and ``correction: none`` this is the fixed-n t-test of the old report.

Everything is vectorised over leading axes (replications in the simulation, one row in a report),
with scipy's t distribution; Holm is written out over numpy arrays (``holm``), because statsmodels'
``multipletests`` calls ``gc.collect()`` on every call (44 ms per call measured here, 2 hours for the
simulation's 160,000 calls); tests/unit/test_sequential.py checks it against statsmodels.

No torch: this runs where the report runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from trainers.methods.base import param as _f

HOLDS, REVERSED, SAME, DIFFERS, INCONCLUSIVE = "holds", "reversed", "same", "differs", "inconclusive"
# outcome codes of a look, vectorised: the verdict the look points to if its claim is decided
OUTCOMES = {0: INCONCLUSIVE, 1: HOLDS, -1: REVERSED, 2: SAME, 3: DIFFERS}
MAX_SEEDS = 1000  # pipeline/grid.py MAX_REPEATS
SPENDING = ("power", "pocock", "obrien-fleming", "uniform")
CORRECTIONS = ("holm", "bonferroni", "none")


@dataclass(frozen=True)
class Design:
    """A sequential decision's settings, fixed before its first seed (the grid's ``decide:`` section)."""

    start_seeds: int = _f(3, min=2, max=MAX_SEEDS, doc="seeds every cell of the claims runs before the first look")
    max_seeds: int = _f(10, min=2, max=MAX_SEEDS, doc="the most seeds any cell gets; the last look")
    budget_gpu_hours: Optional[float] = _f(None, min=0.0, doc="estimated GPU-hours (sslgrid plan's model) the "
                                           "decision may spend in all, first round included; null: no budget")
    claims: Optional[tuple[str, ...]] = _f(None, doc="ids of the claims to decide (pipeline/claims.py); "
                                           "null: every claim the grid can test")
    alpha: float = _f(0.05, min=1e-6, max=0.5, doc="family-wise error rate over all looks and claims")
    correction: str = _f("holm", choices=CORRECTIONS, doc="across the claims decided together")
    spending: str = _f("power", choices=SPENDING, doc="how alpha is spread over the looks at "
                       "start_seeds..max_seeds seeds (pipeline/sequential.py)")
    rho: float = _f(2.0, min=0.1, max=20.0, doc="the power spending function's exponent: alpha·t^rho")

    def problems(self) -> list[tuple[str, object, str]]:
        """(field, value, message) for settings that cannot work together."""
        if self.max_seeds < self.start_seeds:
            return [("max_seeds", self.max_seeds, f"must be at least start_seeds ({self.start_seeds})")]
        return []

    def spent(self, t: np.ndarray | float) -> np.ndarray:
        """F(t): the fraction of alpha spent by information fraction t = n / max_seeds (0 at 0, 1 at 1)."""
        t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
        if self.spending == "power":
            return t ** self.rho
        if self.spending == "pocock":
            return np.log1p((math.e - 1.0) * t)
        if self.spending == "obrien-fleming":
            from scipy.stats import norm

            with np.errstate(divide="ignore"):
                z = norm.isf(self.alpha / 2) / np.sqrt(t)
            return np.minimum(1.0, 2.0 * norm.sf(z) / self.alpha)
        looks = self.max_seeds - self.start_seeds + 1  # uniform
        return np.clip((t * self.max_seeds - self.start_seeds + 1) / looks, 0.0, 1.0)

    def share(self, n: np.ndarray | int) -> np.ndarray:
        """s(n): the fraction of alpha the look at n seeds may spend; 0 outside start..max_seeds.
        The shares of start..max_seeds sum to 1."""
        n = np.asarray(n, dtype=np.float64)
        N = float(self.max_seeds)
        first = n == self.start_seeds
        s = np.where(first, self.spent(n / N), self.spent(n / N) - self.spent((n - 1) / N))
        return np.where((n >= self.start_seeds) & (n <= self.max_seeds), s, 0.0)


FIXED = Design(start_seeds=2, max_seeds=MAX_SEEDS)  # only its alpha, correction are used in fixed-n mode


def standard_error(d: np.ndarray, resolution: np.ndarray | float = 0.0) -> np.ndarray:
    """The standard error of the mean of ``d`` along its last axis, with the rounding variance of a
    metric quantised in steps of ``resolution`` (Sheppard's h²/12) added to the sample variance:
    sqrt((s² + h²/12) / n). With h = 0, scipy's ``ttest_1samp`` standard error."""
    d = np.asarray(d, dtype=np.float64)
    h = np.asarray(resolution, dtype=np.float64)
    return np.sqrt((np.var(d, axis=-1, ddof=1) + h * h / 12.0) / d.shape[-1])


def _ttest(d: np.ndarray, popmean: float, alternative: str = "two-sided", resolution: np.ndarray | float = 0.0
           ) -> np.ndarray:
    """The p-value of the one-sample t-test of mean ``popmean`` over the last axis of ``d``, its
    variance floored by the rounding variance (``standard_error``); scipy's t distribution, n − 1
    degrees of freedom. nan where the standard error is 0 and the mean sits on ``popmean``."""
    from scipy import stats

    df = d.shape[-1] - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (np.mean(d, axis=-1) - popmean) / standard_error(d, resolution)
    if alternative == "greater":
        return stats.t.sf(t, df)
    if alternative == "less":
        return stats.t.cdf(t, df)
    return np.minimum(1.0, 2.0 * stats.t.sf(np.abs(t), df))


def look_pvalues(d: np.ndarray, margin: float | None = None, resolution: np.ndarray | float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One look's test of a claim from its per-seed values ``d`` (…×n, the contrast's value per
    seed, in the metric's points) whose metric moves in steps of ``resolution`` (h; 0 for a
    continuous metric). Returns (p, outcome), each of shape …: the p-value of the look (1 where
    n < 2, or no test exists, or a directional claim's mean within ``resolution`` of 0: a tie) and
    the verdict it points to (``OUTCOMES`` codes: 1 holds, −1 reversed for a directional claim;
    2 same, 3 differs for one with ``margin``). See the module docstring for the tests and the
    rounding variance."""
    d = np.asarray(d, dtype=np.float64)
    shape = d.shape[:-1]
    if d.shape[-1] < 2:
        return np.ones(shape), np.zeros(shape, dtype=np.int64)
    if margin is None:
        p = _ttest(d, 0.0, resolution=resolution)
        mean = np.mean(d, axis=-1)
        outcome = np.where(mean >= 0, 1, -1)
        # issue 20: values within the metric's resolution count as equal, however many seeds agree
        # (+1 image on every seed is a tie, not "holds"); with resolution 0 only an exact 0 is
        p = np.where(np.abs(mean) <= np.asarray(resolution, dtype=np.float64) * (1 + 1e-9), 1.0, p)
    else:
        p_same = np.maximum(_ttest(d, -margin, "greater", resolution), _ttest(d, margin, "less", resolution))
        p_diff = np.minimum(1.0, 2.0 * np.minimum(_ttest(d, margin, "greater", resolution),
                                                  _ttest(d, -margin, "less", resolution)))
        p = np.minimum(p_same, p_diff)
        outcome = np.where(p_same <= p_diff, 2, 3)
    none = np.isnan(p)
    p = np.where(none, 1.0, p)
    outcome = np.where(none, 0, outcome)
    return np.asarray(p, dtype=np.float64), np.asarray(outcome, dtype=np.int64)


def fold(pseq: np.ndarray, p: np.ndarray, share: np.ndarray | float, active: np.ndarray | bool = True
         ) -> tuple[np.ndarray, np.ndarray]:
    """A look folded into the claims' sequential p-values: min(pseq, p / share) where ``active``
    (a claim that is still open and has a new look). Returns (new pseq, where this look set it)."""
    share = np.asarray(share, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(share > 0, p / np.where(share > 0, share, 1.0), np.inf)
    better = np.asarray(active) & (ratio < pseq)
    return np.where(better, np.minimum(ratio, 1.0), pseq), better


def holm(p: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down procedure over the last axis (…×C p-values). Returns (rejected …×C bool,
    each claim's threshold …×C: alpha / (C − rank), rank 0 for the smallest p). Equal to
    statsmodels ``multipletests(p, alpha, "holm")[0]`` (tests/unit/test_sequential.py)."""
    p = np.asarray(p, dtype=np.float64)
    C = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, -1)
    steps = alpha / (C - np.arange(C))
    ok = np.cumprod(ranked <= steps, axis=-1).astype(bool)
    rejected = np.zeros(p.shape, dtype=bool)
    threshold = np.zeros(p.shape)
    np.put_along_axis(rejected, order, ok, -1)
    np.put_along_axis(threshold, order, np.broadcast_to(steps, p.shape).copy(), -1)
    return rejected, threshold


def decide(pseq: np.ndarray, alpha: float, correction: str) -> tuple[np.ndarray, np.ndarray]:
    """The claims decided (…×C bool) by their sequential p-values under ``correction``, and the
    level each one is held to (…×C)."""
    pseq = np.asarray(pseq, dtype=np.float64)
    C = pseq.shape[-1]
    if C == 0:
        return np.zeros(pseq.shape, dtype=bool), np.zeros(pseq.shape)
    if correction == "holm":
        return holm(pseq, alpha)
    level = np.full(pseq.shape, alpha / C if correction == "bonferroni" else alpha)
    return pseq <= level, level


def interval(d: np.ndarray, level: float, margin: float | None = None, resolution: float = 0.0
             ) -> tuple[float, float] | None:
    """The t-interval of the mean of ``d`` (n values) that goes with a test at ``level``: two-sided
    1 − level for a directional claim, 1 − 2·level for an equivalence claim (TOST's interval), its
    standard error floored by the metric's rounding (``standard_error``). None for n < 2, or where
    the standard error is 0 (a continuous metric whose values are all equal)."""
    from scipy import stats

    d = np.asarray(d, dtype=np.float64)
    if d.shape[-1] < 2 or not 0 < level < 1:
        return None
    se = float(standard_error(d, resolution))
    if not se > 0:
        return None
    confidence = max(1.0 - (2.0 * level if margin is not None else level), 1e-9)
    half = float(stats.t.isf((1.0 - confidence) / 2, d.shape[-1] - 1)) * se
    mean = float(d.mean())
    return mean - half, mean + half


@dataclass(frozen=True)
class ClaimLooks:
    """One claim's data for a verdict: its per-seed values in seed order (the contrast of its cells
    on each seed they share), the numbers of seeds it was looked at, its margin and the step its
    metric moves in (``resolution``, h: its rounding variance h²/12 floors the tests' variance)."""

    values: tuple[float, ...]
    looks: tuple[int, ...]
    margin: float | None = None
    resolution: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """A claim's verdict in its family: ``verdict`` (holds, reversed, same, differs, inconclusive),
    at ``n`` seeds (the deciding look's, else the latest), the mean there and its interval at the
    claim's ``level`` (per-look share × corrected alpha), its sequential p-value and whether it is
    still open (undecided with seeds left to give)."""

    verdict: str
    n: int
    mean: float | None
    low: float | None
    high: float | None
    p: float
    level: float
    open: bool


def verdicts(claims: list[ClaimLooks], design: Design, sequential: bool = True) -> list[Verdict]:
    """Each claim's verdict, the claims corrected together. ``sequential``: every recorded look
    spends its share of alpha (``design``); else one look at the latest n, at the full alpha
    (the fixed-n report, with the correction across claims)."""
    C = len(claims)
    pseq, at_n, outcome = np.ones(C), np.zeros(C, dtype=np.int64), np.zeros(C, dtype=np.int64)
    latest = [len(c.values) for c in claims]
    for i, c in enumerate(claims):
        looks = sorted({n for n in c.looks if 2 <= n <= len(c.values)}) if sequential else [latest[i]]
        for n in looks:
            p, out = look_pvalues(np.asarray(c.values[:n])[None], c.margin, c.resolution)
            share = design.share(n) if sequential else 1.0
            new, better = fold(pseq[i:i + 1], p, share)
            if better[0]:
                pseq[i], at_n[i], outcome[i] = new[0], n, out[0]
    rejected, level = decide(pseq, design.alpha, design.correction)
    out: list[Verdict] = []
    for i, c in enumerate(claims):
        n = int(at_n[i]) if rejected[i] else latest[i]  # the deciding look, else the data so far
        share = float(design.share(n)) if sequential else 1.0
        lvl = float(level[i]) * share
        d = np.asarray(c.values[:n])
        ci = interval(d, lvl, c.margin, c.resolution) if n >= 2 and lvl > 0 else None
        verdict = OUTCOMES[int(outcome[i])] if rejected[i] else INCONCLUSIVE
        out.append(Verdict(verdict, n, float(d.mean()) if n else None, ci[0] if ci else None, ci[1] if ci else None,
                           float(pseq[i]), lvl, not rejected[i] and latest[i] < design.max_seeds))
    return out


def next_look_power(values: tuple[float, ...], design: Design, level: float, margin: float | None = None,
                    resolution: float = 0.0) -> float:
    """The chance that one more seed decides an open claim, at its current estimate: the power of
    the next look's t-test at ``level`` × that look's share, with the true mean and standard
    deviation taken as the current sample's, the latter with the rounding variance of a metric in
    steps of ``resolution`` (``standard_error``; scipy's noncentral t). 0 with fewer than 2 values or
    no share left. It ranks claims when a GPU-hour budget cannot give every open one a seed."""
    from scipy import stats

    d = np.asarray(values, dtype=np.float64)
    n1 = len(d) + 1
    a = level * float(design.share(n1))
    if len(d) < 2 or a <= 0:
        return 0.0
    sd = max(math.sqrt(float(d.var(ddof=1)) + resolution * resolution / 12.0), 1e-12)
    se = sd / math.sqrt(n1)
    mean = float(d.mean())
    if margin is None:
        crit = stats.t.isf(a / 2, n1 - 1)
        nc = abs(mean) / se
        # scipy's noncentral t gives nan far in a tail, where the power is 1 or the far side's 0
        far = np.nan_to_num(stats.nct.cdf(-crit, n1 - 1, nc), nan=0.0)
        return float(min(1.0, np.nan_to_num(stats.nct.sf(crit, n1 - 1, nc), nan=float(nc > crit)) + far))
    crit = stats.t.isf(a, n1 - 1)  # TOST: both one-sided tests at a; the nearer margin decides
    nc = (margin - abs(mean)) / se
    return float(np.nan_to_num(stats.nct.sf(crit, n1 - 1, nc), nan=float(nc > crit)))
