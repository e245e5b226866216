"""The latent monitor: per-batch statistics of the rollouts' hidden-state signals beside reward and entropy.

One implementation, used by the three training paths, so that they log the same numbers under the same
names (``latentx train`` writes them into ``metrics.jsonl``; the TRL adapter and the verl plugin log them
under ``latent/`` in their own dashboards):

- ``latentx train``: ``signals.monitor`` (on by default);
- TRL: ``LatentGRPOConfig(latent_monitor=True)`` (docs/trl.md);
- verl: ``latentx.monitor=true`` (docs/verl.md).

The signals are per response (one value per trajectory):

- ``er``, ``erv``, ``era``: effective rank, its velocity and acceleration (METHODS.md section 1,
  :func:`latentx.dynamics.rank_dynamics` with VERL's ``stride`` / ``window``);
- ``dsd``: the Koopman spectrum's dispersion (METHODS.md section 2, :func:`latentx.dynamics.dsd`) with a
  dictionary fitted on the first monitored batch, as ReLaX fits it, and frozen;
- ``entropy``: the response's mean token entropy (METHODS.md section 3, ``entropy_bonus``).

For each signal ``s`` :func:`monitor_metrics` reports, over the batch's responses with a finite value:

- ``s_mean`` and ``s_std`` (population standard deviation, as the trainer's other ``*_std``);
- ``s_q10``, ``s_q50``, ``s_q90``: quantiles, linearly interpolated (``torch.quantile``);
- ``s_reward_corr``: Pearson correlation of ``s`` with the response's reward over the responses where both
  are finite; left out of the row when it is undefined (fewer than 2 such responses, or either constant),
  never logged as NaN.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["MONITOR_SIGNALS", "QUANTILES", "monitor_metrics", "metric_names"]

#: The per-response signals the monitor reports, in logging order.
MONITOR_SIGNALS = ("er", "erv", "era", "dsd", "entropy")

#: The quantiles reported for every signal (as ``q10``, ``q50``, ``q90``).
QUANTILES = (0.1, 0.5, 0.9)


def metric_names(signal: str) -> list[str]:
    """The metric names :func:`monitor_metrics` may report for ``signal`` (``er_mean``, ..., ``er_reward_corr``)."""
    return [f"{signal}_mean", f"{signal}_std"] + [f"{signal}_q{round(q * 100)}" for q in QUANTILES] + [
        f"{signal}_reward_corr"
    ]


def _pearson(x: Tensor, y: Tensor) -> float | None:
    """Pearson correlation of two float64 vectors; None when undefined (n < 2 or a constant vector)."""
    if x.numel() < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = dx.pow(2).sum().sqrt(), dy.pow(2).sum().sqrt()
    # A vector constant up to rounding has no direction: its correlation is undefined, not ±1.
    if float(sx) <= 1e-12 * max(1.0, float(x.abs().max())) or float(sy) <= 1e-12 * max(1.0, float(y.abs().max())):
        return None
    return float((dx * dy).sum() / (sx * sy))


def monitor_metrics(values: Mapping[str, Tensor], rewards: Tensor | None = None) -> dict[str, float]:
    """Batch statistics of per-response signals (module docstring), as python floats.

    Args:
        values: signal name -> ``[B]`` tensor (any float dtype, any device), one value per response.  Names
            outside :data:`MONITOR_SIGNALS` are accepted and reported the same way.
        rewards: ``[B]`` rewards of the same responses, or None (no ``*_reward_corr``).  NaN rewards
            (unscorable responses) are left out of the correlations.

    A signal whose values are all non-finite is left out.  Raises ``ValueError`` naming the signal whose
    shape does not match.
    """
    out: dict[str, float] = {}
    reward = None
    if rewards is not None:
        reward = rewards.detach().reshape(-1).to("cpu", torch.float64)
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    for name, value in values.items():
        value = value.detach().to("cpu", torch.float64)
        if value.dim() != 1:
            raise ValueError(f"monitor signal {name!r} must be a [B] tensor (one value per response), got {list(value.shape)}")
        if reward is not None and reward.shape != value.shape:
            raise ValueError(f"monitor signal {name!r} has {value.numel()} values but rewards has {reward.numel()}")
        finite = torch.isfinite(value)
        kept = value[finite]
        if kept.numel() == 0:
            continue
        out[f"{name}_mean"] = float(kept.mean())
        out[f"{name}_std"] = float(kept.std(unbiased=False)) if kept.numel() > 1 else 0.0
        for level, quantile in zip(QUANTILES, torch.quantile(kept, q).tolist()):
            out[f"{name}_q{round(level * 100)}"] = float(quantile)
        if reward is not None:
            both = finite & torch.isfinite(reward)
            corr = _pearson(value[both], reward[both])
            if corr is not None and math.isfinite(corr):
                out[f"{name}_reward_corr"] = corr
    return out
