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


# ---- power, minimum detectable difference, verdicts (checked against simulation) ----

from latentx.stats import (  # noqa: E402
    min_detectable_difference,
    paired_power,
    pass_at_k_eval_se,
    seeds_needed,
    verdict,
)


def _simulated_power(delta: float, sd: float, n: int, sims: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    d = rng.normal(delta, sd, size=(sims, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    return float(np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1)))


@pytest.mark.parametrize("n", [3, 5, 12])
def test_power_and_mde_match_simulation(n):
    sd = 0.04
    mde = min_detectable_difference(sd, n)
    assert paired_power(mde, sd, n) == pytest.approx(0.8, abs=1e-9)
    # A simulated paired t-test at delta = MDE rejects 80 % of the time (binomial s.e. 0.4 % at 10k sims).
    assert _simulated_power(mde, sd, n, 10_000, seed=n) == pytest.approx(0.8, abs=0.015)
    # At delta = 0 the rejection rate is alpha.
    assert paired_power(0.0, sd, n) == pytest.approx(0.05, abs=1e-9)
    assert _simulated_power(0.0, sd, n, 10_000, seed=100 + n) == pytest.approx(0.05, abs=0.01)


def test_mde_known_values_and_scaling():
    # Normal shortcut (z.975 + z.8) * sd / sqrt(n) = 2.8016 sd/sqrt(n) is the large-n limit.
    assert min_detectable_difference(1.0, 2000) * math.sqrt(2000) == pytest.approx(2.8016, rel=2e-3)
    # Few seeds: the exact MDE is far above the shortcut (3 seeds: 3.26x the sd, not 1.62x).
    assert min_detectable_difference(1.0, 3) == pytest.approx(3.264, abs=2e-3)
    # Linear in sd, decreasing in n.
    assert min_detectable_difference(0.2, 5) == pytest.approx(2 * min_detectable_difference(0.1, 5), rel=1e-9)
    assert min_detectable_difference(0.1, 10) < min_detectable_difference(0.1, 5)
    assert min_detectable_difference(0.0, 4) == 0.0
    with pytest.raises(ValueError, match="at least 2 seeds"):
        min_detectable_difference(0.1, 1)
    with pytest.raises(ValueError, match="power"):
        min_detectable_difference(0.1, 3, power=1.0)


def test_seeds_needed_is_the_smallest_sufficient_n():
    sd, delta = 0.05, 0.03
    n = seeds_needed(delta, sd)
    assert paired_power(delta, sd, n) >= 0.8 > paired_power(delta, sd, n - 1)
    assert min_detectable_difference(sd, n) <= delta < min_detectable_difference(sd, n - 1)
    with pytest.raises(ValueError, match="non-zero"):
        seeds_needed(0.0, sd)
    with pytest.raises(ValueError, match="more than"):
        seeds_needed(1e-6, 1.0, max_seeds=100)


def test_verdict_three_outcomes():
    rng = np.random.default_rng(3)
    base = rng.normal(0.8, 0.02, size=12)
    # A clear difference with 12 seeds.
    found = verdict(paired_test(base + 0.05 + rng.normal(0, 0.005, 12), base), target=0.03)
    assert found.kind == "difference found" and "difference found" in found.text
    # No difference, small spread, many seeds: powered to exclude 0.03.
    tight = verdict(paired_test(base + rng.normal(0, 0.01, 12), base), target=0.03)
    assert tight.kind == "no difference larger than" and tight.mde <= 0.03
    assert f"{tight.mde:.3f}" in tight.text
    # No difference, 3 seeds, large spread: underpowered, with the seeds the target would need.
    few = paired_test([0.80, 0.76, 0.83], [0.79, 0.81, 0.78])
    under = verdict(few, target=0.03)
    assert under.kind == "cannot tell (underpowered)" and under.mde > 0.03
    assert under.seeds_for_target is not None and under.seeds_for_target > 3
    assert "not significant" not in under.text
    with pytest.raises(ValueError, match="target"):
        verdict(few, target=0.0)


def test_pass_at_k_eval_se_matches_direct_simulation():
    counts = [0, 1, 5, 32, 64, 10, 3]
    n, k = 64, 8
    se = pass_at_k_eval_se(counts, n, k, draws=2000, seed=1)
    # Independent check: simulate the 64 samples per problem as coin flips and recompute.
    rng = np.random.default_rng(7)
    reps = []
    for _ in range(2000):
        c = [int((rng.random(n) < (ci / n)).sum()) for ci in counts]
        reps.append(np.mean([pass_at_k(n, x, k) for x in c]))
    assert se == pytest.approx(float(np.std(reps, ddof=1)), rel=0.08)
    assert pass_at_k_eval_se([0, 64], n, k) == 0.0  # certain problems carry no sampling noise
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k_eval_se(counts, n, 65)
