"""The warm start: SFT lowers the loss, the cache is hit on the second call with identical weights."""

from __future__ import annotations

import json

import pytest
import torch

from latentx.models import build_tiny_model
from latentx.tasks import CountdownTask, FunctionTask, get_task
from latentx.warmstart import WarmStartConfig, sample_accuracy, warm_start, warm_start_key

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64}
SMALL_SFT = {"steps": 6, "batch_size": 4, "num_examples": 16, "warmup_steps": 1, "lr": 1e-2}


@pytest.fixture(scope="module")
def countdown():
    return get_task("countdown")


def test_warm_start_trains_then_hits_the_cache(countdown, tmp_path):
    cfg = WarmStartConfig(**SMALL_SFT)
    model, tokenizer = build_tiny_model(seed=0, **TINY)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model, info = warm_start(model, tokenizer, countdown, cfg, progress=False, cache_dir=tmp_path)
    assert info["cache_hit"] is False and info["steps"] == 6
    assert info["final_loss"] < info["first_loss"]
    assert info["sft_time_s"] > 0 and info["wall_time_s"] >= info["sft_time_s"]
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    entry = tmp_path / "warmstart" / info["key"]
    assert info["cache_path"] == str(entry) and (entry / "weights.safetensors").is_file()
    assert json.loads((entry / "key.json").read_text())["task"]["attributes"]["options"]["max_operands"] == 3
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".tmp")]  # no temp dir left behind

    fresh, _ = build_tiny_model(seed=0, **TINY)
    fresh, hit = warm_start(fresh, tokenizer, countdown, cfg, progress=False, cache_dir=tmp_path)
    assert hit["cache_hit"] is True and hit["key"] == info["key"] and hit["final_loss"] == info["final_loss"]
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_cache_key_depends_on_what_matters(countdown):
    cfg = WarmStartConfig(**SMALL_SFT)
    model, tokenizer = build_tiny_model(seed=0, **TINY)
    key, _ = warm_start_key(model, tokenizer, countdown, cfg)
    assert warm_start_key(model, tokenizer, countdown, WarmStartConfig(**SMALL_SFT))[0] == key
    assert warm_start_key(model, tokenizer, countdown, WarmStartConfig(**{**SMALL_SFT, "lr": 2e-2}))[0] != key
    assert warm_start_key(model, tokenizer, countdown, WarmStartConfig(**SMALL_SFT, enabled=True))[0] == key
    other_seed, _ = build_tiny_model(seed=1, **TINY)
    assert warm_start_key(other_seed, tokenizer, countdown, cfg)[0] != key
    four = get_task("countdown", num_operands=4)
    assert warm_start_key(model, tokenizer, four, cfg)[0] != key


def test_disabled_and_unsolvable(tmp_path):
    model, tokenizer = build_tiny_model(seed=0, **TINY)
    same, info = warm_start(model, tokenizer, get_task("countdown"), WarmStartConfig(enabled=False), cache_dir=tmp_path)
    assert same is model and info == {"enabled": False}
    no_solutions = FunctionTask("x", reward_fn=lambda i, r: 0.0, items=[(f"q{i}", "a") for i in range(30)])
    with pytest.raises(ValueError, match="provides no solutions"):
        warm_start(model, tokenizer, no_solutions, WarmStartConfig(**SMALL_SFT), progress=False, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("num_examples", 0), ("min_lr_ratio", 2.0)],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"warm_start.{field}"):
        WarmStartConfig(**{field: value})


def test_sample_accuracy_counts_correct_samples(countdown):
    model, tokenizer = build_tiny_model(seed=0, **TINY)
    instances = countdown.eval_instances(3, seed=0)
    scores = sample_accuracy(model, tokenizer, countdown, instances, k=2, max_new_tokens=4)
    assert scores == {"mean_at_k": 0.0, "pass_at_k": 0.0, "k": 2, "instances": 3}  # 4 characters cannot solve it

    class AlwaysRight(CountdownTask):
        def is_correct(self, instance, response):
            return True

    scores = sample_accuracy(model, tokenizer, AlwaysRight(), instances, k=3, max_new_tokens=2)
    assert scores["mean_at_k"] == 1.0 and scores["pass_at_k"] == 1.0
