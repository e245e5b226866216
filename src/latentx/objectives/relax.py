"""ReLaX objective: GRPO + latent exploration through Dynamic Spectral Dispersion (METHODS.md §3, §3a).

    L = L_pg + α · L_xp + β · KL_I
    L_xp = mean over pools p of log( (1/|p|) Σ_{i ∈ p} exp(−w_i · DSD_i) )
        pools: the prompt groups (lme_scope="group", paper) or the micro-batch (lme_scope="microbatch", code)
        w_i = max(Â_i, 0) (xp_weight="advantage", paper) or max(Â_i · T_i / L_max, 0) ("padded_mean", code)
    I = { i : DSD_i > ξ }  (kl_set="paper")   or  { i : Â_i > 0 and DSD_i > ξ }, L_xp of i ∈ I detached ("code")
        xi_mode="quantile" (ours, not in either source): ξ is a fraction q, I = the top q of the batch's DSD
    KL_I = mean_{i ∈ I} KL_i (kl_reduce="set_mean", paper; KL_i the token-mean k3 of response i)
        or Σ_{i ∈ I} Σ_t k3_it / (valid tokens of the batch) (kl_reduce="token_mean", code: k3 zeroed outside I,
        then token-mean)

Minimising L_xp raises the DSD of responses with positive advantage (the log-mean-exp is a soft minimum
over the pool); the KL term keeps the responses whose DSD already exceeds ξ close to the reference.

**One implementation.**  :func:`relax_terms` is the only code that evaluates α·L_xp + β·KL_I.  It takes the
*batch-wide* normalisers explicitly (:class:`BatchTotals`: groups, responses, valid tokens and |I| over every
micro-batch and data-parallel rank of the optimisation batch) and returns this shard's *summable share*:
summing the shares of any split of the batch gives the value and the gradient of the unsplit batch.  The
core trainer, the TRL adapter and the verl loss all call it.  Two things depend on the split by definition:
``lme_scope="microbatch"`` (the authors' pools *are* micro-batches; each pool is weighted by its share of
responses) and, for a prompt group split over several shards, the log-mean-exp of that group, which is
evaluated exactly when the group is whole and by its first-order expansion around the rollout values
(``group_lse``) when it is split (exact gradient on-policy, i.e. when the update forward equals the rollout
forward; see :func:`relax_terms`).

**Presets** (``preset: paper | authors``; METHODS.md §3 and §3a).  Every field the presets govern defaults to
``None`` = "take it from the preset"; a field set explicitly (YAML, ``--set``, constructor) always wins over
the preset, so a user can mix items.  The resolved values are what ``config.yaml`` records.  ``authors``
also sets the GRPO part of a ReLaX run (``grpo.clip_low = grpo.clip_high = 1``, ``grpo.dual_clip = 10``,
``rollout.dynamic_sampling = true``) through :func:`apply_train_preset`, with the same rule.

Reference: Zhang, Chen, Shen, Ye, Wu, "Reasoning with Latent Exploration for Large Reasoning Models",
arXiv:2512.07558 (2025); the authors' release described in METHODS.md §3a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from latentx.objectives.base import (
    register_objective,
    GRPOConfig,
    LossOutput,
    PolicyBatch,
    _check_choice,
    _check_range,
    fill_unset,
    k3_kl,
    per_response_mean,
    to_floats,
    token_mean,
    valid_only,
)
from latentx.objectives.grpo import clipped_surrogate, reference_kl

__all__ = [
    "RelaxConfig",
    "PRESETS",
    "BatchTotals",
    "RelaxTerms",
    "relax_loss",
    "relax_terms",
    "exploration_term",
    "relax_kl_set",
    "kl_set_members",
    "xp_weights",
    "group_log_sum_exp",
    "RelaxPlan",
    "relax_batch_plan",
    "apply_train_preset",
    "dsd_quantiles",
]

#: The values each preset gives to the fields it governs (METHODS.md §3 = "paper", §3a = "authors").
#: ``pad_to = -1`` means "the maximum response length" (the authors' L_max): the trainer resolves it to
#: ``rollout.max_new_tokens``, the TRL adapter to ``max_completion_length``, verl to ``data.max_response_length``.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        xi=25.0, kl_set="paper", kl_reduce="set_mean", xp_weight="advantage", lme_scope="group",
        spectrum="eig", scaling="mean", init="normal", pad_to=0, fit_window=0, fit_loss="residual",
        fit_lr=1e-4, fit_seed=0, refit_every=0,
    ),
    "authors": dict(
        xi=10.0, kl_set="code", kl_reduce="token_mean", xp_weight="padded_mean", lme_scope="microbatch",
        spectrum="singular", scaling="unscaled", init="kaiming_uniform", pad_to=-1, fit_window=512,
        fit_loss="svd", fit_lr=1e-3, fit_seed=42, refit_every=50,
    ),
}

#: The GRPO / rollout part of each preset (applied to a ``relax`` run by :func:`apply_train_preset`).
TRAIN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"grpo": dict(clip_low=0.2, clip_high=0.2, dual_clip=0.0), "rollout": dict(dynamic_sampling=False)},
    "authors": {"grpo": dict(clip_low=1.0, clip_high=1.0, dual_clip=10.0), "rollout": dict(dynamic_sampling=True)},
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "kl_set": ("paper", "code"),
    "kl_reduce": ("set_mean", "token_mean"),
    "xp_weight": ("advantage", "padded_mean"),
    "lme_scope": ("group", "microbatch"),
    "xi_mode": ("absolute", "quantile"),
    "spectrum": ("eig", "singular"),
    "scaling": ("mean", "unscaled"),
    "init": ("normal", "kaiming_uniform"),
    "fit_loss": ("residual", "svd"),
}


@dataclass
class RelaxConfig:
    """ReLaX options (METHODS.md §2 for the signal, §3 / §3a for the loss).

    ``None`` = take the value from ``preset`` (table in :data:`PRESETS`); an explicit value wins.

    Preset:
        preset: "paper" (METHODS.md §3, default) or "authors" (the released code, §3a).
    Loss:
        alpha: α, weight of the exploration term L_xp (0.1).
        beta: β, weight of the KL of the high-DSD set I to the reference (0.01).
        xi: ξ, the DSD threshold defining I (paper 25, authors 10); with ``xi_mode="quantile"`` a fraction
            q in (0, 1): I = the top q of the batch's DSD.
        xi_mode: "absolute" (both sources) or "quantile" (ours, an extension: the term acts at any DSD scale).
        kl_set: "paper" (I = {DSD > ξ}) or "code" (I = {Â > 0 and DSD > ξ}, their L_xp detached).
        kl_reduce: "set_mean" (mean over I of per-response token-mean k3, paper) or "token_mean" (k3 zeroed
            outside I, then token-mean over every valid token of the batch, code).
        xp_weight: "advantage" (w_i = max(Â_i, 0), paper) or "padded_mean" (w_i = max(Â_i · T_i / L_max, 0),
            the mean of the token advantages over the padded length, code).
        lme_scope: "group" (log-mean-exp within each prompt group, paper) or "microbatch" (one log-mean-exp
            over each micro-batch, the authors' code).
    Signal (consumed by the Koopman estimator, METHODS.md §2 / §3a):
        spectrum: "eig" (eigenvalue moduli of K, paper) or "singular" (sqrt(S² + 1e-3), code).
        m: dictionary size (50).
        ridge: λ of the EDMD ridge (1e-3).
        scaling: "mean" (Gram / n, default) or "unscaled" (raw Gram, code).
        residual_threshold: τ_res for Residual-DMD filtering of spurious modes; None = no filtering.
        init: dictionary initialisation, "normal" (N(0, 1/d), ours) or "kaiming_uniform" (a = √7, code).
        pad_to: DSD on each response zero-padded to this many positions, padding unmasked (code); 0 =
            masked (default); -1 = the maximum response length L_max (resolved by the caller).
        fit_window: the fit sees the first that-many positions of each response, zero-padded (code: 512);
            0 = every valid position, masked.
        fit_loss: "residual" (ResKoopNet residual, paper) or "svd" (the authors' SVD formula, §3a).
        fit_lr: Adam learning rate of the dictionary fit (1e-4 paper; 1e-3 code).
        fit_batch_size: trajectories per fit mini-batch (64).
        fit_epochs: passes over the fit batch (1).
        refit_every: refit the dictionary every N steps; 0 = fit once on the first step (paper; code: 50).
        fit_seed: seed of the dictionary initialisation (paper 0; code 42).
    """

    preset: Literal["paper", "authors"] = "paper"
    alpha: float = 0.1
    beta: float = 0.01
    xi: float | None = None
    xi_mode: Literal["absolute", "quantile"] = "absolute"
    kl_set: Literal["paper", "code"] | None = None
    kl_reduce: Literal["set_mean", "token_mean"] | None = None
    xp_weight: Literal["advantage", "padded_mean"] | None = None
    lme_scope: Literal["group", "microbatch"] | None = None
    spectrum: Literal["eig", "singular"] | None = None
    m: int = 50
    ridge: float = 1e-3
    scaling: Literal["mean", "unscaled"] | None = None
    residual_threshold: float | None = None
    init: Literal["normal", "kaiming_uniform"] | None = None
    pad_to: int | None = None
    fit_window: int | None = None
    fit_lr: float | None = None
    fit_batch_size: int = 64
    fit_epochs: int = 1
    fit_loss: Literal["residual", "svd"] | None = None
    refit_every: int | None = None
    fit_seed: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"relax.preset must be one of {', '.join(map(repr, PRESETS))}, got {self.preset!r}")
        fill_unset(self, PRESETS[self.preset])
        _check_range("relax.alpha", self.alpha, lo=0.0)
        _check_range("relax.beta", self.beta, lo=0.0)
        _check_range("relax.xi", self.xi)
        for name, choices in _CHOICES.items():
            _check_choice(f"relax.{name}", getattr(self, name), choices)
        if self.xi_mode == "quantile" and not 0.0 < float(self.xi) < 1.0:
            raise ValueError(f"relax.xi must be a fraction in (0, 1) with relax.xi_mode='quantile', got {self.xi!r}")
        _check_int("relax.m", self.m, minimum=2)
        _check_range("relax.ridge", self.ridge, lo=0.0)
        from latentx.dynamics.koopman import RIDGE_FLOOR

        if float(self.ridge) < RIDGE_FLOOR:  # the estimator's constructor refuses it too: say so at config time
            raise ValueError(f"relax.ridge must be >= the ridge floor {RIDGE_FLOOR:g} (latentx.dynamics.koopman), "
                             f"got {self.ridge!r}")
        if self.residual_threshold is not None:
            _check_range("relax.residual_threshold", self.residual_threshold, lo=0.0, lo_open=True)
        _check_int("relax.pad_to", self.pad_to, minimum=-1)
        _check_int("relax.fit_window", self.fit_window, minimum=0)
        _check_range("relax.fit_lr", self.fit_lr, lo=0.0, lo_open=True)
        _check_int("relax.fit_batch_size", self.fit_batch_size, minimum=1)
        _check_int("relax.fit_epochs", self.fit_epochs, minimum=1)
        _check_int("relax.refit_every", self.refit_every, minimum=0)
        _check_int("relax.fit_seed", self.fit_seed, minimum=0)

    def resolved_pad_to(self, max_length: int) -> int:
        """``pad_to`` with -1 replaced by ``max_length`` (the run's maximum response length L_max)."""
        return int(max_length) if self.pad_to == -1 else int(self.pad_to or 0)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def apply_train_preset(objective: str, relax: RelaxConfig, grpo: Any, rollout: Any, max_length: int) -> None:
    """The GRPO / rollout part of ``relax.preset`` (METHODS.md §3a), for a ``relax`` run only.

    Fields of ``grpo`` / ``rollout`` left unset (``None``, or filled by their own defaults) take the preset's
    values; explicit ones win.  ``relax.pad_to = -1`` becomes ``max_length``.  Other objectives are left
    alone (their GRPO part stays at its own defaults; set ``grpo.*`` explicitly for a like-for-like run).
    """
    if relax.pad_to == -1:
        object.__setattr__(relax, "pad_to", int(max_length))
    if relax.pad_to and relax.pad_to < max_length:
        raise ValueError(
            f"relax.pad_to = {relax.pad_to} is smaller than a response can be ({max_length} tokens); "
            f"use 0 (masked), -1 (the maximum response length) or at least {max_length}"
        )
    if objective != "relax":
        return
    parts = TRAIN_PRESETS[relax.preset]
    for cfg, values in ((grpo, parts["grpo"]), (rollout, parts["rollout"])):
        if cfg is None:
            continue
        fill_unset(cfg, {k: v for k, v in values.items() if hasattr(cfg, k)}, override_filled=True)
        cfg.__post_init__()  # re-validate with the preset's values


# --------------------------------------------------------------------------------------------------
# The set I, the weights w_i, the log-mean-exp
# --------------------------------------------------------------------------------------------------


def relax_kl_set(adv: Tensor, dsd: Tensor, xi: float, kl_set: str) -> Tensor:
    """The set I of METHODS.md §3 with an absolute ξ, bool ``[B]``: ``DSD_i > ξ`` ("paper") or
    ``Â_i > 0 and DSD_i > ξ`` ("code")."""
    high = dsd.detach() > xi
    if kl_set == "paper":
        return high
    if kl_set == "code":
        return high & (adv > 0)
    raise ValueError(f"relax.kl_set must be 'paper' or 'code', got {kl_set!r}")


def kl_set_members(adv: Tensor, dsd: Tensor, cfg: RelaxConfig) -> tuple[Tensor, float]:
    """Membership of I for the *whole* batch (all micro-batches and ranks) and the ξ in use.

    ``xi_mode="absolute"``: :func:`relax_kl_set` with ``ξ = cfg.xi`` (elementwise, so a shard may also call it
    on its own rows).  ``xi_mode="quantile"`` (ours): with N responses, the ⌈q·N⌉ responses of largest DSD
    (ties broken by position) are the high-DSD responses, and the ξ reported is the smallest DSD among them;
    ``kl_set="code"`` then keeps those with Â > 0.  Returns ``(in_set [B] bool, xi_used)``.
    """
    dsd = dsd.detach().float()
    if cfg.xi_mode == "absolute" or dsd.numel() == 0:
        return relax_kl_set(adv, dsd, float(cfg.xi), str(cfg.kl_set)), float(cfg.xi)
    k = max(1, math.ceil(float(cfg.xi) * dsd.numel()))
    order = torch.sort(dsd, descending=True, stable=True).indices[:k]
    high = torch.zeros_like(dsd, dtype=torch.bool)
    high[order] = True
    if cfg.kl_set == "code":
        high = high & (adv > 0)
    return high, float(dsd[order].min())


def xp_weights(adv: Tensor, lengths: Tensor, cfg: RelaxConfig, length_norm: int | None = None) -> Tensor:
    """w_i of L_xp: ``max(Â_i, 0)`` ("advantage") or ``max(Â_i · T_i / L_max, 0)`` ("padded_mean", §3a).

    ``lengths``: ``[B]`` valid tokens T_i; ``length_norm``: L_max (required for "padded_mean").
    """
    adv = adv.detach().float()
    if cfg.xp_weight == "advantage":
        return torch.clamp(adv, min=0.0)
    if not length_norm or length_norm < 1:
        raise ValueError("relax.xp_weight='padded_mean' needs the maximum response length L_max (length_norm)")
    return torch.clamp(adv * lengths.to(adv.device).float() / float(length_norm), min=0.0)


def _group_index(group: Tensor) -> tuple[Tensor, int]:
    _, index = torch.unique(group, return_inverse=True)
    return index, (int(index.max()) + 1 if index.numel() else 0)


def group_log_sum_exp(exponent: Tensor, group: Tensor) -> tuple[Tensor, Tensor]:
    """Per response: log Σ_{j ∈ group(i)} exp(x_j) and the group size, over the rows given (max-shifted)."""
    index, n_groups = _group_index(group)
    x = exponent
    shift = torch.full((n_groups,), -torch.inf, dtype=x.dtype, device=x.device)
    shift = shift.scatter_reduce(0, index, x.detach(), reduce="amax")
    summed = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, index, torch.exp(x - shift[index]))
    count = torch.zeros(n_groups, dtype=x.dtype, device=x.device).index_add(0, index, torch.ones_like(x))
    return (torch.log(summed) + shift)[index], count[index]


def exploration_term(adv: Tensor, dsd: Tensor, group: Tensor, lme_scope: str, detach: Tensor | None = None) -> Tensor:
    """L_xp of one whole batch with w_i = max(Â_i, 0) (METHODS.md §3): mean over pools of
    ``log((1/|p|) Σ_{i ∈ p} exp(−w_i·DSD_i))``; the pools are the groups or (``"microbatch"``) the batch.

    Thin wrapper of :func:`relax_terms` (kept for callers that have one whole batch and the paper weight).
    ``detach`` (bool ``[B]``) marks responses whose DSD is a constant (the "code" KL set).
    """
    if lme_scope not in ("group", "microbatch"):
        raise ValueError(f"relax.lme_scope must be 'group' or 'microbatch', got {lme_scope!r}")
    dsd = dsd.float()
    if detach is not None:
        dsd = torch.where(detach, dsd.detach(), dsd)
    exponent = -torch.clamp(adv.float(), min=0.0) * dsd
    return _xp_share(exponent, group, lme_scope, BatchTotals.of(group, None))


# --------------------------------------------------------------------------------------------------
# relax_terms: the one implementation of α·L_xp + β·KL_I
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchTotals:
    """Batch-wide normalisers of the ReLaX terms, counted over every micro-batch and data-parallel rank of
    one optimisation batch.

    Attributes:
        groups: prompt groups G (L_xp with ``lme_scope="group"`` is a mean over them).
        responses: responses N (``lme_scope="microbatch"`` weights each micro-batch pool by b / N).
        tokens: valid response tokens (``kl_reduce="token_mean"``; also the GRPO token-mean).
        in_set: |I| (``kl_reduce="set_mean"``).
        length: L_max for ``xp_weight="padded_mean"`` (0 = not needed).
    """

    groups: int
    responses: int
    tokens: int
    in_set: int = 0
    length: int = 0

    @classmethod
    def of(cls, group: Tensor, mask: Tensor | None, in_set: Tensor | None = None, length: int = 0) -> "BatchTotals":
        """The totals of one whole batch (no split)."""
        n_groups = int(torch.unique(group).numel()) if group.numel() else 0
        tokens = int(mask.sum()) if mask is not None else 0
        return cls(n_groups, int(group.numel()), tokens, int(in_set.sum()) if in_set is not None else 0, length)


@dataclass
class RelaxTerms:
    """:func:`relax_terms` output: this shard's summable shares (tensors with gradient) and diagnostics.

    ``loss = alpha · xp + beta · kl``; summing ``xp`` / ``kl`` / ``loss`` over the shards of a batch gives the
    batch's L_xp / KL_I / latent loss.
    """

    loss: Tensor
    xp: Tensor
    kl: Tensor
    in_set: Tensor


def _xp_share(exponent: Tensor, group: Tensor, lme_scope: str, totals: BatchTotals,
              group_lse: Tensor | None = None, group_count: Tensor | None = None) -> Tensor:
    """This shard's share of L_xp from the exponents x_i = −w_i·DSD_i (see :func:`relax_terms`)."""
    if exponent.numel() == 0:
        return exponent.sum()
    if lme_scope == "microbatch":
        lme = torch.logsumexp(exponent, dim=0) - math.log(exponent.numel())
        return lme * (exponent.numel() / max(totals.responses, 1))
    lse, count = group_log_sum_exp(exponent, group)  # over this shard's rows
    # Σ_i (LSE_g − log R_g) / R_g over a whole group = LSE_g − log R_g: each member carries 1/R_g of it.
    per_response = (lse - torch.log(count)) / count
    if group_lse is None:
        if group_count is not None and bool((count != group_count.to(count)).any()):
            raise ValueError(
                "relax_terms: a prompt group is split across micro-batches / ranks; pass group_lse (the log-sum-exp "
                "of the whole group's exponents at the rollout) so that its log-mean-exp can be shared"
            )
    else:
        # A group split over shards: first-order share around the rollout point (exact value there, exact
        # gradient on-policy):  LME_g(x) ≈ LSE_g − log R_g + Σ_{i ∈ g} exp(x_i − LSE_g) − 1.
        if group_count is None:
            raise ValueError("relax_terms: group_lse needs group_count (responses of each group in the whole batch)")
        full = group_count.to(exponent)
        g_lse = group_lse.to(exponent).detach()
        split = (g_lse - torch.log(full) - 1.0) / full + torch.exp(exponent - g_lse)
        per_response = torch.where(count == full, per_response, split)
    return per_response.sum() / max(totals.groups, 1)


def relax_terms(
    adv: Tensor,
    dsd: Tensor,
    group: Tensor,
    mask: Tensor,
    in_set: Tensor,
    cfg: RelaxConfig,
    totals: BatchTotals,
    *,
    logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    group_lse: Tensor | None = None,
    group_count: Tensor | None = None,
) -> RelaxTerms:
    """This shard's share of ``α·L_xp + β·KL_I`` (METHODS.md §3 / §3a; module docstring).

    Args:
        adv: ``[b]`` response advantages Â_i (constants).
        dsd: ``[b]`` DSD_i on the current forward (with gradient into the policy).
        group: ``[b]`` int prompt groups (ids consistent over the whole batch).
        mask: ``[b, T]`` bool valid response tokens (T_i = its row sums).
        in_set: ``[b]`` bool membership of I, decided on the whole batch (:func:`kl_set_members`).
        cfg: the ReLaX options (``kl_set``, ``kl_reduce``, ``xp_weight``, ``lme_scope``, α, β).
        totals: :class:`BatchTotals` of the whole batch.
        logp, ref_logp: ``[b, T]`` current (with grad) / reference log-probs; ``ref_logp=None`` → KL share 0.
            Only rows in I are read from ``ref_logp`` (the trainer computes the reference only for them).
        group_lse, group_count: ``[b]`` for groups split across shards (lme_scope="group"): the log-sum-exp of
            the whole group's exponents at the rollout, and the group's size in the whole batch.  Without
            them every group must be whole in this shard (checked when ``group_count`` is given).

    Shares:
        xp: Σ_{groups g here} LME_g / G ("group"), or LME_{shard} · b / N ("microbatch").
        kl: Σ_{i ∈ I here} KL_i / |I| ("set_mean"), or Σ_{i ∈ I here} Σ_t k3_it / tokens ("token_mean").
    """
    mask = mask.bool()
    in_set = in_set.to(dsd.device).bool()
    dsd = dsd.float()
    if cfg.kl_set == "code":
        dsd = torch.where(in_set, dsd.detach(), dsd)
    weight = xp_weights(adv.to(dsd.device), mask.sum(1), cfg, totals.length)
    exponent = -weight * dsd
    xp = _xp_share(exponent, group, str(cfg.lme_scope), totals, group_lse, group_count)

    zero = torch.zeros((), dtype=torch.float32, device=dsd.device)
    if ref_logp is None or logp is None or totals.in_set == 0 or not bool(in_set.any()):
        kl = zero
    else:
        member = mask & in_set[:, None]
        k3 = torch.where(member, k3_kl(valid_only(logp, member), valid_only(ref_logp.detach(), member)), zero)
        if cfg.kl_reduce == "token_mean":
            kl = k3.sum() / max(totals.tokens, 1)
        else:
            kl = torch.where(in_set, per_response_mean(k3, mask), zero).sum() / max(totals.in_set, 1)
    return RelaxTerms(loss=cfg.alpha * xp + cfg.beta * kl, xp=xp, kl=kl, in_set=in_set)


@dataclass
class RelaxPlan:
    """What every shard of one optimisation batch needs for :func:`relax_terms`, decided once on the whole
    batch from the rollout (no-grad) DSDs: :func:`relax_batch_plan`.

    Attributes (per response ``[N]`` unless said): ``in_set`` (bool), ``group_lse`` / ``group_count`` (for
    groups split over shards), ``totals`` (:class:`BatchTotals`), ``xp`` (L_xp at the rollout, float),
    ``xi_used`` (float), ``metrics`` (|I|, ξ, DSD quantiles).
    """

    in_set: Tensor
    group_lse: Tensor
    group_count: Tensor
    totals: BatchTotals
    xp: float
    xi_used: float
    metrics: dict[str, float]


def relax_batch_plan(adv: Tensor, dsd: Tensor, group: Tensor, lengths: Tensor, cfg: RelaxConfig,
                     length_norm: int = 0) -> RelaxPlan:
    """Decide I (:func:`kl_set_members`) and the batch-wide normalisers on the whole batch's rollout values.

    ``adv`` / ``dsd`` / ``group`` / ``lengths`` ``[N]`` of every response of the optimisation batch (gathered
    over ranks); ``length_norm`` = L_max for ``xp_weight="padded_mean"``.
    """
    adv = adv.detach().float()
    dsd = dsd.detach().float()
    lengths = lengths.to(adv.device)
    in_set, xi_used = kl_set_members(adv, dsd, cfg)
    totals = BatchTotals(
        groups=int(torch.unique(group).numel()) if group.numel() else 0, responses=int(adv.numel()),
        tokens=int(lengths.sum()), in_set=int(in_set.sum()), length=int(length_norm),
    )
    exponent = -xp_weights(adv, lengths, cfg, totals.length) * dsd
    lse, count = group_log_sum_exp(exponent, group)
    mask = torch.arange(int(lengths.max()) if lengths.numel() else 0, device=adv.device)[None, :] < lengths[:, None]
    xp = float(relax_terms(adv, dsd, group, mask, in_set, cfg, totals).xp) if adv.numel() else 0.0
    metrics = {**kl_set_metrics(in_set, xi_used, dsd), "xp_rollout": xp}
    return RelaxPlan(in_set, lse, count, totals, xp, xi_used, metrics)


def kl_set_metrics(in_set: Tensor, xi_used: float, dsd: Tensor) -> dict[str, float]:
    """A step's KL-set diagnostics: ``kl_set_size`` (|I|), ``xi_used`` and the DSD quantiles."""
    return {"kl_set_size": float(in_set.sum()), "xi_used": xi_used, **dsd_quantiles(dsd)}


def dsd_quantiles(dsd: Tensor) -> dict[str, float]:
    """``dsd_min``, ``dsd_q10``, ``dsd_q50``, ``dsd_q90``, ``dsd_max`` of a batch of DSD values (0 if empty)."""
    values = dsd.detach().float().reshape(-1)
    if values.numel() == 0:
        return {k: 0.0 for k in ("dsd_min", "dsd_q10", "dsd_q50", "dsd_q90", "dsd_max")}
    q = torch.quantile(values, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=values.dtype)).tolist()
    return dict(zip(("dsd_min", "dsd_q10", "dsd_q50", "dsd_q90", "dsd_max"), q))


# --------------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------------


def relax_loss(batch: PolicyBatch, cfg: RelaxConfig, clip: GRPOConfig) -> LossOutput:
    """ReLaX loss ``L_pg (+ β_KL·k3) + α·L_xp + β·KL_I`` (METHODS.md §3 "relax").

    Needs ``batch.dsd`` (``[B]``, with grad).  Response advantages are ``batch.response_advantages()``.

    Without ``batch.totals`` the batch is a whole optimisation batch: I is decided here (:func:`kl_set_members`)
    and ``loss`` is the batch loss.  With ``batch.totals`` (a :class:`BatchTotals` of the whole batch) and
    ``batch.in_set`` (membership decided on the whole batch), the batch is one shard and ``loss`` is its
    *summable* share (``out.summable``): the GRPO token-mean is scaled by this shard's token share, the
    latent terms come from :func:`relax_terms`, and every term in ``terms`` is a share too.

    Without ``batch.ref_logp`` the β term is 0 and ``terms["ref_available"] == 0.0``.

    ``terms``: ``loss``, ``pg``, ``xp``, ``kl_set_size``, ``kl_set_kl``, ``kl_set_penalty`` (β·kl_set_kl),
    ``ref_available``, ``xp_weight`` (mean w_i), the GRPO diagnostics (``clip_frac``, ``ratio_mean``, ``kl``
    ...), and for a whole batch ``dsd_mean``, ``dsd_min``, ``dsd_max``, ``xi_used``.  ``out.parts``: the loss
    as a sum of ``pg`` (with the GRPO KL), ``xp`` (α·L_xp) and ``kl`` (β·KL_I), for per-term gradients.
    """
    if batch.dsd is None:
        raise ValueError("relax needs batch.dsd (DSD of each response on the current forward, with grad)")
    mask = batch.mask
    adv = batch.response_advantages()
    dsd = batch.dsd.float()
    totals: BatchTotals | None = getattr(batch, "totals", None)
    whole = totals is None
    xi_used = float(cfg.xi)
    if whole:
        in_set, xi_used = kl_set_members(adv, dsd, cfg)
        length = int(cfg.pad_to) if cfg.pad_to and cfg.pad_to > 0 else int(mask.shape[1])
        totals = BatchTotals.of(batch.group, mask, in_set, length=length)
    else:
        in_set = batch.in_set if getattr(batch, "in_set", None) is not None else kl_set_members(adv, dsd, cfg)[0]
    share = float(mask.sum()) / max(totals.tokens, 1) if not whole else 1.0

    # GRPO part.
    per_token, stats = clipped_surrogate(
        batch.logp, batch.old_logp, batch.token_advantages(), mask, clip.clip_low, clip.clip_high,
        dual_clip=getattr(clip, "dual_clip", 0.0) or 0.0,
    )
    pg = token_mean(per_token, mask) * share
    grpo_kl_penalty, kl_terms = reference_kl(batch, clip.kl_coef)
    grpo_kl_penalty = grpo_kl_penalty * share

    latent = relax_terms(
        adv, dsd, batch.group, mask, in_set, cfg, totals, logp=batch.logp, ref_logp=batch.ref_logp,
    )
    kl_set_penalty = cfg.beta * latent.kl
    loss = pg + grpo_kl_penalty + latent.loss
    zero = torch.zeros((), dtype=torch.float32, device=dsd.device)
    terms: dict[str, Any] = {
        "loss": loss,
        "pg": pg,
        "xp": latent.xp,
        "kl_set_size": in_set.sum(),
        "kl_set_kl": latent.kl,
        "kl_set_penalty": kl_set_penalty,
        "ref_available": (1.0 if batch.ref_logp is not None else 0.0) * share,
        "kl_penalty": grpo_kl_penalty,
        **{k: v * share for k, v in kl_terms.items()},
        "xp_weight": (xp_weights(adv, mask.sum(1), cfg, totals.length).mean() if adv.numel() else zero) * share,
        **{k: v * share for k, v in stats.items()},
        "tokens": mask.sum(),
    }
    if whole:
        terms.update(
            dsd_mean=dsd.mean() if dsd.numel() else zero,
            dsd_min=dsd.min() if dsd.numel() else zero,
            dsd_max=dsd.max() if dsd.numel() else zero,
            xi_used=xi_used,
        )
    parts = {"pg": pg + grpo_kl_penalty, "xp": cfg.alpha * latent.xp, "kl": kl_set_penalty}
    return LossOutput(loss=loss, terms=to_floats(terms), summable=not whole, parts=parts)


def _relax_needs(cfg: RelaxConfig, grpo: GRPOConfig) -> set[str]:
    # The reference is optional: without one the β term is 0 (reported in terms).
    return {"dsd_grad", "ref"} if cfg.beta > 0 else {"dsd_grad"}


def relax_dsd_grad_rows(cfg: RelaxConfig, adv: Tensor, lengths: Tensor, totals: "BatchTotals | None" = None) -> Tensor:
    """The responses whose DSD L_xp differentiates: w_i > 0 (:func:`xp_weights`; METHODS.md section 3).

    L_xp's exponent is -w_i DSD_i, so a response with w_i = 0 (Â_i <= 0) enters its log-mean-exp as exp(0)
    whatever its DSD: neither the loss nor its gradient depends on that DSD.  The KL term never reads DSD
    (I is decided on the rollout DSD), so these rows are all that needs a differentiable DSD.
    """
    return xp_weights(adv, lengths, cfg, totals.length if totals is not None else None) > 0


def relax_reference_rows(cfg: RelaxConfig, adv: Tensor, signals: Mapping[str, Tensor]) -> "tuple[Tensor, dict[str, float]] | None":
    """ReLaX's KL set I on the rollout DSDs (METHODS.md section 3; :func:`kl_set_members`) and its
    diagnostics (``kl_set_size``, ``xi_used``, DSD quantiles); None without a ``dsd`` signal."""
    dsd = signals.get("dsd")
    if dsd is None:
        return None
    in_set, xi_used = kl_set_members(adv, dsd, cfg)
    return in_set, kl_set_metrics(in_set, xi_used, dsd)


register_objective(
    name="relax",
    config_class=RelaxConfig,
    needs=_relax_needs,
    dsd_grad_rows=relax_dsd_grad_rows,
    reference_rows=relax_reference_rows,
    loss=lambda batch, config, grpo, state: relax_loss(batch, config, grpo),
)
