"""Koopman spectrum of hidden-state trajectories and Dynamic Spectral Dispersion (ReLaX).

Implements METHODS.md section 2 (ReLaX, Zhang et al. arXiv:2512.07558; EDMD, Williams, Kevrekidis & Rowley
2015; Residual DMD, Colbrook & Townsend 2024; ResKoopNet, Xu et al. ICML 2025) and the options of section 3a
(the authors' released computation):

    g(x) = sigmoid(W x),  Psi_X = g(H[0:T-1]),  Psi_Y = g(H[1:T])           (rows = snapshots, n = T - 1)
    G = Psi_X^T Psi_X / n,  A = Psi_X^T Psi_Y / n,  L = Psi_Y^T Psi_Y / n,  K = (G + ridge I)^{-1} A
    DSD(H) = Var_j |lambda_j(K)|  (unbiased, over the m moduli)

The estimator.  :class:`KoopmanDictionary` is the one object that holds W *and* every hyper-parameter
(scikit-learn / PyDMD shape): ``KoopmanDictionary(hidden_size, m=50, seed=0, **settings)`` with the
settings of :class:`KoopmanSettings` (named as :class:`latentx.objectives.RelaxConfig`'s signal fields),
then ``.fit(H, mask)`` (a fresh W from ``init`` / ``seed``, then Adam), ``.dsd(H, mask)``,
``.dsd_with_info``, ``.spectrum(H, mask)``, ``.operator(H, mask)``, ``.fit_objective(H, mask)``, ``.save`` /
``.load`` (every setting round-trips; ``load(path, expect=...)`` refuses a file saved with other settings,
naming the field).  The functions :func:`dsd`, :func:`dsd_with_info`, :func:`koopman_spectrum`,
:func:`koopman_operator` are the same computation as functions of (H, mask, dictionary); every argument
left at ``None`` takes the dictionary's setting.

Numerics: Gram matrices, the solve and the eigenproblem are float64 (they are m x m; the lift itself runs in
the compute dtype), so the ridge regularisation is honoured even with ``scaling="unscaled"``.

Numeric guards (what a degenerate input gets; each is tested in tests/test_dynamics_koopman.py):

* **Ridge floor.**  The solve never sees a singular matrix: the ridge actually added to G is
  max(ridge, RIDGE_FLOOR * max(1, max_i G_ii)), RIDGE_FLOOR = 1e-12, so cond(G + ridge I) <= ~m * 1e12 and
  K is finite and bounded; torch's eigen-solver therefore only ever gets finite input (a LAPACK failure
  on a singular / non-finite K with ridge = 0 corrupted the heap).  A *setting* ``ridge`` below the floor
  (the estimator's constructor) is a ``ValueError`` naming ``ridge``; the functions raise it to the floor
  with a ``UserWarning``.  The one exception is :func:`edmd` with ``ridge=0``, which has no eigenproblem
  and keeps the exact pseudo-inverse K = Psi_X^+ Psi_Y (PyDMD's exact DMD).
* **Huge inputs.**  The lift is computed in the compute dtype; where a valid row's pre-activation W x
  overflows it (|x| near 3e38 in float32 / bfloat16) it is recomputed in float64, so every finite float32
  / bfloat16 / float16 input gives a finite result (the sigmoid just saturates).  A float64 input whose
  pre-activation overflows float64 is a ``ValueError`` naming the response.
* **Empty fits.**  ``fit`` / ``fit_objective`` on B = 0, on a mask without a valid token, or (masked layout)
  without any snapshot pair is a ``ValueError``.
* **Finite gradients.**  The cast from H's dtype to the compute dtype is a guarded autograd step: per
  response, a gradient with a non-finite entry is zeroed, and one whose largest entry exceeds the largest
  finite value of H's dtype (float16: 65504) is rescaled to it, direction kept; so the gradient is finite
  wherever the value is.  The same guarded cast sits on :func:`edmd`'s inputs (psi_x, psi_y, cast to
  float64 for the solve: with ``ridge=0`` the pseudo-inverse of a tiny-scale Gram gives gradients far above
  float16's range) and on the trajectories of ``fit`` / ``fit_objective`` (the pooled fit loss goes
  through an SVD or an eigendecomposition whose backward is NaN at repeated singular values / eigenvalues;
  ``fit`` skips such a step, ``fit_objective`` returns the zeroed per-response gradient).

Gradient of DSD (ReLaX back-propagates it into the policy).  ``torch.linalg.eigvals``' own backward divides
by eigenvector conditioning and returns inf / NaN at repeated or defective eigenvalues, which do occur here
(a response with n < m snapshot pairs has a rank-deficient K with a repeated eigenvalue 0; a constant
trajectory gives a rank-one K).  The moduli therefore go through :class:`_EigenvalueModuli`, whose backward
is the exact first-order formula  dK-gradient = Re(V^{-T} diag(g * conj(lambda)/|lambda|) V^T)  with three
guards, each documented where it acts:

1. |lambda_j| <= 1e-7 * max(1, max_i |lambda_i|): modulus is a cone at 0, its subgradient is taken as 0.
2. V^{-1} comes from a Tikhonov-regularised SVD inverse (singular values of V below 1e-10 * max are damped),
   so a numerically singular eigenvector matrix (a Jordan block) never yields inf.
3. The contribution of eigenvalue j is scaled by min(1, 1e3 / kappa_j), kappa_j = ||v_j|| ||w_j|| its
   condition number: gradients of well-conditioned eigenvalues are exact, ill-conditioned ones (where the
   derivative does not exist or is arbitrarily large) get a bounded surrogate.

Any non-finite entry left after that zeroes that response's gradient.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from latentx.dynamics._validate import check_mask, check_trajectories, compute_dtype, first_bad_index, pack_valid

__all__ = [
    "KoopmanDictionary",
    "KoopmanSettings",
    "KoopmanSpectrum",
    "DSDInfo",
    "RIDGE_FLOOR",
    "AUTHORS_SEED",
    "authors_settings",
    "edmd",
    "koopman_operator",
    "koopman_spectrum",
    "dsd",
    "dsd_with_info",
    "dsd_reference",
]

Scaling = Literal["mean", "unscaled"]
RIDGE_FLOOR = 1e-12  # smallest ridge used in any solve that feeds an eigenproblem (module docstring)
AUTHORS_SEED = 42  # the seed of the authors' released code (METHODS.md section 3a)
_SINGULAR_EPS = 1e-3  # r_j = sqrt(S_j^2 + 1e-3) for spectrum="singular" (the authors' code)
_ZERO_MODULUS = 1e-7  # guard 1
_INVERSE_DAMPING = 1e-10  # guard 2
_CONDITION_CAP = 1e3  # guard 3
_USE_DICTIONARY: Any = object()  # "take the dictionary's setting" for residual_threshold (None means "off")


class KoopmanSpectrum(NamedTuple):
    """Eigenvalues of K (complex ``[B, m]``, sorted by decreasing modulus) and their Residual-DMD residuals."""

    eigvals: Tensor
    residuals: Tensor


class DSDInfo(NamedTuple):
    """:func:`dsd_with_info` output: DSD ``[B]``, number of modes kept ``[B]`` (int64), all moduli ``[B, m]``."""

    dsd: Tensor
    kept: Tensor
    moduli: Tensor


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class KoopmanSettings:
    """Every hyper-parameter of a :class:`KoopmanDictionary` except ``hidden_size``, ``m`` and ``seed``.

    The names are :class:`latentx.objectives.RelaxConfig`'s signal fields (METHODS.md sections 2 and 3a);
    defaults are ours (the paper's computation, masked padding).  Errors name the field.

    Spectrum / DSD:
        spectrum: ``"eig"`` (r_j = |lambda_j(K)|, paper) or ``"singular"`` (r_j = sqrt(S_j^2 + 1e-3), the
            authors' code).
        ridge: lambda of K = (G + lambda I)^{-1} A; at least :data:`RIDGE_FLOOR`.
        scaling: ``"mean"`` (G, A divided by the number of pairs n) or ``"unscaled"`` (raw Gram, authors).
        residual_threshold: ``None`` (no filtering) or tau > 0: DSD over the modes with Residual-DMD
            residual <= tau (only with ``spectrum="eig"``).
        pad_to: 0 / ``None`` (default): padding is masked, each response is its valid tokens.  P > 0 (the
            authors' layout): each response's valid states followed by zeros up to P positions, all P used
            unmasked (n = P - 1 pairs, the padding lifts to g(0) = 0.5); a response longer than P is an error.
    Initialisation:
        init: ``"normal"`` (ours: W_ij ~ Normal(0, 1/d)) or ``"kaiming_uniform"`` (the authors':
            kaiming_uniform(a = sqrt(7)), i.e. Uniform(+-sqrt(3) * 0.5 / sqrt(d)), std 0.5 / sqrt(d)).  Both
            drawn in float32 from ``torch.Generator().manual_seed(seed)`` on the CPU (the authors used
            seed 42, :data:`AUTHORS_SEED`).
    Fit (METHODS.md section 2 "Learning W"):
        fit_loss: ``"residual"`` (ResKoopNet: (1/N) ||(Psi_Y - Psi_X K) Phi||_F^2, Phi = eigenvectors of K,
            held fixed within a step) or ``"svd"`` (the authors' formula exactly: K = U S Vh by
            ``torch.linalg.svd``, J = ||Psi_Y Vh - Psi_X Vh S||_F / B with Vh used as returned, gradient
            through the SVD).  Both pool ONE K over all snapshot pairs of the mini-batch of B trajectories.
        fit_window: ``None`` / 0 (default): the fit sees each response's valid tokens (masked).  W > 0 (the
            authors' layout): the first W positions of each response, zero-padded to W, unmasked.
        fit_lr: Adam learning rate (1e-4 paper; 1e-3 the authors' code).
        fit_batch_size: trajectories per mini-batch (64).
        fit_epochs: passes over the trajectories (1).
    """

    spectrum: Literal["eig", "singular"] = "eig"
    ridge: float = 1e-3
    scaling: Scaling = "mean"
    residual_threshold: float | None = None
    init: Literal["normal", "kaiming_uniform"] = "normal"
    pad_to: int = 0
    fit_window: int | None = None
    fit_loss: Literal["residual", "svd"] = "residual"
    fit_lr: float = 1e-4
    fit_batch_size: int = 64
    fit_epochs: int = 1

    def __post_init__(self) -> None:
        if self.spectrum not in ("eig", "singular"):
            raise ValueError(f"spectrum must be 'eig' or 'singular', got {self.spectrum!r}")
        if not _finite_number(self.ridge) or self.ridge < RIDGE_FLOOR:
            raise ValueError(f"ridge must be a finite number >= {RIDGE_FLOOR} (the ridge floor), got {self.ridge!r}")
        if self.scaling not in ("mean", "unscaled"):
            raise ValueError(f"scaling must be 'mean' or 'unscaled', got {self.scaling!r}")
        if self.residual_threshold is not None:
            if not _finite_number(self.residual_threshold) or self.residual_threshold <= 0:
                raise ValueError(f"residual_threshold must be a number > 0 or None, got {self.residual_threshold!r}")
            if self.spectrum != "eig":
                raise ValueError("residual_threshold needs spectrum='eig' (residuals are defined for eigenpairs)")
        if self.init not in ("normal", "kaiming_uniform"):
            raise ValueError(f"init must be 'normal' or 'kaiming_uniform', got {self.init!r}")
        if self.pad_to is None:
            object.__setattr__(self, "pad_to", 0)
        _positive_int("pad_to", self.pad_to, minimum=0)
        if self.fit_window == 0:
            object.__setattr__(self, "fit_window", None)
        if self.fit_window is not None:
            _positive_int("fit_window", self.fit_window, minimum=2)
        if self.fit_loss not in ("residual", "svd"):
            raise ValueError(f"fit_loss must be 'residual' or 'svd', got {self.fit_loss!r}")
        if not _finite_number(self.fit_lr) or self.fit_lr <= 0:
            raise ValueError(f"fit_lr must be a positive number, got {self.fit_lr!r}")
        _positive_int("fit_batch_size", self.fit_batch_size)
        _positive_int("fit_epochs", self.fit_epochs)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def create(cls, **settings: Any) -> "KoopmanSettings":
        """Like the constructor, but an unknown name is a ``ValueError`` listing the known ones."""
        unknown = sorted(set(settings) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown Koopman setting {unknown[0]!r}; the settings are {', '.join(cls.names())}")
        return cls(**settings)

    @classmethod
    def from_config(cls, cfg: object, **overrides: Any) -> "KoopmanSettings":
        """The settings that a config object (e.g. ``RelaxConfig``) has as attributes, plus ``overrides``."""
        values = {name: getattr(cfg, name) for name in cls.names() if hasattr(cfg, name)}
        values.update(overrides)
        return cls.create(**values)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.names()}

    def replace(self, **changes: Any) -> "KoopmanSettings":
        return dataclasses.replace(self, **changes)


def authors_settings(max_response_tokens: int) -> dict[str, Any]:
    """The Koopman side of the authors' released computation (METHODS.md section 3a), as settings.

    ``pad_to`` is the maximum response length L_max of the run (their scripts: 3072 = max response length);
    use with ``seed=AUTHORS_SEED``.  Not covered: they compute K and its spectrum in float32, we in float64.
    """
    _positive_int("max_response_tokens", max_response_tokens)
    return dict(
        spectrum="singular", ridge=1e-3, scaling="unscaled", init="kaiming_uniform", pad_to=max_response_tokens,
        fit_window=512, fit_loss="svd", fit_lr=1e-3, fit_batch_size=64, fit_epochs=1,
    )


def _initial_weight(hidden_size: int, m: int, seed: int, init: str) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if init == "normal":
        return torch.randn(m, hidden_size, generator=generator, dtype=torch.float32) / math.sqrt(hidden_size)
    weight = torch.empty(m, hidden_size, dtype=torch.float32)
    return torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(7.0), generator=generator)


# ----------------------------------------------------------------------------------------------------------
# Guarded numerics
# ----------------------------------------------------------------------------------------------------------


class _ComputeCast(torch.autograd.Function):
    """H -> H in the compute dtype; backward guards the gradient per response (module docstring)."""

    @staticmethod
    def forward(ctx, H: Tensor, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        ctx.in_dtype = H.dtype
        return H.to(dtype) if H.dtype != dtype else H.view_as(H)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if grad.ndim != 3 or grad.shape[0] == 0:
            return grad.to(ctx.in_dtype), None
        flat = grad.reshape(grad.shape[0], -1)
        finite = torch.isfinite(flat).all(dim=1)
        flat = torch.where(finite[:, None], flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
        limit = torch.finfo(ctx.in_dtype).max / 2
        peak = flat.abs().amax(dim=1) if flat.shape[1] else torch.zeros_like(finite, dtype=flat.dtype)
        if bool((peak > limit).any()):
            scale = torch.where(peak > limit, limit / peak.clamp_min(limit), torch.ones_like(peak))
            flat = flat * scale[:, None]
        return flat.reshape(grad.shape).to(ctx.in_dtype), None


def _to_compute(H: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """H in ``dtype`` (default: its compute dtype) through the guarded cast when a gradient will flow."""
    dtype = compute_dtype(H.dtype) if dtype is None else dtype
    if H.requires_grad and torch.is_grad_enabled():
        return _ComputeCast.apply(H, dtype)
    return H.to(dtype)


def _lift(weight: Tensor, X: Tensor) -> Tensor:
    """sigmoid(X W^T) in X's dtype; a pre-activation that overflows it is redone in float64 (module docstring)."""
    W = weight.to(device=X.device, dtype=X.dtype)
    pre = X @ W.mT
    if X.dtype != torch.float64 and pre.numel() and not bool(torch.isfinite(pre).all()):
        return torch.sigmoid(X.double() @ W.double().mT).to(X.dtype)
    if pre.numel() and not bool(torch.isfinite(pre).all()):
        bad = ~torch.isfinite(pre.detach())
        where = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.ndim >= 2 else bad.reshape(1, -1).any(dim=1)
        index = first_bad_index(where) if bad.ndim == 3 else 0
        raise ValueError(
            f"H is too large in response {index}: the dictionary's pre-activation W x overflows float64"
        )
    return torch.sigmoid(pre)


def _check_ridge(ridge: object, what: str = "ridge", zero_ok: bool = False) -> float:
    if not _finite_number(ridge) or ridge < 0:  # type: ignore[operator]
        raise ValueError(f"{what} must be a finite number >= 0, got {ridge!r}")
    ridge = float(ridge)  # type: ignore[arg-type]
    if ridge < RIDGE_FLOOR and not (zero_ok and ridge == 0):
        warnings.warn(
            f"{what}={ridge!r} is below the ridge floor {RIDGE_FLOOR}: raised to the floor "
            "(latentx.dynamics.koopman: a smaller ridge can make torch's eigen-solver fail)",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )
    return ridge


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel of the first frame outside this module (the user's call)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


def _check_scaling(scaling: object) -> None:
    if scaling not in ("mean", "unscaled"):
        raise ValueError(f"scaling must be 'mean' or 'unscaled', got {scaling!r}")


def _check_ridge_scaling(ridge: float, scaling: str) -> None:
    _check_ridge(ridge)
    _check_scaling(scaling)


def _solve_koopman(gram: Tensor, cross: Tensor, ridge: float, pinv_at_zero: bool = False) -> Tensor:
    """K = (G + r I)^{-1} A, r = max(ridge, RIDGE_FLOOR * max(1, max_i G_ii)) (the ridge floor).

    ``pinv_at_zero`` (only :func:`edmd`): ridge = 0 gives the pseudo-inverse solution K = G^+ A instead.
    """
    if pinv_at_zero and ridge == 0:
        return torch.linalg.pinv(gram, hermitian=True) @ cross
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    scale = torch.diagonal(gram.detach(), dim1=-2, dim2=-1).amax(dim=-1).clamp_min(1.0) if m else gram.new_ones(())
    r = torch.clamp(RIDGE_FLOOR * scale, min=ridge)
    return torch.linalg.solve(gram + r[..., None, None] * eye, cross)


def _finite_operator(K: Tensor) -> Tensor:
    """Never hand torch's eigen-solver a non-finite matrix (cannot happen after the ridge floor; checked)."""
    bad = ~torch.isfinite(K.detach()).flatten(1).all(dim=1)
    if bool(bad.any()):
        raise ValueError(f"the Koopman matrix of response {first_bad_index(bad)} is not finite")
    return K


# ----------------------------------------------------------------------------------------------------------
# The estimator
# ----------------------------------------------------------------------------------------------------------


class KoopmanDictionary(nn.Module):
    """The Koopman estimator: a learned dictionary g(x) = sigmoid(W x), W in R^{m x d}, no bias, and every
    hyper-parameter of its fit and of its spectrum (METHODS.md sections 2 and 3a).

    ``KoopmanDictionary(hidden_size, m=50, seed=0, **settings)``: ``settings`` are the fields of
    :class:`KoopmanSettings` (``spectrum``, ``ridge``, ``scaling``, ``residual_threshold``, ``init``,
    ``pad_to``, ``fit_window``, ``fit_loss``, ``fit_lr``, ``fit_batch_size``, ``fit_epochs``), kept in
    ``self.settings``.  :meth:`from_config` builds one from a ``RelaxConfig`` (``m``, ``fit_seed`` and the
    settings it has).

    ``fit`` starts from a fresh W (``init`` under ``seed``; scikit-learn's ``fit`` semantics: refitting gives a
    new dictionary, as the authors' periodic refit does) and shuffles with a generator seeded by ``seed``, so
    the same data and settings give the same W on every machine.

    Attributes after :meth:`fit`: ``loss_history_`` (one float per optimiser step), ``steps_`` (Adam steps),
    ``skipped_steps_`` (mini-batches skipped: no snapshot pair, or a non-finite loss / gradient),
    ``n_trajectories_`` (trajectories seen, epochs included), ``fitted_`` (True after ``fit``, ``load`` or
    :meth:`set_fitted_weight`), ``fitted_step_`` (the training step of that fit, for :meth:`refit_due`),
    ``fit_params_`` (the fit's settings, in the old key names: lr, batch_size, epochs, loss, ridge, scaling).
    """

    def __init__(self, hidden_size: int, m: int = 50, seed: int = 0, **settings: Any):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.hidden_size, self.m, self.seed = hidden_size, m, seed
        self.settings = KoopmanSettings.create(**settings)
        self.weight = nn.Parameter(_initial_weight(hidden_size, m, seed, self.settings.init))
        self._clear_fit_state()

    @classmethod
    def config_from(cls, cfg: object, max_response_tokens: int | None = None, **overrides: Any) -> dict[str, Any]:
        """``m = cfg.m``, ``seed = cfg.fit_seed`` and every setting ``cfg`` has (``overrides`` win), validated:
        the keyword arguments of the dictionary a ``RelaxConfig`` describes (and :meth:`load`'s ``expect``).

        ``pad_to = -1`` in ``cfg`` means the run's maximum response length L_max (the authors' layout) and
        becomes ``max_response_tokens``; without it, -1 is an error naming ``pad_to``.
        """
        if "pad_to" not in overrides and getattr(cfg, "pad_to", None) == -1:
            if max_response_tokens is None:
                raise ValueError("pad_to=-1 (the maximum response length) needs the run's max_response_tokens")
            overrides["pad_to"] = int(max_response_tokens)
        m = overrides.pop("m", getattr(cfg, "m", 50))
        seed = overrides.pop("seed", getattr(cfg, "fit_seed", 0))
        _positive_int("m", m)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        return dict(m=m, seed=seed, **KoopmanSettings.from_config(cfg, **overrides).as_dict())

    @classmethod
    def from_config(
        cls, cfg: object, hidden_size: int, max_response_tokens: int | None = None, **overrides: Any
    ) -> "KoopmanDictionary":
        """The dictionary of :meth:`config_from` (an unfitted one): how the trainer, ``analyze``, TRL and verl
        build theirs from a ``RelaxConfig``."""
        return cls(hidden_size, **cls.config_from(cfg, max_response_tokens, **overrides))

    def _clear_fit_state(self) -> None:
        self.loss_history_: list[float] = []
        self.steps_ = 0
        self.skipped_steps_ = 0
        self.n_trajectories_ = 0
        self.fitted_ = False
        self.fitted_step_: int | None = None
        self.fit_params_: dict = {}

    @property
    def init_scheme(self) -> str:
        if self.settings.init == "normal":
            return "normal(0, 1/hidden_size), float32, torch.Generator(cpu).manual_seed(seed)"
        return "kaiming_uniform(a=sqrt(7)), float32, torch.Generator(cpu).manual_seed(seed)"

    def config(self) -> dict[str, Any]:
        """``hidden_size``, ``m``, ``seed`` and every setting: what :meth:`save` records and :meth:`load` checks."""
        return dict(hidden_size=self.hidden_size, m=self.m, seed=self.seed, **self.settings.as_dict())

    def extra_repr(self) -> str:
        changed = {k: v for k, v in self.settings.as_dict().items() if v != getattr(KoopmanSettings, k)}
        extra = "".join(f", {k}={v!r}" for k, v in changed.items())
        return f"hidden_size={self.hidden_size}, m={self.m}, seed={self.seed}{extra}, steps_={self.steps_}"

    def reset_parameters(self) -> None:
        """W back to its initial draw (``init`` under ``seed``) and the fit attributes cleared."""
        weight = _initial_weight(self.hidden_size, self.m, self.seed, self.settings.init)
        with torch.no_grad():
            self.weight.copy_(weight.to(self.weight.device))
        self._clear_fit_state()

    def lift(self, H: Tensor) -> Tensor:
        """g(H) = sigmoid(H W^T) over the last dimension, in H's compute dtype (float32 / float64)."""
        if not isinstance(H, Tensor) or not H.is_floating_point():
            raise ValueError("H must be a floating-point torch.Tensor")
        if H.shape[-1] != self.hidden_size:
            raise ValueError(f"H has hidden size {H.shape[-1]} but the dictionary expects {self.hidden_size}")
        return _lift(self.weight, H.to(compute_dtype(H.dtype)))

    forward = lift

    # -- spectrum and DSD with this dictionary's settings ------------------------------------------------

    def operator(self, H: Tensor, mask: Tensor) -> Tensor:
        """EDMD Koopman matrix K ``[B, m, m]`` of every response (see :func:`koopman_operator`)."""
        return koopman_operator(H, mask, self)

    def spectrum(self, H: Tensor, mask: Tensor) -> KoopmanSpectrum:
        """Eigenvalues of K and their residuals (see :func:`koopman_spectrum`), detached."""
        return koopman_spectrum(H, mask, self)

    def dsd_with_info(self, H: Tensor, mask: Tensor) -> DSDInfo:
        """DSD, modes kept and moduli (see :func:`dsd_with_info`)."""
        return dsd_with_info(H, mask, self)

    def dsd(self, H: Tensor, mask: Tensor) -> Tensor:
        """DSD ``Tensor[B]`` of every response, differentiable w.r.t. ``H`` (see :func:`dsd`)."""
        return dsd_with_info(H, mask, self).dsd

    # -- fit ---------------------------------------------------------------------------------------------

    def _fit_data(self, H: Tensor, mask: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Validated fit trajectories ``(X, lengths)``: masked, or the first ``fit_window`` positions padded."""
        H, mask = check_trajectories(H, mask)
        if H.shape[2] != self.hidden_size:
            raise ValueError(f"H has hidden size {H.shape[2]} but the dictionary expects {self.hidden_size}")
        H = _to_compute(H)  # the guarded cast: H's gradient stays finite per response (module docstring)
        if H.shape[0] == 0:
            raise ValueError(f"{what}: H holds no response (B = 0), nothing to fit the Koopman dictionary on")
        if not bool(mask.any()):
            raise ValueError(f"{what}: mask has no valid token, nothing to fit the Koopman dictionary on")
        X, lengths = pack_valid(H, mask)
        window = self.settings.fit_window
        if window is not None:
            X = X[:, :window]
            if X.shape[1] < window:
                X = torch.nn.functional.pad(X, (0, 0, 0, window - X.shape[1]))
            return X, torch.full_like(lengths, window)
        if int(lengths.max()) < 2:
            raise ValueError(f"{what}: mask gives no response 2 valid tokens (a snapshot pair) to fit the dictionary on")
        return X, lengths

    def refit_due(self, step: int, refit_every: int) -> bool:
        """The one fit schedule (METHODS.md section 2; ``RelaxConfig.refit_every``): fit when not fitted yet,
        then every ``refit_every`` steps (0 = never again), never twice at the step it was fitted at."""
        if not self.fitted_:
            return True
        return refit_every > 0 and step != self.fitted_step_ and step % refit_every == 0

    def set_fitted_weight(self, weight: Tensor, step: int | None = None) -> "KoopmanDictionary":
        """Install a W fitted elsewhere (another process's fit, broadcast); marks the dictionary fitted."""
        if tuple(weight.shape) != (self.m, self.hidden_size):
            raise ValueError(f"weight has shape {list(weight.shape)}, the dictionary needs [{self.m}, {self.hidden_size}]")
        with torch.no_grad():
            self.weight.copy_(weight.to(device=self.weight.device, dtype=self.weight.dtype))
        self.fitted_, self.fitted_step_ = True, step
        return self

    def fit(
        self, H: Tensor, mask: Tensor, progress: bool = False, step: int | None = None
    ) -> "KoopmanDictionary":
        """Learn W on trajectories ``H[B, T, d]`` (METHODS.md section 2 "Learning W", 3a); returns ``self``.

        W starts from its initial draw; Adam (``fit_lr``) on W; each of ``fit_epochs`` passes visits the B
        trajectories once in mini-batches of ``fit_batch_size`` (shuffled with the dictionary's seed), and
        minimises :meth:`fit_objective` of each mini-batch.  A mini-batch with no snapshot pair or a
        non-finite loss / gradient is skipped (counted in ``skipped_steps_``).  B = 0, no valid token, or
        (masked) no snapshot pair at all: ``ValueError``.  ``step``: the training step of this fit, recorded as
        ``fitted_step_`` for :meth:`refit_due` (saved with the dictionary).
        """
        s = self.settings
        X, lengths = self._fit_data(H.detach(), mask, "fit")
        self.to(X.device)
        self.reset_parameters()
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam([self.weight], lr=s.fit_lr)
        batches = [
            chunk
            for _ in range(s.fit_epochs)
            for chunk in torch.randperm(X.shape[0], generator=generator).split(s.fit_batch_size)
        ]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Koopman dictionary fit")
        trainable = self.weight.requires_grad  # a frozen dictionary (requires_grad False) can still be refit
        self.weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                for chunk in batches:
                    chunk = chunk.to(X.device)
                    self._fit_step(optimizer, X[chunk], lengths[chunk])
        finally:
            self.weight.requires_grad_(trainable)
            self.weight.grad = None
        self.n_trajectories_ = int(X.shape[0]) * s.fit_epochs
        self.fitted_, self.fitted_step_ = True, step
        self.fit_params_ = dict(
            lr=float(s.fit_lr), batch_size=s.fit_batch_size, epochs=s.fit_epochs, loss=s.fit_loss,
            ridge=float(s.ridge), scaling=s.scaling,
        )
        return self

    def fit_objective(self, H: Tensor, mask: Tensor) -> Tensor:
        """The configured fit loss (``fit_loss``, ``fit_window``, ``ridge``, ``scaling``) of ONE mini-batch:
        all trajectories of ``H`` pooled into one K.  A scalar, differentiable in W (and H)."""
        X, lengths = self._fit_data(H, mask, "fit_objective")
        objective = self._batch_loss(X, lengths, self.settings.fit_loss, self.settings.ridge, self.settings.scaling)
        if objective is None:  # pragma: no cover - _fit_data guarantees a pair
            raise ValueError("fit_objective: no snapshot pair")
        return objective

    def _fit_step(self, optimizer: torch.optim.Optimizer, X: Tensor, lengths: Tensor) -> None:
        s = self.settings
        objective = self._batch_loss(X, lengths, s.fit_loss, s.ridge, s.scaling)
        if objective is None or not bool(torch.isfinite(objective)):
            self.skipped_steps_ += 1
            return
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if not bool(torch.isfinite(self.weight.grad).all()):
            self.skipped_steps_ += 1
            return
        optimizer.step()
        self.steps_ += 1
        self.loss_history_.append(float(objective.detach()))

    def _batch_loss(self, X: Tensor, lengths: Tensor, loss: str, ridge: float, scaling: Scaling) -> Tensor | None:
        """Fit loss of the trajectories ``X`` (valid prefix of ``lengths`` rows each), ONE K pooled over all pairs."""
        psi = _lift(self.weight, X)
        pairs = torch.arange(1, X.shape[1], device=X.device)[None, :] < lengths[:, None]
        psi_x, psi_y = psi[:, :-1][pairs].double(), psi[:, 1:][pairs].double()
        n = psi_x.shape[0]
        if n == 0:
            return None
        gram, cross = psi_x.mT @ psi_x, psi_x.mT @ psi_y
        if scaling == "mean":
            gram, cross = gram / n, cross / n
        K = _solve_koopman(gram, cross, ridge)
        if loss == "residual":
            with torch.no_grad():
                _, phi = torch.linalg.eig(_finite_operator(K.detach()[None])[0])
                weight = (phi @ phi.mH).real
            residual = psi_y - psi_x @ K
            return ((residual @ weight) * residual).sum() / n
        # The authors' formula (METHODS.md 3a): Vh as torch.linalg.svd returns it, gradient through the SVD.
        _, S, Vh = torch.linalg.svd(K, full_matrices=False)
        return torch.linalg.matrix_norm(psi_y @ Vh - (psi_x @ Vh) * S) / X.shape[0]

    # -- persistence -------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """Everything needed to reproduce / resume, as the string metadata of the safetensors file."""
        from latentx import __version__

        meta = dict(
            format="latentx.KoopmanDictionary/2",
            hidden_size=self.hidden_size,
            m=self.m,
            seed=self.seed,
            settings=self.settings.as_dict(),
            init=self.init_scheme,
            fitted=self.fitted_,
            fitted_step=self.fitted_step_,
            steps=self.steps_,
            skipped_steps=self.skipped_steps_,
            n_trajectories=self.n_trajectories_,
            fit_params=self.fit_params_,
            loss=self.fit_params_.get("loss"),
            loss_history=self.loss_history_,
            latentx_version=__version__,
            torch_version=torch.__version__,
        )
        return {key: json.dumps(value) for key, value in meta.items()}

    def save(self, path: str | Path) -> None:
        """Write W (float32) and :meth:`metadata` (every setting, the fit history) to a safetensors file."""
        from safetensors.torch import save_file

        save_file({"weight": self.weight.detach().float().cpu().contiguous()}, str(path), metadata=self.metadata())

    def check_compatible(self, expect: "KoopmanDictionary | Mapping[str, Any]", source: str = "the dictionary") -> None:
        """``ValueError`` naming the first field (``hidden_size``, ``m``, ``seed`` or a setting) that differs."""
        wanted = expect.config() if isinstance(expect, KoopmanDictionary) else dict(expect)
        mine = self.config()
        unknown = sorted(set(wanted) - set(mine))
        if unknown:
            raise ValueError(f"unknown Koopman setting {unknown[0]!r}")
        for name, value in wanted.items():
            if name == "pad_to" and value is None:
                value = 0
            if name == "fit_window" and value == 0:
                value = None
            if mine[name] != value:
                raise ValueError(f"{source} was saved with {name}={mine[name]!r} but this run has {name}={value!r}")

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        expect: "KoopmanDictionary | Mapping[str, Any] | None" = None,
    ) -> "KoopmanDictionary":
        """Rebuild a dictionary saved by :meth:`save` (weights, every setting, fit history).

        ``expect``: the run's dictionary (or a mapping of ``hidden_size`` / ``m`` / ``seed`` / settings); a file
        saved with any other value is a one-line ``ValueError`` naming the field.  Files of the first format
        (before the settings were recorded) load with the fit settings they recorded and defaults otherwise.
        """
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            weight = handle.get_tensor("weight")
        fmt = json.loads(raw.get("format", "null"))
        if fmt not in ("latentx.KoopmanDictionary/1", "latentx.KoopmanDictionary/2"):
            raise ValueError(f"path {path} is not a latentx KoopmanDictionary file")
        meta = {key: json.loads(value) for key, value in raw.items()}
        if list(weight.shape) != [meta["m"], meta["hidden_size"]]:
            raise ValueError(f"path {path}: weight shape {list(weight.shape)} does not match its metadata")
        if "settings" in meta:
            settings = meta["settings"]
        else:
            old = meta.get("fit_params") or {}
            names = dict(lr="fit_lr", batch_size="fit_batch_size", epochs="fit_epochs", loss="fit_loss",
                         ridge="ridge", scaling="scaling")
            settings = {new: old[key] for key, new in names.items() if key in old}
        dictionary = cls(meta["hidden_size"], meta["m"], meta["seed"], **settings)
        with torch.no_grad():
            dictionary.weight.copy_(weight)
        dictionary.steps_ = meta["steps"]
        dictionary.skipped_steps_ = meta["skipped_steps"]
        dictionary.n_trajectories_ = meta["n_trajectories"]
        dictionary.fit_params_ = meta["fit_params"]
        dictionary.loss_history_ = meta["loss_history"]
        dictionary.fitted_ = bool(meta.get("fitted", True))
        dictionary.fitted_step_ = meta.get("fitted_step")
        if expect is not None:
            dictionary.check_compatible(expect, source=f"the Koopman dictionary {path}")
        return dictionary.to(device)


# ----------------------------------------------------------------------------------------------------------
# EDMD
# ----------------------------------------------------------------------------------------------------------


def _edmd_matrices(psi_x: Tensor, psi_y: Tensor, pairs: Tensor, scaling: Scaling) -> tuple[Tensor, Tensor, Tensor]:
    """float64 (G, A, L) of masked snapshot pairs, divided by n (``scaling="mean"``; n = 0 -> all zero)."""
    zero = torch.zeros((), dtype=torch.float64, device=psi_x.device)
    px = torch.where(pairs[:, :, None], psi_x.double(), zero)
    py = torch.where(pairs[:, :, None], psi_y.double(), zero)
    gram, cross, gram_y = px.mT @ px, px.mT @ py, py.mT @ py
    if scaling == "mean":
        n = pairs.sum(dim=1).clamp_min(1).to(torch.float64)[:, None, None]
        gram, cross, gram_y = gram / n, cross / n, gram_y / n
    return gram, cross, gram_y


def edmd(psi_x: Tensor, psi_y: Tensor, mask: Tensor, ridge: float = 1e-3, scaling: Scaling = "mean") -> Tensor:
    """EDMD Koopman matrices of lifted snapshot pairs (METHODS.md section 2).

    Args:
        psi_x, psi_y: ``[B, N, m]`` lifted snapshots; row t of ``psi_y`` is the successor of row t of ``psi_x``.
        mask: ``[B, N]`` bool, True on the valid pairs (n = number of them per response).
        ridge: lambda >= 0.  ``ridge=0`` gives K = G^+ A = Psi_X^+ Psi_Y (pseudo-inverse; no eigenproblem
            follows here, so the ridge floor does not apply to exactly 0); 0 < ridge < RIDGE_FLOOR is raised
            to the floor with a warning.
        scaling: ``"mean"`` (default): K = (G/n + lambda I)^{-1} A/n.  ``"unscaled"``: lambda added to the raw
            Gram, K = (G + lambda I)^{-1} A (the authors' code).

    Returns:
        ``K: [B, m, m]`` in the compute dtype of ``psi_x`` (solved in float64).  A response with no valid pair
        gets K = 0.
    """
    ridge = _check_ridge(ridge, zero_ok=True)
    _check_scaling(scaling)
    for name, value in (("psi_x", psi_x), ("psi_y", psi_y)):
        if not isinstance(value, Tensor) or value.ndim != 3 or not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape [B, N, m]")
    if psi_y.shape != psi_x.shape:
        raise ValueError(f"psi_y has shape {list(psi_y.shape)} but psi_x has shape {list(psi_x.shape)}")
    if psi_y.device != psi_x.device:
        raise ValueError(f"psi_y is on {psi_y.device} but psi_x is on {psi_x.device}")
    pairs = check_mask(mask, tuple(psi_x.shape[:2]), psi_x.device)
    for name, value in (("psi_x", psi_x), ("psi_y", psi_y)):
        bad = (pairs & ~torch.isfinite(value.detach()).all(dim=-1)).any(dim=1)
        if bool(bad.any()):
            raise ValueError(f"{name} has non-finite values in response {first_bad_index(bad)}")
    out_dtype = compute_dtype(psi_x.dtype)
    # float64 through the guarded cast: the inputs' gradients stay finite per response (module docstring)
    gram, cross, _ = _edmd_matrices(_to_compute(psi_x, torch.float64), _to_compute(psi_y, torch.float64), pairs, scaling)
    overflow = ~(torch.isfinite(gram.detach()).flatten(1).all(1) & torch.isfinite(cross.detach()).flatten(1).all(1))
    if bool(overflow.any()):  # only float64 rows near 1e154 and above get here
        raise ValueError(f"psi_x / psi_y are too large in response {first_bad_index(overflow)}: "
                         "their Gram matrix overflows float64")
    return _solve_koopman(gram, cross, ridge, pinv_at_zero=True).to(out_dtype)


def _weight_of(dictionary: KoopmanDictionary, H: Tensor) -> KoopmanDictionary:
    if not isinstance(dictionary, KoopmanDictionary):
        raise ValueError(f"dictionary must be a KoopmanDictionary, got {type(dictionary).__name__}")
    if dictionary.hidden_size != H.shape[2]:
        raise ValueError(f"dictionary expects hidden size {dictionary.hidden_size} but H has {H.shape[2]}")
    return dictionary


def _resolve_ridge_scaling(dictionary: KoopmanDictionary, ridge: float | None, scaling: str | None) -> tuple[float, str]:
    ridge = dictionary.settings.ridge if ridge is None else _check_ridge(ridge)
    scaling = dictionary.settings.scaling if scaling is None else scaling
    _check_scaling(scaling)
    return ridge, scaling  # type: ignore[return-value]


def _resolve_spectrum(dictionary: KoopmanDictionary, spectrum: str | None, residual_threshold: Any) -> tuple[str, Any]:
    spectrum = dictionary.settings.spectrum if spectrum is None else spectrum
    if spectrum not in ("eig", "singular"):
        raise ValueError(f"spectrum must be 'eig' or 'singular', got {spectrum!r}")
    if residual_threshold is _USE_DICTIONARY:
        residual_threshold = dictionary.settings.residual_threshold
    if residual_threshold is not None:
        if spectrum != "eig":
            raise ValueError("residual_threshold needs spectrum='eig' (residuals are defined for eigenpairs)")
        if not _finite_number(residual_threshold):
            raise ValueError(f"residual_threshold must be a number or None, got {residual_threshold!r}")
    return spectrum, residual_threshold


def _koopman_parts(
    H: Tensor, mask: Tensor, dictionary: KoopmanDictionary, ridge: float | None, scaling: str | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Validated float64 (K, G, A, L, n_pairs) of every response.

    With psi_t the lifted trajectory (t < T) and F = sum_t psi_t psi_t^T, the snapshot Grams are
    G = F - psi_{T-1} psi_{T-1}^T and L = F - psi_0 psi_0^T, and A = sum_t psi_t psi_{t+1}^T: two batched
    products instead of three (the lift, T x d x m, dominates anyway).

    Masked layout (``pad_to = 0``): the trajectory is the response's valid tokens, T = its length.
    Authors' layout (``pad_to = P``): the valid tokens then zeros up to P positions, T = P for every response;
    the rows past the longest response are all g(0) = 0.5 * 1 =: c, so they are added in closed form
    (F and A gain one c c^T per such row) instead of being lifted.
    """
    H, mask = check_trajectories(H, mask)
    dictionary = _weight_of(dictionary, H)
    ridge, scaling = _resolve_ridge_scaling(dictionary, ridge, scaling)
    pad_to = dictionary.settings.pad_to
    X, lengths = pack_valid(_to_compute(H), mask)
    B, T, _ = X.shape
    m = dictionary.m
    if pad_to:
        if B and int(lengths.max()) > pad_to:
            b = first_bad_index(lengths > pad_to)
            raise ValueError(f"pad_to={pad_to} is smaller than response {b} ({int(lengths[b])} valid tokens)")
        if T < pad_to:  # one zero row: every response's trajectory continues with the padding state c
            X = torch.nn.functional.pad(X, (0, 0, 0, 1))
        psi = _lift(dictionary.weight, X).double()
        full = psi.mT @ psi
        cross = psi[:, :-1].mT @ psi[:, 1:]
        tail = pad_to - X.shape[1]
        c = torch.full((m,), 0.5, dtype=torch.float64, device=X.device)
        if tail > 0:
            cc = torch.outer(c, c)
            full, cross = full + tail * cc, cross + tail * cc
            last = c.expand(B, m)
        else:
            last = psi[:, -1]
        first = psi[:, 0]
        n_pairs = torch.full_like(lengths, pad_to - 1)
    else:
        psi = _lift(dictionary.weight, X).double()
        valid = torch.arange(T, device=X.device)[None, :] < lengths[:, None]
        psi = torch.where(valid[:, :, None], psi, torch.zeros((), dtype=psi.dtype, device=psi.device))
        full = psi.mT @ psi
        cross = psi[:, :-1].mT @ psi[:, 1:]  # pairs past the end meet a zero row
        first = psi[:, 0] if T else psi.new_zeros(B, psi.shape[2])
        index = (lengths - 1).clamp_min(0)[:, None, None].expand(B, 1, psi.shape[2])
        last = torch.gather(psi, 1, index)[:, 0] if T else first
        n_pairs = (lengths - 1).clamp_min(0)
    gram = full - last[:, :, None] * last[:, None, :]
    gram_y = full - first[:, :, None] * first[:, None, :]
    if scaling == "mean":
        n = n_pairs.clamp_min(1).to(torch.float64)[:, None, None]
        gram, cross, gram_y = gram / n, cross / n, gram_y / n
    return _solve_koopman(gram, cross, ridge), gram, cross, gram_y, n_pairs


def koopman_operator(
    H: Tensor, mask: Tensor, dictionary: KoopmanDictionary, ridge: float | None = None, scaling: Scaling | None = None
) -> Tensor:
    """EDMD Koopman matrix K ``[B, m, m]`` of every response's lifted trajectory (METHODS.md section 2).

    Psi_X = g(H[0:T-1]), Psi_Y = g(H[1:T]) over each response's valid tokens in order (or the authors'
    zero-padded layout, setting ``pad_to``); ``ridge`` / ``scaling`` default to the dictionary's settings
    (see :func:`edmd`).  Responses with fewer than 2 valid tokens get K = 0.  Differentiable w.r.t. ``H`` and
    the dictionary weight; returned in the compute dtype of ``H``.
    """
    K, *_ = _koopman_parts(H, mask, dictionary, ridge, scaling)
    return K.to(compute_dtype(H.dtype))


def _residuals(K_eigvals: Tensor, V: Tensor, gram: Tensor, cross: Tensor, gram_y: Tensor) -> Tensor:
    """Residual DMD: res^2 = v*[L - lambda A* - conj(lambda) A + |lambda|^2 G]v / (v* G v).

    For real A, v* A^T v = conj(v* A v), so the numerator is v*Lv - 2 Re(conj(lambda) v*Av) + |lambda|^2 v*Gv.
    A mode that the data do not see (v* G v <= 1e-12 * tr G, e.g. K's null modes when n < m) gets +inf: it
    is spurious by definition.
    """
    Vc = V.to(torch.complex128)

    def quad(M: Tensor) -> Tensor:
        return (Vc.conj() * (M.to(torch.complex128) @ Vc)).sum(dim=-2)

    q_l, q_a, q_g = quad(gram_y).real, quad(cross), quad(gram).real
    lam = K_eigvals.to(torch.complex128)
    numerator = (q_l - 2 * (lam.conj() * q_a).real + lam.abs() ** 2 * q_g).clamp_min(0)
    floor = 1e-12 * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1, keepdim=True).clamp_min(1e-300)
    seen = q_g > floor
    ratio = numerator / torch.where(seen, q_g, torch.ones_like(q_g))
    return torch.where(seen, ratio.sqrt(), torch.full_like(ratio, math.inf))


def koopman_spectrum(
    H: Tensor, mask: Tensor, dictionary: KoopmanDictionary, ridge: float | None = None, scaling: Scaling | None = None
) -> KoopmanSpectrum:
    """Eigenvalues of K and their Residual-DMD residuals (METHODS.md section 2), detached.

    Returns ``KoopmanSpectrum(eigvals: complex [B, m], residuals: [B, m])``; eigenvalues sorted by decreasing
    modulus (ties keep LAPACK's order).  complex64 / float32 (complex128 / float64 for float64 input).
    Residuals are +inf for modes the data do not see (see :func:`_residuals`); responses with < 2 valid
    tokens have K = 0, so eigenvalues 0 and residuals +inf.  ``ridge`` / ``scaling``: the dictionary's unless given.
    """
    with torch.no_grad():
        K, gram, cross, gram_y, _ = _koopman_parts(H, mask, dictionary, ridge, scaling)
        eigvals, V = torch.linalg.eig(_finite_operator(K))
        order = torch.argsort(eigvals.abs(), dim=-1, descending=True, stable=True)
        eigvals = torch.gather(eigvals, -1, order)
        V = torch.gather(V, -1, order[:, None, :].expand_as(V))
        residuals = _residuals(eigvals, V, gram, cross, gram_y)
    dtype = compute_dtype(H.dtype)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return KoopmanSpectrum(eigvals.to(complex_dtype), residuals.to(dtype))


# ----------------------------------------------------------------------------------------------------------
# DSD
# ----------------------------------------------------------------------------------------------------------


class _EigenvalueModuli(torch.autograd.Function):
    """|lambda_j(K)| for a batch of real square K, with the guarded backward described in the module docstring."""

    @staticmethod
    def forward(ctx, K: Tensor) -> Tensor:  # type: ignore[override]
        eigvals, V = torch.linalg.eig(K)
        ctx.save_for_backward(eigvals, V)
        return eigvals.abs().to(K.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        eigvals, V = ctx.saved_tensors
        modulus = eigvals.abs()
        # guard 1: zero subgradient at lambda = 0
        tiny = _ZERO_MODULUS * modulus.amax(dim=-1, keepdim=True).clamp_min(1.0)
        live = modulus > tiny
        phase = torch.where(live, eigvals.conj() / torch.where(live, modulus, 1.0), 0)
        # guard 2: damped inverse of V (rows = left eigenvectors w_j, normalised so that w_j v_j = 1)
        P, s, Qh = torch.linalg.svd(V)
        damping = _INVERSE_DAMPING * s[..., :1]
        s_inv = s / (s * s + damping * damping)
        W = Qh.mH @ (s_inv[..., :, None].to(P.dtype) * P.mH)
        # guard 3: cap the eigenvalue condition number kappa_j = ||w_j|| ||v_j||
        kappa = torch.linalg.vector_norm(W, dim=-1) * torch.linalg.vector_norm(V, dim=-2)
        damp = (_CONDITION_CAP / kappa.clamp_min(_CONDITION_CAP)).to(V.dtype)
        beta = grad.to(V.dtype) * phase * damp
        grad_K = (W.mT @ (beta[..., :, None] * V.mT)).real
        finite = torch.isfinite(grad_K).all(dim=-1).all(dim=-1)
        return torch.where(finite[:, None, None], grad_K, torch.zeros_like(grad_K)).to(grad.dtype)


def _masked_unbiased_var(values: Tensor, keep: Tensor) -> Tensor:
    """Unbiased variance of ``values[keep]`` per row (torch.var's default); 0 where fewer than 2 are kept."""
    count = keep.sum(dim=-1)
    zero = torch.zeros_like(values)
    mean = torch.where(keep, values, zero).sum(dim=-1) / count.clamp_min(1).to(values.dtype)
    square = torch.where(keep, (values - mean[:, None]) ** 2, zero).sum(dim=-1)
    var = square / (count - 1).clamp_min(1).to(values.dtype)
    return torch.where(count >= 2, var, torch.zeros_like(var))


def dsd_with_info(
    H: Tensor,
    mask: Tensor,
    dictionary: KoopmanDictionary,
    spectrum: Literal["eig", "singular"] | None = None,
    residual_threshold: float | None = _USE_DICTIONARY,
    ridge: float | None = None,
    scaling: Scaling | None = None,
) -> DSDInfo:
    """Dynamic Spectral Dispersion plus the number of modes kept and the moduli (METHODS.md section 2).

    Every argument left out takes the dictionary's setting (:class:`KoopmanSettings`; ``pad_to`` always does).

    Args:
        spectrum: ``"eig"`` (paper): r_j = |lambda_j(K)|.  ``"singular"`` (authors' code):
            r_j = sqrt(S_j^2 + 1e-3) with S the singular values of K.
        residual_threshold: ``None`` (neither paper nor code filters): DSD is the unbiased variance of all m
            moduli.  A number tau: only eigenpairs with Residual-DMD residual <= tau are kept and DSD is the
            unbiased variance of their moduli (0 if fewer than 2 kept).  Only for ``spectrum="eig"``.

    Edge cases: a response with fewer than 3 valid tokens (fewer than 2 snapshot pairs) has DSD = 0, kept = 0,
    moduli = 0 and zero gradient.  Fewer than 2 modes (m = 1, or < 2 kept by the filter) give DSD = 0.  Constant trajectories give a rank-one K (DSD ~ 1/m, finite gradient).
    Differentiable w.r.t. ``H`` (and the dictionary weight) with a finite gradient everywhere; see the module
    docstring for how repeated / defective eigenvalues, huge inputs and low-precision gradients are handled.
    """
    H, mask = check_trajectories(H, mask)
    _weight_of(dictionary, H)
    spectrum, residual_threshold = _resolve_spectrum(dictionary, spectrum, residual_threshold)
    K, gram, cross, gram_y, n_pairs = _koopman_parts(H, mask, dictionary, ridge, scaling)
    K = _finite_operator(K)
    m = K.shape[-1]
    enough = n_pairs >= 2
    # Degenerate responses get a fixed matrix with distinct eigenvalues, then a zero result through `where`.
    placeholder = torch.diag(torch.linspace(0.5, 1.0, m, dtype=K.dtype, device=K.device))
    K = torch.where(enough[:, None, None], K, placeholder)
    if spectrum == "eig":
        needs_grad = torch.is_grad_enabled() and K.requires_grad
        moduli = _EigenvalueModuli.apply(K) if needs_grad else torch.linalg.eigvals(K).abs()
    else:
        moduli = torch.sqrt(torch.linalg.svdvals(K) ** 2 + _SINGULAR_EPS)
    keep = enough[:, None].expand(-1, m)
    if residual_threshold is not None:
        with torch.no_grad():
            eigvals, V = torch.linalg.eig(K.detach())
            residuals = _residuals(eigvals, V, gram.detach(), cross.detach(), gram_y.detach())
        # _EigenvalueModuli and this eig call return LAPACK's order for the same K, so they align.
        keep = keep & (residuals <= residual_threshold)
    value = _masked_unbiased_var(moduli, keep)
    dtype = compute_dtype(H.dtype)
    moduli = torch.where(enough[:, None], moduli, torch.zeros_like(moduli))
    return DSDInfo(value.to(dtype), keep.sum(dim=-1), moduli.to(dtype))


def dsd(H: Tensor, mask: Tensor, dictionary: KoopmanDictionary, **overrides: Any) -> Tensor:
    """DSD(H) = unbiased Var_j r_j per response, ``Tensor[B]`` (METHODS.md section 2); ``dictionary.dsd(H, mask)``.

    :func:`dsd_with_info` (which also reports how many modes were kept) without the extra fields: the same
    arguments (``overrides``: its keywords ``spectrum``, ``residual_threshold``, ``ridge``, ``scaling``) and
    edge cases.
    """
    return dsd_with_info(H, mask, dictionary, **overrides).dsd


def dsd_reference(
    H: Tensor,
    mask: Tensor,
    dictionary: KoopmanDictionary,
    spectrum: Literal["eig", "singular"] | None = None,
    ridge: float | None = None,
    scaling: Scaling | None = None,
) -> Tensor:
    """Straightforward DSD (tests and benchmark): loop over responses, explicit inverse, ``torch.var``.

    No residual filtering, no gradient guards; arguments left out take the dictionary's settings, ``pad_to``
    included (the response explicitly zero-padded to ``pad_to`` rows).  Responses with < 2 snapshot pairs
    give 0, like :func:`dsd`.  The ridge floor applies as in :func:`dsd`.
    """
    H, mask = check_trajectories(H, mask)
    _weight_of(dictionary, H)
    spectrum, _ = _resolve_spectrum(dictionary, spectrum, None)
    ridge, scaling = _resolve_ridge_scaling(dictionary, ridge, scaling)
    pad_to = dictionary.settings.pad_to
    dtype = compute_dtype(H.dtype)
    out = torch.zeros(H.shape[0], dtype=dtype, device=H.device)
    with torch.no_grad():
        weight = dictionary.weight.detach()
        for b in range(H.shape[0]):
            rows = H[b][mask[b]].to(dtype)
            if pad_to:
                if rows.shape[0] > pad_to:
                    raise ValueError(f"pad_to={pad_to} is smaller than response {b} ({rows.shape[0]} valid tokens)")
                rows = torch.cat([rows, rows.new_zeros(pad_to - rows.shape[0], rows.shape[1])])
            if rows.shape[0] < 3:
                continue
            psi = _lift(weight, rows).double()
            psi_x, psi_y = psi[:-1], psi[1:]
            n = psi_x.shape[0] if scaling == "mean" else 1
            gram = psi_x.T @ psi_x / n
            r = max(ridge, RIDGE_FLOOR * max(1.0, float(torch.diagonal(gram).max())))
            gram = gram + r * torch.eye(psi.shape[1], dtype=torch.float64, device=H.device)
            K = torch.linalg.inv(gram) @ (psi_x.T @ psi_y / n)
            if spectrum == "eig":
                moduli = torch.linalg.eigvals(K).abs()
            else:
                moduli = torch.sqrt(torch.linalg.svdvals(K) ** 2 + _SINGULAR_EPS)
            out[b] = torch.var(moduli) if moduli.numel() >= 2 else 0.0  # a single mode (m = 1) has no spread
    return out
