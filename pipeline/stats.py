"""Replicates → estimates: a cell's mean with a Student-t 95% confidence interval over its seeds, and
the difference of two cells (or a contrast of several), paired by seed where the seeds match.

Every number comes from scipy.stats (``ttest_1samp``, ``ttest_rel``, ``ttest_ind`` and their
``confidence_interval``); nothing here computes a standard error by hand. Values are whatever the
metric's unit is (top-1 in percent, AP in points). With one seed there is no interval: ``low`` and
``high`` are None and the text says so.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` replicates and its ``LEVEL`` confidence interval (None when n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    paired: bool = False  # a difference computed seed by seed

    @property
    def half(self) -> float | None:
        """Half the interval's width (the "±"), None without an interval."""
        return None if self.low is None else (self.high - self.low) / 2

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def _why(self) -> str:
        return f"n={self.n}" + (", all equal" if self.n > 1 else "")

    def text(self, digits: int = 2, sign: bool = False) -> str:
        """``41.20 ± 1.31 (n=3)``, or ``41.20 (n=1)`` / ``17.00 (n=3, all equal)`` where no interval exists."""
        mean = number(self.mean, digits, sign)
        if self.half is None:
            return f"{mean} ({self._why()})"
        return f"{mean} ± {number(self.half, digits)} (n={self.n})"

    def interval(self, digits: int = 2) -> str:
        """``[-0.52, 3.10]``, or ``no interval (n=1)`` / ``no interval (n=3, all equal)``."""
        if self.low is None:
            return f"no interval ({self._why()})"
        return f"[{number(self.low, digits)}, {number(self.high, digits)}]"


def number(x: float, digits: int = 2, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals, or in scientific notation when that would show it as 0
    (an inversion loss of 3e-4)."""
    plus = "+" if sign else ""
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:{plus}.1e}"
    return f"{x:{plus}.{digits}f}"


def _ci(result) -> tuple[float, float]:
    ci = result.confidence_interval(LEVEL)
    return float(ci.low), float(ci.high)


RELATIVE_TIE = 1e-6  # float32 metrics agree to about 7 digits: closer values are the same number


def estimate(values: Sequence[float], tol: float | None = None) -> Estimate | None:
    """Mean and Student-t interval of ``values`` (one per seed); None for no values. Values that tie
    (their range at most ``tol``, default 1e-6 of their size: top-1 on a small val set moves in
    steps, and float32 top-1 differs in the 6th digit, so seeds can agree) give no interval: a
    zero-width one would call any difference certain."""
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return Estimate(mean, None, None, 1)
    if tol is None:
        tol = RELATIVE_TIE * max(abs(v) for v in values)
    if max(values) - min(values) <= tol:
        return Estimate(mean, None, None, len(values))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical values: scipy warns, still answers
        low, high = _ci(stats.ttest_1samp(values, 0.0))
    return Estimate(mean, low, high, len(values))


def contrast(terms: Sequence[tuple[float, Mapping[int, float]]], tol: float | None = None) -> Estimate | None:
    """Σ coef · metric over ``terms`` of (coef, {seed: value}); e.g. [(1, a), (-1, b)] is a − b.

    Paired by seed when the cells share at least one seed: each shared seed gives one value of the
    contrast, and the interval is a one-sample t over them (scipy ``ttest_1samp``; for two cells this
    is ``ttest_rel``). Otherwise a two-cell difference uses Welch's t (``ttest_ind`` with unequal
    variances), and anything else has no interval. None when a cell has no value."""
    from scipy import stats

    if any(not values for _, values in terms):
        return None
    common = set.intersection(*(set(values) for _, values in terms))
    if common:
        per_seed = [sum(c * values[s] for c, values in terms) for s in sorted(common)]
        scale = sum(abs(c) * max(abs(v) for v in values.values()) for c, values in terms)
        est = estimate(per_seed, RELATIVE_TIE * scale if tol is None else tol)
        return Estimate(est.mean, est.low, est.high, est.n, paired=True)
    means = [sum(v.values()) / len(v) for _, v in terms]
    mean = sum(c * m for (c, _), m in zip(terms, means))
    sizes = [len(v) for _, v in terms]
    if len(terms) == 2 and {c for c, _ in terms} == {1.0, -1.0} and min(sizes) >= 2:
        (ca, a), (_, b) = terms
        a, b = (a, b) if ca > 0 else (b, a)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = _ci(stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False))
        if math.isnan(low) or high - low <= RELATIVE_TIE * max(abs(low), abs(high)):  # no spread: see ``estimate``
            low = high = None
        return Estimate(mean, low, high, min(sizes))
    return Estimate(mean, None, None, min(sizes))


def difference(a: Mapping[int, float], b: Mapping[int, float], tol: float | None = None) -> Estimate | None:
    """a − b (each {seed: value}), paired by seed where the seeds match (see ``contrast``)."""
    return contrast([(1.0, a), (-1.0, b)], tol)


def difference_p(a: Mapping[int, float], b: Mapping[int, float], tol: float | None = None) -> float:
    """The two-sided p-value of a − b = 0: the paired t-test over the shared seeds (pipeline/sequential.py
    ``look_pvalues``), else Welch's; 1 where no test exists. ``tol`` is half the step each value moves
    in (half an image of top-1; default 1e-6 of the values): the paired test adds the rounding
    variance of a difference of two values rounded at 2·tol, 2·(2·tol)²/12, to the seeds' variance, so
    seeds that agree give a p that falls with the difference, not 1 or 0."""
    import numpy as np
    from scipy import stats

    from pipeline.sequential import look_pvalues

    common = sorted(set(a) & set(b))
    if common:
        d = np.array([a[s] - b[s] for s in common])
        if tol is None:
            tol = RELATIVE_TIE * (max(map(abs, a.values())) + max(map(abs, b.values())))
        return float(look_pvalues(d, None, math.sqrt(2.0) * 2.0 * tol)[0]) if len(d) >= 2 else 1.0
    if min(len(a), len(b)) < 2:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).pvalue
    return 1.0 if math.isnan(p) else float(p)
