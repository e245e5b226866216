"""latentx.stats on synthetic numbers with known answers (hand-computed, cross-checked with SciPy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from latentx.metrics import pass_at_k
from latentx.stats import holm, paired_test, pass_at_k_curve, t_interval, t_quantile


def test_t_quantile_matches_tables():
    # Two-sided 95 % critical values of Student's t (any statistics table).
    assert t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.95, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.95, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.90, 9) == pytest.approx(1.8331, abs=1e-4)
    with pytest.raises(ValueError, match="level"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.95, 0)


def test_t_interval_by_hand():
    ci = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, n = 3: half width t_{.975,2} / sqrt(3)
    half = 4.302652729911275 / math.sqrt(3)
    assert ci.mean == pytest.approx(2.0)
    assert ci.std == pytest.approx(1.0)
    assert (ci.low, ci.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert ci.half_width == pytest.approx(half)
    assert ci.format(2) == f"2.00 ± {half:.2f}"


def test_t_interval_matches_scipy():
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 0.1, size=7)
    ci = t_interval(values, level=0.9)
    low, high = sps.t.interval(0.9, len(values) - 1, loc=values.mean(), scale=sps.sem(values))
    assert (ci.low, ci.high) == pytest.approx((low, high))


def test_t_interval_edge_cases():
    one = t_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.half_width)
    assert one.format() == "0.500"
    same = t_interval([0.2, 0.2, 0.2])
    assert same.low == pytest.approx(0.2) and same.high == pytest.approx(0.2)
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])
    with pytest.raises(ValueError, match="finite"):
        t_interval([1.0, float("nan")])


def test_paired_t_by_hand_and_vs_scipy():
    treatment, baseline = [3.0, 5.0, 7.0, 10.0], [1.0, 2.0, 4.0, 6.0]  # d = 2, 3, 3, 4
    result = paired_test(treatment, baseline)
    sd = math.sqrt(2.0 / 3.0)
    assert result.n == 4
    assert result.diff.mean == pytest.approx(3.0)
    assert result.t_stat == pytest.approx(3.0 / (sd / 2.0))
    reference = sps.ttest_rel(treatment, baseline)
    assert result.t_stat == pytest.approx(reference.statistic)
    assert result.t_p == pytest.approx(reference.pvalue)
    assert result.significant(0.05) and not result.significant(result.t_p / 2)
    # The paired interval is the t interval of the differences.
    assert result.diff.half_width == pytest.approx(t_quantile(0.95, 3) * sd / 2.0)


def test_wilcoxon_exact_by_hand():
    # All five differences positive: W- = 0, exact two-sided p = 2 / 2^5.
    result = paired_test([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])
    assert result.wilcoxon_stat == 0.0
    assert result.wilcoxon_p == pytest.approx(2 / 32)
    assert result.wilcoxon_min_p == pytest.approx(2 / 32)
    # d = 1, -2, 3, 4, 5: W- = 2; rank sums <= 2 arise from {}, {1}, {2}: p = 2 * 3 / 32.
    mixed = paired_test([1, -2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert mixed.wilcoxon_stat == 2.0
    assert mixed.wilcoxon_p == pytest.approx(6 / 32)


def test_paired_test_degenerate_cases():
    equal = paired_test([0.4, 0.5, 0.6], [0.4, 0.5, 0.6])
    assert equal.t_p == 1.0 and equal.wilcoxon_p == 1.0 and equal.t_stat == 0.0
    shifted = paired_test([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])  # constant +0.1
    assert shifted.t_stat == math.inf and shifted.t_p == 0.0
    assert shifted.wilcoxon_p == pytest.approx(0.25)  # the floor with 3 seeds: low power, said plainly
    single = paired_test([0.5], [0.4])
    assert math.isnan(single.t_p) and not single.significant()
    with pytest.raises(ValueError, match="length"):
        paired_test([1.0, 2.0], [1.0])


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.5]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.02, math.nan])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])


def test_pass_at_k_curve_known_values():
    # One problem, 2 of 4 correct: Pass@1 = 1/2, Pass@2 = 1 - C(2,2)/C(4,2) = 5/6, then 1.
    assert pass_at_k_curve([2], 4) == pytest.approx([0.5, 5 / 6, 1.0, 1.0])
    # One problem never solved, one always: 1/2 for every k.
    assert pass_at_k_curve([0, 64], 64) == pytest.approx(np.full(64, 0.5))
    # One correct of n: Pass@k = k / n.
    assert pass_at_k_curve([1], 8) == pytest.approx(np.arange(1, 9) / 8)
    curve = pass_at_k_curve([3, 0, 7], 16, ks=[1, 16])
    assert curve[0] == pytest.approx(10 / 48)  # Pass@1 = mean fraction correct
    assert curve[1] == pytest.approx(2 / 3)
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 65, size=20).tolist()
    full = pass_at_k_curve(counts, 64)
    assert np.all(np.diff(full) >= -1e-12)  # Pass@k never decreases in k
    assert full[7] == pytest.approx(np.mean([pass_at_k(64, c, 8) for c in counts]))
    with pytest.raises(ValueError, match="at least one"):
        pass_at_k_curve([], 4)
