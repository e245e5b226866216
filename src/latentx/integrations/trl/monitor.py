"""The latent monitor inside TRL's ``GRPOTrainer`` (``LatentGRPOConfig(latent_monitor=True)``; docs/trl.md).

It never touches the objective: it reads the completion hidden states of a no-grad policy forward, reduces
them per response to ER / ERV / ERA (METHODS.md §1, ``verl_stride`` / ``verl_window``) and DSD (§2, a
Koopman dictionary with the ``relax_*`` settings, fitted on the first monitored batch and frozen), takes
the response's mean token entropy from the same forward, and logs :func:`latentx.monitor.monitor_metrics`
of the gathered batch under ``latent/``.

Which forward (decided per generation batch by the trainer); the monitor never runs a forward of its own:

- TRL's own old-log-prob forward, when TRL runs it (``steps_per_generation * num_iterations`` does not
  divide ``gradient_accumulation_steps``, or vLLM importance sampling), and the forward the ``relax`` /
  ``verl`` objectives already run: every step;
- otherwise (on-policy GRPO: TRL runs no no-grad forward) TRL's loss forward, whose states are computed with
  the same parameters as the rollout's (TRL skips the old-log-prob forward exactly because no update happens
  between the rollout and its micro-batches): every ``latent_monitor_every`` optimizer steps, on
  ``latent_monitor_fraction`` of the local batch (rows drawn with a private generator, never the global
  RNG; the first monitored batch is used whole, to fit the dictionary).  The rows reach the loss shuffled
  and split into micro-batches; each carries its rollout row index and reward (``latent_monitor_row``,
  ``latent_monitor_reward``), and :meth:`RolloutMonitor.finish` puts them back in rollout order once the
  last micro-batch of the generation batch has been seen.  Cost: the signals of the sampled rows only.
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
    """The per-response signals of one monitored generation batch (this process's rows), chunk by chunk, in
    the order the forward saw them (``order``: their local rollout row indices)."""

    rows: Tensor | None  # local rollout rows that are monitored (None: every row)
    fit_now: bool
    er: list[Tensor] = field(default_factory=list)
    erv: list[Tensor] = field(default_factory=list)
    era: list[Tensor] = field(default_factory=list)
    dsd: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    kept_H: list[Tensor] = field(default_factory=list)  # fit step only, float32 on the CPU
    entropy: list[Tensor] = field(default_factory=list)  # per-response mean token entropy
    rewards: list[Tensor] = field(default_factory=list)
    order: list[Tensor] = field(default_factory=list)


class RolloutMonitor:
    """Signals and batch statistics of the monitor (module docstring).

    Args:
        verl: the ``verl_*`` settings (``stride``, ``window`` of the ER series).
        relax: the ``relax_*`` settings (dictionary size, fit and DSD options).
        hidden_size: the policy's hidden size.
        every: monitor every this many optimizer steps when the states come from TRL's loss forward.
        fraction: fraction of the local batch monitored then.
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
        """Whether this step's batch is monitored (from TRL's loss forward)."""
        return not self.koopman.fitted_ or global_step % self.every == 0

    def sample_rows(self, local_size: int, global_step: int) -> Tensor | None:
        """Sorted local rows to monitor from the loss forward (None = all: fraction 1 or the fit step)."""
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

    def add_outcomes(self, batch: MonitorBatch, entropies: Tensor, mask: Tensor, rewards: Tensor, order: Tensor) -> None:
        """The rest of the rows just passed to :meth:`on_chunk`: their per-token entropies ``[b, C]`` from the
        same forward, completion ``mask``, rewards ``[b]`` (NaN = unscorable) and local rollout row indices."""
        with torch.no_grad():
            batch.entropy.append(per_response_mean(entropies.detach().float(), mask.to(entropies.device)))
        batch.rewards.append(rewards.detach().float())
        batch.order.append(order.detach())

    def finish(self, batch: MonitorBatch, accelerator, global_step: int) -> dict[str, float]:
        """Put the rows in rollout order, fit the dictionary if this is the first batch, gather, and return the
        ``latent/`` metrics.  Afterwards each list of ``batch`` holds the one ordered tensor."""
        if not batch.er:
            raise RuntimeError("the latent monitor saw no hidden states in its forward")
        if len(batch.order) != len(batch.rewards) or sum(o.numel() for o in batch.order) != sum(e.numel() for e in batch.er):
            raise RuntimeError("the latent monitor's rows, rewards and signals do not line up")
        device = batch.er[0].device
        perm = torch.argsort(torch.cat(batch.order).to(device), stable=True)

        def ordered(chunks: list[Tensor]) -> list[Tensor]:
            value = torch.cat(chunks)
            return [value[perm.to(value.device)]]

        batch.er, batch.erv, batch.era, batch.masks = (ordered(x) for x in (batch.er, batch.erv, batch.era, batch.masks))
        batch.entropy, batch.rewards, batch.order = (ordered(x) for x in (batch.entropy, batch.rewards, batch.order))
        mask = batch.masks[0]
        metrics: dict[str, float] = {}
        if batch.fit_now:
            H = ordered(batch.kept_H)[0]
            if not self.koopman.fitted_:  # a shared (relax) dictionary may have been fitted on this batch already
                loss = fit_on_main_process(self.koopman, H, mask.cpu(), global_step, accelerator)
                if accelerator.is_main_process:
                    metrics["monitor/koopman_fit_loss"] = loss
            batch.dsd = [self.koopman.dsd(H.to(device), mask.to(device)).float()]
            batch.kept_H = []
        else:
            batch.dsd = ordered(batch.dsd)
        local = {
            "er": batch.er[0], "erv": batch.erv[0], "era": batch.era[0], "dsd": batch.dsd[0].to(device),
            "entropy": batch.entropy[0].to(device),
        }
        names = list(local)
        stacked = torch.stack([local[name] for name in names], dim=1)
        rewards = batch.rewards[0].to(device)[:, None]
        gathered = accelerator.gather(torch.cat([stacked, rewards], dim=1).contiguous())
        values = {name: gathered[:, i] for i, name in enumerate(names)}
        metrics.update(monitor_metrics(values, gathered[:, -1]))
        metrics["monitor/responses"] = float(gathered.shape[0])
        return metrics
