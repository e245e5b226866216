"""`latentx train`'s monitor (signals.monitor): the same statistics, under the same names, as TRL / verl."""

from __future__ import annotations

import numpy as np
import pytest

from latentx.config import apply_overrides, from_dict
from latentx.monitor import MONITOR_SIGNALS, metric_names
from latentx.trainer import TrainConfig, Trainer, resolve_config
from test_trainer import small_config


def test_grpo_rows_carry_the_monitor_statistics(tmp_path):
    trainer = Trainer(resolve_config(small_config(tmp_path, "grpo", "rollout.max_new_tokens=32")), progress=False)
    seen = []
    rollout = trainer.rollout
    trainer.rollout = lambda: seen.append(rollout()) or seen[-1]
    row = trainer.train_step()
    (ro,) = seen
    rewards = ro.rewards.double().cpu().numpy()
    values = {"entropy": ro.entropy, **ro.signals}
    assert set(values) == set(MONITOR_SIGNALS)
    for name, value in values.items():
        v = value.double().cpu().numpy()
        assert row[f"{name}_mean"] == pytest.approx(v.mean(), rel=1e-6)
        assert row[f"{name}_std"] == pytest.approx(v.std(), rel=1e-5)
        for q in (10, 50, 90):
            assert row[f"{name}_q{q}"] == pytest.approx(np.quantile(v, q / 100), rel=1e-6)
        if v.std() > 1e-6 and rewards.std() > 0:
            assert row[f"{name}_reward_corr"] == pytest.approx(np.corrcoef(v, rewards)[0, 1], abs=1e-4)
    assert {key for name in MONITOR_SIGNALS for key in metric_names(name)} - set(row) <= {
        f"{name}_reward_corr" for name in MONITOR_SIGNALS
    }


def test_monitor_off_and_the_old_option_name(tmp_path):
    row = Trainer(resolve_config(small_config(tmp_path, "grpo", "signals.monitor=false")), progress=False).train_step()
    assert "entropy_q50" in row and not any(key.startswith(("er_", "dsd_")) for key in row)
    old = from_dict(TrainConfig, {"signals": {"track": False}})
    assert old.signals.monitor is False and old.signals.track is None


def test_trackers_put_the_monitor_statistics_under_latent():
    from latentx.reporting import tag_for

    for name in MONITOR_SIGNALS:
        for key in metric_names(name)[2:]:  # quantiles and correlation: the names TRL / verl log under latent/
            assert tag_for(key) == f"latent/{key}", key
