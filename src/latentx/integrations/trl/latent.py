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

from latentx.objectives.relax import BatchTotals, RelaxPlan, RelaxTerms, relax_batch_plan, relax_terms
from latentx.objectives import (
    GRPOConfig,
    KLCovConfig,
    PolicyBatch,
    RelaxConfig,
    VerlBaselines,
    VerlConfig,
    VerlInputs,
    grpo_loss,
    kl_cov_loss,
)
from latentx.objectives.verl import verl_step, verl_step_info

__all__ = [
    "AllGather",
    "local_rows",
    "group_ids",
    "VerlStep",
    "verl_rollout_step",
    "relax_rollout_plan",
    "relax_microbatch_share",
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
    inputs = VerlInputs(
        adv_all, er_all, erv_all, era_all, reward_all, group, advantage_eps=1e-4, advantage_std=scale_rewards != "none"
    )
    out = verl_step(inputs, baselines, cfg)
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


def relax_rollout_plan(
    advantages: Tensor,
    dsd: Tensor,
    group: Tensor,
    cfg: RelaxConfig,
    all_gather: AllGather,
    process_index: int,
    lengths: Tensor | None = None,
    length_norm: int = 0,
) -> RelaxPlan:
    """Gather Â, the rollout DSDs, group ids and response lengths of every process, decide I and the
    batch-wide normalisers on the whole generation batch (:func:`latentx.objectives.relax.relax_batch_plan`),
    and slice this process's rows back (``in_set``, ``group_lse``, ``group_count``; ``totals`` and
    ``metrics`` are the generation batch's).  Each micro-batch then adds ``P·S ·`` :func:`relax_terms` of its
    rows (see :func:`relax_microbatch_share`)."""
    local_size = advantages.shape[0]
    adv_all = all_gather(advantages.detach().float().contiguous())
    dsd_all = all_gather(dsd.detach().float().contiguous())
    group_all = all_gather(group.contiguous())
    if lengths is None:
        lengths = torch.ones(local_size, dtype=torch.long, device=advantages.device)
    lengths_all = all_gather(lengths.contiguous())
    plan = relax_batch_plan(adv_all, dsd_all, group_all, lengths_all, cfg, length_norm)
    rows = local_rows(process_index, local_size)
    device = advantages.device
    return RelaxPlan(
        in_set=plan.in_set[rows].to(device),
        group_lse=plan.group_lse[rows].to(device),
        group_count=plan.group_count[rows].to(device),
        totals=plan.totals,
        xp=plan.xp,
        xi_used=plan.xi_used,
        metrics={f"relax/{k}" if not k.startswith("dsd") else k: v for k, v in plan.metrics.items()},
    )


def relax_microbatch_share(
    advantages: Tensor,
    dsd: Tensor,
    group: Tensor,
    mask: Tensor,
    in_set: Tensor,
    group_lse: Tensor,
    group_count: Tensor,
    totals: BatchTotals,
    cfg: RelaxConfig,
    num_shares: int,
    logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> RelaxTerms:
    """One micro-batch's ``α·L_xp + β·KL_I`` as TRL accumulates it: ``num_shares`` = P·S micro-batches make up
    the generation batch and TRL averages their losses (÷ gradient accumulation, DDP mean over processes), so
    :func:`relax_terms`' summable shares are multiplied by ``num_shares``; their mean is then the whole batch's
    value and their summed gradient its gradient (split groups: first-order around the rollout, exact
    on-policy)."""
    terms = relax_terms(
        advantages, dsd, group, mask, in_set, cfg, totals, logp=logp, ref_logp=ref_logp,
        group_lse=group_lse, group_count=group_count,
    )
    return RelaxTerms(
        loss=terms.loss * num_shares, xp=terms.xp * num_shares, kl=terms.kl * num_shares, in_set=terms.in_set
    )


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
