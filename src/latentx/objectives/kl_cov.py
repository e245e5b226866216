"""KL-Cov baseline (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv:2505.22617;
METHODS.md section 3 "kl_cov").

Per valid token t of the micro-batch (all detached):

    cov_t = (log π_θ(o_t) − mean_logp) · (Â_t − mean_adv)        (means over the batch's valid tokens)

The k = max(1, ⌊k_ratio · N⌋) tokens with the largest cov_t (N valid tokens; none if k_ratio = 0 or
N = 0 — the rounding verl uses) get the surrogate

    loss_t = −Â_t ρ_t + c_kl · |log π_θ(o_t) − log π_old(o_t)|

and every other valid token keeps the clipped GRPO surrogate (METHODS.md: all objectives share it).
verl's ``compute_policy_loss_kl_cov`` instead gives the *unselected* tokens the unclipped −Â·ρ;
``clip_unselected=False`` reproduces that.  Aggregation: token mean, + the optional β_KL·k3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latentx.objectives.base import (
    register_objective,
    GRPOConfig,
    LossOutput,
    PolicyBatch,
    _check_range,
    masked_log_ratio,
    masked_mean,
    valid_only,
)
from latentx.objectives.grpo import clipped_surrogate, surrogate_loss

__all__ = ["KLCovConfig", "token_covariance", "kl_cov_select", "kl_cov_loss", "kl_cov_inert_reason"]


@dataclass
class KLCovConfig:
    """KL-Cov options.

    Attributes:
        k_ratio: fraction of the valid tokens that get the KL penalty (0.0002, verl's default; Cui et al.
            used 0.002 for 7B models).  0 disables the selection (plain GRPO).
        coef: c_kl, weight of |log π_θ − log π_old| on the selected tokens (1.0).
        clip_unselected: True (default) keeps the clipped surrogate on unselected tokens; False uses the
            unclipped −Â·ρ there, as verl's implementation does.
    """

    k_ratio: float = 0.0002
    coef: float = 1.0
    clip_unselected: bool = True

    def __post_init__(self) -> None:
        _check_range("kl_cov.k_ratio", self.k_ratio, lo=0.0, hi=1.0)
        _check_range("kl_cov.coef", self.coef, lo=0.0)
        if not isinstance(self.clip_unselected, bool):
            raise ValueError(f"kl_cov.clip_unselected must be a bool, got {self.clip_unselected!r}")


def token_covariance(logp: Tensor, adv_tok: Tensor, mask: Tensor) -> Tensor:
    """``cov_t = (logp_t − mean logp)(Â_t − mean Â)`` over the valid tokens, detached float32 ``[B, T]``,
    0 at padding."""
    logp = valid_only(logp.detach(), mask)
    adv = valid_only(adv_tok.detach(), mask)
    cov = (logp - masked_mean(logp, mask)) * (adv - masked_mean(adv, mask))
    return torch.where(mask, cov, torch.zeros_like(cov))


def kl_cov_select(logp: Tensor, adv_tok: Tensor, mask: Tensor, k_ratio: float) -> Tensor:
    """Bool ``[B, T]``: the ``max(1, ⌊k_ratio·N⌋)`` valid tokens with the largest cov_t (none if k_ratio = 0)."""
    n_valid = int(mask.sum())
    if k_ratio <= 0 or n_valid == 0:
        return torch.zeros_like(mask)
    k = max(1, int(n_valid * k_ratio))
    cov = token_covariance(logp, adv_tok, mask)
    scores = torch.where(mask, cov, torch.full_like(cov, -torch.inf)).flatten()
    top = torch.topk(scores, k, largest=True).indices
    selected = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    selected[top] = True
    return selected.view_as(mask)


def kl_cov_loss(batch: PolicyBatch, cfg: KLCovConfig, clip: GRPOConfig) -> LossOutput:
    """KL-Cov loss (METHODS.md §3 "kl_cov"); see the module docstring.

    ``terms``: ``loss``, ``pg``, ``kl_cov_selected`` (count), ``kl_cov_abs_kl`` (mean |log π_θ − log π_old|
    over the selected tokens), ``cov_mean``, ``cov_max`` and the GRPO diagnostics.
    """
    mask = batch.mask
    adv = batch.token_advantages()
    selected = kl_cov_select(batch.logp, adv, mask, cfg.k_ratio)

    per_token_clipped, stats = clipped_surrogate(batch.logp, batch.old_logp, adv, mask, clip.clip_low, clip.clip_high, clip.dual_clip or 0.0)
    log_ratio = masked_log_ratio(batch.logp, batch.old_logp, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    penalised = unclipped + cfg.coef * log_ratio.abs()
    others = per_token_clipped if cfg.clip_unselected else unclipped
    per_token = torch.where(selected, penalised, others)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))

    cov = token_covariance(batch.logp, adv, mask)
    return surrogate_loss(
        batch, per_token, stats, clip.kl_coef,
        kl_cov_selected=selected.sum(),
        kl_cov_abs_kl=masked_mean(log_ratio.detach().abs(), selected),
        cov_mean=masked_mean(cov, mask),
        cov_max=cov[mask].max() if bool(mask.any()) else torch.zeros((), device=cov.device),
    )


def kl_cov_inert_reason(cfg: KLCovConfig, updates_per_step: int) -> str | None:
    """Why KL-Cov would train exactly like GRPO with these settings, or None when it acts.

    On-policy (one optimizer pass per rollout batch, log π_θ = log π_old at the update) the penalty
    |log π_θ − log π_old| is 0 with zero (sub)gradient and ρ = 1, so the selected tokens' unclipped −Â·ρ
    has the clipped surrogate's gradient: the loss and its gradient are GRPO's, bit for bit.
    """
    if cfg.k_ratio == 0 or cfg.coef == 0:
        return f"kl_cov.k_ratio = {cfg.k_ratio:g}, kl_cov.coef = {cfg.coef:g}: no token is penalised, the run is GRPO"
    if updates_per_step <= 1:
        return ("KL-Cov acts only off-policy: with one update per rollout batch (optim.updates_per_step = 1) its "
                "penalty |log pi - log pi_old| is 0 with zero gradient and the run trains exactly as GRPO; "
                "set optim.updates_per_step >= 2 (TRL: num_iterations >= 2) for the term to act")
    return None


register_objective(
    name="kl_cov",
    config_class=KLCovConfig,
    loss=lambda batch, config, grpo, state: kl_cov_loss(batch, config, grpo),
    inert_reason=lambda config, grpo, updates_per_step: kl_cov_inert_reason(config, updates_per_step),
)
