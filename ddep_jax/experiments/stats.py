"""The arithmetic of the label-efficiency summary: per-cell mean and spread
over seeds, differences between initialisations with 95% confidence
intervals, and the pooled seed standard deviation the sensitivity check uses.

All functions take plain Python / NumPy numbers (mIoU in percent or in [0, 1],
whatever the caller uses) and return floats; `nan` where a figure is
undefined (fewer than two seeds for a spread or an interval). `fmt` and
`cell_text` write them as the summary's tables do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (row, fraction) cell: the mean, the sample standard deviation
    (ddof 1; nan for one seed) and the number of seeds."""

    mean: float
    std: float
    n: int


def cell(values: Sequence[float]) -> Cell:
    """Mean +- sample std (ddof 1) of one cell's per-seed values.

    Raises:
      ValueError: no values.
    """
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("a cell needs at least one value.")
    return Cell(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan,
                int(v.size))


@dataclasses.dataclass(frozen=True)
class Difference:
    """`row - reference` over seeds: the mean difference, its 95% confidence
    interval [low, high], the seeds it used and how ('paired': per-seed
    differences over the seeds both have, a t interval with n - 1 degrees of
    freedom; 'welch': the two cells' seeds differ, Welch's unequal-variance t
    interval)."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0."""
        return self.low > 0 or self.high < 0


def difference(row: Mapping[int, float], reference: Mapping[int, float],
               confidence: float = 0.95) -> Difference:
    """Difference of two cells given as {seed: value}, with a `confidence`
    interval.

    A seed fixes the labelled subset, the initialisation and the data order,
    so the runs of two rows with the same seed share their labelled images:
    where one cell's seeds (at least two) are all among the other's, the
    interval is the paired t interval mean(d) +- t_{n-1} sd(d) / sqrt(n) of
    the per-seed differences d over those seeds (a row run at 5 seeds against
    one at 3 is compared on the 3). Otherwise Welch's interval (mean difference +- t_nu *
    sqrt(s1^2/n1 + s2^2/n2), nu from the Welch-Satterthwaite equation);
    with a single seed on either side the interval is (nan, nan).

    Raises:
      ValueError: either cell is empty.
    """
    if not row or not reference:
        raise ValueError("a difference needs values in both cells.")
    q = 0.5 + confidence / 2
    common = sorted(set(row) & set(reference))
    if len(common) >= 2 and len(common) == min(len(row), len(reference)):
        d = np.array([row[s] - reference[s] for s in common], np.float64)
        n = d.size
        half = scipy_stats.t.ppf(q, n - 1) * d.std(ddof=1) / math.sqrt(n)
        return Difference(float(d.mean()), float(d.mean() - half),
                          float(d.mean() + half), n, "paired")
    a = np.array(list(row.values()), np.float64)
    b = np.array(list(reference.values()), np.float64)
    mean = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return Difference(mean, math.nan, math.nan, min(a.size, b.size), "welch")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(mean, mean, mean, min(a.size, b.size), "welch")
    nu = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = scipy_stats.t.ppf(q, nu) * se
    return Difference(mean, mean - half, mean + half, min(a.size, b.size), "welch")


def pooled_std(cells: Sequence[Sequence[float]]) -> float:
    """The pooled within-cell standard deviation of several cells' per-seed
    values: sqrt(sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1)); cells with one
    value add nothing. nan when no cell has two values."""
    num = den = 0.0
    for values in cells:
        v = np.asarray(values, np.float64)
        if v.size > 1:
            num += (v.size - 1) * v.var(ddof=1)
            den += v.size - 1
    return math.sqrt(num / den) if den else math.nan


def detectable_difference(std: float, n: int, confidence: float = 0.95,
                          power: float | None = None) -> float:
    """For two cells of `n` seeds each with seed std `std` and independent
    seeds (df = 2n - 2): with `power` None, the half-width of the
    `confidence` interval of their difference, t_{(1+confidence)/2} * std *
    sqrt(2 / n): the smallest observed difference that excludes 0. With a
    `power` (e.g. 0.8), the true difference found to exclude 0 with that
    probability: (t_{(1+confidence)/2} + t_{power}) * std * sqrt(2 / n).
    Pairing the seeds (the same labelled subsets) narrows both when the rows'
    seeds agree. nan for n < 2 or a nan std."""
    if n < 2 or math.isnan(std):
        return math.nan
    df = 2 * n - 2
    t = scipy_stats.t.ppf(0.5 + confidence / 2, df)
    if power is not None:
        t += scipy_stats.t.ppf(power, df)
    return float(t * std * math.sqrt(2 / n))


def fmt(x: float | None, signed: bool = False) -> str:
    """`x` with two decimals ('+' sign when `signed`); 'n/a' for None / nan."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def cell_text(values: Mapping[int, float] | None) -> str:
    """'mean ± std (n=k)' of a cell's {seed: value}; '-' when empty."""
    if not values:
        return "-"
    c = cell(list(values.values()))
    spread = f" ± {fmt(c.std)}" if c.n > 1 else ""
    return f"{fmt(c.mean)}{spread} (n={c.n})"
