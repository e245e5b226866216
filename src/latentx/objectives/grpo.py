"""GRPO: group-relative advantages and the clipped surrogate (METHODS.md sections 0 and 3).

    Â_i = (r_i − mean_group(r)) / (std_group(r) + ε)          ("Dr. GRPO": no std division)
    ρ_t = π_θ(o_t) / π_old(o_t)
    L_pg = −token_mean min(ρ_t Â_t, clip(ρ_t, 1 − ε_lo, 1 + ε_hi) Â_t)
    L = L_pg + β_KL · token_mean k3,   k3 = e^δ − δ − 1,  δ = log π_ref − log π_θ

References: Shao et al. 2024 (DeepSeekMath, arXiv:2402.03300); Liu et al. 2025 ("Dr. GRPO").
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from latentx.objectives.base import (
    register_objective,
    GRPOConfig,
    LossOutput,
    PolicyBatch,
    k3_kl,
    masked_log_ratio,
    masked_mean,
    to_floats,
    token_mean,
    valid_only,
)

__all__ = ["group_advantages", "clipped_surrogate", "reference_kl", "surrogate_loss", "grpo_loss"]


def group_advantages(
    rewards: Tensor,
    group: Tensor,
    eps: float = 1e-6,
    std_normalize: bool = True,
) -> Tensor:
    """GRPO advantages, one per response (METHODS.md §0).

    ``Â_i = (r_i − mean_g) / (std_g + eps)`` where g is the group of response i, or ``r_i − mean_g``
    when ``std_normalize=False`` ("Dr. GRPO").

    ``std_g`` is the *unbiased* (Bessel-corrected, n − 1) standard deviation — ``torch.std``'s default and
    what both TRL (``nanstd``) and verl (``torch.std`` in ``compute_grpo_outcome_advantage``) use.

    Edge cases (no NaN): a group whose rewards are all equal gets advantage 0 for every member; a group
    with a single response gets advantage 0 (it has no baseline to compare to — verl instead uses
    mean 0 / std 1 there, i.e. Â = r).  Groups are identified by equal values of ``group``; they need not
    be contiguous.

    Args:
        rewards: ``[B]`` float rewards.
        group: ``[B]`` integer group ids.
        eps: ε added to the std (> 0).
        std_normalize: divide by the group std (GRPO) or not (Dr. GRPO).

    Returns:
        ``[B]`` float32 advantages (no grad).
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D [B] tensor, got {getattr(rewards, 'shape', type(rewards).__name__)}")
    if not isinstance(group, Tensor) or tuple(group.shape) != tuple(rewards.shape):
        raise ValueError(
            f"group must be a [B] tensor matching rewards {list(rewards.shape)}, got "
            f"{getattr(group, 'shape', type(group).__name__)}"
        )
    if group.is_floating_point() or group.is_complex() or group.dtype == torch.bool:
        raise ValueError(f"group must be an integer tensor, got dtype {group.dtype}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    r = rewards.detach().to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards has a non-finite value")
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)

    _, index = torch.unique(group, return_inverse=True)
    n_groups = int(index.max()) + 1
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, index, r) / count
    centred = r - mean[index]
    if std_normalize:
        sq = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, index, centred**2)
        std = torch.sqrt(sq / (count - 1).clamp(min=1))
        adv = centred / (std[index] + eps)  # all-equal group: 0 / (0 + eps) = 0
    else:
        adv = centred
    # A singleton group needs no special case: r − mean = 0 exactly, and its std is 0.
    return adv.to(torch.float32)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    adv_tok: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO/GRPO clipped surrogate loss (METHODS.md §3).

    ``loss_t = max(−Â_t ρ_t, −Â_t clip(ρ_t, 1 − clip_low, 1 + clip_high))`` (= −min(ρÂ, clip(ρ)Â)),
    with ``ρ_t = exp(logp_t − old_logp_t)`` (the log-ratio clamped to ±20 as in verl, for overflow safety);
    0 at padded tokens.  ``dual_clip = c > 1`` additionally caps the loss of tokens with Â < 0 at −c·Â
    (dual-clip PPO, Ye et al. 2020; the ReLaX authors' code uses c = 10, METHODS.md §3a); 0 = off.

    Args:
        logp, old_logp, adv_tok: ``[B, T]``; ``adv_tok`` is treated as a constant (no grad).
        mask: ``[B, T]`` bool.

    Returns:
        ``(per_token_loss [B, T] float32, stats)``; stats are detached scalar tensors over valid tokens
        (0 when there is none): ``clip_frac`` (tokens where the clipped branch is active, i.e. the token has
        no gradient), ``clip_frac_low`` / ``clip_frac_high`` (ratio below 1 − ε_lo with Â < 0 / above
        1 + ε_hi with Â > 0), ``ratio_mean``, ``approx_kl`` (token mean of log π_old − log π_θ).
    """
    log_ratio = masked_log_ratio(logp, old_logp, mask)  # 0 at padding -> ρ = 1; clamped to ±20
    adv = valid_only(adv_tok.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip:
        # Dual-clip PPO (Ye et al. 2020; the ReLaX authors' c = 10): for Â < 0 the loss is capped at −c·Â.
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    per_token = torch.where(mask, loss, torch.zeros_like(unclipped))

    with torch.no_grad():
        active = mask & (loss > unclipped) if not dual_clip else mask & (loss != unclipped)
        stats = {
            "clip_frac": masked_mean(active.float(), mask),
            "clip_frac_low": masked_mean((active & (adv < 0)).float(), mask),
            "clip_frac_high": masked_mean((active & (adv > 0)).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "approx_kl": masked_mean(-log_ratio, mask),
        }
    return per_token, stats


def reference_kl(batch: PolicyBatch, kl_coef: float, field: str = "grpo.kl_coef") -> tuple[Tensor, dict[str, Tensor]]:
    """The optional β_KL · token_mean k3 penalty to the frozen reference (METHODS.md §3).

    Returns ``(penalty, terms)``: ``penalty`` is 0 (a float32 scalar) when ``kl_coef == 0``; ``terms`` has
    ``kl`` (token-mean k3) whenever ``batch.ref_logp`` is given.  ``kl_coef > 0`` without
    ``batch.ref_logp`` is a ``ValueError`` naming ``field``.
    """
    zero = torch.zeros((), dtype=torch.float32, device=batch.logp.device)
    if batch.ref_logp is None:
        if kl_coef > 0:
            raise ValueError(f"{field} = {kl_coef} > 0 needs batch.ref_logp (log-probs of a frozen reference model)")
        return zero, {}
    per_token_k3 = k3_kl(valid_only(batch.logp, batch.mask), valid_only(batch.ref_logp.detach(), batch.mask))
    kl = token_mean(per_token_k3, batch.mask)
    penalty = kl_coef * kl if kl_coef > 0 else zero
    return penalty, {"kl": kl.detach()}


def surrogate_loss(
    batch: PolicyBatch, per_token: Tensor, stats: Mapping[str, Tensor], kl_coef: float, **method_terms: Tensor
) -> LossOutput:
    """``L = token_mean(per_token) + β_KL · token_mean k3`` as a :class:`LossOutput`: GRPO's loss, and that of
    every method that only edits GRPO's per-token surrogate (KL-Cov, Clip-Cov).

    ``terms``: ``loss``, ``pg``, the method's own ``method_terms``, ``kl_penalty`` (β_KL·k3), ``kl`` (if a
    reference is given), the surrogate's ``stats`` (:func:`clipped_surrogate`) and ``tokens``.
    """
    pg = token_mean(per_token, batch.mask)
    kl_penalty, kl_terms = reference_kl(batch, kl_coef)
    loss = pg + kl_penalty
    terms = {"loss": loss, "pg": pg, **method_terms, "kl_penalty": kl_penalty, **kl_terms, **stats,
             "tokens": batch.mask.sum()}
    return LossOutput(loss=loss, terms=to_floats(terms))


def grpo_loss(batch: PolicyBatch, cfg: GRPOConfig) -> LossOutput:
    """GRPO loss (METHODS.md §3 "grpo"): ``L = L_pg + β_KL · token_mean k3``.

    ``terms``: ``loss``, ``pg``, ``adv_mean``, ``kl_penalty`` (β_KL·k3), ``kl`` (if a reference is given),
    ``clip_frac``, ``clip_frac_low``, ``clip_frac_high``, ``ratio_mean``, ``approx_kl``, ``tokens``.
    """
    per_token, stats = clipped_surrogate(
        batch.logp, batch.old_logp, batch.token_advantages(), batch.mask, cfg.clip_low, cfg.clip_high,
        dual_clip=cfg.dual_clip or 0.0,
    )
    adv_mean = masked_mean(batch.token_advantages(), batch.mask)
    return surrogate_loss(batch, per_token, stats, cfg.kl_coef, adv_mean=adv_mean)


register_objective(
    name="grpo",
    loss=lambda batch, config, grpo, state: grpo_loss(batch, grpo),
)
