"""latentx.monitor.monitor_metrics: the batch statistics every training path logs, against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentx.monitor import MONITOR_SIGNALS, metric_names, monitor_metrics


def test_statistics_equal_numpy():
    gen = torch.Generator().manual_seed(0)
    values = {name: torch.randn(37, generator=gen) * (i + 1) + i for i, name in enumerate(MONITOR_SIGNALS)}
    rewards = torch.rand(37, generator=gen)
    out = monitor_metrics(values, rewards)
    assert set(out) == {key for name in MONITOR_SIGNALS for key in metric_names(name)}
    r = rewards.double().numpy()
    for name, value in values.items():
        v = value.double().numpy()
        assert out[f"{name}_mean"] == pytest.approx(v.mean(), rel=1e-12)
        assert out[f"{name}_std"] == pytest.approx(v.std(), rel=1e-12)
        for q in (10, 50, 90):
            assert out[f"{name}_q{q}"] == pytest.approx(np.quantile(v, q / 100), rel=1e-12)
        assert out[f"{name}_reward_corr"] == pytest.approx(np.corrcoef(v, r)[0, 1], rel=1e-10)


def test_non_finite_values_and_undefined_correlations_are_left_out():
    er = torch.tensor([1.0, 2.0, float("nan"), 4.0])
    rewards = torch.tensor([0.0, 1.0, 1.0, float("nan")])
    out = monitor_metrics({"er": er, "dsd": torch.full((4,), float("inf")), "era": torch.ones(4)}, rewards)
    assert out["er_mean"] == pytest.approx(7 / 3) and out["er_q50"] == 2.0
    assert out["er_reward_corr"] == pytest.approx(1.0)  # the two responses with a finite value and reward
    assert not any(key.startswith("dsd_") for key in out)  # no finite DSD at all
    assert out["era_std"] == 0.0 and "era_reward_corr" not in out  # a constant signal has no correlation
    assert "er_reward_corr" not in monitor_metrics({"er": er}, torch.ones(4))  # nor a constant reward
    assert "er_reward_corr" not in monitor_metrics({"er": er})  # no rewards given
    assert all(math.isfinite(v) for v in out.values())


def test_bad_shapes_name_the_signal():
    with pytest.raises(ValueError, match="monitor signal 'er' must be a \\[B\\] tensor"):
        monitor_metrics({"er": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="monitor signal 'dsd' has 3 values but rewards has 4"):
        monitor_metrics({"dsd": torch.zeros(3)}, torch.zeros(4))
