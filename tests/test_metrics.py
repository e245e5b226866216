from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from latentx.metrics import aggregate, average_over_benchmarks, default_ks, mean_at_k, pass_at_k, problem_counts


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_special_values():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 8) == 1.0  # n - c < k


def test_pass_at_k_is_stable_for_large_n():
    # C(1024, 512) overflows a float; the product form does not.
    value = pass_at_k(1024, 1, 512)
    assert value == pytest.approx(0.5)
    assert math.isfinite(pass_at_k(100_000, 3, 1000))


@given(n=st.integers(1, 300), data=st.data())
def test_pass_at_k_properties(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-9)
    if k > 1:
        assert value >= pass_at_k(n, c, k - 1) - 1e-12  # more tries never hurt


@pytest.mark.parametrize(
    "n, c, k, match",
    [(0, 0, 1, "n"), (5, 6, 1, "c"), (5, -1, 1, "c"), (5, 2, 0, "k"), (5, 2, 6, "k")],
)
def test_pass_at_k_rejects_bad_counts(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError, match="k"):
        pass_at_k(4, 2, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="c"):
        pass_at_k(4, True, 1)  # type: ignore[arg-type]


def test_mean_at_k():
    assert mean_at_k(4, 1, 1) == 0.25
    assert mean_at_k(4, 1, 4) == 0.25
    with pytest.raises(ValueError, match="k"):
        mean_at_k(4, 1, 5)


def test_default_ks():
    assert default_ks(1) == (1,)
    assert default_ks(16) == (1, 2, 4, 8, 16)
    assert default_ks(12) == (1, 2, 4, 8, 12)
    with pytest.raises(ValueError, match="n"):
        default_ks(0)


def test_problem_counts_and_aggregate():
    ids = ["a", "a", "b", "b", "c", "c"]
    correct = [True, False, False, False, True, True]
    counts = problem_counts(ids, correct)
    assert counts == {"a": (2, 1), "b": (2, 0), "c": (2, 2)}
    metrics = aggregate(counts.values(), ks=[1, 2])
    assert metrics["mean@2"] == pytest.approx(0.5)
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert metrics["pass@2"] == pytest.approx((1 + 0 + 1) / 3)


def test_aggregate_rejects_mixed_n_and_large_k():
    with pytest.raises(ValueError, match="different numbers of samples"):
        aggregate([(2, 1), (3, 1)], ks=[1])
    with pytest.raises(ValueError, match="k"):
        aggregate([(2, 1)], ks=[4])
    with pytest.raises(ValueError, match="length"):
        problem_counts(["a"], [True, False])


def test_average_over_benchmarks():
    avg = average_over_benchmarks(
        {"x": {"mean@1": 0.2, "pass@1": 0.2}, "y": {"mean@4": 0.6, "pass@1": 0.6, "pass@4": 0.9}}
    )
    assert avg == pytest.approx({"accuracy": 0.4, "pass@1": 0.4})
