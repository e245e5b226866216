"""The batch-level latent logic of the TRL adapter, as pure functions of tensors (docs/trl.md).

TRL splits one *generation batch* (``generation_batch_size`` completions, groups of ``num_generations``
consecutive rows) over ``P`` processes, each holding a contiguous slice of ``B_local`` rows, and then over
``S = steps_per_generation`` shuffled micro-batches per process.  Group statistics must therefore be
computed on the gathered batch and sliced back, as TRL does for its advantages.  Every function here
takes an ``all_gather`` callable (``accelerator.gather`` in the trainer: concatenate every process's
``[B_local, ...]`` tensor in rank order) and the ``process_index``, so tests can drive it with fake ranks.

Nothing here re-implements a formula: the math is :mod:`latentx.objectives` (METHODS.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from latentx.objectives import (
    GRPOConfig,
    KLCovConfig,
    PolicyBatch,
    RelaxConfig,
    VerlBaselines,
    VerlConfig,
    exploration_term,
    grpo_loss,
    kl_cov_loss,
    relax_kl_set,
)
from latentx.objectives.verl import verl_step, verl_step_info

__all__ = [
    "AllGather",
    "local_rows",
    "group_ids",
    "VerlStep",
    "verl_rollout_step",
    "RelaxPlan",
    "relax_rollout_plan",
    "relax_group_shares",
    "relax_microbatch_terms",
    "kl_cov_token_sum_correction",
]

#: Concatenate every process's ``[B_local, ...]`` tensor along dim 0, in rank order (``accelerator.gather``).
AllGather = Callable[[Tensor], Tensor]


def local_rows(process_index: int, local_size: int) -> slice:
    """The rows of the gathered batch that belong to ``process_index`` (TRL's ``process_slice``)."""
    return slice(process_index * local_size, (process_index + 1) * local_size)


def group_ids(process_index: int, local_size: int, num_generations: int, device: torch.device | str = "cpu") -> Tensor:
    """Prompt-group id of each local row: TRL's sampler repeats each prompt ``num_generations`` times
    consecutively over the *global* generation batch, so global row g belongs to group ``g // num_generations``."""
    start = process_index * local_size
    return torch.div(torch.arange(start, start + local_size, device=device), num_generations, rounding_mode="floor")


# --------------------------------------------------------------------------------------------------
# VERL: advantage shaping at rollout time (METHODS.md §3 "verl")
# --------------------------------------------------------------------------------------------------


@dataclass
class VerlStep:
    """Result of :func:`verl_rollout_step`.

    Attributes:
        advantages: ``[B_local]`` float32 Â of this process's rows for every token but the bonus token
            (TRL's advantages, or with ``aux_in_reward`` the re-normalised ones).
        shaped: ``[B_local]`` float32 shaped advantages Â' of this process's rows.
        baselines: the EMA state after this step (identical on every process).
        metrics: python floats over the *gathered* batch (logged under ``latent/``).
    """

    advantages: Tensor
    shaped: Tensor
    baselines: VerlBaselines
    metrics: dict[str, float]


def verl_rollout_step(
    advantages: Tensor,
    er: Tensor,
    erv: Tensor,
    era: Tensor,
    baselines: VerlBaselines,
    cfg: VerlConfig,
    all_gather: AllGather,
    process_index: int,
    rewards: Tensor | None = None,
    num_generations: int | None = None,
    scale_rewards: str = "group",
) -> VerlStep:
    """Gather Â, ER, ERV, ERA of every process, run the core :func:`latentx.objectives.verl_step` on the
    *global* batch (its EMA baselines see the global batch means), slice this process's rows back.

    Args:
        advantages, er, erv, era: ``[B_local]`` of this process.
        baselines: the EMA state before this step.
        rewards: ``[B_global]`` rewards of the whole generation batch (already gathered, as TRL's
            ``_calculate_rewards`` returns them).  NaN entries (unscorable completions) are left out of the
            mean, and keep advantage 0 as in TRL.
        num_generations, scale_rewards: TRL's group size and normalisation (``"group"``: (r − mean)/(std +
            1e-4), ``"none"``: r − mean), needed with ``verl.aux_in_reward`` (GRPO re-runs on r + aux).
    """
    b = cfg.behaviour
    local_size = advantages.shape[0]
    adv_all, er_all, erv_all, era_all = (all_gather(x.detach().float().contiguous()) for x in (advantages, er, erv, era))
    reward_all = unscorable = group = None
    if rewards is not None:
        rewards = rewards.detach().float().to(adv_all.device)
        unscorable = ~torch.isfinite(rewards)
        mean = rewards[~unscorable].mean() if bool((~unscorable).any()) else torch.zeros((), device=rewards.device)
        reward_all = torch.where(unscorable, mean, rewards)  # same mean, no NaN
    if b.aux_in_reward:
        if scale_rewards not in ("group", "none"):
            raise ValueError(
                f"verl.aux_in_reward re-runs TRL's group normalisation on r + aux: scale_rewards must be 'group' or "
                f"'none', got {scale_rewards!r}"
            )
        if num_generations is None or reward_all is None:
            raise ValueError("verl.aux_in_reward needs the gathered rewards and num_generations")
        group = torch.arange(adv_all.shape[0], device=adv_all.device) // num_generations
    out = verl_step(
        adv_all, er_all, erv_all, era_all, baselines, cfg, reward_all, group,
        advantage_eps=1e-4, advantage_std=scale_rewards != "none",
    )
    base, shaped = out.advantages, out.shaped
    if unscorable is not None and bool(unscorable.any()) and not b.inert:
        base, shaped = (torch.where(unscorable, torch.zeros_like(x), x) for x in (base, shaped))
    metrics = {
        "er_mean": float(er_all.mean()) if er_all.numel() else 0.0,
        "erv_mean": float(erv_all.mean()) if erv_all.numel() else 0.0,
        "era_mean": float(era_all.mean()) if era_all.numel() else 0.0,
        **verl_step_info(out, baselines, prefix="verl/"),
    }
    rows = local_rows(process_index, local_size)
    return VerlStep(
        advantages=base[rows].to(advantages.device), shaped=shaped[rows].to(advantages.device),
        baselines=out.baselines, metrics=metrics,
    )


# --------------------------------------------------------------------------------------------------
# ReLaX: the group log-mean-exp across processes and micro-batches (METHODS.md §3 "relax")
# --------------------------------------------------------------------------------------------------


@dataclass
class RelaxPlan:
    """What every micro-batch of one generation batch needs for the ReLaX terms (lme_scope="group").

    L_xp is a log-mean-exp over each prompt group, and a group's responses end up in different
    micro-batches (TRL shuffles the generation batch) and processes.  Its exact gradient is
    ``Σ_i ∂L_xp/∂DSD_i · ∇DSD_i``: the weights ``∂L_xp/∂DSD_i`` are computed once per generation batch from
    the rollout-time DSDs of the *whole* batch (``exploration_term`` differentiated with autograd), and each
    micro-batch contributes ``Σ_{i ∈ mb} w_i · ∇DSD_i`` through its own forward (:func:`relax_group_shares`).

    Attributes:
        xp: L_xp of the whole generation batch (float).
        dsd_weight: ``[B_local]`` ∂L_xp/∂DSD_i of this process's rows (0 for detached "code" members).
        dsd_rollout: ``[B_local]`` the rollout-time DSD_i the weights were computed at.
        in_set: ``[B_local]`` bool, membership of the KL set I (``relax_kl_set`` on the rollout DSDs).
        set_size: |I| over the whole generation batch.
        metrics: python floats over the gathered batch.
    """

    xp: float
    dsd_weight: Tensor
    dsd_rollout: Tensor
    in_set: Tensor
    set_size: int
    metrics: dict[str, float]


def relax_rollout_plan(
    advantages: Tensor,
    dsd: Tensor,
    group: Tensor,
    cfg: RelaxConfig,
    all_gather: AllGather,
    process_index: int,
) -> RelaxPlan:
    """Gather Â, DSD (rollout forward, no grad) and group ids, compute L_xp, its weights and I on the
    whole generation batch with :func:`exploration_term` / :func:`relax_kl_set`, slice the local rows back."""
    local_size = advantages.shape[0]
    adv_all = all_gather(advantages.detach().float().contiguous())
    dsd_all = all_gather(dsd.detach().float().contiguous())
    group_all = all_gather(group.contiguous())
    in_set_all = relax_kl_set(adv_all, dsd_all, cfg.xi, cfg.kl_set)
    leaf = dsd_all.clone().requires_grad_(True)
    with torch.enable_grad():
        xp = exploration_term(adv_all, leaf, group_all, "group", detach=in_set_all if cfg.kl_set == "code" else None)
    if xp.requires_grad:
        (weight_all,) = torch.autograd.grad(xp, leaf, allow_unused=True)
        weight_all = torch.zeros_like(dsd_all) if weight_all is None else weight_all
    else:  # every DSD detached ("code" set covers the batch)
        weight_all = torch.zeros_like(dsd_all)
    rows = local_rows(process_index, local_size)
    metrics = {
        "relax/xp_rollout": float(xp.detach()),
        "relax/kl_set_size": float(in_set_all.sum()),
        "dsd_mean": float(dsd_all.mean()) if dsd_all.numel() else 0.0,
        "dsd_max": float(dsd_all.max()) if dsd_all.numel() else 0.0,
        "dsd_min": float(dsd_all.min()) if dsd_all.numel() else 0.0,
    }
    device = advantages.device
    return RelaxPlan(
        xp=float(xp.detach()),
        dsd_weight=weight_all[rows].to(device),
        dsd_rollout=dsd_all[rows].to(device),
        in_set=in_set_all[rows].to(device),
        set_size=int(in_set_all.sum()),
        metrics=metrics,
    )


def relax_group_shares(
    dsd: Tensor,
    kl_per_response: Tensor | None,
    dsd_weight: Tensor,
    dsd_rollout: Tensor,
    in_set: Tensor,
    xp: float,
    set_size: int,
    num_shares: int,
) -> tuple[Tensor, Tensor]:
    """One micro-batch's shares of L_xp and of mean_{i ∈ I} KL_i (lme_scope="group").

    ``num_shares`` = P · S micro-batches make up the generation batch; TRL averages the micro-batch losses
    (÷ gradient_accumulation_steps, DDP mean over processes), so the shares are scaled such that their
    mean has the value and the gradient of the whole-batch terms::

        xp_share = L_xp + num_shares · Σ_{i ∈ mb} w_i · (DSD_i − DSD_i^rollout)
        kl_share = num_shares / |I| · Σ_{i ∈ mb ∩ I} KL_i          (0 when I is empty)

    On-policy (the update forward equals the rollout forward) ``DSD_i = DSD_i^rollout`` up to rounding,
    so the mean of the xp shares is L_xp and their summed gradient is exactly ∇L_xp.

    Args:
        dsd: ``[b]`` DSD of the micro-batch's responses on the update forward (with grad).
        kl_per_response: ``[b]`` token-mean k3 KL_i (with grad), or None without a reference.
        dsd_weight, dsd_rollout, in_set: the micro-batch's rows of :class:`RelaxPlan`.
    """
    dsd = dsd.float()
    weight = dsd_weight.to(dsd.device, torch.float32)
    xp_share = xp + num_shares * (weight * (dsd - dsd_rollout.to(dsd.device, torch.float32))).sum()
    zero = torch.zeros((), dtype=torch.float32, device=dsd.device)
    if kl_per_response is None or set_size == 0:
        kl_share = zero
    else:
        kl_share = (num_shares / set_size) * torch.where(in_set.to(dsd.device), kl_per_response.float(), zero).sum()
    return xp_share, kl_share


def relax_microbatch_terms(
    advantages: Tensor, dsd: Tensor, group: Tensor, kl_per_response: Tensor | None, cfg: RelaxConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """lme_scope="microbatch" (the authors' code): L_xp, I and mean_{i∈I} KL_i of this micro-batch alone,
    with :func:`exploration_term` / :func:`relax_kl_set` on the update forward's DSDs.

    Returns ``(xp, kl_set_mean, in_set)``.
    """
    in_set = relax_kl_set(advantages, dsd, cfg.xi, cfg.kl_set)
    xp = exploration_term(advantages, dsd, group, "microbatch", detach=in_set if cfg.kl_set == "code" else None)
    zero = torch.zeros((), dtype=torch.float32, device=dsd.device)
    if kl_per_response is None:
        return xp, zero, in_set
    kl = torch.where(in_set, kl_per_response.float(), zero).sum() / in_set.sum().clamp(min=1).float()
    return xp, kl, in_set


# --------------------------------------------------------------------------------------------------
# KL-Cov: the edit of the clipped surrogate on the selected tokens (METHODS.md §3 "kl_cov")
# --------------------------------------------------------------------------------------------------


def kl_cov_token_sum_correction(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: KLCovConfig,
    clip_low: float,
    clip_high: float,
) -> Tensor:
    """``Σ_tokens (ℓ^KL-Cov_t − ℓ^GRPO_t)`` over the micro-batch, with gradient.

    TRL's per-token loss for the clipped loss types is the GRPO clipped surrogate; KL-Cov replaces it on the
    top-k covariance tokens.  The difference of the two latentx losses (both token-mean over the same
    tokens, no reference KL) times the number of valid tokens is that replacement as a token *sum*, which
    the trainer then normalises exactly like TRL normalises its own token sum for the configured loss_type.
    """
    clip = GRPOConfig(clip_low=clip_low, clip_high=clip_high, kl_coef=0.0)
    group = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    batch = PolicyBatch(logp=logp, old_logp=old_logp, mask=mask, advantages=advantages, group=group)
    token_mean_difference = kl_cov_loss(batch, cfg, clip).loss - grpo_loss(batch, clip).loss
    return token_mean_difference * mask.sum().clamp(min=1).float()
