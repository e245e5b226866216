"""Koopman spectrum of hidden-state trajectories and Dynamic Spectral Dispersion (ReLaX).

Implements METHODS.md section 2 (ReLaX, Zhang et al. arXiv:2512.07558; EDMD, Williams, Kevrekidis & Rowley
2015; Residual DMD, Colbrook & Townsend 2024; ResKoopNet, Xu et al. ICML 2025):

    g(x) = sigmoid(W x),  Psi_X = g(H[0:T-1]),  Psi_Y = g(H[1:T])           (rows = snapshots, n = T - 1)
    G = Psi_X^T Psi_X / n,  A = Psi_X^T Psi_Y / n,  L = Psi_Y^T Psi_Y / n,  K = (G + ridge I)^{-1} A
    DSD(H) = Var_j |lambda_j(K)|  (unbiased, over the m moduli)

Numerics: Gram matrices, the solve and the eigenproblem are float64 (they are m x m; the lift itself runs in
the compute dtype), so the ridge regularisation is honoured even with ``scaling="unscaled"``.

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

import json
import math
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from latentx.dynamics._validate import check_mask, check_trajectories, compute_dtype, first_bad_index, pack_valid

__all__ = [
    "KoopmanDictionary",
    "KoopmanSpectrum",
    "DSDInfo",
    "edmd",
    "koopman_operator",
    "koopman_spectrum",
    "dsd",
    "dsd_with_info",
    "dsd_reference",
]

Scaling = Literal["mean", "unscaled"]
_SINGULAR_EPS = 1e-3  # r_j = sqrt(S_j^2 + 1e-3) for spectrum="singular" (the authors' code)
_ZERO_MODULUS = 1e-7  # guard 1
_INVERSE_DAMPING = 1e-10  # guard 2
_CONDITION_CAP = 1e3  # guard 3


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
# Dictionary
# ----------------------------------------------------------------------------------------------------------


class KoopmanDictionary(nn.Module):
    """Learned Koopman dictionary g(x) = sigmoid(W x), W in R^{m x d}, no bias (METHODS.md section 2).

    Initialisation (recorded in the saved metadata as ``init``): W_ij ~ Normal(0, 1/d), drawn in float32
    from ``torch.Generator().manual_seed(seed)`` on the CPU, so the same ``(hidden_size, m, seed)`` gives
    the same W on every machine.  ``fit`` shuffles trajectories with a generator seeded by ``seed`` too.

    Attributes after :meth:`fit`: ``loss_history_`` (one float per optimiser step), ``steps_`` (total Adam
    steps), ``skipped_steps_`` (mini-batches skipped because they had no snapshot pair or a non-finite
    loss), ``fit_params_`` (the arguments of the last fit), ``n_trajectories_`` (trajectories seen).
    """

    init_scheme = "normal(0, 1/hidden_size), float32, torch.Generator(cpu).manual_seed(seed)"

    def __init__(self, hidden_size: int, m: int = 50, seed: int = 0):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.hidden_size, self.m, self.seed = hidden_size, m, seed
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(m, hidden_size, generator=generator, dtype=torch.float32) / math.sqrt(hidden_size)
        self.weight = nn.Parameter(weight)
        self.loss_history_: list[float] = []
        self.steps_ = 0
        self.skipped_steps_ = 0
        self.n_trajectories_ = 0
        self.fit_params_: dict = {}

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, m={self.m}, seed={self.seed}, steps_={self.steps_}"

    def lift(self, H: Tensor) -> Tensor:
        """g(H) = sigmoid(H W^T) over the last dimension, in H's compute dtype (float32 / float64)."""
        if not isinstance(H, Tensor) or not H.is_floating_point():
            raise ValueError("H must be a floating-point torch.Tensor")
        if H.shape[-1] != self.hidden_size:
            raise ValueError(f"H has hidden size {H.shape[-1]} but the dictionary expects {self.hidden_size}")
        dtype = compute_dtype(H.dtype)
        return torch.sigmoid(H.to(dtype) @ self.weight.to(device=H.device, dtype=dtype).mT)

    forward = lift

    def fit(
        self,
        H: Tensor,
        mask: Tensor,
        lr: float = 1e-4,
        batch_size: int = 64,
        epochs: int = 1,
        loss: Literal["residual", "svd"] = "residual",
        ridge: float = 1e-3,
        scaling: Scaling = "mean",
        progress: bool = False,
    ) -> "KoopmanDictionary":
        """Learn W on trajectories ``H[B, T, d]`` (METHODS.md section 2, "Learning W"); returns ``self``.

        Adam on W; each epoch visits the B trajectories once in mini-batches of ``batch_size`` (shuffled with
        the dictionary's seed).  Per mini-batch the valid snapshot pairs of its trajectories are pooled,
        K = (G + ridge I)^{-1} A is recomputed from the current W (a differentiable function of W), and

        * ``loss="residual"`` (default, ResKoopNet/ResDMD): J = (1/N) ||(Psi_Y - Psi_X K) Phi||_F^2, N the
          number of pairs, Phi the eigenvectors of K.  Phi is held fixed within the step (stop-gradient:
          eigenvector derivatives are undefined at repeated eigenvalues), so J = (1/N) tr(R Re(Phi Phi^H) R^T)
          with R = Psi_Y - Psi_X K real; K carries the gradient.
        * ``loss="svd"`` (the authors' code): K = U S V^T, J = ||Psi_Y V - Psi_X V S||_F / (trajectories in
          the mini-batch); V is held fixed within the step, S carries gradient (singular-value gradients
          are well defined at repeated values).

        A mini-batch with no snapshot pair or a non-finite loss is skipped (counted in ``skipped_steps_``).
        """
        if loss not in ("residual", "svd"):
            raise ValueError(f"loss must be 'residual' or 'svd', got {loss!r}")
        _check_ridge_scaling(ridge, scaling)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        for name, value in (("batch_size", batch_size), ("epochs", epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        H, mask = check_trajectories(H, mask)
        if H.shape[2] != self.hidden_size:
            raise ValueError(f"H has hidden size {H.shape[2]} but the dictionary expects {self.hidden_size}")
        self.to(H.device)
        X, lengths = pack_valid(H.detach(), mask)
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam([self.weight], lr=lr)
        batches = [
            chunk for _ in range(epochs) for chunk in torch.randperm(X.shape[0], generator=generator).split(batch_size)
        ]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Koopman dictionary fit")
        trainable = self.weight.requires_grad  # a frozen dictionary (requires_grad False) can still be refit
        self.weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                for chunk in batches:
                    self._fit_step(optimizer, X[chunk.to(X.device)], lengths[chunk.to(X.device)], loss, ridge, scaling)
        finally:
            self.weight.requires_grad_(trainable)
            self.weight.grad = None
        self.n_trajectories_ += int(X.shape[0]) * epochs
        self.fit_params_ = dict(
            lr=float(lr), batch_size=batch_size, epochs=epochs, loss=loss, ridge=float(ridge), scaling=scaling
        )
        return self

    def _fit_step(
        self, optimizer: torch.optim.Optimizer, X: Tensor, lengths: Tensor, loss: str, ridge: float, scaling: Scaling
    ) -> None:
        objective = self._batch_loss(X, lengths, loss, ridge, scaling)
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
        psi = self.lift(X)
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
                _, phi = torch.linalg.eig(K)
                weight = (phi @ phi.mH).real
            residual = psi_y - psi_x @ K
            return ((residual @ weight) * residual).sum() / n
        U, S, Vh = torch.linalg.svd(K)
        V = Vh.mT.detach()
        return torch.linalg.matrix_norm(psi_y @ V - (psi_x @ V) * S) / X.shape[0]

    # -- persistence -------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """Everything needed to reproduce / resume, as the string metadata of the safetensors file."""
        from latentx import __version__

        meta = dict(
            format="latentx.KoopmanDictionary/1",
            hidden_size=self.hidden_size,
            m=self.m,
            seed=self.seed,
            init=self.init_scheme,
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
        """Write W (float32) and :meth:`metadata` to a safetensors file."""
        from safetensors.torch import save_file

        save_file({"weight": self.weight.detach().float().cpu().contiguous()}, str(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "KoopmanDictionary":
        """Rebuild a dictionary saved by :meth:`save` (weights, seed, fit history)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            weight = handle.get_tensor("weight")
        if json.loads(raw.get("format", "null")) != "latentx.KoopmanDictionary/1":
            raise ValueError(f"path {path} is not a latentx KoopmanDictionary file")
        meta = {key: json.loads(value) for key, value in raw.items()}
        if list(weight.shape) != [meta["m"], meta["hidden_size"]]:
            raise ValueError(f"path {path}: weight shape {list(weight.shape)} does not match its metadata")
        dictionary = cls(meta["hidden_size"], meta["m"], meta["seed"])
        with torch.no_grad():
            dictionary.weight.copy_(weight)
        dictionary.steps_ = meta["steps"]
        dictionary.skipped_steps_ = meta["skipped_steps"]
        dictionary.n_trajectories_ = meta["n_trajectories"]
        dictionary.fit_params_ = meta["fit_params"]
        dictionary.loss_history_ = meta["loss_history"]
        return dictionary.to(device)


# ----------------------------------------------------------------------------------------------------------
# EDMD
# ----------------------------------------------------------------------------------------------------------


def _check_ridge_scaling(ridge: float, scaling: str) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if scaling not in ("mean", "unscaled"):
        raise ValueError(f"scaling must be 'mean' or 'unscaled', got {scaling!r}")


def _solve_koopman(gram: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """K = (G + ridge I)^{-1} A by a linear solve; ridge = 0 uses the pseudo-inverse (K = Psi_X^+ Psi_Y)."""
    if ridge == 0:
        return torch.linalg.pinv(gram, hermitian=True) @ cross
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, cross)


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
        ridge: lambda >= 0.  ``ridge=0`` gives K = G^+ A = Psi_X^+ Psi_Y (pseudo-inverse).
        scaling: ``"mean"`` (default): K = (G/n + lambda I)^{-1} A/n.  ``"unscaled"``: lambda added to the raw
            Gram, K = (G + lambda I)^{-1} A (the authors' code).

    Returns:
        ``K: [B, m, m]`` in the compute dtype of ``psi_x`` (solved in float64).  A response with no valid pair
        gets K = 0.
    """
    _check_ridge_scaling(ridge, scaling)
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
    gram, cross, _ = _edmd_matrices(psi_x, psi_y, pairs, scaling)
    return _solve_koopman(gram, cross, ridge).to(compute_dtype(psi_x.dtype))


def _weight_of(dictionary: KoopmanDictionary, H: Tensor) -> KoopmanDictionary:
    if not isinstance(dictionary, KoopmanDictionary):
        raise ValueError(f"dictionary must be a KoopmanDictionary, got {type(dictionary).__name__}")
    if dictionary.hidden_size != H.shape[2]:
        raise ValueError(f"dictionary expects hidden size {dictionary.hidden_size} but H has {H.shape[2]}")
    return dictionary


def _koopman_parts(
    H: Tensor, mask: Tensor, dictionary: KoopmanDictionary, ridge: float, scaling: Scaling
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Validated float64 (K, G, A, L, n_pairs) of every response.

    With psi_t the lifted valid tokens (t < T) and F = sum_t psi_t psi_t^T, the snapshot Grams are
    G = F - psi_{T-1} psi_{T-1}^T and L = F - psi_0 psi_0^T, and A = sum_t psi_t psi_{t+1}^T: two batched
    products instead of three (the lift, T x d x m, dominates anyway).
    """
    _check_ridge_scaling(ridge, scaling)
    H, mask = check_trajectories(H, mask)
    dictionary = _weight_of(dictionary, H)
    X, lengths = pack_valid(H, mask)
    B, T, _ = X.shape
    psi = dictionary.lift(X).double()
    valid = torch.arange(T, device=X.device)[None, :] < lengths[:, None]
    psi = torch.where(valid[:, :, None], psi, torch.zeros((), dtype=psi.dtype, device=psi.device))
    full = psi.mT @ psi
    cross = psi[:, :-1].mT @ psi[:, 1:]  # pairs past the end meet a zero row
    first = psi[:, 0] if T else psi.new_zeros(B, psi.shape[2])
    last = torch.gather(psi, 1, (lengths - 1).clamp_min(0)[:, None, None].expand(B, 1, psi.shape[2]))[:, 0] if T else first
    gram = full - last[:, :, None] * last[:, None, :]
    gram_y = full - first[:, :, None] * first[:, None, :]
    n_pairs = (lengths - 1).clamp_min(0)
    if scaling == "mean":
        n = n_pairs.clamp_min(1).to(torch.float64)[:, None, None]
        gram, cross, gram_y = gram / n, cross / n, gram_y / n
    return _solve_koopman(gram, cross, ridge), gram, cross, gram_y, n_pairs


def koopman_operator(
    H: Tensor, mask: Tensor, dictionary: KoopmanDictionary, ridge: float = 1e-3, scaling: Scaling = "mean"
) -> Tensor:
    """EDMD Koopman matrix K ``[B, m, m]`` of every response's lifted trajectory (METHODS.md section 2).

    Psi_X = g(H[0:T-1]), Psi_Y = g(H[1:T]) over each response's valid tokens (in order); see :func:`edmd`
    for ``ridge`` and ``scaling``.  Responses with fewer than 2 valid tokens get K = 0.  Differentiable
    w.r.t. ``H`` and the dictionary weight; returned in the compute dtype of ``H``.
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
    H: Tensor, mask: Tensor, dictionary: KoopmanDictionary, ridge: float = 1e-3, scaling: Scaling = "mean"
) -> KoopmanSpectrum:
    """Eigenvalues of K and their Residual-DMD residuals (METHODS.md section 2), detached.

    Returns ``KoopmanSpectrum(eigvals: complex [B, m], residuals: [B, m])``; eigenvalues sorted by decreasing
    modulus (ties keep LAPACK's order).  complex64 / float32 (complex128 / float64 for float64 input).
    Residuals are +inf for modes the data do not see (see :func:`_residuals`); responses with < 2 valid
    tokens have K = 0, so eigenvalues 0 and residuals +inf.
    """
    with torch.no_grad():
        K, gram, cross, gram_y, _ = _koopman_parts(H, mask, dictionary, ridge, scaling)
        eigvals, V = torch.linalg.eig(K)
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
    spectrum: Literal["eig", "singular"] = "eig",
    residual_threshold: float | None = None,
    ridge: float = 1e-3,
    scaling: Scaling = "mean",
) -> DSDInfo:
    """Dynamic Spectral Dispersion plus the number of modes kept and the moduli (METHODS.md section 2).

    Args:
        spectrum: ``"eig"`` (paper, default): r_j = |lambda_j(K)|.  ``"singular"`` (authors' code):
            r_j = sqrt(S_j^2 + 1e-3) with S the singular values of K.
        residual_threshold: ``None`` (default, neither paper nor code filters): DSD is the unbiased variance of
            all m moduli.  A number tau: only eigenpairs with Residual-DMD residual <= tau are kept and DSD is
            the unbiased variance of their moduli (0 if fewer than 2 kept).  Only for ``spectrum="eig"``.

    Edge cases: a response with fewer than 3 valid tokens (fewer than 2 snapshot pairs) has DSD = 0, kept = 0,
    moduli = 0 and zero gradient.  Fewer than 2 modes (m = 1, or < 2 kept by the filter) give DSD = 0.  Constant trajectories give a rank-one K (DSD ~ 1/m, finite gradient).
    Differentiable w.r.t. ``H`` (and the dictionary weight) with a finite gradient everywhere; see the module
    docstring for how repeated / defective eigenvalues are handled.
    """
    if spectrum not in ("eig", "singular"):
        raise ValueError(f"spectrum must be 'eig' or 'singular', got {spectrum!r}")
    if residual_threshold is not None:
        if spectrum != "eig":
            raise ValueError("residual_threshold needs spectrum='eig' (residuals are defined for eigenpairs)")
        if isinstance(residual_threshold, bool) or not isinstance(residual_threshold, (int, float)):
            raise ValueError(f"residual_threshold must be a number or None, got {residual_threshold!r}")
    K, gram, cross, gram_y, n_pairs = _koopman_parts(H, mask, dictionary, ridge, scaling)
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


def dsd(
    H: Tensor,
    mask: Tensor,
    dictionary: KoopmanDictionary,
    spectrum: Literal["eig", "singular"] = "eig",
    residual_threshold: float | None = None,
    ridge: float = 1e-3,
    scaling: Scaling = "mean",
) -> Tensor:
    """DSD(H) = unbiased Var_j |lambda_j(K)| per response, ``Tensor[B]`` (METHODS.md section 2).

    Same arguments and edge cases as :func:`dsd_with_info` (which also reports how many modes were kept).
    """
    return dsd_with_info(H, mask, dictionary, spectrum, residual_threshold, ridge, scaling).dsd


def dsd_reference(
    H: Tensor,
    mask: Tensor,
    dictionary: KoopmanDictionary,
    spectrum: Literal["eig", "singular"] = "eig",
    ridge: float = 1e-3,
    scaling: Scaling = "mean",
) -> Tensor:
    """Straightforward DSD (tests and benchmark): loop over responses, explicit inverse, ``torch.var``.

    No residual filtering, no gradient guards.  Responses with < 3 valid tokens give 0, like :func:`dsd`.
    """
    H, mask = check_trajectories(H, mask)
    dtype = compute_dtype(H.dtype)
    out = torch.zeros(H.shape[0], dtype=dtype, device=H.device)
    with torch.no_grad():
        weight = dictionary.weight.detach().to(device=H.device, dtype=dtype)
        for b in range(H.shape[0]):
            rows = H[b][mask[b]].to(dtype)
            if rows.shape[0] < 3:
                continue
            psi = torch.sigmoid(rows @ weight.T).double()
            psi_x, psi_y = psi[:-1], psi[1:]
            n = psi_x.shape[0] if scaling == "mean" else 1
            gram = psi_x.T @ psi_x / n + ridge * torch.eye(psi.shape[1], dtype=torch.float64, device=H.device)
            K = torch.linalg.inv(gram) @ (psi_x.T @ psi_y / n)
            if spectrum == "eig":
                r = torch.linalg.eigvals(K).abs()
            else:
                r = torch.sqrt(torch.linalg.svdvals(K) ** 2 + _SINGULAR_EPS)
            out[b] = torch.var(r) if r.numel() >= 2 else 0.0  # a single mode (m = 1) has no spread
    return out
