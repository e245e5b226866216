"""The ReLaX Koopman dictionary inside a (possibly multi-process) TRL run (METHODS.md section 2).

A thin holder around :class:`latentx.dynamics.KoopmanDictionary` and :func:`latentx.dynamics.dsd` that
applies the ``RelaxConfig`` options, fits once (or every ``refit_every`` steps), keeps W frozen in between,
and keeps every process on the same W: process 0 fits on its share of the generation batch, then W is
broadcast.  (The paper fits on all B·R trajectories of the first step; with P processes this fits on the
B·R/P of process 0 — docs/trl.md.)
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from latentx.dynamics import KoopmanDictionary
from latentx.objectives import RelaxConfig

__all__ = ["KoopmanOps"]


class KoopmanOps:
    """Dictionary fit / DSD / persistence with the options of one :class:`RelaxConfig`."""

    def __init__(self, cfg: RelaxConfig, hidden_size: int) -> None:
        self.cfg = cfg
        self.dictionary = KoopmanDictionary.from_config(cfg, hidden_size)
        self.dictionary.weight.requires_grad_(False)
        self.fitted = False
        self.fitted_at_step: int | None = None

    def needs_fit(self, global_step: int) -> bool:
        """Fit on the first rollout; refit every ``refit_every`` optimizer steps if that is > 0."""
        if not self.fitted:
            return True
        every = self.cfg.refit_every
        return every > 0 and global_step != self.fitted_at_step and global_step % every == 0

    def fit(self, H: Tensor, mask: Tensor, global_step: int = 0) -> float:
        """Fit W on trajectories ``H [B, T, d]`` (METHODS.md §2 "Learning W"); returns the last mini-batch loss."""
        cfg = self.cfg
        self.dictionary.weight.requires_grad_(True)
        try:
            self.dictionary.fit(H, mask)
        finally:
            self.dictionary.weight.requires_grad_(False)
            self.dictionary.weight.grad = None
        self.mark_fitted(global_step)
        history = self.dictionary.loss_history_
        return float(history[-1]) if history else math.nan

    def mark_fitted(self, global_step: int) -> None:
        self.fitted = True
        self.fitted_at_step = global_step

    def broadcast_from_main(self, accelerator) -> None:
        """Give every process process 0's W (no-op in a single process)."""
        if accelerator.num_processes <= 1:
            return
        from accelerate.utils import broadcast

        weight = self.dictionary.weight.detach().to(accelerator.device).contiguous()
        weight = broadcast(weight, from_process=0)
        with torch.no_grad():
            self.dictionary.weight.copy_(weight.to(self.dictionary.weight.device))

    def dsd(self, H: Tensor, mask: Tensor) -> Tensor:
        """``[B]`` DSD of each response (with gradient w.r.t. ``H`` when ``H`` has one; W stays frozen)."""
        if not self.fitted:
            raise RuntimeError("the Koopman dictionary is used before it was fitted")
        if self.dictionary.weight.device != H.device:
            self.dictionary.to(H.device)
        return self.dictionary.dsd(H, mask)

    def save(self, path: str) -> None:
        self.dictionary.save(path)

    def load(self, path: str) -> None:
        """Reload a saved dictionary (on resume: no refit on the first rollout)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: the checkpoint has no fitted Koopman dictionary")
        loaded = KoopmanDictionary.load(path, device=self.dictionary.weight.device, expect=self.dictionary)
        if (loaded.hidden_size, loaded.m) != (self.dictionary.hidden_size, self.dictionary.m):
            raise ValueError(
                f"{path}: dictionary of shape m={loaded.m}, hidden_size={loaded.hidden_size} does not match "
                f"relax_m={self.dictionary.m}, hidden_size={self.dictionary.hidden_size}"
            )
        loaded.weight.requires_grad_(False)
        self.dictionary = loaded
        self.mark_fitted(-1)
