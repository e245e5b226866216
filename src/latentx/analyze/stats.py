"""Statistics of the analysis tables: correlations with Fisher-z intervals, per-prompt dispersion.

Plain numpy (no scipy / pandas): the analysis must run with latentx's own dependencies.

Correlations (report section "correlation matrix")
---------------------------------------------------
For two columns x, y the coefficient is computed over the rows where both are finite (pairwise complete
observations; n is reported per coefficient).  Two methods:

* Pearson r; Fisher's z = atanh(r) has standard error 1 / sqrt(n - 3).
* Spearman rho = Pearson r of the mid-ranks (ties get their average rank); the Fisher-z standard error is
  sqrt(1.06 / (n - 3)) (Fieller, Hartley & Pearson, Biometrika 1957), the usual large-sample correction.

The two-sided interval at level ``1 - alpha`` is tanh(z -+ q se) with q the standard-normal quantile
``1 - alpha / 2``.  It needs n >= 4; coefficients of a constant column are undefined (NaN).

Dispersion of the dynamics of one input (report section "dynamical scaling law")
--------------------------------------------------------------------------------
For each prompt g with responses r = 1..R (only responses whose signal is defined count; at least 2 needed).
The analysis feeds length-matched signals: each response cut to T_g tokens, the shortest length in the group
(:func:`latentx.analyze.signals.matched_lengths`), since ER grows with length and DSD shrinks with it.

* ``cv_er``  = std_r(ER_r) / mean_r(ER_r)      (sample std, ddof = 1): scale-free spread of the effective rank;
* ``cv_dsd`` = std_r(DSD_r) / mean_r(DSD_r)    the same for the Dynamic Spectral Dispersion;
* ``spectral_w1`` = mean over pairs r < r' of W1(r, r') where W1 is the 1-Wasserstein distance between the
  empirical distributions of the m eigenvalue moduli of the two responses' Koopman operators, which for
  equal m is (1/m) sum_j |rho_(j) - rho'_(j)| with both modulus lists sorted.  In the units of |lambda|.

Small values mean that responses to the same input follow similar latent dynamics (coherent, clustered);
ReLaX (arXiv:2512.07558) reports that this coherence grows with model scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

__all__ = [
    "CorrelationMatrix",
    "rankdata",
    "correlation",
    "correlation_matrix",
    "coefficient_of_variation",
    "spectral_w1",
    "group_dispersion",
    "DISPERSION_MEASURES",
]

Method = Literal["spearman", "pearson"]
_SPEARMAN_SE_FACTOR = 1.06  # Fieller, Hartley & Pearson (1957)
DISPERSION_MEASURES = ("cv_er", "cv_dsd", "spectral_w1")


def rankdata(values: np.ndarray) -> np.ndarray:
    """Mid-ranks 1..n of a 1-D array (ties share the average of their ranks), as float64."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = 0.5 * (start + stop - 1) + 1.0
        start = stop
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    if denominator == 0.0:
        return math.nan
    return float(np.clip((xc * yc).sum() / denominator, -1.0, 1.0))


