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
``dp_size ·`` its summable share from :func:`latentx.objectives.relax.relax_terms` (the one implementation of
the terms), with the mini-batch's totals: N = ``global_batch_size``, G = N / R, tokens = ``batch_num_tokens``,
and |I|, I and each group's rollout log-sum-exp from the driver's plan (:func:`relax_plan_fields`, written
into the batch after the advantages).  With the plan any split of the mini-batch gives the unsplit value and
gradient (split groups: first order around the rollout, exact on-policy); without it see :func:`relax_terms`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from latentx.objectives.base import k3_kl, per_response_mean, valid_only
from latentx.objectives.relax import BatchTotals, RelaxConfig, relax_batch_plan, relax_kl_set
from latentx.objectives.relax import relax_terms as core_relax_terms

__all__ = ["relax_terms", "relax_ppo_loss", "group_ids", "relax_plan_fields", "PLAN_FIELDS"]


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
    batch_num_tokens: int | None = None,
    plan: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``α·L_xp + β·KL_I`` of one micro-batch, scaled for verl's accumulation: ``dp_size ·``
    :func:`latentx.objectives.relax.relax_terms` with the mini-batch's totals (module docstring).

    Args:
        dsd: ``[B]`` DSD of each response on the current forward (with gradient).
        advantages: ``[B, T]`` token advantages (verl's ``advantages``); Â_i is their mean over the response.
        group: ``[B]`` int prompt groups.
        logp, ref_logp: ``[B, T]`` current / reference log-probs (``ref_logp=None``: no KL term).
        mask: ``[B, T]`` bool response mask.
        dp_size, global_batch_size, batch_num_tokens: verl's ``data["dp_size"]`` / ``["global_batch_size"]``
            (responses of the mini-batch over all ranks) / ``["batch_num_tokens"]``.
        group_size: R (groups = global_batch_size / R; also to report groups verl split across micro-batches).
        plan: optional per-response rows of the whole-batch plan (:func:`latentx.objectives.relax.relax_batch_plan`
            on the rollout DSDs): ``in_set``, ``group_lse``, ``group_count``, ``kl_set_size``.  With it, I and
            split groups are exact; without it I is decided on this micro-batch's DSDs (absolute ξ), |I| is
            estimated as this micro-batch's count scaled to the mini-batch, and each part of a split group
            counts as a group (biased; reported as ``latentx/relax_split_groups``).

    Returns:
        ``(loss, metrics)``; with ``dp_size=1`` and ``global_batch_size=B`` the loss equals
        ``α·terms["xp"] + terms["kl_set_penalty"]`` of :func:`latentx.objectives.relax_loss`.
    """
    mask = mask.bool()
    adv = per_response_mean(valid_only(advantages.detach(), mask), mask)
    dsd = dsd.float()
    B = dsd.shape[0]
    N = int(global_batch_size) if global_batch_size else max(B, 1)
    local_groups, local_counts = torch.unique(group, return_counts=True)
    R = int(group_size) if group_size else (int(local_counts.max()) if local_counts.numel() else 1)
    tokens = int(batch_num_tokens) if batch_num_tokens else int(mask.sum()) * N // max(B, 1)
    length = cfg.resolved_pad_to(int(mask.shape[1])) or int(mask.shape[1])
    if plan is not None:
        in_set = plan["in_set"].to(dsd.device).bool()
        set_total = int(plan["kl_set_size"].reshape(-1)[0]) if B else 0
        group_lse, group_count = plan["group_lse"], plan["group_count"]
    else:
        in_set = relax_kl_set(adv, dsd, float(cfg.xi), str(cfg.kl_set))
        set_total = int(in_set.sum()) * N / max(B, 1)  # estimate: this micro-batch's share of I
        group_lse = group_count = None
    totals = BatchTotals(groups=max(N // max(R, 1), 1), responses=N, tokens=tokens, in_set=set_total, length=length)
    terms = core_relax_terms(
        adv, dsd, group, mask, in_set, cfg, totals, logp=logp, ref_logp=ref_logp,
        group_lse=group_lse, group_count=group_count,
    )
    loss = dp_size * terms.loss
    with torch.no_grad():
        split = [int(c) for c in local_counts.tolist() if group_size is not None and c != group_size]
        metrics = {
            "latentx/relax_xp": float(terms.xp) * N / max(B, 1),
            "latentx/relax_kl_set_size": float(in_set.sum()),
            "latentx/relax_kl_set_kl": float(terms.kl) * (set_total / max(float(in_set.sum()), 1.0)),
            "latentx/relax_dsd_mean": float(dsd.mean()) if B else 0.0,
            "latentx/relax_dsd_max": float(dsd.max()) if B else 0.0,
            "latentx/relax_split_groups": float(len(split)) if cfg.lme_scope == "group" and plan is None else 0.0,
            "latentx/relax_ref_available": 1.0 if ref_logp is not None else 0.0,
        }
    return loss, metrics


#: Per-response fields the driver writes from the whole batch's rollout DSDs (:func:`relax_plan_fields`).
PLAN_FIELDS = ("latentx_in_set", "latentx_group_lse", "latentx_group_count", "latentx_kl_set_size")


def relax_plan_fields(advantages: Tensor, mask: Tensor, dsd: Tensor, uids: Any, cfg: RelaxConfig,
                      length_norm: int) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The driver's whole-batch ReLaX plan (:func:`latentx.objectives.relax.relax_batch_plan` on the rollout
    DSDs) as dense per-response ``[B]`` float fields (:data:`PLAN_FIELDS`) and its metrics (``latentx/``)."""
    from latentx.integrations.verl.signals import per_response_values

    mask = mask.bool()
    adv = per_response_mean(valid_only(advantages.float(), mask), mask)
    group = group_ids(uids, adv.device)
    plan = relax_batch_plan(adv, per_response_values(dsd, "latentx_dsd").to(adv.device), group, mask.sum(1), cfg,
                            length_norm)
    B = adv.shape[0]
    fields = {
        "latentx_in_set": plan.in_set.float(),
        "latentx_group_lse": plan.group_lse.float(),
        "latentx_group_count": plan.group_count.float(),
        "latentx_kl_set_size": torch.full((B,), float(plan.totals.in_set)),
    }
    return fields, {f"latentx/relax_{k}": v for k, v in plan.metrics.items()}


def _plan_rows(data: Any) -> dict[str, Tensor] | None:
    """This micro-batch's rows of the driver's plan, or None when the driver wrote none."""
    from latentx.integrations.verl.signals import per_response_values

    keys = set(data.keys())
    if not all(k in keys for k in PLAN_FIELDS):
        return None
    rows = {k[len("latentx_"):]: per_response_values(data[k], k) for k in PLAN_FIELDS}
    rows["in_set"] = rows["in_set"] > 0.5
    return rows


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
        batch_num_tokens=tu.get(data, "batch_num_tokens", None),
        plan=_plan_rows(data),
    )
    for key, value in extra_metrics.items():
        metrics[key] = Metric(value=value, aggregation=AggregationType.MEAN)
    return policy_loss + extra, metrics
