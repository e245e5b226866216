"""A finished study run is evaluated from its checkpoint through the one evaluator, without a Trainer."""

from __future__ import annotations

import pytest

from latentx.config import apply_overrides
from latentx.study import evaluate_policy, evaluate_run
from latentx.trainer import TrainConfig, Trainer, resolve_config


def test_evaluate_run_loads_the_checkpoint_and_equals_the_trainer_evaluation(tmp_path, monkeypatch):
    cfg = resolve_config(apply_overrides(TrainConfig(), [
        "objective=grpo", "steps=1", f"out={tmp_path / 'run'}", "task.train_size=16", "warm_start.enabled=false",
        "eval.enabled=false", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6", "eval.instances=3", "eval.n=2", "eval.ks=[1,2]",
    ]))
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    expected = evaluate_policy(trainer)

    def no_trainer(self, *args, **kwargs):
        raise AssertionError("evaluate_run built a Trainer")

    monkeypatch.setattr(Trainer, "__init__", no_trainer)
    got = evaluate_run(cfg)
    assert got["correct_counts"] == expected["correct_counts"]
    assert got["mean@1_greedy"] == expected["mean@1_greedy"] and got["pass@k"] == expected["pass@k"]
    assert got["seed"] == cfg.eval.seed and got["n"] == 2
    with pytest.raises(Exception, match="no complete checkpoint"):
        evaluate_run(resolve_config(apply_overrides(cfg, [f"out={tmp_path / 'empty'}"])))