def correlation(x: np.ndarray, y: np.ndarray, method: Method = "spearman", level: float = 0.95) -> tuple[float, float, float, int]:
    """``(coefficient, ci_low, ci_high, n)`` over the rows where both x and y are finite (module docstring)."""
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D arrays of the same length, got shapes {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(keep.sum())
    if n < 2:
        return math.nan, math.nan, math.nan, n
    r = _pearson(rankdata(x), rankdata(y)) if method == "spearman" else _pearson(x, y)
    if math.isnan(r) or n < 4:
        return r, math.nan, math.nan, n
    if abs(r) == 1.0:
        return r, r, r, n
    factor = _SPEARMAN_SE_FACTOR if method == "spearman" else 1.0
    se = math.sqrt(factor / (n - 3))
    q = NormalDist().inv_cdf(0.5 + level / 2)
    z = math.atanh(r)
    return r, math.tanh(z - q * se), math.tanh(z + q * se), n


@dataclass
class CorrelationMatrix:
    """Symmetric ``[k, k]`` arrays of coefficients, interval ends and pairwise sample sizes."""

    names: list[str]
    method: Method
    level: float
    r: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n: np.ndarray

    def rows(self) -> list[dict]:
        """One record per unordered pair (i < j), for the CSV table."""
        out = []
        for i, a in enumerate(self.names):
            for j in range(i + 1, len(self.names)):
                out.append(dict(x=a, y=self.names[j], method=self.method, coefficient=self.r[i, j],
                                ci_low=self.low[i, j], ci_high=self.high[i, j], ci_level=self.level, n=int(self.n[i, j])))
        return out


def correlation_matrix(columns: dict[str, np.ndarray], method: Method = "spearman", level: float = 0.95) -> CorrelationMatrix:
    """All pairwise :func:`correlation` s of ``columns`` (the diagonal: 1, NaN for a constant column; n = finite count)."""
    names = list(columns)
    k = len(names)
    r, low, high = (np.full((k, k), np.nan) for _ in range(3))
    n = np.zeros((k, k), dtype=np.int64)
    for i in range(k):
        values = np.asarray(columns[names[i]], dtype=np.float64)
        values = values[np.isfinite(values)]
        r[i, i] = low[i, i] = high[i, i] = 1.0 if len(np.unique(values)) >= 2 else np.nan  # NaN: constant column
        n[i, i] = len(values)
        for j in range(i + 1, k):
            value = correlation(columns[names[i]], columns[names[j]], method, level)
            r[i, j], low[i, j], high[i, j], n[i, j] = value
            r[j, i], low[j, i], high[j, i], n[j, i] = value
    return CorrelationMatrix(names, method, level, r, low, high, n)


def coefficient_of_variation(values: np.ndarray) -> float:
    """std (ddof = 1) / |mean| of the finite values; NaN with fewer than 2 of them or a zero mean."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return math.nan
    mean = float(values.mean())
    if mean == 0.0:
        return math.nan
    return float(values.std(ddof=1) / abs(mean))


def spectral_w1(moduli: np.ndarray) -> float:
    """Mean pairwise 1-Wasserstein distance between the rows' modulus distributions ``[R, m]``.

    Rows holding a non-finite value (responses without a spectrum) are dropped; NaN with fewer than 2 rows.
    """
    moduli = np.asarray(moduli, dtype=np.float64)
    if moduli.ndim != 2:
        raise ValueError(f"moduli must be a [responses, modes] array, got shape {moduli.shape}")
    moduli = np.sort(moduli[np.isfinite(moduli).all(axis=1)], axis=1)
    if len(moduli) < 2:
        return math.nan
    distances = np.abs(moduli[:, None, :] - moduli[None, :, :]).mean(axis=-1)
    upper = np.triu_indices(len(moduli), k=1)
    return float(distances[upper].mean())


def group_dispersion(groups: np.ndarray, er: np.ndarray, dsd: np.ndarray, moduli: np.ndarray) -> dict[str, np.ndarray]:
    """Per-group ``cv_er``, ``cv_dsd``, ``spectral_w1`` and the group size, for the groups in order of appearance.

    ``groups``: ``[n]`` group label of each response; ``er``, ``dsd``: ``[n]``; ``moduli``: ``[n, m]``.
    """
    groups = np.asarray(groups)
    labels = list(dict.fromkeys(groups.tolist()))
    out: dict[str, list] = {"group": [], "responses": [], "cv_er": [], "cv_dsd": [], "spectral_w1": []}
    for label in labels:
        rows = groups == label
        out["group"].append(label)
        out["responses"].append(int(rows.sum()))
        out["cv_er"].append(coefficient_of_variation(er[rows]))
        out["cv_dsd"].append(coefficient_of_variation(dsd[rows]))
        out["spectral_w1"].append(spectral_w1(moduli[rows]))
    return {key: np.asarray(value) for key, value in out.items()}
