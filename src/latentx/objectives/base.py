"""Shared pieces of every objective: the batch, the loss output, the GRPO config and masked helpers.

Specification: ``shared/docs/METHODS.md`` section 0 (notation, GRPO advantage) and section 3 (the
clipped surrogate, token-mean aggregation, the k3 KL to a frozen reference).

Conventions used by every objective in :mod:`latentx.objectives`:

- Token tensors are ``[B, T]`` (B responses padded to T tokens); ``mask`` is a bool ``[B, T]`` that is
  True on real response tokens.  Values at padded positions are never read: they are replaced by 0
  *before* any arithmetic, so garbage (even NaN/inf) in the padding cannot leak into the loss or its
  gradient.
- "Token-mean" aggregation is the global mean over all valid tokens of the micro-batch
  (``sum(loss * mask) / sum(mask)``), as in METHODS.md section 3 and verl's ``loss_agg_mode="token-mean"``.
- A micro-batch without any valid token (every response empty) gives a loss of exactly 0 that is still
  connected to the graph (its gradient is 0), and every token diagnostic is 0.  No NaN.
- All loss arithmetic is done in float32 (inputs in bf16/fp16 are upcast).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

__all__ = [
    "PolicyBatch",
    "LossOutput",
    "GRPOConfig",
    "ClipConfig",
    "masked_mean",
    "token_mean",
    "per_response_mean",
    "k3_kl",
    "masked_log_ratio",
    "valid_only",
    "to_floats",
    "fill_unset",
    "SIGNALS",
    "ObjectiveSpec",
    "register_objective",
    "REGISTRY",
    "objective_spec",
    "parse_objective_spec",
]

#: Log-ratios (log π_θ − log π_old) and KL log-differences are clamped to ±LOG_RATIO_CLAMP before exp(),
#: as verl does, so a degenerate token (e.g. a rollout log-prob of −1e4) cannot overflow to inf/NaN.
#: Within the clamp the formulas are exact; beyond it the token has no gradient through the ratio.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------------
# Configuration shared by every objective
# --------------------------------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    """The GRPO part shared by every objective (METHODS.md sections 0 and 3).

    Attributes:
        clip_low: ε_lo, the ratio is clipped below at ``1 - clip_low`` (0.2).
        clip_high: ε_hi, the ratio is clipped above at ``1 + clip_high`` (0.2; DAPO "clip-higher" raises it).
        kl_coef: β_KL, weight of the token-mean k3 KL to a frozen reference (0 = no reference needed).
        advantage_std: True divides the group-centred reward by the group std (GRPO);
            False keeps only the centring ("Dr. GRPO").  Read by :func:`latentx.objectives.grpo.group_advantages`
            through whoever computes the advantages (the trainer); the losses take advantages as given.
        advantage_eps: ε in ``(r - mean) / (std + ε)`` (1e-6).
        dual_clip: c of dual-clip PPO (Ye et al. 2020): for Â < 0 the per-token loss is capped at −c·Â;
            0 = off (default), > 1 on (the ReLaX authors' code: 10, METHODS.md §3a).
        clip_low may be 1 (ratio clipped below at 0, the authors' range [0, 2]).
    """

    clip_low: float | None = None
    clip_high: float | None = None
    kl_coef: float = 0.0
    advantage_std: bool = True
    advantage_eps: float = 1e-6
    dual_clip: float | None = None

    def __post_init__(self) -> None:
        # None = not set: 0.2 / 0.2 / off, or the values of a ReLaX preset (objectives.relax.apply_train_preset).
        fill_unset(self, {"clip_low": 0.2, "clip_high": 0.2, "dual_clip": 0.0})
        _check_range("grpo.clip_low", self.clip_low, lo=0.0, hi=1.0)
        _check_range("grpo.clip_high", self.clip_high, lo=0.0)
        _check_range("grpo.kl_coef", self.kl_coef, lo=0.0)
        if not isinstance(self.advantage_std, bool):
            raise ValueError(f"grpo.advantage_std must be a bool, got {self.advantage_std!r}")
        _check_range("grpo.advantage_eps", self.advantage_eps, lo=0.0, lo_open=True)
        _check_range("grpo.dual_clip", self.dual_clip, lo=0.0)
        if 0.0 < self.dual_clip <= 1.0:
            raise ValueError(f"grpo.dual_clip must be 0 (off) or > 1, got {self.dual_clip!r}")


#: Alias: the clip/KL fields live in :class:`GRPOConfig`, which every objective takes.
ClipConfig = GRPOConfig


def fill_unset(cfg: Any, values: Mapping[str, Any], override_filled: bool = False) -> None:
    """Give every field of ``cfg`` named in ``values`` that is ``None`` its value, and remember it in
    ``cfg._unset_fields``; with ``override_filled`` also replace values filled that way before (a preset
    over plain defaults).  An explicitly set field is never touched.  ``to_dict(cfg, unset=False)``
    (:mod:`latentx.config`) leaves remembered fields out, so a round trip through overrides re-resolves them;
    ``config.yaml`` records the resolved values."""
    unset = set(getattr(cfg, "_unset_fields", ()))
    for name, value in values.items():
        if getattr(cfg, name) is None or (override_filled and name in unset):
            object.__setattr__(cfg, name, value)
            unset.add(name)
    object.__setattr__(cfg, "_unset_fields", frozenset(unset))


def _check_range(
    name: str,
    value: object,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number in the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi:g}, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Batch and output
# --------------------------------------------------------------------------------------------------


@dataclass
class PolicyBatch:
    """Token-level tensors of one (micro-)batch of B responses padded to T tokens (METHODS.md §0, §3).

    Attributes:
        logp: ``[B, T]`` float, log π_θ of the sampled tokens from the current forward (with grad).
        old_logp: ``[B, T]`` float, log π_old of the same tokens from the rollout policy (no grad needed).
        mask: ``[B, T]`` bool, True on real response tokens (prompt and padding are False).
        advantages: ``[B]`` (one Â per response, broadcast to its tokens) or ``[B, T]`` (per token, e.g.
            VERL's last-token shaping).
        group: ``[B]`` integer, the prompt group of each response (responses to the same prompt share it).
        ref_logp: optional ``[B, T]``, log π_ref from a frozen reference model (for the KL terms).
        entropy: optional ``[B, T]``, token entropies of the current forward, with grad (entropy_bonus).
        dsd: optional ``[B]``, Dynamic Spectral Dispersion of each response on the current forward's hidden
            states, with grad (relax).
        totals: optional batch-wide normalisers (:class:`latentx.objectives.relax.BatchTotals`) when this batch
            is one micro-batch / rank of a larger optimisation batch; objectives that honour it return a
            summable share (``LossOutput.summable``).
        in_set: optional ``[B]`` bool, membership of ReLaX's KL set I decided on the whole batch.

    Shapes, dtypes and devices are validated on construction; values at valid tokens must be finite.
    """

    logp: Tensor
    old_logp: Tensor
    mask: Tensor
    advantages: Tensor
    group: Tensor
    ref_logp: Tensor | None = None
    entropy: Tensor | None = None
    dsd: Tensor | None = None
    totals: Any = None
    in_set: Tensor | None = None

    def __post_init__(self) -> None:
        logp = self.logp
        if not isinstance(logp, Tensor) or logp.dim() != 2:
            raise ValueError(f"batch.logp must be a [B, T] tensor, got {_describe(logp)}")
        if not logp.is_floating_point():
            raise ValueError(f"batch.logp must be a floating tensor, got dtype {logp.dtype}")
        B, T = logp.shape
        device = logp.device

        if not isinstance(self.mask, Tensor) or tuple(self.mask.shape) != (B, T):
            raise ValueError(f"batch.mask must have shape [B, T] = {[B, T]}, got {_describe(self.mask)}")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"batch.mask must be a bool tensor, got dtype {self.mask.dtype} (use mask.bool())")

        for name in ("old_logp", "ref_logp", "entropy"):
            value = getattr(self, name)
            if value is None and name != "old_logp":
                continue
            if not isinstance(value, Tensor) or tuple(value.shape) != (B, T):
                raise ValueError(f"batch.{name} must have shape [B, T] = {[B, T]}, got {_describe(value)}")
            if not value.is_floating_point():
                raise ValueError(f"batch.{name} must be a floating tensor, got dtype {value.dtype}")

        adv = self.advantages
        if not isinstance(adv, Tensor) or tuple(adv.shape) not in ((B,), (B, T)):
            raise ValueError(f"batch.advantages must have shape [B] = {[B]} or [B, T] = {[B, T]}, got {_describe(adv)}")
        if not adv.is_floating_point():
            raise ValueError(f"batch.advantages must be a floating tensor, got dtype {adv.dtype}")

        if not isinstance(self.group, Tensor) or tuple(self.group.shape) != (B,):
            raise ValueError(f"batch.group must have shape [B] = {[B]}, got {_describe(self.group)}")
        if self.group.is_floating_point() or self.group.is_complex() or self.group.dtype == torch.bool:
            raise ValueError(f"batch.group must be an integer tensor, got dtype {self.group.dtype}")

        if self.dsd is not None:
            if not isinstance(self.dsd, Tensor) or tuple(self.dsd.shape) != (B,):
                raise ValueError(f"batch.dsd must have shape [B] = {[B]}, got {_describe(self.dsd)}")
            if not self.dsd.is_floating_point():
                raise ValueError(f"batch.dsd must be a floating tensor, got dtype {self.dsd.dtype}")

        for name in ("old_logp", "mask", "advantages", "group", "ref_logp", "entropy", "dsd"):
            value = getattr(self, name)
            if value is not None and value.device != device:
                raise ValueError(f"batch.{name} is on {value.device} but batch.logp is on {device}")

        # Finite values where they are read (valid tokens; every response for response-level tensors).
        with torch.no_grad():
            for name in ("logp", "old_logp", "ref_logp", "entropy"):
                value = getattr(self, name)
                if value is not None and not bool((torch.isfinite(value) | ~self.mask).all()):
                    raise ValueError(f"batch.{name} has a non-finite value at a valid (mask=True) token")
            adv_ok = torch.isfinite(self.advantages)
            if self.advantages.dim() == 2:
                adv_ok = adv_ok | ~self.mask
            if not bool(adv_ok.all()):
                raise ValueError("batch.advantages has a non-finite value")
            if self.dsd is not None and not bool(torch.isfinite(self.dsd).all()):
                raise ValueError("batch.dsd has a non-finite value")

    @property
    def batch_size(self) -> int:
        return int(self.logp.shape[0])

    def token_advantages(self) -> Tensor:
        """Advantages as a float32 ``[B, T]`` tensor (a ``[B]`` tensor is broadcast to every token), 0 at padding."""
        adv = self.advantages.detach().float()
        if adv.dim() == 1:
            adv = adv[:, None].expand_as(self.mask)
        return torch.where(self.mask, adv, torch.zeros((), dtype=adv.dtype, device=adv.device))

    def response_advantages(self) -> Tensor:
        """One advantage per response, float32 ``[B]``.

        A ``[B]`` tensor is returned as is; for a ``[B, T]`` tensor the mean over the response's valid
        tokens is used (equal to Â_i when it was broadcast), 0 for an empty response.
        """
        adv = self.advantages.detach().float()
        if adv.dim() == 1:
            return adv
        return per_response_mean(adv, self.mask)


@dataclass
class LossOutput:
    """What every objective returns.

    Attributes:
        loss: scalar, differentiable; call ``loss.backward()``.
        terms: every loss term and diagnostic as a python float (``pg``, ``kl``, ``clip_frac``, ...).
        summable: False: ``loss`` / ``terms`` are means over this micro-batch (the caller weights them by the
            micro-batch's token share); True: they are this micro-batch's share of the batch value (the caller
            sums them; see ``PolicyBatch.totals``).
        parts: optional additive decomposition of ``loss`` into named terms (tensors with grad, e.g. ``pg``,
            ``xp``, ``kl``) for per-term gradient diagnostics; empty = the loss is one term.
    """

    loss: Tensor
    terms: dict[str, float] = field(default_factory=dict)
    summable: bool = False
    parts: dict[str, Tensor] = field(default_factory=dict)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return repr(value) if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------------
# Masked helpers
# --------------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is True (over ``dim``, or over everything).

    Positions with ``mask=False`` are never read (replaced by 0 before summing), so NaN/inf there is
    harmless.  A reduction over no valid position returns 0 (not NaN).
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    kept = torch.where(mask, values, zero)
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1).to(values.dtype)
    return kept.sum(dim) / mask.sum(dim).clamp(min=1).to(values.dtype)


def token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Token-mean aggregation (METHODS.md §3): the mean over *all* valid tokens of the micro-batch.

    Every valid token weighs the same, so long responses contribute more tokens (verl's "token-mean",
    DAPO's aggregation).  0 when there is no valid token.
    """
    return masked_mean(per_token, mask, dim=None)


def per_response_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """``[B, T] -> [B]``: mean over each response's valid tokens; 0 for an empty response."""
    return masked_mean(per_token, mask, dim=1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 KL estimator to a frozen reference (METHODS.md §3; Schulman 2020).

    ``k3 = exp(δ) - δ - 1`` with ``δ = log π_ref - log π_θ``; always >= 0, an unbiased estimate of
    KL(π_θ ‖ π_ref) when tokens are sampled from π_θ.  Elementwise, in float32; δ is clamped to
    [-20, 20] (as verl's "low_var_kl"; exact inside that range).  Callers must zero padded positions first (see
    :func:`masked_mean`) if the padding may hold garbage.
    """
    delta = torch.clamp(ref_logp.float() - logp.float(), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(delta) - delta - 1.0


def to_floats(values: Mapping[str, Tensor | float | int]) -> dict[str, float]:
    """Detach and convert scalar tensors / numbers to python floats with a single device sync."""
    keys = list(values)
    tensor_keys = [k for k in keys if isinstance(values[k], Tensor)]
    out: dict[str, float] = {}
    if tensor_keys:
        device = values[tensor_keys[0]].device  # type: ignore[union-attr]
        scalars = [values[k].detach().float().reshape(()).to(device) for k in tensor_keys]  # type: ignore[union-attr]
        stacked = torch.stack(scalars).cpu().tolist()
        out.update(zip(tensor_keys, stacked))
    for k in keys:
        if k not in out:
            out[k] = float(values[k])  # type: ignore[arg-type]
    return {k: out[k] for k in keys}


def valid_only(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` upcast to float32 with padded positions replaced by 0 (keeps the gradient at valid ones)."""
    values = values.float()
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """``log π_θ − log π_old`` in float32, 0 at padding (so ρ = 1 there), clamped to ±LOG_RATIO_CLAMP.

    ``old_logp`` is treated as a constant.  The gradient flows to ``logp`` at valid tokens.
    """
    log_ratio = valid_only(logp, mask) - valid_only(old_logp.detach(), mask)
    return torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


# --------------------------------------------------------------------------------------------------
# The method registry
# --------------------------------------------------------------------------------------------------

#: The signals an objective can ask its caller (the trainer, the TRL / verl adapters) to provide.
#:   "dsd_grad": ``batch.dsd``, Dynamic Spectral Dispersion on the current forward's hidden states, with grad.
#:   "rank": ``er`` / ``erv`` / ``era`` per response of the rollout (no grad), passed by name to the
#:       advantage hook (:meth:`latentx.objectives.Objective.shape`).
#:   "entropy": ``batch.entropy``, token entropies of the current forward, with grad.
#:   "ref": ``batch.ref_logp`` from a frozen reference model.
SIGNALS = ("dsd_grad", "rank", "entropy", "ref")


@dataclass(frozen=True)
class ObjectiveSpec:
    """Everything the generic :class:`latentx.objectives.Objective` needs to run one method.

    Each objective module registers one with :func:`register_objective` at import time; nothing outside
    the registry dispatches on an objective's name.

    Attributes:
        name: the key users write (``objective: relax`` in YAML, ``Objective("relax")``).
        loss: ``loss(batch, config, grpo, state) -> LossOutput``, one training micro-batch.
        config_class: the method's own config dataclass, or None when the method has none (GRPO).
        needs: ``needs(config, grpo) -> iterable of`` :data:`SIGNALS` (besides ``"ref"`` when
            ``grpo.kl_coef > 0``, which :class:`Objective` adds for every method).
        new_state: ``new_state(config, seed) -> state``: the method's per-run state across steps (EMA
            baselines, an adaptive coefficient, a random generator); None = stateless.
        shape_advantages: the advantage hook, ``(state, advantages [B], signals: {name: [B]}, mask [B, T],
            rewards [B]) -> (advantages [B] or [B, T], info: {name: float})``; a hook that also declares
            ``group`` and ``grpo`` keywords receives the ``[B]`` prompt groups (or None) and the
            objective's GRPOConfig; None = advantages as given.
        on_optimizer_step: ``(state) -> {name: float}`` after every optimizer step.
        state_key: key of the state in :meth:`Objective.state_dict` (default: ``name``).
        save_state / load_state: ``(state) -> saved`` and ``(state, saved) -> None`` (default: the
            state's own ``state_dict()`` / ``load_state_dict()``).
        state_attribute: an extra attribute name under which :class:`Objective` exposes the state
            (``verl_shaper``, ``entropy_controller``, ``generator``: the names older code used).
        dsd_grad_rows: for a method that needs ``"dsd_grad"``: ``(config, advantages [B], lengths [B],
            totals) -> [B] bool``, the responses whose DSD the loss differentiates; the trainer computes DSD
            with a gradient on those rows only and reuses the rollout forward's (no-grad) DSD for the others
            (their value must not change the loss).  None = every row.
        reference_rows: for a method whose reference KL reads only some responses: ``(config, advantages [B],
            signals: {name: [B]}) -> ([B] bool, info: {name: float})`` or None (signals missing), decided
            once per rollout batch (ReLaX's KL set I); the trainer then runs the frozen reference forward on
            those rows only, and not at all when none is selected.  None = every row, every step.
        inert_reason: ``(config, grpo, updates_per_step) -> str | None``: why the method's own term cannot act
            with these settings (the run would be plain GRPO), said in the run's log at start; None = it acts.
    """

    name: str
    loss: Callable[..., "LossOutput"]
    config_class: type | None = None
    needs: Callable[[Any, "GRPOConfig"], Iterable[str]] | None = None
    new_state: Callable[[Any, int], Any] | None = None
    shape_advantages: Callable[..., tuple[Tensor, dict[str, float]]] | None = None
    on_optimizer_step: Callable[[Any], dict[str, float]] | None = None
    state_key: str | None = None
    save_state: Callable[[Any], Any] | None = None
    load_state: Callable[[Any, Any], None] | None = None
    state_attribute: str | None = None
    dsd_grad_rows: Callable[..., Tensor] | None = None
    reference_rows: Callable[..., "tuple[Tensor, dict[str, float]] | None"] | None = None
    inert_reason: Callable[..., "str | None"] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"objective name must be a python identifier, got {self.name!r}")
        if not callable(self.loss):
            raise ValueError(f"objective {self.name!r}: loss must be callable, got {type(self.loss).__name__}")
        if self.config_class is not None and not isinstance(self.config_class, type):
            raise ValueError(f"objective {self.name!r}: config_class must be a class, got {self.config_class!r}")
        if self.shape_advantages is not None and self.new_state is None:
            raise ValueError(f"objective {self.name!r}: an advantage hook needs a state (new_state)")


class _Registry(Mapping[str, ObjectiveSpec]):
    """The one ordered table ``name -> ObjectiveSpec`` (read-only mapping; add with :func:`register_objective`)."""

    def __init__(self) -> None:
        self._specs: dict[str, ObjectiveSpec] = {}

    def __getitem__(self, name: str) -> ObjectiveSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"objectives({', '.join(self._specs)})"

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)


#: Every registered objective, in registration order (the built-ins: grpo, relax, verl, entropy_bonus,
#: kl_cov, clip_cov).  This is the one list of objective names.
REGISTRY = _Registry()


def register_objective(spec: ObjectiveSpec | None = None, /, *, overwrite: bool = False, **fields: Any) -> ObjectiveSpec:
    """Register an objective: ``register_objective(ObjectiveSpec(...))`` or ``register_objective(name=..., loss=...)``.

    A name already taken raises ``ValueError`` unless ``overwrite=True``.  Returns the spec.
    """
    if spec is None:
        spec = ObjectiveSpec(**fields)
    elif fields:
        raise ValueError("pass either an ObjectiveSpec or its fields, not both")
    if not isinstance(spec, ObjectiveSpec):
        raise ValueError(f"register_objective needs an ObjectiveSpec, got {type(spec).__name__}")
    if spec.name in REGISTRY._specs and not overwrite:
        raise ValueError(f"objective {spec.name!r} is already registered (pass overwrite=True to replace it)")
    REGISTRY._specs[spec.name] = spec
    return spec


def objective_spec(name: object) -> ObjectiveSpec:
    """The registered spec of ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"objective name must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def adapter_objective(name: object, adapter: str, runs: Iterable[str], field: str = "objective") -> ObjectiveSpec:
    """The registered spec of ``name`` for an adapter (TRL, verl) that has code paths for the objectives
    ``runs`` only: it keeps the framework's own loss and adds just those methods' terms, so it cannot run an
    arbitrary registered objective the way :class:`latentx.objectives.Objective` (``latentx train``) does.

    Errors are one line naming ``field``: a name that is not registered lists what the adapter runs; a
    registered one it has no code path for says so, names the adapter and what it runs.
    """
    runs = tuple(n for n in REGISTRY if n in set(runs))  # registry order; names nobody registered drop out
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, runs))}, got {name!r}")
    if name not in runs:
        raise ValueError(
            f"{field}={name!r} is a registered objective, but {adapter} has no code path for it (it runs "
            f"{', '.join(runs)}); `latentx train` runs every registered objective"
        )
    return REGISTRY[name]


def parse_objective_spec(spec: object) -> tuple[str, list[str]]:
    """An objective with an optional preset: ``"verl"`` -> ``("verl", [])``, ``"verl@enabled"`` ->
    ``("verl", ["verl.preset=enabled"])``.

    ``name@preset`` is for methods whose config has a ``preset`` field (VERL: paper / release /
    enabled); the overrides are ``section.field=value`` strings for :func:`latentx.config.apply_overrides`.
    A study takes such labels as separate objectives (``--objectives grpo,verl@paper,verl@enabled``).
    Errors are one line and name the label.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"objective must be a name or name@preset, got {spec!r}")
    name, sep, preset = spec.strip().partition("@")
    try:
        objective = objective_spec(name)
    except ValueError as err:
        raise ValueError(f"{err} (in {spec!r})") from None
    if not sep:
        return name, []
    cls = objective.config_class
    if not preset or "@" in preset:
        raise ValueError(f"objective {spec!r} must look like name@preset")
    if cls is None or "preset" not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"objective {name!r} has no presets (in {spec!r})")
    try:
        cls(preset=preset)  # the config names the field and its choices
    except ValueError as err:
        raise ValueError(f"{err} (in {spec!r})") from None
    return name, [f"{name}.preset={preset}"]
