"""The method registry: one list of names, and an objective registered from a user's own module."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from latentx.objectives import (
    CONFIGS,
    OBJECTIVES,
    REGISTRY,
    GRPOConfig,
    LossOutput,
    Objective,
    PolicyBatch,
    grpo_loss,
    register_objective,
)


@dataclass
class HalfConfig:
    scale: float = 0.5


class StepCounter:
    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])


def _half_loss(batch: PolicyBatch, cfg: HalfConfig, grpo: GRPOConfig, state: StepCounter) -> LossOutput:
    out = grpo_loss(batch, grpo)
    return LossOutput(out.loss * cfg.scale, {**out.terms, "loss": out.terms["loss"] * cfg.scale, "seen": state.steps})


def _flip(state, adv, signals, mask, rewards):
    return -adv, {"flipped": 1.0, "er_seen": float(signals["er"].mean())}


@pytest.fixture(autouse=True)
def _registry_restored():
    """Each test's registrations are undone afterwards: other test modules see only the built-ins."""
    before = dict(REGISTRY._specs)
    yield
    REGISTRY._specs.clear()
    REGISTRY._specs.update(before)


def _register() -> None:
    register_objective(
        name="test_half",
        config_class=HalfConfig,
        needs=lambda cfg, grpo: {"rank"},
        loss=_half_loss,
        new_state=lambda cfg, seed: StepCounter(),
        shape_advantages=_flip,
        on_optimizer_step=lambda state: {"seen": float(setattr(state, "steps", state.steps + 1) or state.steps)},
        overwrite=True,
    )


def _batch() -> PolicyBatch:
    logp = (-torch.rand(2, 3)).requires_grad_()
    return PolicyBatch(logp=logp, old_logp=logp.detach(), mask=torch.ones(2, 3, dtype=torch.bool),
                       advantages=torch.tensor([1.0, -1.0]), group=torch.tensor([0, 0]))


def test_builtin_names_come_from_one_registry_in_order() -> None:
    names = list(REGISTRY)[:6]
    assert names == ["grpo", "relax", "verl", "entropy_bonus", "kl_cov", "clip_cov"]
    from latentx.trainer import OBJECTIVES as trainer_names

    assert trainer_names is REGISTRY and list(OBJECTIVES) == list(REGISTRY) and list(CONFIGS) == list(REGISTRY)
    assert CONFIGS["grpo"] is None and REGISTRY["verl"].shape_advantages is not None


def test_user_registered_objective_runs_through_objective() -> None:
    _register()
    assert "test_half" in REGISTRY and CONFIGS["test_half"] is HalfConfig
    objective = Objective("test_half", config=HalfConfig(scale=0.25))
    assert objective.needs == frozenset({"rank"})
    adv, info = objective.shape(torch.tensor([1.0, -2.0]), {"er": torch.tensor([3.0, 5.0])}, torch.ones(2, 3, dtype=torch.bool))
    assert adv.tolist() == [-1.0, 2.0] and info == {"flipped": 1.0, "er_seen": 4.0}
    batch = _batch()
    full = grpo_loss(batch, GRPOConfig()).loss
    assert objective.loss(batch).loss.item() == pytest.approx(0.25 * full.item())
    assert objective.on_optimizer_step() == {"seen": 1.0}
    saved = objective.state_dict()
    assert saved == {"name": "test_half", "test_half": {"steps": 1}}
    again = Objective("test_half")
    again.load_state_dict(saved)
    assert again.state.steps == 1 and again.config == HalfConfig()
    with pytest.raises(ValueError, match="already registered"):
        register_objective(name="test_half", loss=_half_loss)
    with pytest.raises(ValueError, match="HalfConfig"):
        Objective("test_half", config=GRPOConfig())


def test_registration_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="python identifier"):
        register_objective(name="my objective", loss=_half_loss)
    with pytest.raises(ValueError, match="loss must be callable"):
        register_objective(name="test_bad", loss=None)
    with pytest.raises(ValueError, match="needs a state"):
        register_objective(name="test_bad", loss=_half_loss, shape_advantages=_flip)
    register_objective(name="test_odd_signal", loss=_half_loss, needs=lambda c, g: {"telepathy"}, overwrite=True)
    with pytest.raises(ValueError, match="unknown signals"):
        Objective("test_odd_signal").needs


def test_trainer_runs_a_user_registered_objective(tmp_path) -> None:
    from latentx.config import apply_overrides
    from latentx.trainer import TrainConfig, Trainer, resolve_config

    _register()
    cfg = apply_overrides(TrainConfig(), [
        "objective=test_half", "steps=1", f"out={tmp_path / 'run'}", "task.train_size=16",
        "warm_start.enabled=false", "eval.enabled=false", "rollout.prompts_per_step=2",
        "rollout.samples_per_prompt=4", "rollout.max_new_tokens=8", "rollout.micro_batch_size=8",
    ])
    trainer = Trainer(resolve_config(cfg), progress=False)
    row = trainer.train_step()
    assert row["flipped"] == 1.0 and row["seen"] == 1.0 and "er_mean" in row
    assert trainer.objective.state.steps == 1


def test_adapters_read_the_registry_and_name_what_they_lack() -> None:
    """The TRL and verl adapters validate against the one registry: an unknown name lists what they run, a
    user-registered objective they have no code path for is refused in one line that says so."""
    from latentx.integrations.verl.settings import OBJECTIVES as VERL_RUNS
    from latentx.integrations.verl.settings import parse_settings

    _register()
    assert parse_settings({"objective": "verl"}).objective == "verl"
    with pytest.raises(ValueError, match=r"latentx\.objective must be one of 'grpo', 'relax', 'verl', got 'ppo'"):
        parse_settings({"objective": "ppo"})
    with pytest.raises(ValueError) as err:
        parse_settings({"objective": "test_half"})
    message = str(err.value)
    assert "\n" not in message and "latentx.objective='test_half' is a registered objective" in message
    assert "the verl plugin has no code path for it" in message and f"it runs {', '.join(VERL_RUNS)}" in message

    pytest.importorskip("trl")
    from latentx.integrations.trl import LATENT_OBJECTIVES, LatentGRPOConfig

    assert set(LATENT_OBJECTIVES) <= set(REGISTRY) and set(VERL_RUNS) <= set(REGISTRY)
    with pytest.raises(ValueError) as err:
        LatentGRPOConfig(output_dir="unused", use_cpu=True, latent_objective="test_half")
    message = str(err.value)
    assert "\n" not in message and "latent_objective='test_half' is a registered objective" in message
    assert "the TRL adapter has no code path for it" in message and "`latentx train` runs every registered" in message
    with pytest.raises(ValueError, match="latent_objective must be one of 'grpo', 'relax'"):
        LatentGRPOConfig(output_dir="unused", use_cpu=True, latent_objective="ppo")
