"""Training objectives: GRPO and the latent / token-level exploration methods (METHODS.md section 3).

One module per method, each a pure function of batch tensors (``<name>_loss(batch, ...) -> LossOutput``);
state that lives across steps (VERL's EMA baselines, the adaptive entropy coefficient, Clip-Cov's random
generator) sits in small objects with ``state_dict()`` / ``load_state_dict()``.

The trainer uses the :class:`Objective` dispatch::

    objective = Objective("relax", grpo=GRPOConfig(), config=RelaxConfig())
    objective.needs                     # frozenset of signals to compute: "dsd_grad", "rank", "entropy", "ref"
    adv = objective.advantages(rewards, group)                          # GRPO / Dr. GRPO advantages [B]
    adv_tok, info = objective.shape_advantages(adv, er, erv, era, mask, rewards)   # "verl" only, once per step
    out = objective.loss(batch)         # LossOutput(loss, terms), per micro-batch
    out.loss.backward(); ...; optimizer.step(); objective.on_optimizer_step()
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor

from latentx.objectives.base import (
    ClipConfig,
    GRPOConfig,
    LossOutput,
    PolicyBatch,
    k3_kl,
    masked_mean,
    per_response_mean,
    token_mean,
)
from latentx.objectives.clip_cov import ClipCovConfig, clip_cov_loss, clip_cov_select
from latentx.objectives.entropy_bonus import EntropyBonusConfig, EntropyCoefController, entropy_bonus_loss
from latentx.objectives.grpo import clipped_surrogate, group_advantages, grpo_loss
from latentx.objectives.kl_cov import KLCovConfig, kl_cov_loss, kl_cov_select
from latentx.objectives.relax import RelaxConfig, exploration_term, relax_kl_set, relax_loss
from latentx.objectives.verl import (
    VerlBaselines,
    VerlConfig,
    VerlShaper,
    verl_loss,
    verl_shape,
    verl_token_advantages,
    verl_update_baselines,
)

__all__ = [
    "OBJECTIVES",
    "CONFIGS",
    "SIGNALS",
    "Objective",
    "PolicyBatch",
    "LossOutput",
    "GRPOConfig",
    "ClipConfig",
    "RelaxConfig",
    "VerlConfig",
    "EntropyBonusConfig",
    "KLCovConfig",
    "ClipCovConfig",
    "VerlBaselines",
    "VerlShaper",
    "EntropyCoefController",
    "group_advantages",
    "clipped_surrogate",
    "grpo_loss",
    "relax_loss",
    "exploration_term",
    "relax_kl_set",
    "verl_loss",
    "verl_shape",
    "verl_update_baselines",
    "verl_token_advantages",
    "entropy_bonus_loss",
    "kl_cov_loss",
    "kl_cov_select",
    "clip_cov_loss",
    "clip_cov_select",
    "masked_mean",
    "token_mean",
    "per_response_mean",
    "k3_kl",
]

MethodConfig = Union[RelaxConfig, VerlConfig, EntropyBonusConfig, KLCovConfig, ClipCovConfig, None]

#: name -> the pure loss function of that method.
OBJECTIVES: dict[str, Callable[..., LossOutput]] = {
    "grpo": grpo_loss,
    "relax": relax_loss,
    "verl": verl_loss,
    "entropy_bonus": entropy_bonus_loss,
    "kl_cov": kl_cov_loss,
    "clip_cov": clip_cov_loss,
}

#: name -> the method's own config class (GRPO has none beyond :class:`GRPOConfig`).
CONFIGS: dict[str, type | None] = {
    "grpo": None,
    "relax": RelaxConfig,
    "verl": VerlConfig,
    "entropy_bonus": EntropyBonusConfig,
    "kl_cov": KLCovConfig,
    "clip_cov": ClipCovConfig,
}

#: The signals an objective can ask the trainer for.
#:   "dsd_grad": ``batch.dsd`` from ``latentx.dynamics`` on the current forward's hidden states, with grad.
#:   "rank": ER / ERV / ERA per response of the rollout (no grad), for :meth:`Objective.shape_advantages`.
#:   "entropy": ``batch.entropy``, token entropies of the current forward, with grad.
#:   "ref": ``batch.ref_logp`` from a frozen reference model.
SIGNALS = ("dsd_grad", "rank", "entropy", "ref")


class Objective:
    """One training objective with its configs and cross-step state (METHODS.md §3).

    Args:
        name: a key of :data:`OBJECTIVES`.
        grpo: the shared clip / KL / advantage config (default ``GRPOConfig()``).
        config: the method's config (default: its class with default values; must be None for "grpo").
        seed: seed of Clip-Cov's token sampling generator.
    """

    def __init__(self, name: str, grpo: GRPOConfig | None = None, config: MethodConfig = None, seed: int = 0) -> None:
        if name not in OBJECTIVES:
            raise ValueError(f"objective name must be one of {', '.join(OBJECTIVES)}, got {name!r}")
        config_class = CONFIGS[name]
        if config is None and config_class is not None:
            config = config_class()
        if config_class is None and config is not None:
            raise ValueError(f"objective {name!r} takes no method config, got {type(config).__name__}")
        if config_class is not None and not isinstance(config, config_class):
            raise ValueError(f"objective {name!r} needs a {config_class.__name__}, got {type(config).__name__}")
        if grpo is not None and not isinstance(grpo, GRPOConfig):
            raise ValueError(f"grpo must be a GRPOConfig, got {type(grpo).__name__}")
        self.name = name
        self.grpo = grpo if grpo is not None else GRPOConfig()
        self.config = config
        self.verl_shaper = VerlShaper(config) if isinstance(config, VerlConfig) else None
        self.entropy_controller = EntropyCoefController(config) if isinstance(config, EntropyBonusConfig) else None
        self.generator = torch.Generator().manual_seed(seed) if name == "clip_cov" else None

    @property
    def needs(self) -> frozenset[str]:
        """The signals (see :data:`SIGNALS`) the trainer must put in the batch / compute for this objective."""
        needs: set[str] = set()
        if self.grpo.kl_coef > 0:
            needs.add("ref")
        if isinstance(self.config, RelaxConfig):
            needs.add("dsd_grad")
            if self.config.beta > 0:
                needs.add("ref")  # optional: without a reference the β term is 0 (reported in terms)
        elif isinstance(self.config, VerlConfig):
            needs.add("rank")
        elif isinstance(self.config, EntropyBonusConfig):
            needs.add("entropy")
        return frozenset(needs)

    def advantages(self, rewards: Tensor, group: Tensor) -> Tensor:
        """GRPO advantages ``[B]`` with this objective's ``grpo.advantage_std`` / ``grpo.advantage_eps``."""
        return group_advantages(rewards, group, eps=self.grpo.advantage_eps, std_normalize=self.grpo.advantage_std)

    def shape_advantages(
        self,
        advantages: Tensor,
        er: Tensor,
        erv: Tensor,
        era: Tensor,
        mask: Tensor,
        rewards: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """VERL only: shape the step's advantages (call once per rollout batch); see :meth:`VerlShaper.shape`."""
        if self.verl_shaper is None:
            raise ValueError(f"shape_advantages is only for the 'verl' objective, this one is {self.name!r}")
        return self.verl_shaper.shape(advantages, er, erv, era, mask, rewards)

    def loss(self, batch: PolicyBatch) -> LossOutput:
        """The loss of one training micro-batch.  For "entropy_bonus" it also records the micro-batch's
        entropy for the adaptive coefficient (so call it on training micro-batches only)."""
        cfg = self.config
        if isinstance(cfg, RelaxConfig):
            return relax_loss(batch, cfg, self.grpo)
        if isinstance(cfg, VerlConfig):
            return verl_loss(batch, self.grpo)
        if isinstance(cfg, EntropyBonusConfig):
            assert self.entropy_controller is not None
            out = entropy_bonus_loss(batch, cfg, self.grpo, coef=self.entropy_controller.coef_to_apply())
            self.entropy_controller.observe(out.terms["entropy_sum"], out.terms["tokens"])
            return out
        if isinstance(cfg, KLCovConfig):
            return kl_cov_loss(batch, cfg, self.grpo)
        if isinstance(cfg, ClipCovConfig):
            return clip_cov_loss(batch, cfg, self.grpo, generator=self.generator)
        return grpo_loss(batch, self.grpo)

    def on_optimizer_step(self) -> dict[str, float]:
        """Call after each optimizer step: updates the adaptive entropy coefficient.  Returns diagnostics."""
        if self.entropy_controller is not None:
            return {"entropy_coef": self.entropy_controller.step()}
        return {}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name}
        if self.verl_shaper is not None:
            state["verl"] = self.verl_shaper.state_dict()
        if self.entropy_controller is not None:
            state["entropy_bonus"] = self.entropy_controller.state_dict()
        if self.generator is not None:
            state["clip_cov_generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for objective {state.get('name')!r}, this one is {self.name!r}")
        if self.verl_shaper is not None:
            self.verl_shaper.load_state_dict(state["verl"])
        if self.entropy_controller is not None:
            self.entropy_controller.load_state_dict(state["entropy_bonus"])
        if self.generator is not None:
            self.generator.set_state(state["clip_cov_generator"])
