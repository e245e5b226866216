"""The latent monitor inside TRL's ``GRPOTrainer`` (``LatentGRPOConfig(latent_monitor=True)``; docs/trl.md).

It never touches the objective: it reads the completion hidden states of a no-grad policy forward, reduces
them per response to ER / ERV / ERA (METHODS.md §1, ``verl_stride`` / ``verl_window``) and DSD (§2, a
Koopman dictionary with the ``relax_*`` settings, fitted on the first monitored batch and frozen), takes
the response's mean token entropy from the same forward, and logs :func:`latentx.monitor.monitor_metrics`
of the gathered batch under ``latent/``.

Which forward (decided per generation batch by the trainer):

- TRL's own old-log-prob forward, when TRL runs it (``steps_per_generation * num_iterations`` does not
  divide ``gradient_accumulation_steps``, or vLLM importance sampling), and the forward the ``relax`` /
  ``verl`` objectives already run: every step, no extra forward;
- otherwise one extra no-grad forward over ``latent_monitor_fraction`` of the local batch (rows drawn with a
  private generator, never the global RNG) every ``latent_monitor_every`` optimizer steps; the first
  monitored batch is used whole, to fit the dictionary.  Its cost is one no-grad forward of that fraction of
  the batch, logged as ``latent/time/monitor_forward_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from latentx.dynamics import KoopmanDictionary, rank_dynamics
from latentx.integrations.trl.koopman import fit_on_main_process
from latentx.monitor import monitor_metrics
from latentx.objectives import RelaxConfig, VerlConfig, per_response_mean

__all__ = ["MonitorBatch", "RolloutMonitor"]


@dataclass
class MonitorBatch:
    """The per-response signals of one monitored generation batch (this process's rows), chunk by chunk."""

    rows: Tensor | None  # local row indices the forward ran on (None: every row)
    fit_now: bool
    er: list[Tensor] = field(default_factory=list)
    erv: list[Tensor] = field(default_factory=list)
    era: list[Tensor] = field(default_factory=list)
    dsd: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    kept_H: list[Tensor] = field(default_factory=list)  # fit step only, float32 on the CPU


class RolloutMonitor:
    """Signals and batch statistics of the monitor (module docstring).

    Args:
        verl: the ``verl_*`` settings (``stride``, ``window`` of the ER series).
        relax: the ``relax_*`` settings (dictionary size, fit and DSD options).
        hidden_size: the policy's hidden size.
        every: monitor every this many optimizer steps when the monitor runs its own forward.
        fraction: fraction of the local batch that forward runs on.
        seed: seed of the row sampling (with the step number).
        koopman: a Koopman estimator to share (the ``relax`` objective's); None = the monitor's own.
    """

    def __init__(
        self,
        verl: VerlConfig,
        relax: RelaxConfig,
        hidden_size: int,
        every: int,
        fraction: float,
        seed: int = 0,
        koopman: KoopmanDictionary | None = None,
    ) -> None:
        self.stride, self.window = verl.stride, verl.window
        self.every, self.fraction, self.seed = every, fraction, seed
        if koopman is None:
            koopman = KoopmanDictionary.from_config(relax, hidden_size).requires_grad_(False)
        self.koopman = koopman

    def due(self, global_step: int) -> bool:
        """Whether the monitor runs its own forward on this step's batch."""
        return not self.koopman.fitted_ or global_step % self.every == 0

    def sample_rows(self, local_size: int, global_step: int) -> Tensor | None:
        """Sorted local rows for the monitor's own forward (None = all: fraction 1 or the fit step)."""
        if not self.koopman.fitted_ or self.fraction >= 1.0:
            return None
        count = min(local_size, max(2, math.ceil(self.fraction * local_size)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + global_step)
        return torch.randperm(local_size, generator=generator)[:count].sort().values

    def begin(self, rows: Tensor | None) -> MonitorBatch:
        return MonitorBatch(rows=rows, fit_now=not self.koopman.fitted_)

    def on_chunk(self, batch: MonitorBatch, H: Tensor, mask: Tensor) -> None:
        """Reduce one chunk of completion states ``H [b, C, d]`` (no grad) to per-response signals."""
        with torch.no_grad():
            H = H.detach()
            dynamics = rank_dynamics(H, mask, stride=self.stride, window=self.window)
            batch.er.append(dynamics.er.float())
            batch.erv.append(dynamics.erv.float())
            batch.era.append(dynamics.era.float())
            batch.masks.append(mask)
            if batch.fit_now:
                batch.kept_H.append(H.float().cpu())
            else:
                batch.dsd.append(self.koopman.dsd(H, mask).float())

    def finish(
        self,
        batch: MonitorBatch,
        entropies: Tensor | None,
        rewards: Tensor,
        accelerator,
        global_step: int,
    ) -> dict[str, float]:
        """Fit the dictionary if this is the first batch, gather, and return the ``latent/`` metrics.

        Args:
            entropies: ``[b, C]`` per-token entropies of the monitored rows (same forward), or None.
            rewards: ``[b]`` rewards of the monitored rows (NaN = unscorable).
        """
        if not batch.er:
            raise RuntimeError("the latent monitor saw no hidden states in its forward")
        mask = torch.cat(batch.masks)
        device = batch.er[0].device
        metrics: dict[str, float] = {}
        if batch.fit_now:
            H = torch.cat(batch.kept_H)
            if not self.koopman.fitted_:  # a shared (relax) dictionary may have been fitted on this batch already
                loss = fit_on_main_process(self.koopman, H, mask.cpu(), global_step, accelerator)
                if accelerator.is_main_process:
                    metrics["monitor/koopman_fit_loss"] = loss
            batch.dsd = [self.koopman.dsd(H.to(device), mask.to(device)).float()]
            batch.kept_H = []
        local = {
            "er": torch.cat(batch.er), "erv": torch.cat(batch.erv), "era": torch.cat(batch.era),
            "dsd": torch.cat(batch.dsd).to(device),
        }
        if entropies is not None:
            local["entropy"] = per_response_mean(entropies.detach().float(), mask.to(entropies.device)).to(device)
        names = list(local)
        stacked = torch.stack([local[name] for name in names], dim=1)
        gathered = accelerator.gather(torch.cat([stacked, rewards.float().to(device)[:, None]], dim=1).contiguous())
        values = {name: gathered[:, i] for i, name in enumerate(names)}
        metrics.update(monitor_metrics(values, gathered[:, -1]))
        metrics["monitor/responses"] = float(gathered.shape[0])
        return metrics
