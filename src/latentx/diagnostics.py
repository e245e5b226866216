"""Run diagnostics that say whether the latent terms act (issue 17; METHODS.md §3).

- :class:`DiagnosticsConfig` (``diagnostics.term_grads_every: N``): on every N-th step, the gradient of each
  loss term *separately* (``pg``, ``xp``, ``kl``, ``entropy``, ... as the objective decomposes its loss in
  ``LossOutput.parts``), its norm and its cosine with the ``pg`` gradient.
- :class:`TermGradients`: accumulates those per-term gradients over the micro-batches of one step (one
  extra backward per term and micro-batch, with ``retain_graph``; only on those steps).
- :class:`KLSetMonitor`: ReLaX's β·KL term only acts on the responses in I; when I has been empty on every
  one of the first 10 steps of a run with β > 0, say so once, with the DSD range seen and the options that
  would make the term act.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

__all__ = ["DiagnosticsConfig", "TermGradients", "KLSetMonitor"]


@dataclass
class DiagnosticsConfig:
    """``term_grads_every``: every N steps log ``grad_norm/<term>`` and ``grad_cos_pg/<term>`` (0 = off).

    Cost on those steps: one extra backward pass per loss term (and micro-batch) and one parameter-sized
    buffer per term; nothing on the other steps.
    """

    term_grads_every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.term_grads_every, bool) or not isinstance(self.term_grads_every, int) or self.term_grads_every < 0:
            raise ValueError(f"diagnostics.term_grads_every must be an integer >= 0, got {self.term_grads_every!r}")


class TermGradients:
    """Sum of each loss term's parameter gradient over the micro-batches of one step.

    ``add(parts, weight)`` takes the term tensors of one micro-batch (the same graph the total loss is built
    on; call it *before* the total's ``backward``) and adds ``weight · ∇term`` for each.  ``metrics()`` gives
    ``grad_norm/<term>``, ``grad_cos_pg/<term>`` (cosine with the ``pg`` term's gradient) and
    ``grad_share/<term>`` (the term's norm over the sum of the terms' norms).
    """

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.sums: dict[str, list[Tensor | None]] = {}

    def add(self, parts: dict[str, Tensor], weight: float = 1.0) -> None:
        for name, term in parts.items():
            if not isinstance(term, Tensor) or not term.requires_grad:
                grads: tuple[Tensor | None, ...] = (None,) * len(self.params)
            else:
                grads = torch.autograd.grad(term * weight, self.params, retain_graph=True, allow_unused=True)
            acc = self.sums.setdefault(name, [None] * len(self.params))
            for i, g in enumerate(grads):
                if g is not None:
                    acc[i] = g.detach().clone() if acc[i] is None else acc[i] + g.detach()

    def _flat(self, name: str) -> Tensor:
        acc = self.sums[name]
        device = self.params[0].device if self.params else torch.device("cpu")
        pieces = [(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(acc, self.params)]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.float64, device=device)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        flats = {name: self._flat(name) for name in self.sums}
        norms = {name: float(v.norm()) for name, v in flats.items()}
        total = sum(norms.values())
        pg = flats.get("pg")
        for name, v in flats.items():
            out[f"grad_norm/{name}"] = norms[name]
            out[f"grad_share/{name}"] = norms[name] / total if total > 0 else 0.0
            if pg is not None:
                denom = norms[name] * norms["pg"]
                out[f"grad_cos_pg/{name}"] = float(v @ pg) / denom if denom > 0 else 0.0
        return out


class KLSetMonitor:
    """Watches |I| of a ReLaX run; :meth:`observe` returns the one warning, on the 10th empty step, or None."""

    STEPS = 10

    def __init__(self, beta: float, xi: float, xi_mode: str, spectrum: str, enabled: bool = True) -> None:
        self.active = enabled and beta > 0
        self.xi, self.xi_mode, self.spectrum = xi, xi_mode, spectrum
        self.seen = 0
        self.low, self.high = math.inf, -math.inf
        self.done = False

    def observe(self, set_size: int, dsd: Tensor | None) -> str | None:
        if not self.active or self.done:
            return None
        if set_size > 0:
            self.done = True
            return None
        self.seen += 1
        if dsd is not None and dsd.numel():
            self.low = min(self.low, float(dsd.min()))
            self.high = max(self.high, float(dsd.max()))
        if self.seen < self.STEPS:
            return None
        self.done = True
        seen = f"{self.low:.3g} .. {self.high:.3g}" if self.high >= self.low else "no DSD values"
        return (
            f"warning: ReLaX's KL set I was empty on each of the first {self.STEPS} steps (DSD range {seen}, "
            f"xi = {self.xi:g}, spectrum = {self.spectrum}): the beta KL term does nothing and no reference forward ran. "
            f"To make it act set relax.xi below the DSD range, or relax.xi_mode=quantile relax.xi=0.1 (top 10 % of "
            f"each batch), or relax.spectrum=singular (DSD about 10x larger); or set relax.beta=0 to say you do not want it."
        )

