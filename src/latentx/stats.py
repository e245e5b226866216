"""Statistics for comparing training runs over seeds: t confidence intervals, paired tests, Pass@k curves.

A study trains every objective with the same seeds, so each seed gives one number per objective and
metric.  This module turns those numbers into what a report states:

- :func:`t_interval`: mean and two-sided confidence interval over seeds, ``mean ± t_{(1+level)/2, n-1}
  · s / √n`` (``s`` the sample standard deviation, ``n − 1`` degrees of freedom).  With one seed the
  interval is undefined (``nan``).
- :func:`paired_test`: a treatment against a baseline on the same seeds: the mean difference with its t
  interval, the paired t-test and the Wilcoxon signed-rank test (two-sided).  Both have low power with
  few seeds; the exact Wilcoxon test cannot go below p = 2 / 2^n (0.25 with 3 seeds, 0.0625 with 5),
  which :attr:`PairedTest.wilcoxon_min_p` reports so that a report can say so.
- :func:`holm`: Holm–Bonferroni adjusted p-values for a family of comparisons.
- :func:`pass_at_k_curve`: the unbiased Pass@k of one run for every k = 1..n from per-problem correct
  counts (:func:`latentx.metrics.pass_at_k`, averaged over problems).

The t quantile and the Wilcoxon test come from SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from latentx.metrics import pass_at_k

__all__ = ["Interval", "PairedTest", "t_interval", "t_quantile", "paired_test", "holm", "pass_at_k_curve"]


def _scipy_stats():
    try:
        from scipy import stats
    except ImportError as err:  # pragma: no cover - scipy ships with the dev extras
        raise ImportError("latentx.stats needs SciPy for t quantiles and the Wilcoxon test: pip install scipy") from err
    return stats


def _as_values(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    return array


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")


def t_quantile(level: float, dof: int) -> float:
    """The two-sided critical value t_{(1+level)/2, dof} of Student's t distribution."""
    _check_level(level)
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    return float(_scipy_stats().t.ppf((1.0 + level) / 2.0, dof))


@dataclass(frozen=True)
class Interval:
    """Mean over ``n`` values with its t confidence interval ``[low, high]`` (``nan`` for n < 2)."""

    mean: float
    low: float
    high: float
    std: float  # sample standard deviation (ddof = 1); nan for n < 2
    n: int
    level: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def format(self, digits: int = 3) -> str:
        """``0.412 ± 0.031`` (or just the mean when the interval is undefined)."""
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and t-based confidence interval of ``values`` (independent samples, e.g. one per seed)."""
    _check_level(level)
    array = _as_values(values, "values")
    if array.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(array.mean())
    if array.size < 2:
        return Interval(mean, math.nan, math.nan, math.nan, 1, level)
    std = float(array.std(ddof=1))
    half = t_quantile(level, array.size - 1) * std / math.sqrt(array.size)
    return Interval(mean, mean - half, mean + half, std, int(array.size), level)


@dataclass(frozen=True)
class PairedTest:
    """``treatment − baseline`` on the same seeds, with the paired t-test and Wilcoxon signed-rank test."""

    n: int
    diff: Interval  # the mean difference and its t interval
    t_stat: float
    t_p: float
    wilcoxon_stat: float
    wilcoxon_p: float
    wilcoxon_min_p: float  # the smallest p-value the exact Wilcoxon test can give with n pairs

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the paired t-test rejects "no difference" at ``alpha`` (nan p-values never do)."""
        return bool(self.t_p < alpha)


def paired_test(treatment: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> PairedTest:
    """Compare paired samples (index i of both is seed i), two-sided.

    Degenerate cases are decided, not left to the libraries: with identical differences the t statistic
    is 0 (p = 1) when they are all zero and ±inf (p = 0) otherwise; when every difference is zero the
    Wilcoxon test has nothing to rank and p = 1.  With fewer than two pairs both p-values are ``nan``.
    """
    a = _as_values(treatment, "treatment")
    b = _as_values(baseline, "baseline")
    if a.size != b.size:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        raise ValueError("paired_test needs at least one pair")
    d = a - b
    n = int(d.size)
    diff = t_interval(d, level)
    if n < 2:
        return PairedTest(n, diff, math.nan, math.nan, math.nan, math.nan, math.nan)
    stats = _scipy_stats()
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd <= 1e-12 * max(1.0, abs(mean)):
        t_stat, t_p = (0.0, 1.0) if abs(mean) <= 1e-12 else (math.copysign(math.inf, mean), 0.0)
    else:
        t_stat = mean / (sd / math.sqrt(n))
        t_p = float(2.0 * stats.t.sf(abs(t_stat), n - 1))
    if np.all(np.abs(d) <= 1e-12):
        w_stat, w_p = 0.0, 1.0
    else:
        result = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        w_stat, w_p = float(result.statistic), float(result.pvalue)
    return PairedTest(n, diff, float(t_stat), float(t_p), w_stat, w_p, min(1.0, 2.0 / 2.0**n))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as given; ``nan`` entries stay ``nan``)."""
    p = [float(v) for v in pvalues]
    valid = sorted((v, i) for i, v in enumerate(p) if not math.isnan(v))
    m = len(valid)
    adjusted = [math.nan] * len(p)
    running = 0.0
    for rank, (value, index) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * value))
        adjusted[index] = running
    return adjusted


def pass_at_k_curve(correct_counts: Sequence[int], n: int, ks: Sequence[int] | None = None) -> np.ndarray:
    """Pass@k averaged over problems for each k in ``ks`` (default 1..n), from per-problem correct
    counts out of ``n`` samples each."""
    counts = [int(c) for c in correct_counts]
    if not counts:
        raise ValueError("pass_at_k_curve needs the correct count of at least one problem")
    ks = list(range(1, n + 1)) if ks is None else [int(k) for k in ks]
    return np.array([sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks], dtype=float)
