"""VERL: advantage shaping with the effective rank of hidden states (METHODS.md section 3 "verl").

For x ∈ {ER, ERV, ERA} (METHODS.md §1) an EMA baseline m_x (init 0) is kept across steps:

    rel_x = clamp((x_i − m_x) / (|m_x| + 1e-8), −5, 5)
    τ_i   = sigmoid(g · rel_ERA)                                 (gating="era"; "fixed_half": τ = 0.5)
    aux_i = c · [τ_i · tanh(rel_ER) + (1 − τ_i) · tanh(rel_ERV)]   ("sum": c · [tanh(rel_ER) + tanh(rel_ERV)])
    Â'_i  = Â_i + min(relu(aux_i), |Â_i| / κ)

then ``m_x ← (1 − a)·m_x + a·batch_mean(x)`` *after* the shaping; on the very first step nothing is
shaped (there is no baseline yet).  Â' goes to every token of the response ("all_tokens", paper) or only
to its last valid token ("last_token", the authors' release).  Performance scaling (option) replaces c by
``c0 · (1 − (ē + 1)/2)`` where ē is an EMA (same rate a, init 0) of the batch-mean reward mapped to
[−1, 1] by ``2·(r − reward_min)/(reward_max − reward_min) − 1`` (rewards in [0, 1]: 2r − 1): the bonus
shrinks as the policy gets better.  ē is, like the m_x, updated after the step's shaping.
Everything is float32.

The math is the pure function :func:`verl_shape` (+ :func:`verl_update_baselines`); :class:`VerlShaper`
holds the state across steps.  Adapters with gathered tensors call the pure functions.

Reference: Huang et al., "Beyond the Exploration-Exploitation Trade-off: A Hidden State Approach for LLM
Reasoning in RLVR", arXiv:2509.23808 (2025).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from latentx.objectives.base import GRPOConfig, LossOutput, PolicyBatch, _check_choice, _check_range, register_objective
from latentx.objectives.grpo import grpo_loss

__all__ = [
    "VerlConfig",
    "VerlBaselines",
    "verl_shape",
    "verl_effective_coef",
    "verl_update_baselines",
    "verl_token_advantages",
    "VerlShaper",
    "verl_loss",
]

_REL_EPS = 1e-8
_REL_CLAMP = 5.0


@dataclass
class VerlConfig:
    """VERL options (METHODS.md §1 for the signal, §3 for the shaping).  Defaults follow the paper.

    Attributes:
        ema_rate: a, the EMA rate of the baselines (0.3): m ← (1 − a)·m + a·batch_mean.
        gain: g in τ = sigmoid(g · rel_ERA) (2.0).
        kappa: κ, the bonus is capped at |Â| / κ (2.0).
        coef: c (c0 with performance scaling), the scale of aux (1.0).
        gating: "era" (τ from ERA, default), "fixed_half" (τ = 0.5), "sum" (both channels, weight 1).
        apply_to: "all_tokens" (paper) or "last_token" (authors' release: only the final valid token).
        performance_scaling: scale c by 1 − (ē + 1)/2 (needs rewards).
        reward_min, reward_max: the reward range mapped to [−1, 1] for ē (default [0, 1]).
        stride: s of the ER prefix series (40), read by the trainer for ``latentx.dynamics``.
        window: L, the tail window of the ER prefix series (512), read by the trainer.
    """

    ema_rate: float = 0.3
    gain: float = 2.0
    kappa: float = 2.0
    coef: float = 1.0
    gating: Literal["era", "fixed_half", "sum"] = "era"
    apply_to: Literal["all_tokens", "last_token"] = "all_tokens"
    performance_scaling: bool = False
    reward_min: float = 0.0
    reward_max: float = 1.0
    stride: int = 40
    window: int = 512

    def __post_init__(self) -> None:
        _check_range("verl.ema_rate", self.ema_rate, lo=0.0, hi=1.0, lo_open=True)
        _check_range("verl.gain", self.gain)
        _check_range("verl.kappa", self.kappa, lo=0.0, lo_open=True)
        _check_range("verl.coef", self.coef, lo=0.0)
        _check_choice("verl.gating", self.gating, ("era", "fixed_half", "sum"))
        _check_choice("verl.apply_to", self.apply_to, ("all_tokens", "last_token"))
        if not isinstance(self.performance_scaling, bool):
            raise ValueError(f"verl.performance_scaling must be a bool, got {self.performance_scaling!r}")
        _check_range("verl.reward_min", self.reward_min)
        _check_range("verl.reward_max", self.reward_max)
        if not self.reward_max > self.reward_min:
            raise ValueError(
                f"verl.reward_max must be > verl.reward_min, got reward_min={self.reward_min}, reward_max={self.reward_max}"
            )
        for name, value, minimum in (("stride", self.stride, 1), ("window", self.window, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"verl.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class VerlBaselines:
    """The EMA state: baselines of ER / ERV / ERA, the reward EMA ē, and the number of updates so far.

    ``steps == 0`` means no baseline exists yet (first step: no shaping).  Values are float32 numbers
    stored as python floats (exact round trip).
    """

    er: float = 0.0
    erv: float = 0.0
    era: float = 0.0
    reward_ema: float = 0.0
    steps: int = 0


def _f32(x: Tensor, name: str, batch: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D [B] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {list(x.shape)}")
    x = x.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has a non-finite value")
    return x


def _relative(x: Tensor, baseline: float) -> Tensor:
    m = torch.tensor(baseline, dtype=torch.float32, device=x.device)
    return torch.clamp((x - m) / (m.abs() + _REL_EPS), -_REL_CLAMP, _REL_CLAMP)


def verl_effective_coef(baselines: VerlBaselines, cfg: VerlConfig) -> float:
    """c for this step: ``cfg.coef``, or ``cfg.coef · (1 − (ē + 1)/2)`` with performance scaling."""
    if not cfg.performance_scaling:
        return float(cfg.coef)
    c0 = torch.tensor(cfg.coef, dtype=torch.float32)
    reward_ema = torch.tensor(baselines.reward_ema, dtype=torch.float32)
    return float(c0 * (1.0 - (reward_ema + 1.0) / 2.0))


def verl_shape(
    advantages: Tensor,
    er: Tensor,
    erv: Tensor,
    era: Tensor,
    baselines: VerlBaselines,
    cfg: VerlConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Response-level shaped advantages Â' (METHODS.md §3 "verl"), a pure function of its inputs.

    Args:
        advantages: ``[B]`` GRPO advantages Â.
        er, erv, era: ``[B]`` effective rank and its velocity / acceleration of each response.
        baselines: the EMA state *before* this step (``steps == 0``: returns Â unchanged).
        cfg: the options.

    Returns:
        ``(shaped [B] float32, info)`` where info holds ``[B]`` float32 tensors ``rel_er``, ``rel_erv``,
        ``rel_era``, ``tau``, ``aux``, ``bonus`` (= Â' − Â) and a scalar ``coef``.
    """
    adv = _f32(advantages, "advantages")
    B = adv.shape[0]
    er, erv, era = (_f32(x, name, B).to(adv.device) for x, name in ((er, "er"), (erv, "erv"), (era, "era")))
    zeros = torch.zeros_like(adv)
    if baselines.steps == 0:  # no baseline yet: no signal on the first step
        info = {k: zeros for k in ("rel_er", "rel_erv", "rel_era", "tau", "aux", "bonus")}
        return adv.clone(), {**info, "coef": torch.tensor(0.0)}

    coef = verl_effective_coef(baselines, cfg)
    rel_er = _relative(er, baselines.er)
    rel_erv = _relative(erv, baselines.erv)
    rel_era = _relative(era, baselines.era)
    if cfg.gating == "era":
        tau = torch.sigmoid(cfg.gain * rel_era)
        aux = coef * (tau * torch.tanh(rel_er) + (1.0 - tau) * torch.tanh(rel_erv))
    elif cfg.gating == "fixed_half":
        tau = torch.full_like(adv, 0.5)
        aux = coef * (tau * torch.tanh(rel_er) + (1.0 - tau) * torch.tanh(rel_erv))
    else:  # "sum": both channels with weight 1
        tau = torch.zeros_like(adv)  # no gate; reported as 0
        aux = coef * (torch.tanh(rel_er) + torch.tanh(rel_erv))
    bonus = torch.minimum(torch.relu(aux), adv.abs() / cfg.kappa)
    shaped = adv + bonus
    info = {
        "rel_er": rel_er,
        "rel_erv": rel_erv,
        "rel_era": rel_era,
        "tau": tau,
        "aux": aux,
        "bonus": bonus,
        "coef": torch.tensor(coef),
    }
    return shaped, info


def verl_update_baselines(
    baselines: VerlBaselines,
    er: Tensor,
    erv: Tensor,
    era: Tensor,
    cfg: VerlConfig,
    rewards: Tensor | None = None,
) -> VerlBaselines:
    """The EMA update ``m ← (1 − a)·m + a·batch_mean(x)`` for ER/ERV/ERA (and ē from ``rewards``), float32.

    Pure: returns a new :class:`VerlBaselines` with ``steps + 1``.  The batch mean is over every response
    passed (an empty response has ER = ERV = ERA = 0 by METHODS.md §1).  ē is updated only when
    ``rewards`` is given: ``ē ← (1 − a)·ē + a·clamp(2·(mean r − r_min)/(r_max − r_min) − 1, −1, 1)``.
    An empty batch leaves the values unchanged (the step still counts).
    """
    er, erv, era = _f32(er, "er"), _f32(erv, "erv", er.shape[0]), _f32(era, "era", er.shape[0])
    a = torch.tensor(cfg.ema_rate, dtype=torch.float32)

    def ema(old: float, x: Tensor) -> float:
        if x.numel() == 0:
            return old
        return float((1.0 - a) * torch.tensor(old, dtype=torch.float32) + a * x.mean().cpu())

    reward_ema = baselines.reward_ema
    if rewards is not None:
        r = _f32(rewards, "rewards", er.shape[0])
        if r.numel() > 0:
            span = cfg.reward_max - cfg.reward_min
            mapped = torch.clamp(2.0 * (r.mean().cpu() - cfg.reward_min) / span - 1.0, -1.0, 1.0)
            reward_ema = ema(reward_ema, mapped.reshape(1))
    return VerlBaselines(
        er=ema(baselines.er, er),
        erv=ema(baselines.erv, erv),
        era=ema(baselines.era, era),
        reward_ema=reward_ema,
        steps=baselines.steps + 1,
    )


def verl_token_advantages(advantages: Tensor, shaped: Tensor, mask: Tensor, apply_to: str) -> Tensor:
    """Spread response-level advantages over tokens, float32 ``[B, T]`` (0 at padding).

    ``"all_tokens"``: every valid token of response i gets Â'_i.  ``"last_token"``: every valid token gets
    Â_i except the last valid one, which gets Â'_i (an empty response has no token to change).
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.dtype != torch.bool or mask.shape[0] != shaped.shape[0]:
        raise ValueError(f"mask must be a bool [B, T] tensor with B = {shaped.shape[0]}, got {getattr(mask, 'shape', mask)}")
    adv = advantages.detach().to(torch.float32).to(mask.device)
    shaped = shaped.to(torch.float32).to(mask.device)
    if apply_to == "all_tokens":
        token_adv = shaped[:, None].expand_as(mask)
    elif apply_to == "last_token":
        T = mask.shape[1]
        positions = torch.arange(T, device=mask.device)[None, :].expand_as(mask)
        last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)  # -1 for empty rows
        is_last = positions == last[:, None]
        token_adv = torch.where(is_last, shaped[:, None], adv[:, None])
    else:
        raise ValueError(f"verl.apply_to must be 'all_tokens' or 'last_token', got {apply_to!r}")
    return torch.where(mask, token_adv, torch.zeros((), dtype=torch.float32, device=mask.device))


class VerlShaper:
    """Stateful VERL shaping across training steps: call :meth:`shape` once per rollout batch.

    ``shape`` shapes with the baselines of the previous steps, then updates them with this batch (so a
    step never sees its own statistics).  ``state_dict`` / ``load_state_dict`` make a resumed run
    continue exactly.
    """

    def __init__(self, cfg: VerlConfig) -> None:
        self.cfg = cfg
        self.baselines = VerlBaselines()

    def shape(
        self,
        advantages: Tensor,
        er: Tensor,
        erv: Tensor,
        era: Tensor,
        mask: Tensor,
        rewards: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Shape one step's advantages; returns ``(token_advantages [B, T] float32, info)``.

        ``info`` (python floats): ``verl_first_step``, ``verl_coef``, ``verl_bonus_mean``,
        ``verl_bonus_frac`` (responses whose advantage changed), ``verl_tau_mean``, ``verl_aux_mean``,
        ``verl_rel_er_mean``, ``verl_rel_erv_mean``, ``verl_rel_era_mean``, the baselines used
        (``verl_m_er`` ...) and ``verl_reward_ema``.
        """
        if self.cfg.performance_scaling and rewards is None:
            raise ValueError("verl.performance_scaling needs the step's rewards (pass rewards=...)")
        used = self.baselines
        shaped, parts = verl_shape(advantages, er, erv, era, used, self.cfg)
        token_adv = verl_token_advantages(advantages, shaped, mask, self.cfg.apply_to)
        self.baselines = verl_update_baselines(used, er, erv, era, self.cfg, rewards)

        def mean(x: Tensor) -> float:
            return float(x.mean()) if x.numel() else 0.0

        info = {
            "verl_first_step": 1.0 if used.steps == 0 else 0.0,
            "verl_coef": float(parts["coef"]),
            "verl_bonus_mean": mean(parts["bonus"]),
            "verl_bonus_frac": mean((parts["bonus"] > 0).float()),
            "verl_tau_mean": mean(parts["tau"]),
            "verl_aux_mean": mean(parts["aux"]),
            "verl_rel_er_mean": mean(parts["rel_er"]),
            "verl_rel_erv_mean": mean(parts["rel_erv"]),
            "verl_rel_era_mean": mean(parts["rel_era"]),
            "verl_m_er": used.er,
            "verl_m_erv": used.erv,
            "verl_m_era": used.era,
            "verl_reward_ema": used.reward_ema,
        }
        return token_adv, info

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.baselines)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = set(asdict(VerlBaselines()))
        if set(state) != expected:
            raise ValueError(f"VerlShaper state must have keys {sorted(expected)}, got {sorted(state)}")
        self.baselines = VerlBaselines(
            er=float(state["er"]),
            erv=float(state["erv"]),
            era=float(state["era"]),
            reward_ema=float(state["reward_ema"]),
            steps=int(state["steps"]),
        )


def verl_loss(batch: PolicyBatch, cfg: GRPOConfig) -> LossOutput:
    """VERL's loss is the GRPO loss on the shaped advantages already in ``batch.advantages``
    (``[B, T]`` from :meth:`VerlShaper.shape`)."""
    return grpo_loss(batch, cfg)


def _verl_shape_hook(
    shaper: VerlShaper, advantages: Tensor, signals: Mapping[str, Tensor], mask: Tensor, rewards: Tensor | None
) -> tuple[Tensor, dict[str, float]]:
    missing = [k for k in ("er", "erv", "era") if k not in signals]
    if missing:
        raise ValueError(f"the 'verl' objective needs the rank signals {missing} (signal 'rank')")
    return shaper.shape(advantages, signals["er"], signals["erv"], signals["era"], mask, rewards)


register_objective(
    name="verl",
    config_class=VerlConfig,
    needs=lambda config, grpo: {"rank"},
    loss=lambda batch, config, grpo, state: verl_loss(batch, grpo),
    new_state=lambda config, seed: VerlShaper(config),
    shape_advantages=_verl_shape_hook,
    state_key="verl",
    state_attribute="verl_shaper",
)
