"""The statistics of the evaluation tables: medians with seeded bootstrap confidence
intervals, paired and independent two-sample tests, rank correlation with its p-value,
and Holm's adjustment for many comparisons. Plain functions over 1-D float arrays; NaN
inputs are the caller's to drop (every function here expects finite values)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap of the median: ``resamples`` draws with replacement from a
    numpy generator seeded with ``seed``; the interval holds ``level`` of the resampled
    medians (0.95: the 2.5th to the 97.5th percentile)."""

    resamples: int = 2000
    seed: int = 0
    level: float = 0.95


@dataclass(frozen=True)
class Median:
    """A sample median with its bootstrap interval (NaN for an empty sample)."""

    value: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class TwoSample:
    """A two-sample test: its p-value (two-sided) and a rank-biserial effect size in
    [-1, 1] (> 0: the first sample tends to be larger); NaN where undefined."""

    n: int
    p: float
    effect: float


def median_ci(values: Sequence[float] | np.ndarray, boot: Bootstrap) -> Median:
    """The median of ``values`` and its percentile-bootstrap interval. The same values and
    ``boot`` give the same interval (the generator is seeded per call)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Median(math.nan, math.nan, math.nan, 0)
    median = float(np.median(x))
    if x.size == 1 or boot.resamples <= 0:
        return Median(median, median, median, int(x.size))
    rng = np.random.default_rng(boot.seed)
    medians = np.empty(boot.resamples)
    chunk = max(1, 2_000_000 // x.size)  # bounded memory: resamples x n indices per chunk
    for start in range(0, boot.resamples, chunk):
        stop = min(start + chunk, boot.resamples)
        draws = x[rng.integers(0, x.size, size=(stop - start, x.size))]
        medians[start:stop] = np.median(draws, axis=1)
    tail = (1.0 - boot.level) / 2.0
    low, high = np.quantile(medians, [tail, 1.0 - tail])
    return Median(median, float(low), float(high), int(x.size))


def wilcoxon(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> TwoSample:
    """Paired Wilcoxon signed-rank test of a - b (scipy's default: zero differences
    dropped, exact p for small samples without ties, normal approximation otherwise).
    Effect: the matched-pairs rank-biserial correlation (W+ - W-) / (W+ + W-) over the
    nonzero differences. Two samples of the same images, e.g. two methods or two stages."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError("paired samples need the same length")
    d = x - y
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return TwoSample(int(d.size), math.nan, 0.0 if d.size else math.nan)
    ranks = sps.rankdata(np.abs(nonzero))
    plus, minus = float(ranks[nonzero > 0].sum()), float(ranks[nonzero < 0].sum())
    effect = (plus - minus) / (plus + minus)
    p = float(sps.wilcoxon(x, y).pvalue) if d.size >= 2 else math.nan
    return TwoSample(int(d.size), p, effect)


def mann_whitney(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> TwoSample:
    """Mann-Whitney U test of two independent samples (two-sided, scipy's default method).
    Effect: the rank-biserial correlation 2 U_a / (n_a n_b) - 1 (> 0: ``a`` tends to be
    larger). Two groups of different images, e.g. correct and misclassified."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        return TwoSample(int(x.size + y.size), math.nan, math.nan)
    result = sps.mannwhitneyu(x, y, alternative="two-sided")
    effect = 2.0 * float(result.statistic) / (x.size * y.size) - 1.0
    return TwoSample(int(x.size + y.size), float(result.pvalue), effect)


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> TwoSample:
    """Spearman's rank correlation (``effect``) and its two-sided p-value (scipy: t
    distribution with n - 2 degrees of freedom); NaN below 3 pairs or for a constant
    sample."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return TwoSample(int(x.size), math.nan, math.nan)
    result = sps.spearmanr(x, y)
    return TwoSample(int(x.size), float(result.pvalue), float(result.statistic))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN and is not
    counted in the family)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="mergesort")]
    m = order.size
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * float(p[index])))
        out[index] = running
    return [float(v) for v in out]
