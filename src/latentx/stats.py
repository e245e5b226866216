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
- :func:`paired_power`, :func:`min_detectable_difference`, :func:`seeds_needed`: the power of the
  two-sided paired t-test (exact, from the noncentral t distribution), the smallest true mean difference
  it detects with a given power for the number of seeds used, and how many seeds a target difference
  needs, all from the observed standard deviation of the per-seed paired differences.
- :func:`verdict`: what a report may say about one comparison: "difference found", "no difference
  larger than X" (X = the minimum detectable difference, when X is at most the difference that matters)
  or "cannot tell (underpowered)" — never a bare "not significant".
- :func:`pass_at_k_eval_se`: the evaluation noise of one run's Pass@k (parametric bootstrap of the
  n samples per problem), to set beside the seed-to-seed spread.

The t quantile and the Wilcoxon test come from SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from latentx.metrics import pass_at_k

__all__ = [
    "Interval",
    "PairedTest",
    "Verdict",
    "t_interval",
    "t_quantile",
    "paired_test",
    "holm",
    "pass_at_k_curve",
    "pass_at_k_eval_se",
    "paired_power",
    "min_detectable_difference",
    "seeds_needed",
    "verdict",
]


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


def _check_power_args(sd: float, n: int, alpha: float, power: float | None = None) -> None:
    if not (math.isfinite(sd) and sd >= 0.0):
        raise ValueError(f"sd of the paired differences must be finite and >= 0, got {sd}")
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 seeds, got n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if power is not None and not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power}")


