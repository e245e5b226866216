"""Clip-Cov baseline (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv:2505.22617;
METHODS.md section 3 "clip_cov").

Per valid token t (detached), ``cov_t = (log π_θ(o_t) − mean_logp) · (Â_t − mean_adv)`` over the batch's
valid tokens.  Candidates are the valid tokens with ``cov_low <= cov_t <= cov_high`` whose clipped
surrogate is not already on its clipped (zero-gradient) branch — the same exclusion as verl's
``compute_policy_loss_clip_cov`` (which uses the open interval; the ends differ only on a null set).
A uniformly random subset of ``min(max(1, ⌊ratio · N⌋), #candidates)`` candidates (N = valid tokens;
none if ratio = 0) has its gradient detached: the token's loss value is unchanged, its gradient is 0.
verl zeroes those tokens' loss instead, which gives the same gradient but a smaller reported loss.
The randomness comes from a ``torch.Generator`` for reproducibility.
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
from latentx.objectives.kl_cov import token_covariance

__all__ = ["ClipCovConfig", "clip_cov_candidates", "clip_cov_select", "clip_cov_loss"]


@dataclass
class ClipCovConfig:
    """Clip-Cov options.

    Attributes:
        ratio: fraction of the valid tokens whose gradient is detached (0.0002, verl's default).
        cov_low, cov_high: the band [cov_low, cov_high] of cov_t that makes a token a candidate (1.0, 5.0).
    """

    ratio: float = 0.0002
    cov_low: float = 1.0
    cov_high: float = 5.0

    def __post_init__(self) -> None:
        _check_range("clip_cov.ratio", self.ratio, lo=0.0, hi=1.0)
        _check_range("clip_cov.cov_low", self.cov_low)
        _check_range("clip_cov.cov_high", self.cov_high)
        if self.cov_high < self.cov_low:
            raise ValueError(
                f"clip_cov.cov_high must be >= clip_cov.cov_low, got cov_low={self.cov_low}, cov_high={self.cov_high}"
            )


def clip_cov_candidates(
    logp: Tensor,
    old_logp: Tensor,
    adv_tok: Tensor,
    mask: Tensor,
    cfg: ClipCovConfig,
    clip: GRPOConfig,
) -> Tensor:
    """Bool ``[B, T]``: valid tokens with cov_t in [cov_low, cov_high] that the PPO clip does not already cut."""
    cov = token_covariance(logp, adv_tok, mask)
    with torch.no_grad():
        ratio = torch.exp(masked_log_ratio(logp, old_logp, mask))
        adv = valid_only(adv_tok, mask)
        already_clipped = -adv * torch.clamp(ratio, 1.0 - clip.clip_low, 1.0 + clip.clip_high) > -adv * ratio
    return mask & ~already_clipped & (cov >= cfg.cov_low) & (cov <= cfg.cov_high)


def clip_cov_select(
    candidates: Tensor, mask: Tensor, cfg: ClipCovConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Bool ``[B, T]``: the random subset of the ``candidates`` (:func:`clip_cov_candidates`) whose gradient
    is detached, ``min(max(1, ⌊ratio · N⌋), #candidates)`` of them with N the valid tokens of ``mask``."""
    n_valid = int(mask.sum())
    selected = torch.zeros_like(mask)
    if cfg.ratio <= 0 or n_valid == 0:
        return selected
    budget = max(1, int(cfg.ratio * n_valid))
    candidates = torch.nonzero(candidates.flatten()).flatten()
    if candidates.numel() == 0:
        return selected
    rng_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.randperm(candidates.numel(), generator=generator, device=rng_device).to(candidates.device)
    chosen = candidates[order[: min(budget, candidates.numel())]]
    flat = selected.flatten()
    flat[chosen] = True
    return flat.view_as(mask)


def clip_cov_loss(
    batch: PolicyBatch,
    cfg: ClipCovConfig,
    clip: GRPOConfig,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Clip-Cov loss (METHODS.md §3 "clip_cov"): the GRPO loss with the selected tokens' gradient detached.

    ``terms``: ``loss``, ``pg``, ``clip_cov_candidates``, ``clip_cov_detached`` (counts),
    ``clip_cov_frac`` (detached / valid tokens), ``cov_mean`` and the GRPO diagnostics.
    """
    mask = batch.mask
    adv = batch.token_advantages()
    candidates = clip_cov_candidates(batch.logp, batch.old_logp, adv, mask, cfg, clip)
    detached = clip_cov_select(candidates, mask, cfg, generator)
    logp = torch.where(detached, batch.logp.detach(), batch.logp)

    per_token, stats = clipped_surrogate(logp, batch.old_logp, adv, mask, clip.clip_low, clip.clip_high, clip.dual_clip or 0.0)
    return surrogate_loss(
        batch, per_token, stats, clip.kl_coef,
        clip_cov_candidates=candidates.sum(),
        clip_cov_detached=detached.sum(),
        clip_cov_frac=masked_mean(detached.float(), mask),
        cov_mean=masked_mean(token_covariance(batch.logp, adv, mask), mask),
    )


register_objective(
    name="clip_cov",
    config_class=ClipCovConfig,
    loss=lambda batch, config, grpo, generator: clip_cov_loss(batch, config, grpo, generator=generator),
    new_state=lambda config, seed: torch.Generator().manual_seed(seed),  # the token sampling generator
    state_key="clip_cov_generator",
    save_state=lambda generator: generator.get_state(),
    load_state=lambda generator, saved: generator.set_state(saved),
    state_attribute="generator",
)
