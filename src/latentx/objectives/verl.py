"""VERL: advantage shaping with the effective rank of hidden states (METHODS.md sections 3 "verl" and 3b).

For x ∈ {ER, ERV, ERA} (METHODS.md §1) an EMA baseline m_x (init 0) is kept across steps:

    rel_x = clamp((x_i − m_x) / (|m_x| + 1e-8), −5, 5)
    τ_i   = sigmoid(g · rel_ERA)                                 (gating="era"; "fixed_half": τ = 0.5)
    aux_i = c · [τ_i · tanh(rel_ER) + (1 − τ_i) · tanh(rel_ERV)]   ("sum": c · [tanh(rel_ER) + tanh(rel_ERV)])
    Â'_i  = Â_i + min(relu(aux_i), |Â_i| / κ)

and nothing is shaped on the very first step (there is no baseline yet).  Â' goes to every token of the
response ("all_tokens", paper) or only to its last valid token ("last_token").  Performance scaling
(option) replaces c by ``c0 · (1 − (ē + 1)/2)``.

How the shaping is *computed* follows either the paper (METHODS.md §3) or the authors' released code
(§3b).  Each point where they differ is one option; ``preset`` sets all of them at once:

==================  ==================  ===================  ==================  ==============================
option              paper (default)     release              enabled             what it changes
==================  ==================  ===================  ==================  ==============================
aux_in_reward       False               False                True                r_i + aux_i enters GRPO's group
                                                                                 normalisation (Â itself moves)
advantage_bonus     True                False                True                the clipped bonus on Â
apply_to            all_tokens          last_token           last_token          where the bonus lands
ema_lag             False               True                 True                baselines lag one more step
performance_ema     mapped              raw                  raw                 ē of 2r−1 from step 1, or of
                                                                                 the raw score from step 2
dtype               float32             bfloat16             bfloat16            ER, aux, rewards, Â rounded
==================  ==================  ===================  ==================  ==============================

``release`` is exactly the released training script, which never shapes: its advantages are GRPO's,
bit for bit (the shaper hands them back untouched and says so once in the log).  ``enabled`` is that
code with its shaping switched on.  The rule for mixing: a preset fixes these six options; an explicit
option that agrees with it is accepted, one that contradicts it is an error naming both fields (leave
``preset`` unset to combine the options freely — unset options then take the paper's values).  The
hyperparameters (``ema_rate``, ``gain``, ``kappa``, ``coef``, ``gating``, ``performance_scaling``,
``stride``, ``window``) are not part of a preset: their defaults are the released script's settings,
which are also the paper's, and they can be changed under any preset.

Timing of the EMA (``ema_lag``): without lag, step t shapes against the EMA of the batch means of steps
1..t−1 and then folds in step t's means.  With lag (the release), the EMA folds in the *previous*
step's means after shaping, so step t shapes against steps 1..t−2: step 1 is unshaped, step 2 shapes
against a baseline of 0 (every rel is clamped to ±5).

``performance_ema``: "mapped" (ours) tracks ``clamp(2·(mean r − r_min)/(r_max − r_min) − 1, −1, 1)`` from
step 1; "raw" (the release) tracks the raw mean score and is first updated on step 2.

``dtype="bfloat16"`` reproduces where the release rounds: ER / ERV / ERA and their batch means are
bfloat16, rel / τ / tanh are evaluated in bfloat16, the weighted sum aux is float32, the shaped reward
r + aux is stored in bfloat16 (so the bonus sees ``aux = bf16(r + aux) − r``), and the advantages the
shaper writes are rounded to bfloat16: Â + bonus, and with ``aux_in_reward`` the re-normalised Â, for
which GRPO itself runs in bfloat16 as in the release (group mean and std rounded, each operation
rounded).  An inert shaper writes nothing, so it rounds nothing.

The float32 path evaluates the signal in float64 and stores float32 (GRPO may divide r + aux by a small
group std, which would magnify float32 round-off).  The math is the pure functions :func:`verl_shape` / :func:`verl_update_baselines` (one step:
:func:`verl_step`); :class:`VerlShaper` holds the state across steps.  Every adapter (the trainer, TRL,
verl) calls these.

Reference: Huang et al., "Beyond the Exploration-Exploitation Trade-off: A Hidden State Approach for LLM
Reasoning in RLVR", arXiv:2509.23808 (2025); released code hf618/VERL (METHODS.md §3b).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Literal, Mapping, Optional

import torch
from torch import Tensor

from latentx.objectives.base import GRPOConfig, LossOutput, PolicyBatch, _check_choice, _check_range, register_objective
from latentx.objectives.grpo import group_advantages, grpo_loss

__all__ = [
    "VERL_PRESETS",
    "VerlConfig",
    "VerlBehaviour",
    "VerlBaselines",
    "VerlInputs",
    "VerlStep",
    "verl_shape",
    "verl_effective_coef",
    "verl_update_baselines",
    "verl_step",
    "verl_token_advantages",
    "VerlShaper",
    "log_notice",
    "verl_loss",
]

logger = logging.getLogger("latentx.verl")

_REL_EPS = 1e-8
_REL_CLAMP = 5.0

#: The options of METHODS.md §3b that a preset fixes, with each preset's values.
VERL_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        aux_in_reward=False, advantage_bonus=True, apply_to="all_tokens", ema_lag=False,
        performance_ema="mapped", dtype="float32",
    ),
    "release": dict(
        aux_in_reward=False, advantage_bonus=False, apply_to="last_token", ema_lag=True,
        performance_ema="raw", dtype="bfloat16",
    ),
    "enabled": dict(
        aux_in_reward=True, advantage_bonus=True, apply_to="last_token", ema_lag=True,
        performance_ema="raw", dtype="bfloat16",
    ),
}

_CHOICES: dict[str, tuple[Any, ...]] = {
    "aux_in_reward": (False, True),
    "advantage_bonus": (False, True),
    "apply_to": ("all_tokens", "last_token"),
    "ema_lag": (False, True),
    "performance_ema": ("mapped", "raw"),
    "dtype": ("float32", "bfloat16"),
}

_NOTICES = {
    "release": (
        "verl.preset=release: the authors' released training script never shapes (train.sh passes "
        "add_reward False), so these advantages are plain GRPO's, bit for bit; ER / ERV / ERA are only "
        "computed and logged"
    ),
    "enabled": (
        "verl.preset=enabled: the authors' code with its shaping on (aux added to the reward before GRPO's "
        "group normalisation and as a clipped last-token bonus, baselines lagged one step, raw-score "
        "performance EMA, bfloat16)"
    ),
}


@dataclass(frozen=True)
class VerlBehaviour:
    """The resolved values of the §3b options (what :attr:`VerlConfig.behaviour` returns)."""

    aux_in_reward: bool
    advantage_bonus: bool
    apply_to: str
    ema_lag: bool
    performance_ema: str
    dtype: str

    @property
    def inert(self) -> bool:
        """Neither the reward nor the advantage receives aux: the advantages pass through unchanged."""
        return not self.aux_in_reward and not self.advantage_bonus

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"


@dataclass
class VerlConfig:
    """VERL options (METHODS.md §1 for the signal, §3 for the shaping, §3b for the released code).

    Attributes:
        preset: None (default: each option below as given, unset ones at the paper's values), "paper",
            "release" (the released script: inert, = GRPO) or "enabled" (the released code with shaping
            on).  A preset fixes ``aux_in_reward``, ``advantage_bonus``, ``apply_to``, ``ema_lag``,
            ``performance_ema`` and ``dtype``; an explicit value that contradicts it is an error.
        ema_rate: a, the EMA rate of the baselines (0.3): m ← (1 − a)·m + a·batch_mean.
        gain: g in τ = sigmoid(g · rel_ERA) (2.0).
        kappa: κ, the bonus is capped at |Â| / κ (2.0).
        coef: c (c0 with performance scaling), the scale of aux (1.0).
        gating: "era" (τ from ERA, default; the release's "PlanB"), "fixed_half" (τ = 0.5, "FixTwo"),
            "sum" (both channels, weight 1, "FixOne").
        apply_to: "all_tokens" (paper) or "last_token" (release: only the final valid token gets the bonus).
        advantage_bonus: add min(relu(aux), |Â|/κ) to Â (paper: True).
        aux_in_reward: add aux to the reward before GRPO's group normalisation (release with shaping on).
        ema_lag: the release's one-step lag of the baselines (module docstring).
        performance_ema: "mapped" (ē of the reward mapped to [−1, 1], from step 1) or "raw" (release).
        dtype: "float32" (paper) or "bfloat16" (where the release rounds, module docstring).
        performance_scaling: scale c by 1 − (ē + 1)/2 (needs rewards).
        reward_min, reward_max: the reward range mapped to [−1, 1] for ē "mapped" (default [0, 1]).
        stride: s of the ER prefix series (40), read by the trainer for ``latentx.dynamics``.
        window: L, the tail window of the ER prefix series (512), read by the trainer.

    The resolved §3b options are :attr:`behaviour`; the fields themselves keep what was written (None =
    not set), so that a saved config reloads, and overriding ``preset`` later works, unchanged.
    """

    preset: Optional[Literal["paper", "release", "enabled"]] = None
    ema_rate: float = 0.3
    gain: float = 2.0
    kappa: float = 2.0
    coef: float = 1.0
    gating: Literal["era", "fixed_half", "sum"] = "era"
    apply_to: Optional[Literal["all_tokens", "last_token"]] = None
    advantage_bonus: Optional[bool] = None
    aux_in_reward: Optional[bool] = None
    ema_lag: Optional[bool] = None
    performance_ema: Optional[Literal["mapped", "raw"]] = None
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    performance_scaling: bool = False
    reward_min: float = 0.0
    reward_max: float = 1.0
    stride: int = 40
    window: int = 512

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in VERL_PRESETS:
            raise ValueError(
                f"verl.preset must be one of {', '.join(map(repr, VERL_PRESETS))} (or unset), got {self.preset!r}"
            )
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value is not None and (value not in choices or type(value) is not type(choices[0])):
                raise ValueError(f"verl.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
            if self.preset is not None and value is not None and value != VERL_PRESETS[self.preset][name]:
                raise ValueError(
                    f"verl.{name}={value!r} contradicts verl.preset={self.preset!r} (which sets "
                    f"verl.{name}={VERL_PRESETS[self.preset][name]!r}); drop one of them, or leave verl.preset "
                    "unset to combine options freely"
                )
        behaviour = self.behaviour
        if behaviour.ema_lag and not isinstance(self.ema_rate, bool) and self.ema_rate == 0:
            raise ValueError(
                "verl.ema_lag needs verl.ema_rate > 0 (with rate 0 the lagged baselines stay 0 for ever), got "
                f"verl.ema_rate={self.ema_rate!r}"
            )
        _check_range("verl.ema_rate", self.ema_rate, lo=0.0, hi=1.0, lo_open=True)
        _check_range("verl.gain", self.gain)
        _check_range("verl.kappa", self.kappa, lo=0.0, lo_open=True)
        _check_range("verl.coef", self.coef, lo=0.0)
        _check_choice("verl.gating", self.gating, ("era", "fixed_half", "sum"))
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

    @property
    def behaviour(self) -> VerlBehaviour:
        """The §3b options resolved: explicit values, else the preset's, else the paper's."""
        base = VERL_PRESETS[self.preset or "paper"]
        values = {name: base[name] if getattr(self, name) is None else getattr(self, name) for name in _CHOICES}
        return VerlBehaviour(**values)

    def notice(self) -> str | None:
        """The one line a run logs about what this configuration does (None for the paper's shaping)."""
        if self.preset in _NOTICES:
            return _NOTICES[self.preset]
        if self.behaviour.inert:
            return (
                "verl: verl.aux_in_reward and verl.advantage_bonus are both off, so the advantages are plain "
                "GRPO's, bit for bit; ER / ERV / ERA are only computed and logged"
            )
        return None


@dataclass
class VerlBaselines:
    """The EMA state: baselines of ER / ERV / ERA, the reward EMA ē, and the number of updates so far.

    ``steps == 0`` means no baseline exists yet (first step: no shaping).  With ``ema_lag`` the previous
    step's batch means wait in ``pending_*`` until the next update.  Values are float32 numbers stored as
    python floats (exact round trip).
    """

    er: float = 0.0
    erv: float = 0.0
    era: float = 0.0
    reward_ema: float = 0.0
    steps: int = 0
    pending_er: float = 0.0
    pending_erv: float = 0.0
    pending_era: float = 0.0


@dataclass(frozen=True)
class VerlInputs:
    """One step's per-response inputs to the shaping (:func:`verl_shape`, :func:`verl_step`,
    :meth:`VerlShaper.shape`): every adapter builds one.

    Attributes:
        advantages: ``[B]`` GRPO advantages Â of the raw rewards.
        er, erv, era: ``[B]`` effective rank and its velocity / acceleration of each response
            (:func:`latentx.dynamics.rank_dynamics`).
        rewards: ``[B]`` raw rewards; needed with ``aux_in_reward``, ``dtype="bfloat16"`` or performance
            scaling.
        group: ``[B]`` integer prompt groups; needed with ``aux_in_reward``: Â is recomputed from r + aux by
            GRPO (:func:`latentx.objectives.group_advantages`) with ``advantage_eps`` / ``advantage_std``
            (Dr. GRPO: False), the estimator that made ``advantages``.  With ``dtype="bfloat16"`` that GRPO
            runs in bfloat16 as the release ran it (:func:`_grpo_bf16`).
    """

    advantages: Tensor
    er: Tensor
    erv: Tensor
    era: Tensor
    rewards: Tensor | None = None
    group: Tensor | None = None
    advantage_eps: float = 1e-6
    advantage_std: bool = True


def _f32(x: Tensor, name: str, batch: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D [B] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}], got {list(x.shape)}")
    x = x.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has a non-finite value")
    return x


def _bf16(x: Tensor) -> Tensor:
    """Round float32 values to bfloat16 and back (the value a bfloat16 tensor would hold)."""
    return x.to(torch.bfloat16).to(torch.float32)


def _relative(x: Tensor, baseline: float) -> Tensor:
    """rel = clamp((x − m)/(|m| + 1e-8), ±5) in x's dtype (bfloat16 rounds after each operation)."""
    return torch.clamp((x - baseline) / (abs(baseline) + _REL_EPS), -_REL_CLAMP, _REL_CLAMP)


def verl_effective_coef(baselines: VerlBaselines, cfg: VerlConfig) -> float:
    """c for this step: ``cfg.coef``, or ``cfg.coef · (1 − (ē + 1)/2)`` with performance scaling."""
    if not cfg.performance_scaling:
        return float(cfg.coef)
    c0 = torch.tensor(cfg.coef, dtype=torch.float32)
    reward_ema = torch.tensor(baselines.reward_ema, dtype=torch.float32)
    return float(c0 * (1.0 - (reward_ema + 1.0) / 2.0))


def _aux(er: Tensor, erv: Tensor, era: Tensor, baselines: VerlBaselines, cfg: VerlConfig, coef: float) -> dict[str, Tensor]:
    """rel_x, τ (float32 ``[B]``) and aux: in bfloat16 where ``dtype`` says so (aux float32, module
    docstring), else in float64 (aux float64: GRPO may divide r + aux by a small group std)."""
    bf16 = cfg.behaviour.bf16
    dt, wdt = (torch.bfloat16, torch.float32) if bf16 else (torch.float64, torch.float64)
    rel_er = _relative(er.to(dt), baselines.er)
    rel_erv = _relative(erv.to(dt), baselines.erv)
    rel_era = _relative(era.to(dt), baselines.era)
    if cfg.gating == "era":
        tau = torch.sigmoid(cfg.gain * rel_era)
        w_er, w_erv = tau.to(wdt), (1.0 - tau).to(wdt)
    elif cfg.gating == "fixed_half":
        tau = torch.full_like(rel_er, 0.5)
        w_er = w_erv = torch.full_like(er, 0.5, dtype=wdt)
    else:  # "sum": both channels with weight 1, no gate (τ reported as 0)
        tau = torch.zeros_like(rel_er)
        w_er = w_erv = torch.ones_like(er, dtype=wdt)
    aux = (torch.tanh(rel_erv).to(wdt) * w_erv + torch.tanh(rel_er).to(wdt) * w_er) * coef
    return {"rel_er": rel_er.float(), "rel_erv": rel_erv.float(), "rel_era": rel_era.float(), "tau": tau.float(), "aux": aux}


def _grpo_bf16(scores: Tensor, group: Tensor, eps: float, std_normalize: bool) -> Tensor:
    """GRPO (METHODS.md §0) the way the release computes it on bfloat16 scores: the group mean and the
    unbiased group std are bfloat16 numbers, and ``(s − mean)`` and ``/(std + ε)`` each round to
    bfloat16.  ``scores`` holds bfloat16 values; returns float32 ``[B]``.  A group of one gets 0."""
    if not isinstance(group, Tensor) or tuple(group.shape) != tuple(scores.shape):
        raise ValueError(f"group must be a [B] tensor matching the rewards {list(scores.shape)}, got {getattr(group, 'shape', group)}")
    _, index = torch.unique(group, return_inverse=True)
    n = int(index.max()) + 1 if index.numel() else 0
    count = torch.zeros(n, device=scores.device).index_add_(0, index, torch.ones_like(scores))
    total = torch.zeros(n, device=scores.device).index_add_(0, index, scores)
    mean = _bf16(total / count)[index]
    centred = scores - (total / count)[index]
    var = torch.zeros(n, device=scores.device).index_add_(0, index, centred * centred) / (count - 1).clamp(min=1)
    std = _bf16(var.sqrt())[index]
    out = _bf16(scores - mean)
    if std_normalize:
        out = _bf16(out / _bf16(std + eps))
    return torch.where(count[index] > 1, out, torch.zeros_like(out))


def verl_shape(inputs: VerlInputs, baselines: VerlBaselines, cfg: VerlConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Response-level shaped advantages Â' (METHODS.md §3 "verl", §3b), a pure function of its inputs.

    Args:
        inputs: the step's Â, ER / ERV / ERA, and (as the options need them) rewards, prompt groups and the
            GRPO estimator (:class:`VerlInputs`; performance scaling's rewards are the caller's concern).
        baselines: the EMA state *before* this step (``steps == 0``: no signal yet).
        cfg: the options.

    Returns:
        ``(shaped [B] float32, info)``.  info holds ``[B]`` float32 tensors ``advantages`` (the Â every
        token but the bonus token carries: the input Â, or the re-normalised one with ``aux_in_reward``),
        ``rel_er``, ``rel_erv``, ``rel_era``, ``tau``, ``aux``, ``bonus`` (= Â' − info["advantages"]),
        ``shaped_rewards``, and scalars ``coef`` and ``active`` (1 when a signal was applied).
    """
    b = cfg.behaviour
    adv = _f32(inputs.advantages, "advantages")
    B = adv.shape[0]
    er, erv, era = (_f32(getattr(inputs, name), name, B).to(adv.device) for name in ("er", "erv", "era"))
    r = None if inputs.rewards is None else _f32(inputs.rewards, "rewards", B).to(adv.device)
    group = inputs.group
    zeros = torch.zeros_like(adv)
    if b.inert or baselines.steps == 0:
        # Inert: the advantages pass through untouched, bit for bit.  First step: no baseline yet, so no
        # signal; the release still holds these advantages in bfloat16.
        base = adv.clone() if b.inert or not b.bf16 else _bf16(adv)
        info = {k: zeros for k in ("rel_er", "rel_erv", "rel_era", "tau", "aux", "bonus")}
        info.update(advantages=base, shaped_rewards=r.clone() if r is not None else zeros)
        return base.clone(), {**info, "coef": torch.tensor(0.0), "active": torch.tensor(0.0)}
    if (b.aux_in_reward or b.bf16) and r is None:
        which = "verl.aux_in_reward" if b.aux_in_reward else "verl.dtype='bfloat16'"
        raise ValueError(f"{which} needs the step's rewards (pass rewards=...)")
    if b.aux_in_reward and group is None:
        raise ValueError("verl.aux_in_reward needs the prompt group of each response (pass group=...)")

    coef = verl_effective_coef(baselines, cfg)
    parts = _aux(er, erv, era, baselines, cfg, coef)
    aux = parts["aux"]
    if b.bf16:
        r16 = _bf16(r)
        shaped_rewards = _bf16(r16 + aux)  # the release stores r + aux in a bfloat16 tensor
        aux_bonus = _bf16(shaped_rewards - r16)  # and reads aux back as shaped − original reward
    else:
        shaped_rewards = aux if r is None else r.double() + aux
        aux_bonus = aux
    if b.aux_in_reward:
        if b.bf16:
            base = _grpo_bf16(shaped_rewards, group.to(adv.device), inputs.advantage_eps, inputs.advantage_std)
        else:
            base = group_advantages(
                shaped_rewards, group.to(adv.device), eps=inputs.advantage_eps, std_normalize=inputs.advantage_std
            )
    else:
        base = adv
    if b.bf16:
        base = _bf16(base)
    if b.advantage_bonus:
        cap = base.abs() / cfg.kappa
        bonus = torch.minimum(torch.relu(aux_bonus), _bf16(cap) if b.bf16 else cap)
        shaped = _bf16(base + bonus) if b.bf16 else (base.double() + bonus).float()
        bonus = shaped - base
    else:
        bonus, shaped = zeros, base.clone()
    info = {
        **parts,
        "aux": aux.float(),
        "advantages": base,
        "bonus": bonus,
        "shaped_rewards": shaped_rewards.float(),
        "coef": torch.tensor(coef),
        "active": torch.tensor(1.0),
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
    passed (an empty response has ER = ERV = ERA = 0 by METHODS.md §1); with ``dtype="bfloat16"`` it is
    the bfloat16 mean of the bfloat16 values.  With ``ema_lag`` the EMA folds in the means held from the
    previous update (none on the first) and holds this batch's.  ē is updated only when ``rewards`` is
    given: "mapped" ``ē ← (1 − a)·ē + a·clamp(2·(mean r − r_min)/(r_max − r_min) − 1, −1, 1)`` on every
    update, "raw" ``ē ← (1 − a)·ē + a·mean r`` from the second update on.  An empty batch leaves the values
    unchanged (the step still counts).
    """
    b = cfg.behaviour
    er, erv, era = _f32(er, "er"), _f32(erv, "erv", er.shape[0]), _f32(era, "era", er.shape[0])
    a = torch.tensor(cfg.ema_rate, dtype=torch.float32)

    def batch_mean(x: Tensor) -> float | None:
        if x.numel() == 0:
            return None
        if b.bf16:
            return float(x.to(torch.bfloat16).mean().float().cpu())
        return float(x.mean().cpu())

    def ema(old: float, new: float | None) -> float:
        if new is None:
            return old
        return float((1.0 - a) * torch.tensor(old, dtype=torch.float32) + a * torch.tensor(new, dtype=torch.float32))

    means = {"er": batch_mean(er), "erv": batch_mean(erv), "era": batch_mean(era)}
    state = asdict(baselines)
    if b.ema_lag:
        for key, mean in means.items():
            if baselines.steps >= 1:
                state[key] = ema(state[key], state[f"pending_{key}"])
            if mean is not None:
                state[f"pending_{key}"] = mean
    else:
        for key, mean in means.items():
            state[key] = ema(state[key], mean)

    if rewards is not None:
        r = _f32(rewards, "rewards", er.shape[0])
        if r.numel() > 0:
            if b.performance_ema == "mapped":
                span = cfg.reward_max - cfg.reward_min
                mapped = torch.clamp(2.0 * (r.mean().cpu() - cfg.reward_min) / span - 1.0, -1.0, 1.0)
                state["reward_ema"] = ema(state["reward_ema"], float(mapped))
            elif baselines.steps >= 1:  # "raw", first updated on step 2
                state["reward_ema"] = ema(state["reward_ema"], float(r.mean().cpu()))
    state["steps"] = baselines.steps + 1
    return VerlBaselines(**state)


@dataclass
class VerlStep:
    """One step of :func:`verl_step`: Â for the response's other tokens, Â' for its bonus token(s), the
    per-response parts, and the EMA state after the step."""

    advantages: Tensor
    shaped: Tensor
    parts: dict[str, Tensor]
    baselines: VerlBaselines


def verl_step(inputs: VerlInputs, baselines: VerlBaselines, cfg: VerlConfig) -> VerlStep:
    """Shape with the baselines of the previous steps (:func:`verl_shape`), then update them with this
    batch (:func:`verl_update_baselines`), so a step never sees its own statistics.  Pure."""
    if cfg.performance_scaling and inputs.rewards is None:
        raise ValueError("verl.performance_scaling needs the step's rewards (pass rewards=...)")
    shaped, parts = verl_shape(inputs, baselines, cfg)
    new = verl_update_baselines(baselines, inputs.er, inputs.erv, inputs.era, cfg, inputs.rewards)
    return VerlStep(advantages=parts["advantages"], shaped=shaped, parts=parts, baselines=new)


def verl_step_info(step: VerlStep, used: VerlBaselines, prefix: str = "verl_") -> dict[str, float]:
    """The step's diagnostics as python floats (means over the batch), keys ``<prefix>bonus_mean`` ..."""
    parts = step.parts

    def mean(x: Tensor) -> float:
        return float(x.float().mean()) if x.numel() else 0.0

    info = {
        "first_step": 1.0 if used.steps == 0 else 0.0,
        "active": float(parts["active"]),
        "coef": float(parts["coef"]),
        "bonus_mean": mean(parts["bonus"]),
        "bonus_frac": mean((parts["bonus"] > 0).float()),
        "tau_mean": mean(parts["tau"]),
        "aux_mean": mean(parts["aux"]),
        "rel_er_mean": mean(parts["rel_er"]),
        "rel_erv_mean": mean(parts["rel_erv"]),
        "rel_era_mean": mean(parts["rel_era"]),
        "m_er": used.er,
        "m_erv": used.erv,
        "m_era": used.era,
        "reward_ema": used.reward_ema,
    }
    return {f"{prefix}{key}": value for key, value in info.items()}


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


def log_notice(cfg: VerlConfig) -> str | None:
    """Log :meth:`VerlConfig.notice` on the ``latentx.verl`` logger (WARNING when the shaping is inert,
    INFO otherwise) and return it.  Adapters call it once per run (:meth:`VerlShaper.announce`)."""
    note = cfg.notice()
    if note:
        logger.log(logging.WARNING if cfg.behaviour.inert else logging.INFO, note)
    return note


class VerlShaper:
    """Stateful VERL shaping across training steps: call :meth:`shape` once per rollout batch.

    ``shape`` is :func:`verl_step` with the state kept here; ``state_dict`` / ``load_state_dict`` make a
    resumed run continue exactly.  The first call logs :meth:`VerlConfig.notice` once (WARNING when the
    shaping is inert, INFO otherwise).
    """

    def __init__(self, cfg: VerlConfig) -> None:
        self.cfg = cfg
        self.baselines = VerlBaselines()
        self._noticed = False

    def announce(self, log: Callable[[str], Any] | None = None) -> str | None:
        """Log the configuration's notice the first time: with ``log`` (the trainer's printer) when given,
        else on the ``latentx.verl`` logger.  Returns it; None afterwards or when there is none."""
        if self._noticed:
            return None
        self._noticed = True
        if log is None:
            return log_notice(self.cfg)
        note = self.cfg.notice()
        if note:
            log(note)
        return note

    def step(self, inputs: VerlInputs) -> tuple[VerlStep, dict[str, float]]:
        """Response-level: :func:`verl_step` on the held baselines (which advance), with its diagnostics."""
        self.announce()
        used = self.baselines
        out = verl_step(inputs, used, self.cfg)
        self.baselines = out.baselines
        return out, verl_step_info(out, used)

    def shape(self, inputs: VerlInputs, mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Shape one step's advantages; returns ``(token_advantages [B, T] float32, info)``.

        ``info`` (python floats): ``verl_first_step``, ``verl_active``, ``verl_coef``, ``verl_bonus_mean``,
        ``verl_bonus_frac`` (responses whose advantage got a bonus), ``verl_tau_mean``, ``verl_aux_mean``,
        ``verl_rel_er_mean``, ``verl_rel_erv_mean``, ``verl_rel_era_mean``, the baselines used
        (``verl_m_er`` ...) and ``verl_reward_ema``.  ``inputs.group`` (and the GRPO estimator's
        ``advantage_eps`` / ``advantage_std``) is needed with ``aux_in_reward``.
        """
        out, info = self.step(inputs)
        token_adv = verl_token_advantages(out.advantages, out.shaped, mask, self.cfg.behaviour.apply_to)
        return token_adv, info

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.baselines)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = {f.name for f in fields(VerlBaselines)}
        required = {"er", "erv", "era", "reward_ema", "steps"}  # pending_* are absent in older checkpoints
        if not required <= set(state) <= expected:
            raise ValueError(f"VerlShaper state must have keys {sorted(expected)}, got {sorted(state)}")
        values = {k: float(v) for k, v in state.items() if k != "steps"}
        self.baselines = VerlBaselines(**values, steps=int(state["steps"]))


def verl_loss(batch: PolicyBatch, cfg: GRPOConfig) -> LossOutput:
    """VERL's loss is the GRPO loss on the shaped advantages already in ``batch.advantages``
    (``[B, T]`` from :meth:`VerlShaper.shape`)."""
    return grpo_loss(batch, cfg)


def _verl_shape_hook(
    shaper: VerlShaper,
    advantages: Tensor,
    signals: Mapping[str, Tensor],
    mask: Tensor,
    rewards: Tensor | None,
    group: Tensor | None = None,
    grpo: GRPOConfig | None = None,
) -> tuple[Tensor, dict[str, float]]:
    missing = [k for k in ("er", "erv", "era") if k not in signals]
    if missing:
        raise ValueError(f"the 'verl' objective needs the rank signals {missing} (signal 'rank')")
    grpo = grpo if grpo is not None else GRPOConfig()
    inputs = VerlInputs(
        advantages, signals["er"], signals["erv"], signals["era"], rewards, group,
        advantage_eps=grpo.advantage_eps, advantage_std=grpo.advantage_std,
    )
    return shaper.shape(inputs, mask)


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