def paired_power(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs when the true mean
    difference is ``delta`` and the differences have standard deviation ``sd``.

    T = mean(d) / (s/√n) follows a noncentral t with n − 1 degrees of freedom and noncentrality
    δ√n/σ; power = P(|T| > t_{1−α/2, n−1}).  ``sd = 0`` gives power 1 for δ ≠ 0 (and α for δ = 0).
    """
    _check_power_args(sd, n, alpha)
    stats = _scipy_stats()
    crit = float(stats.t.ppf(1.0 - alpha / 2.0, n - 1))
    if sd == 0.0:
        return 1.0 if delta != 0.0 else alpha
    nc = abs(float(delta)) * math.sqrt(n) / sd
    power = float(stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc))
    if math.isnan(power):
        # SciPy's noncentral t loses its series for large noncentralities; there the normal
        # approximation P(T > c) ≈ Φ((nc − c·(1 − 1/(4ν))) / √(1 + c²/(2ν))) is accurate to ~1e-4.
        nu = n - 1
        scale = math.sqrt(1.0 + crit * crit / (2.0 * nu))
        shift = crit * (1.0 - 1.0 / (4.0 * nu))
        power = float(stats.norm.cdf((nc - shift) / scale) + stats.norm.cdf((-nc - shift) / scale))
    return power


def min_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference |δ| that the paired t-test detects with probability ``power``
    (two-sided, level ``alpha``) with ``n`` seeds and difference standard deviation ``sd``.

    Solved exactly on the noncentral t (the normal shortcut (z_{1−α/2} + z_{power})·σ/√n understates it
    badly for few seeds).  0 when ``sd`` is 0.
    """
    _check_power_args(sd, n, alpha, power)
    if sd == 0.0:
        return 0.0
    from scipy.optimize import brentq

    hi = sd
    while paired_power(hi, sd, n, alpha) < power:
        hi *= 2.0
        if hi > 1e12 * sd:  # pragma: no cover - power tends to 1, so this is never reached
            return math.inf
    return float(brentq(lambda d: paired_power(d, sd, n, alpha) - power, 0.0, hi, xtol=1e-12 * max(sd, 1e-300)))


def seeds_needed(delta: float, sd: float, alpha: float = 0.05, power: float = 0.8, max_seeds: int = 10_000) -> int:
    """The fewest seeds (>= 2) with which the paired t-test detects a true difference ``delta`` with
    probability ``power``, given difference standard deviation ``sd``.  Raises when ``delta`` is 0 or
    more than ``max_seeds`` would be needed."""
    if not (math.isfinite(delta) and delta != 0.0):
        raise ValueError(f"target difference must be finite and non-zero, got {delta}")
    _check_power_args(sd, 2, alpha, power)
    lo, hi = 2, 2
    while paired_power(delta, sd, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > max_seeds:
            raise ValueError(f"detecting {delta} with sd {sd} needs more than {max_seeds} seeds")
    while lo < hi:  # power grows with n: the smallest n in [lo, hi] reaching it
        mid = (lo + hi) // 2
        if paired_power(delta, sd, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class Verdict:
    """What a report says about one paired comparison, with the numbers behind it."""

    kind: str  # "difference found" | "no difference larger than" | "cannot tell (underpowered)"
    text: str
    mde: float  # minimum detectable difference at the given power with the seeds used
    seeds_for_target: int | None  # seeds the target difference would need (None: not computable)


def verdict(test: PairedTest, target: float, alpha: float = 0.05, power: float = 0.8, p_value: float | None = None) -> Verdict:
    """Classify one comparison.

    - p < alpha (``p_value`` if given, e.g. Holm-adjusted, else the paired t p-value): "difference found".
    - otherwise, when the minimum detectable difference (MDE) at ``power`` is at most ``target`` (the
      smallest difference that matters): "no difference larger than MDE" — a difference of that size
      would have been found with probability ``power``.
    - otherwise: "cannot tell (underpowered)", with the MDE reached and the seeds the target would need.
    """
    if not (math.isfinite(target) and target > 0.0):
        raise ValueError(f"target difference must be finite and > 0, got {target}")
    p = test.t_p if p_value is None else float(p_value)
    if test.n < 2 or math.isnan(test.diff.std):
        return Verdict("cannot tell (underpowered)", "cannot tell (underpowered): fewer than 2 seeds", math.nan, None)
    sd = test.diff.std
    mde = min_detectable_difference(sd, test.n, alpha, power)
    try:
        needed: int | None = seeds_needed(target, sd, alpha, power) if sd > 0 else 2
    except ValueError:
        needed = None
    if not math.isnan(p) and p < alpha:
        return Verdict("difference found", f"difference found ({test.diff.mean:+.3f}, p = {p:.3g})", mde, needed)
    if mde <= target:
        return Verdict(
            "no difference larger than",
            f"no difference larger than {mde:.3f} ({power:.0%} power, {test.n} seeds)",
            mde,
            needed,
        )
    need = f"{needed} seeds" if needed is not None else "more seeds than can be run"
    return Verdict(
        "cannot tell (underpowered)",
        f"cannot tell (underpowered): detectable difference {mde:.3f} > {target:.3f}; {target:.3f} needs {need}",
        mde,
        needed,
    )


def pass_at_k_eval_se(correct_counts: Sequence[int], n: int, k: int, draws: int = 400, seed: int = 0) -> float:
    """Evaluation noise of one run's Pass@k: the standard deviation, over ``draws`` parametric bootstrap
    replicates, of Pass@k averaged over the problems, where each replicate redraws every problem's
    correct count from Binomial(n, c/n).  This is the noise of the n samples per problem only (the
    problems themselves are the same for every run of a study, so they cancel in paired comparisons)."""
    counts = np.asarray([int(c) for c in correct_counts], dtype=np.int64)
    if counts.size == 0:
        raise ValueError("pass_at_k_eval_se needs the correct count of at least one problem")
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if np.any(counts < 0) or np.any(counts > n):
        raise ValueError(f"correct counts must lie in [0, {n}]")
    rng = np.random.default_rng(seed)
    table = np.array([pass_at_k(n, c, k) for c in range(n + 1)], dtype=float)
    redrawn = rng.binomial(n, counts / n, size=(draws, counts.size))
    return float(table[redrawn].mean(axis=1).std(ddof=1))
