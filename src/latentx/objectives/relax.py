"""ReLaX objective: GRPO + latent exploration through Dynamic Spectral Dispersion (METHODS.md section 3).

    L = L_pg + α · L_xp + β · mean_{i ∈ I} KL_i
    L_xp = mean over groups g of log( (1/R_g) Σ_{i ∈ g} exp(−max(Â_i, 0) · DSD_i) )
    I = { i : DSD_i > ξ }                          (kl_set="paper", default)
    I = { i : Â_i > 0 and DSD_i > ξ }, and the L_xp contribution of i ∈ I detached   (kl_set="code")
    KL_i = token-mean k3 of response i against the frozen reference

Minimising L_xp raises the DSD of responses with positive advantage (the log-mean-exp is a soft minimum
over the group), i.e. it rewards correct answers whose hidden-state dynamics are spectrally dispersed;
the KL term keeps the responses whose DSD already exceeds ξ close to the reference.

DSD_i comes from ``latentx.dynamics.dsd`` on the hidden states of the *current* forward (with gradient);
the signal fields of :class:`RelaxConfig` (``m``, ``ridge``, ``scaling``, ``spectrum``, ``residual_threshold``,
``fit_*``, ``refit_every``) are read by the trainer for that computation (METHODS.md §2), the loss fields
(``alpha``, ``beta``, ``xi``, ``kl_set``, ``lme_scope``) here.

Reference: Zhang, Chen, Shen, Ye, Wu, "Reasoning with Latent Exploration for Large Reasoning Models",
arXiv:2512.07558 (2025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from latentx.objectives.base import (
    register_objective,
    GRPOConfig,
    LossOutput,
    PolicyBatch,
    _check_choice,
    _check_range,
    k3_kl,
    per_response_mean,
    to_floats,
    token_mean,
    valid_only,
)
from latentx.objectives.grpo import clipped_surrogate, reference_kl

__all__ = ["RelaxConfig", "relax_loss", "exploration_term", "relax_kl_set"]


@dataclass
class RelaxConfig:
    """ReLaX options (METHODS.md §2 for the signal, §3 for the loss).  Defaults follow the paper.

    Loss:
        alpha: α, weight of the exploration term L_xp (0.1).
        beta: β, weight of the KL of the high-DSD set I to the reference (0.01).
        xi: ξ, the DSD threshold defining I (25.0).
        kl_set: "paper" (I = {DSD > ξ}) or "code" (I = {Â > 0 and DSD > ξ}, their L_xp detached).
        lme_scope: "group" (log-mean-exp within each prompt group, paper) or "microbatch" (one
            log-mean-exp over the whole micro-batch, the authors' code).
    Signal (consumed by the trainer / ``latentx.dynamics``):
        spectrum: "eig" (eigenvalue moduli of K, paper) or "singular" (sqrt(S² + 1e-3), code).
        m: dictionary size (50).
        ridge: λ of the EDMD ridge (1e-3).
        scaling: "mean" (Gram / n, default) or "unscaled" (raw Gram, code).
        residual_threshold: τ_res for Residual-DMD filtering of spurious modes; None = no filtering.
        fit_lr: Adam learning rate of the dictionary fit (1e-4 paper; the code used 1e-3).
        fit_batch_size: trajectories per fit mini-batch (64).
        fit_loss: "residual" (ResKoopNet residual, default) or "svd" (the authors' SVD surrogate).
        refit_every: refit the dictionary every N steps; 0 = fit once on the first step (default).
        fit_seed: seed of the dictionary initialisation (recorded with the run).
    """

    alpha: float = 0.1
    beta: float = 0.01
    xi: float = 25.0
    kl_set: Literal["paper", "code"] = "paper"
    lme_scope: Literal["group", "microbatch"] = "group"
    spectrum: Literal["eig", "singular"] = "eig"
    m: int = 50
    ridge: float = 1e-3
    scaling: Literal["mean", "unscaled"] = "mean"
    residual_threshold: float | None = None
    fit_lr: float = 1e-4
    fit_batch_size: int = 64
    fit_loss: Literal["residual", "svd"] = "residual"
    refit_every: int = 0
    fit_seed: int = 0

    def __post_init__(self) -> None:
        _check_range("relax.alpha", self.alpha, lo=0.0)
        _check_range("relax.beta", self.beta, lo=0.0)
        _check_range("relax.xi", self.xi)
        _check_choice("relax.kl_set", self.kl_set, ("paper", "code"))
        _check_choice("relax.lme_scope", self.lme_scope, ("group", "microbatch"))
        _check_choice("relax.spectrum", self.spectrum, ("eig", "singular"))
        _check_int("relax.m", self.m, minimum=2)
        _check_range("relax.ridge", self.ridge, lo=0.0)
        _check_choice("relax.scaling", self.scaling, ("mean", "unscaled"))
        if self.residual_threshold is not None:
            _check_range("relax.residual_threshold", self.residual_threshold, lo=0.0, lo_open=True)
        _check_range("relax.fit_lr", self.fit_lr, lo=0.0, lo_open=True)
        _check_int("relax.fit_batch_size", self.fit_batch_size, minimum=1)
        _check_choice("relax.fit_loss", self.fit_loss, ("residual", "svd"))
        _check_int("relax.refit_every", self.refit_every, minimum=0)
        _check_int("relax.fit_seed", self.fit_seed, minimum=0)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def relax_kl_set(adv: Tensor, dsd: Tensor, xi: float, kl_set: str) -> Tensor:
    """The set I of METHODS.md §3 as a bool ``[B]``: ``DSD_i > ξ`` ("paper") or ``Â_i > 0 and DSD_i > ξ`` ("code")."""
    high = dsd.detach() > xi
    if kl_set == "paper":
        return high
    if kl_set == "code":
        return high & (adv > 0)
    raise ValueError(f"relax.kl_set must be 'paper' or 'code', got {kl_set!r}")


def exploration_term(adv: Tensor, dsd: Tensor, group: Tensor, lme_scope: str, detach: Tensor | None = None) -> Tensor:
    """L_xp (METHODS.md §3): mean over groups of ``log((1/R) Σ_i exp(−max(Â_i, 0)·DSD_i))``.

    Computed with a max-shifted log-sum-exp: ``logsumexp_i(x_i) − log R``.  ``lme_scope="group"`` uses the
    prompt groups present in this micro-batch (R = responses of that group in the micro-batch);
    ``"microbatch"`` treats the whole micro-batch as one group.  ``detach`` (bool ``[B]``) marks responses
    whose DSD is used as a constant (the "code" KL set).  Returns a float32 scalar (0 for an empty batch).
    """
    dsd = dsd.float()
    if detach is not None:
        dsd = torch.where(detach, dsd.detach(), dsd)
    exponent = -torch.clamp(adv.float(), min=0.0) * dsd  # x_i = −max(Â_i, 0)·DSD_i
    if exponent.numel() == 0:
        return exponent.sum()
    if lme_scope == "microbatch":
        return torch.logsumexp(exponent, dim=0) - math.log(exponent.numel())
    if lme_scope != "group":
        raise ValueError(f"relax.lme_scope must be 'group' or 'microbatch', got {lme_scope!r}")

    _, index = torch.unique(group, return_inverse=True)
    n_groups = int(index.max()) + 1
    # Per-group max shift (a constant for the gradient, log-sum-exp is shift-invariant).
    shift = torch.full((n_groups,), -torch.inf, dtype=exponent.dtype, device=exponent.device)
    shift = shift.scatter_reduce(0, index, exponent.detach(), reduce="amax")
    summed = torch.zeros(n_groups, dtype=exponent.dtype, device=exponent.device).index_add(
        0, index, torch.exp(exponent - shift[index])
    )
    count = torch.zeros(n_groups, dtype=exponent.dtype, device=exponent.device).index_add(
        0, index, torch.ones_like(exponent)
    )
    log_mean_exp = torch.log(summed) + shift - torch.log(count)
    return log_mean_exp.mean()


def relax_loss(batch: PolicyBatch, cfg: RelaxConfig, clip: GRPOConfig) -> LossOutput:
    """ReLaX loss ``L_pg (+ β_KL·k3) + α·L_xp + β·mean_{i∈I} KL_i`` (METHODS.md §3 "relax").

    Needs ``batch.dsd`` (``[B]``, with grad).  Response advantages are ``batch.response_advantages()``.
    ``KL_i`` is the token-mean k3 of response i (0 for an empty response); the mean over I is 0 when I is
    empty.  Without ``batch.ref_logp`` the β term is 0 and ``terms["ref_available"] == 0.0``.
    Empty responses (no valid token) still take part in L_xp with their DSD (they are members of the
    group), and contribute nothing to the token terms.

    ``terms``: ``loss``, ``pg``, ``xp``, ``kl_set_size``, ``kl_set_kl``, ``kl_set_penalty`` (β·kl_set_kl),
    ``ref_available``, ``dsd_mean``, ``dsd_min``, ``dsd_max``, ``xp_weight`` (mean max(Â,0)),
    plus the GRPO diagnostics (``clip_frac``, ``ratio_mean``, ``approx_kl``, ``kl`` ...).
    """
    if batch.dsd is None:
        raise ValueError("relax needs batch.dsd (DSD of each response on the current forward, with grad)")
    mask = batch.mask
    adv = batch.response_advantages()
    dsd = batch.dsd.float()

    # GRPO part.
    per_token, stats = clipped_surrogate(
        batch.logp, batch.old_logp, batch.token_advantages(), mask, clip.clip_low, clip.clip_high
    )
    pg = token_mean(per_token, mask)
    grpo_kl_penalty, kl_terms = reference_kl(batch, clip.kl_coef)

    # The high-DSD set I and the exploration term.
    in_set = relax_kl_set(adv, dsd, cfg.xi, cfg.kl_set)
    xp = exploration_term(adv, dsd, batch.group, cfg.lme_scope, detach=in_set if cfg.kl_set == "code" else None)

    # β · mean_{i ∈ I} KL_i  (0 without a reference or with an empty I).
    zero = torch.zeros((), dtype=torch.float32, device=dsd.device)
    if batch.ref_logp is not None:
        k3 = k3_kl(valid_only(batch.logp, mask), valid_only(batch.ref_logp.detach(), mask))
        kl_per_response = per_response_mean(k3, mask)  # KL_i, [B]
        set_size = in_set.sum()
        kl_set_kl = torch.where(in_set, kl_per_response, zero).sum() / set_size.clamp(min=1).float()
    else:
        kl_set_kl = zero
    kl_set_penalty = cfg.beta * kl_set_kl

    loss = pg + grpo_kl_penalty + cfg.alpha * xp + kl_set_penalty
    terms = {
        "loss": loss,
        "pg": pg,
        "xp": xp,
        "kl_set_size": in_set.sum(),
        "kl_set_kl": kl_set_kl,
        "kl_set_penalty": kl_set_penalty,
        "ref_available": 1.0 if batch.ref_logp is not None else 0.0,
        "kl_penalty": grpo_kl_penalty,
        **kl_terms,
        "dsd_mean": dsd.mean() if dsd.numel() else zero,
        "dsd_min": dsd.min() if dsd.numel() else zero,
        "dsd_max": dsd.max() if dsd.numel() else zero,
        "xp_weight": torch.clamp(adv, min=0.0).mean() if adv.numel() else zero,
        **stats,
        "tokens": mask.sum(),
    }
    return LossOutput(loss=loss, terms=to_floats(terms))


def _relax_needs(cfg: RelaxConfig, grpo: GRPOConfig) -> set[str]:
    # The reference is optional: without one the β term is 0 (reported in terms).
    return {"dsd_grad", "ref"} if cfg.beta > 0 else {"dsd_grad"}


register_objective(
    name="relax",
    config_class=RelaxConfig,
    needs=_relax_needs,
    loss=lambda batch, config, grpo, state: relax_loss(batch, config, grpo),
)
