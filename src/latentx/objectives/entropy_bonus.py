"""Entropy bonus baseline (METHODS.md section 3 "entropy_bonus"), with optional adaptive coefficient.

    L = L_pg (+ β_KL · k3) − c_H · token_mean H_t          (c_H = 0.001)

``H_t`` is the entropy of the current policy's next-token distribution at response token t (with grad),
token-mean aggregated over the micro-batch like L_pg; minimising L raises the entropy.

Adaptive mode (``adaptive=True``) follows the rule of Skywork-OR1 (He et al., arXiv:2505.22312) as TRL's
``GRPOTrainer`` implements it (``use_adaptive_entropy``, TRL 1.x):

- the coefficient applied during an optimizer step is the one set at the end of the previous step, and
  it is applied only if the entropy measured over the previous step was ``<= target_entropy`` (else 0);
  before the first measurement the bonus is off;
- at the end of each optimizer step the token-weighted mean entropy over all micro-batches of the step
  is measured: if ``<= target_entropy`` the coefficient grows by ``coef_lr``, else it shrinks by
  ``coef_lr``; it is clipped to ``[coef_min, coef_max]``.  ``coef`` is the initial value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from latentx.objectives.base import (
    register_objective,
    GRPOConfig,
    LossOutput,
    PolicyBatch,
    _check_range,
    masked_mean,
    to_floats,
    token_mean,
    valid_only,
)
from latentx.objectives.grpo import clipped_surrogate, reference_kl

__all__ = ["EntropyBonusConfig", "EntropyCoefController", "entropy_bonus_loss"]


@dataclass
class EntropyBonusConfig:
    """Entropy-bonus options.

    Attributes:
        coef: c_H (0.001); the initial coefficient in adaptive mode.
        adaptive: adapt c_H to keep the entropy at ``target_entropy`` (TRL / Skywork-OR1 rule).
        target_entropy: target mean token entropy in nats (required when adaptive).
        coef_lr: step by which c_H moves per optimizer step in adaptive mode (0.005, TRL's default).
        coef_min, coef_max: bounds of c_H in adaptive mode (0.0, 1.0).
    """

    coef: float = 0.001
    adaptive: bool = False
    target_entropy: float | None = None
    coef_lr: float = 0.005
    coef_min: float = 0.0
    coef_max: float = 1.0

    def __post_init__(self) -> None:
        _check_range("entropy_bonus.coef", self.coef, lo=0.0)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"entropy_bonus.adaptive must be a bool, got {self.adaptive!r}")
        if self.target_entropy is not None:
            _check_range("entropy_bonus.target_entropy", self.target_entropy, lo=0.0)
        elif self.adaptive:
            raise ValueError("entropy_bonus.target_entropy must be set when entropy_bonus.adaptive is true")
        _check_range("entropy_bonus.coef_lr", self.coef_lr, lo=0.0)
        _check_range("entropy_bonus.coef_min", self.coef_min, lo=0.0)
        _check_range("entropy_bonus.coef_max", self.coef_max, lo=0.0)
        if self.coef_max < self.coef_min:
            raise ValueError(
                f"entropy_bonus.coef_max must be >= entropy_bonus.coef_min, got {self.coef_max} < {self.coef_min}"
            )
        if self.adaptive and not (self.coef_min <= self.coef <= self.coef_max):
            raise ValueError(
                f"entropy_bonus.coef must lie in [coef_min, coef_max] = [{self.coef_min}, {self.coef_max}] "
                f"when adaptive, got {self.coef}"
            )


class EntropyCoefController:
    """Holds c_H across steps.  Call :meth:`observe` for every micro-batch and :meth:`step` once per
    optimizer step; :meth:`coef_to_apply` is the coefficient for the loss.  Fixed mode: always ``cfg.coef``.
    """

    def __init__(self, cfg: EntropyBonusConfig) -> None:
        self.cfg = cfg
        self.coef = float(cfg.coef)
        self.last_entropy = math.inf  # no measurement yet -> the adaptive bonus is off
        self._entropy_sum = 0.0
        self._token_count = 0.0

    def coef_to_apply(self) -> float:
        if not self.cfg.adaptive:
            return self.coef
        assert self.cfg.target_entropy is not None
        return self.coef if self.last_entropy <= self.cfg.target_entropy else 0.0

    def observe(self, entropy_sum: float, token_count: float) -> None:
        """Accumulate one micro-batch's entropy sum over valid tokens and its number of valid tokens."""
        self._entropy_sum += float(entropy_sum)
        self._token_count += float(token_count)

    def step(self) -> float:
        """End of an optimizer step: update c_H from the step's token-mean entropy; returns the new c_H.

        No-op (returns ``coef``) in fixed mode or when nothing was observed.
        """
        if not self.cfg.adaptive or self._token_count <= 0:
            self._entropy_sum, self._token_count = 0.0, 0.0
            return self.coef
        assert self.cfg.target_entropy is not None
        entropy = self._entropy_sum / self._token_count
        if entropy <= self.cfg.target_entropy:
            self.coef = min(self.coef + self.cfg.coef_lr, self.cfg.coef_max)
        else:
            self.coef = max(self.coef - self.cfg.coef_lr, self.cfg.coef_min)
        self.last_entropy = entropy
        self._entropy_sum, self._token_count = 0.0, 0.0
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {
            "coef": self.coef,
            "last_entropy": self.last_entropy,
            "entropy_sum": self._entropy_sum,
            "token_count": self._token_count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {"coef", "last_entropy", "entropy_sum", "token_count"}
        if set(state) != expected:
            raise ValueError(f"EntropyCoefController state must have keys {sorted(expected)}, got {sorted(state)}")
        self.coef = float(state["coef"])
        self.last_entropy = float(state["last_entropy"])
        self._entropy_sum = float(state["entropy_sum"])
        self._token_count = float(state["token_count"])


def entropy_bonus_loss(
    batch: PolicyBatch,
    cfg: EntropyBonusConfig,
    clip: GRPOConfig,
    coef: float | None = None,
) -> LossOutput:
    """``L = L_pg (+ β_KL·k3) − c_H · token_mean(entropy)`` (METHODS.md §3 "entropy_bonus").

    ``coef`` overrides ``cfg.coef`` (the :class:`EntropyCoefController` passes its current value).
    Needs ``batch.entropy``.  ``terms``: ``loss``, ``pg``, ``entropy`` (token mean), ``entropy_sum``,
    ``entropy_coef``, ``entropy_bonus`` (c_H · entropy), ``tokens`` and the GRPO diagnostics.
    """
    if batch.entropy is None:
        raise ValueError("entropy_bonus needs batch.entropy (token entropies of the current forward, with grad)")
    c_h = cfg.coef if coef is None else float(coef)
    per_token, stats = clipped_surrogate(
        batch.logp, batch.old_logp, batch.token_advantages(), batch.mask, clip.clip_low, clip.clip_high,
        clip.dual_clip or 0.0,
    )
    pg = token_mean(per_token, batch.mask)
    kl_penalty, kl_terms = reference_kl(batch, clip.kl_coef)
    entropy_tok = valid_only(batch.entropy, batch.mask)
    entropy = token_mean(entropy_tok, batch.mask)
    loss = pg + kl_penalty - c_h * entropy
    terms = {
        "loss": loss,
        "pg": pg,
        "entropy": entropy,
        "entropy_sum": entropy_tok.sum(),
        "entropy_coef": c_h,
        "entropy_bonus": c_h * entropy,
        "kl_penalty": kl_penalty,
        **kl_terms,
        **stats,
        "adv_mean": masked_mean(batch.token_advantages(), batch.mask),
        "tokens": batch.mask.sum(),
    }
    return LossOutput(loss=loss, terms=to_floats(terms))


def _entropy_bonus_objective_loss(
    batch: PolicyBatch, cfg: EntropyBonusConfig, grpo: GRPOConfig, controller: EntropyCoefController
) -> LossOutput:
    """The loss with the controller's coefficient; records the micro-batch's entropy for its next update
    (so call it on training micro-batches only)."""
    out = entropy_bonus_loss(batch, cfg, grpo, coef=controller.coef_to_apply())
    controller.observe(out.terms["entropy_sum"], out.terms["tokens"])
    return out


register_objective(
    name="entropy_bonus",
    config_class=EntropyBonusConfig,
    needs=lambda config, grpo: {"entropy"},
    loss=_entropy_bonus_objective_loss,
    new_state=lambda config, seed: EntropyCoefController(config),
    on_optimizer_step=lambda controller: {"entropy_coef": controller.step()},
    state_key="entropy_bonus",
    state_attribute="entropy_controller",
)
