"""Sampling metrics for verifiable tasks: Mean@k and the unbiased Pass@k estimator.

With ``n`` samples of a problem, ``c`` of them correct:

- Pass@k = 1 − C(n−c, k) / C(n, k)  — the probability that at least one of k samples drawn without
  replacement from the n is correct (Chen et al., 2021, "Evaluating Large Language Models Trained on
  Code"). Computed in product form, 1 − ∏_{i=n−c+1}^{n} (1 − k/i), which never forms huge binomials.
- Mean@k = c / n — the expected accuracy of one of k samples. Its unbiased estimate from n ≥ k samples
  is the same c / n for every k, so results report it once, as ``mean@{n}``.

Benchmark scores are averages over problems of these per-problem values.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

__all__ = ["pass_at_k", "mean_at_k", "default_ks", "problem_counts", "aggregate", "average_over_benchmarks"]


def _check_counts(n: int, c: int, k: int) -> None:
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if n < 1:
        raise ValueError(f"n (samples) must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from ``n`` samples of which ``c`` are correct: 1 − C(n−c, k)/C(n, k)."""
    _check_counts(n, c, k)
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Mean@k (expected accuracy of a sample, averaged over k) from n ≥ k samples: c / n."""
    _check_counts(n, c, k)
    return c / n


def default_ks(n: int) -> tuple[int, ...]:
    """Powers of two up to ``n``, plus ``n`` itself: (1, 2, 4, ..., n)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    ks = [2**i for i in range(int(math.log2(n)) + 1) if 2**i <= n]
    if ks[-1] != n:
        ks.append(n)
    return tuple(ks)


def problem_counts(problem_ids: Sequence[str], correct: Sequence[bool]) -> dict[str, tuple[int, int]]:
    """(n, c) per problem from parallel per-sample lists, in first-seen problem order."""
    if len(problem_ids) != len(correct):
        raise ValueError(f"problem_ids and correct differ in length: {len(problem_ids)} vs {len(correct)}")
    counts: dict[str, list[int]] = {}
    for pid, ok in zip(problem_ids, correct):
        entry = counts.setdefault(pid, [0, 0])
        entry[0] += 1
        entry[1] += int(bool(ok))
    return {pid: (n, c) for pid, (n, c) in counts.items()}


def aggregate(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Benchmark metrics from per-problem (n, c): ``mean@{n}`` and ``pass@{k}`` for each k, averaged.

    Every problem must have the same number of samples n, and every k must be ≤ n.
    """
    counts = list(counts)
    if not counts:
        raise ValueError("aggregate needs at least one problem")
    sample_sizes = {n for n, _ in counts}
    if len(sample_sizes) != 1:
        raise ValueError(f"problems have different numbers of samples {sorted(sample_sizes)}; expected one n")
    (n,) = sample_sizes
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"every k must be an int in [1, n={n}], got {k!r}")
    metrics = {f"mean@{n}": sum(mean_at_k(n, ci, 1) for _, ci in counts) / len(counts)}
    for k in sorted(set(ks)):
        metrics[f"pass@{k}"] = sum(pass_at_k(n, ci, k) for _, ci in counts) / len(counts)
    return metrics


def average_over_benchmarks(per_benchmark: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Macro average of the metrics that every benchmark reports (plus ``accuracy``, each one's mean@n)."""
    if not per_benchmark:
        return {}
    tables = list(per_benchmark.values())
    accuracy = []
    for table in tables:
        means = [v for key, v in table.items() if key.startswith("mean@")]
        if len(means) != 1:
            raise ValueError(f"each benchmark needs exactly one mean@n metric, got {sorted(table)}")
        accuracy.append(means[0])
    average = {"accuracy": sum(accuracy) / len(accuracy)}
    shared = set(tables[0]).intersection(*tables[1:])
    for key in sorted(shared, key=_metric_order):
        values = [table[key] for table in tables]
        if all(isinstance(v, (int, float)) for v in values):
            average[key] = sum(values) / len(values)
    return average


def _metric_order(key: str) -> tuple[str, int]:
    name, _, k = key.partition("@")
    return (name, int(k) if k.isdigit() else 0)
