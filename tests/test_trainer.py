"""The RL loop on the built-in tiny model: one real step per objective, resume, crash safety, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from latentx.checkpoint import latest_checkpoint
from latentx.config import ConfigError, apply_overrides, from_dict
from latentx.tasks import FunctionTask, register_task
from latentx.trainer import OBJECTIVES, TrainConfig, Trainer, read_metrics, resolve_config

from digits_task import make_sum as _make  # registers the "test_digits" task


def small_config(tmp_path, objective: str = "relax", *extra: str) -> TrainConfig:
    return apply_overrides(
        TrainConfig(),
        [
            f"objective={objective}", "steps=1", f"out={tmp_path / objective}", "task.name=test_digits",
            "task.train_size=64", "warm_start.enabled=false", "eval.enabled=false",
            "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=16",
            "rollout.micro_batch_size=4", "checkpoint_every=1", "relax.fit_batch_size=4",
            "entropy_bonus.coef=0.01", "kl_cov.k_ratio=0.2", "clip_cov.ratio=0.2", "clip_cov.cov_low=-100",
            *extra,
        ],
    )


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_one_real_step_per_objective(tmp_path, objective):
    trainer = Trainer(resolve_config(small_config(tmp_path, objective)), progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    row = trainer.train_step()
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    assert changed, "an optimizer step with non-zero advantages must move the weights"
    for key in ("loss", "pg", "reward_mean", "entropy_mean", "er_mean", "erv_mean", "era_mean", "dsd_mean",
                "time_step", "time_signals", "grad_norm"):
        assert key in row and torch.isfinite(torch.tensor(row[key])), key
    assert row["adv_abs_mean"] > 0
    if objective == "relax":
        assert "xp" in row and trainer.dictionary is not None
    if objective == "verl":
        assert trainer.objective.verl_shaper is not None
    rows = read_metrics(trainer.run_dir)
    assert [r["step"] for r in rows] == [1]


def test_signals_vary_across_responses(tmp_path):
    """With the task-scaled stride and m, ER / ERV / ERA / DSD are not constant across responses."""
    cfg = resolve_config(small_config(tmp_path, "relax", "rollout.max_new_tokens=32"))
    assert cfg.verl.stride == 4 and cfg.relax.m == 10
    row = Trainer(cfg, progress=False).train_step()
    for key in ("er", "erv", "era", "dsd"):
        assert row[f"{key}_std"] > 1e-6, f"{key} is constant across responses"
    assert row["erv_mean"] != 0.0 and row["era_mean"] != 0.0


def _run(cfg: TrainConfig, steps: int) -> list[dict]:
    trainer = Trainer(resolve_config(apply_overrides(cfg, [f"steps={steps}"])), progress=False)
    trainer.run()
    return read_metrics(trainer.run_dir)


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


@pytest.mark.parametrize("objective", ["relax", "verl"])
def test_resume_equals_uninterrupted(tmp_path, objective):
    straight = small_config(tmp_path / "a", objective, "checkpoint_every=2")
    resumed = small_config(tmp_path / "b", objective, "checkpoint_every=2")
    full = _run(straight, 4)
    _run(resumed, 2)
    assert latest_checkpoint(resumed.run_dir).name == "step_000002"
    both = _run(resumed, 4)
    assert len(both) == 4
    assert _strip_times(both) == _strip_times(full)


def test_killed_mid_checkpoint_resumes_from_last_complete(tmp_path):
    cfg = small_config(tmp_path, "grpo", "checkpoint_every=1")
    _run(cfg, 2)
    ckpts = cfg.run_dir / "checkpoints"
    # Simulate a crash while writing step 3: a half-written temp folder, and LATEST never updated.
    half = ckpts / ".tmp-step_000003-abc"
    (half / "model").mkdir(parents=True)
    (half / "model" / "model.safetensors").write_bytes(b"\x00truncated")
    # ... and a second crash flavour: a renamed folder whose state file is missing.
    shutil.copytree(ckpts / "step_000002" / "model", ckpts / "step_000004" / "model")
    assert latest_checkpoint(cfg.run_dir).name == "step_000002"
    (ckpts / "LATEST").write_text("step_000009\n")  # dangling pointer
    assert latest_checkpoint(cfg.run_dir).name == "step_000002"
    trainer = Trainer(resolve_config(apply_overrides(cfg, ["steps=3"])), progress=False)
    assert trainer.step == 2
    trainer.run()
    assert not half.exists(), "stale temp folders are cleaned up on the next checkpoint"
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [1, 2, 3]


def test_all_equal_rewards_give_zero_advantage_and_no_nan(tmp_path):
    register_task(
        "test_constant",
        lambda **o: FunctionTask("test_constant", reward_fn=lambda inst, resp: 1.0, generate=_make, **o),
        overwrite=True,
    )
    cfg = small_config(tmp_path, "relax", "task.name=test_constant")
    row = Trainer(resolve_config(cfg), progress=False).train_step()
    assert row["adv_abs_mean"] == 0.0 and row["reward_mean"] == 1.0
    assert all(v == v for v in row.values() if isinstance(v, float))


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="relax.alpha"):
        from_dict(TrainConfig, {"relax": {"alpha": -1}})
    with pytest.raises(ConfigError, match="unknown config key 'rollout.temprature'"):
        from_dict(TrainConfig, {"rollout": {"temprature": 1.0}})
    with pytest.raises(ConfigError, match="objective must be one of"):
        from_dict(TrainConfig, {"objective": "ppo"})


def test_model_without_hidden_states_is_a_clear_error(tmp_path):
    from latentx.rollout import policy_forward, sample_responses

    trainer = Trainer(resolve_config(small_config(tmp_path, "grpo")), progress=False)
    seqs = sample_responses(trainer.model, trainer.tokenizer, ["1 2>"], 2, 4)

    class NoHidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.hidden_states = None
            return out

    with pytest.raises(ValueError, match="no hidden states"):
        policy_forward(NoHidden(trainer.model), seqs, want_hidden=True)


def test_config_yaml_records_resolved_signal_scale(tmp_path):
    cfg = small_config(tmp_path, "verl", "steps=1")
    trainer = Trainer(resolve_config(cfg), progress=False)
    trainer.run()
    import yaml

    saved = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
    assert saved["verl"]["stride"] == 2 and saved["relax"]["m"] == 5
    assert saved["signals"]["auto_scale"] is False
    assert (cfg.run_dir / "plots" / "reward.png").is_file()
    assert json.loads((cfg.run_dir / "summary.json").read_text())["steps"] == 1


def test_refit_step_computes_dsd_with_the_new_dictionary_only(tmp_path):
    """relax.refit_every=1: the second rollout refits, and its DSD comes from the new dictionary alone."""
    trainer = Trainer(resolve_config(small_config(tmp_path, "relax", "relax.refit_every=1")), progress=False)
    events: list[tuple[str, int]] = []
    fit, dsd = trainer._fit_dictionary, trainer._dsd

    def logged_fit(trajectories):
        out = fit(trajectories)
        events.append(("fit", id(trainer.dictionary)))
        return out

    def logged_dsd(hidden, mask):
        events.append(("dsd", id(trainer.dictionary)))
        return dsd(hidden, mask)

    trainer._fit_dictionary, trainer._dsd = logged_fit, logged_dsd
    trainer.train_step()
    first = trainer.dictionary
    events.clear()
    ro = trainer.rollout()  # step 1: refit_due(1, 1)
    assert trainer.dictionary is not first and trainer.dictionary.fitted_step_ == 1
    assert events[0][0] == "fit" and all(who == id(trainer.dictionary) for _, who in events), events
    assert ro.signals["dsd"].shape == (8,) and torch.isfinite(ro.signals["dsd"]).all()
