"""ReLaX in verl's actor update: verl's ``ppo_loss`` plus ``α·L_xp + β·mean_{i∈I} KL_i`` (METHODS.md §3).

verl 0.9.1 builds the actor's loss as ``partial(ppo_loss, config=actor_config)``
(``verl/workers/engine_workers.py``, ``ActorRolloutRefWorker.init_model``) and the FSDP engine calls it once
per micro-batch as ``loss_fn(model_output=..., data=micro_batch, dp_group=...)`` right after the forward
(``FSDPEngineWithLMHead.forward_step``).  :func:`relax_ppo_loss` has the same signature: it keeps verl's
clipped surrogate, entropy and KL-loss exactly as configured, and adds the ReLaX terms computed by
:func:`latentx.objectives.relax.exploration_term` / :func:`relax_kl_set` / :func:`k3_kl` on the DSD of the
*current* forward (``model_output["latentx_dsd"]``, with gradient, put there by the engine hook).

Scaling across micro-batches and data-parallel ranks follows verl's convention (``agg_loss``): the engine
sums micro-batch losses and FSDP averages gradients over ``dp_size`` ranks, so each micro-batch adds
``dp_size · Σ_f (n_f / N) · LME_f`` where the f are the prompt groups present in the micro-batch (``n_f``
of their responses are here), LME_f their log-mean-exp and N = ``global_batch_size`` (responses in the
mini-batch over all ranks).  When every micro-batch holds whole groups this is exactly the paper's mean
over groups; when verl splits a group across micro-batches each part is a log-mean-exp over the part
(reported as ``latentx/relax_split_groups``).  The KL over I is averaged within the micro-batch and weighted
by its share of responses (exact when one micro-batch is the mini-batch, as in the authors' code).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from latentx.objectives.base import k3_kl, per_response_mean, valid_only
from latentx.objectives.relax import RelaxConfig, exploration_term, relax_kl_set

__all__ = ["relax_terms", "relax_ppo_loss", "group_ids"]


def group_ids(uids: Any, device: torch.device) -> Tensor:
    """Prompt-group ids (verl's ``uid`` strings, one per response) as an int64 ``[B]`` tensor."""
    if uids is None:
        raise ValueError("latentx relax needs the batch field 'uid' (the prompt group of each response)")
    if isinstance(uids, Tensor):
        return uids.to(device=device, dtype=torch.int64).reshape(-1)
    index: dict[Any, int] = {}
    return torch.tensor([index.setdefault(u, len(index)) for u in list(uids)], dtype=torch.int64, device=device)


def relax_terms(
    dsd: Tensor,
    advantages: Tensor,
    group: Tensor,
    logp: Tensor,
    ref_logp: Tensor | None,
    mask: Tensor,
    cfg: RelaxConfig,
    dp_size: int = 1,
    global_batch_size: int | None = None,
    group_size: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``α·L_xp + β·mean_{i∈I} KL_i`` of one micro-batch, scaled for verl's accumulation (module docstring).

    Args:
        dsd: ``[B]`` DSD of each response on the current forward (with gradient).
        advantages: ``[B, T]`` token advantages (verl's ``advantages``); Â_i is their mean over the response.
        group: ``[B]`` int prompt groups.
        logp, ref_logp: ``[B, T]`` current / reference log-probs (``ref_logp=None``: no KL term).
        mask: ``[B, T]`` bool response mask.
        dp_size, global_batch_size: verl's ``data["dp_size"]`` / ``data["global_batch_size"]``.
        group_size: R (to report how many groups verl split across micro-batches).

    Returns:
        ``(loss, metrics)``; with ``dp_size=1`` and ``global_batch_size=B`` the loss equals
        ``α·terms["xp"] + terms["kl_set_penalty"]`` of :func:`latentx.objectives.relax_loss`.
    """
    mask = mask.bool()
    adv = per_response_mean(valid_only(advantages.detach(), mask), mask)
    dsd = dsd.float()
    in_set = relax_kl_set(adv, dsd, cfg.xi, cfg.kl_set)
    detach = in_set if cfg.kl_set == "code" else None
    B = dsd.shape[0]
    total = float(global_batch_size) if global_batch_size else float(max(B, 1))

    if cfg.lme_scope == "microbatch":
        parts = [(exploration_term(adv, dsd, group, "microbatch", detach), B)]
    else:
        parts = []
        for g in torch.unique(group):
            sel = group == g
            part_detach = detach[sel] if detach is not None else None
            parts.append((exploration_term(adv[sel], dsd[sel], group[sel], "group", part_detach), int(sel.sum())))
    zero = torch.zeros((), dtype=torch.float32, device=dsd.device)
    xp_weighted = sum((value * count for value, count in parts), zero) / total

    if ref_logp is not None:
        kl_i = per_response_mean(k3_kl(valid_only(logp, mask), valid_only(ref_logp.detach(), mask)), mask)
        kl_set_kl = torch.where(in_set, kl_i, zero).sum() / in_set.sum().clamp(min=1).float()
    else:
        kl_set_kl = zero
    kl_weighted = kl_set_kl * (B / total)

    loss = dp_size * (cfg.alpha * xp_weighted + cfg.beta * kl_weighted)
    with torch.no_grad():
        xp_mean = sum((value for value, _ in parts), zero) / max(len(parts), 1)
        split = [count for _, count in parts if group_size is not None and count != group_size]
        metrics = {
            "latentx/relax_xp": float(xp_mean),
            "latentx/relax_kl_set_size": float(in_set.sum()),
            "latentx/relax_kl_set_kl": float(kl_set_kl),
            "latentx/relax_dsd_mean": float(dsd.mean()) if B else 0.0,
            "latentx/relax_dsd_max": float(dsd.max()) if B else 0.0,
            "latentx/relax_split_groups": float(len(split)) if cfg.lme_scope == "group" else 0.0,
            "latentx/relax_ref_available": 1.0 if ref_logp is not None else 0.0,
        }
    return loss, metrics


def relax_ppo_loss(
    config: Any,
    model_output: dict,
    data: Any,
    dp_group: Any = None,
    *,
    relax: RelaxConfig,
    group_size: int | None = None,
) -> tuple[Tensor, dict]:
    """verl's ``ppo_loss`` + :func:`relax_terms` (drop-in for the actor's ``loss_fn``; module docstring)."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.losses import ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding

    if "latentx_dsd" not in model_output:
        raise RuntimeError("latentx relax: the update forward produced no 'latentx_dsd' (engine hook not installed?)")
    dsd = model_output["latentx_dsd"]
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    uids = tu.get(data, "uid")
    fields = ["response_mask", "advantages"] + (["ref_log_prob"] if "ref_log_prob" in data else [])
    padded = data.select(*fields).to_padded_tensor()
    width = log_prob.shape[1]

    def fit(x: Tensor) -> Tensor:  # verl pads to the micro-batch's longest response; align widths
        x = x[:, :width]
        return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x

    mask = fit(padded["response_mask"]).bool()
    ref = fit(padded["ref_log_prob"]) if "ref_log_prob" in padded.keys() else None

    policy_loss, metrics = ppo_loss(config, model_output, data, dp_group)
    extra, extra_metrics = relax_terms(
        dsd=dsd,
        advantages=fit(padded["advantages"]),
        group=group_ids(uids, dsd.device),
        logp=log_prob,
        ref_logp=ref,
        mask=mask,
        cfg=relax,
        dp_size=int(tu.get(data, "dp_size", 1) or 1),
        global_batch_size=tu.get(data, "global_batch_size", None),
        group_size=group_size,
    )
    for key, value in extra_metrics.items():
        metrics[key] = Metric(value=value, aggregation=AggregationType.MEAN)
    return policy_loss + extra, metrics
