"""``LatentGRPOTrainer``: TRL's ``GRPOTrainer`` with latentx's latent objectives (docs/trl.md).

What is overridden, and why (TRL 1.16; METHODS.md section 3):

- ``_get_per_token_logps_and_entropies``: while a latent capture is armed, a forward hook on the policy's
  backbone records the completion hidden states of that one call (:mod:`.capture`); the call's
  log-probabilities are kept for the loss terms.  TRL's fused LM head never returns hidden states.
- ``_generate_and_score_completions`` (rollout, no grad): for ``verl`` the ER / ERV / ERA of every
  response shape TRL's advantages; for ``relax`` the Koopman dictionary is fitted on the first batch and
  the rollout DSDs give the group weights of L_xp.  The states come from TRL's own old-log-prob forward
  when TRL runs it; otherwise one extra no-grad policy forward is run (docs/trl.md lists when).
- ``_compute_loss``: TRL's loss (its loss type, clipping, KL, entropy bonus, vLLM importance sampling)
  plus the latent terms, which need the update forward's hidden states with gradient (ReLaX) or its
  log-probabilities (KL-Cov); on-policy, the latent monitor reads the same forward's states, detached.
- ReLaX's reference: scored by the adapter for the rows of the KL set I only, none when I is empty
  (``_score_reference_lazily``), when only ReLaX's KL needs it.
- ``_calculate_rewards`` only records the gathered rewards (VERL's performance scaling).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import split_pixel_values_by_grid, unsplit_pixel_values_by_grid, use_adapter

from latentx.dynamics import KoopmanDictionary, rank_dynamics
from latentx.integrations.trl.capture import capture_completion_states, find_backbone
from latentx.integrations.trl.config import LatentGRPOConfig
from latentx.integrations.trl.latent import (
    group_ids,
    kl_cov_token_sum_correction,
    local_rows,
    relax_microbatch_share,
    relax_rollout_plan,
    verl_rollout_step,
)
from latentx.integrations.trl.koopman import fit_on_main_process, load_saved_dictionary
from latentx.integrations.trl.monitor import MonitorBatch, RolloutMonitor
from latentx.objectives import (
    KLCovConfig,
    RelaxConfig,
    VerlBaselines,
    VerlConfig,
    k3_kl,
    per_response_mean,
    verl_token_advantages,
)
from latentx.objectives.base import valid_only
from latentx.objectives.relax import BatchTotals
from latentx.diagnostics import TermGradients
from latentx.objectives.verl import log_notice

__all__ = ["LatentGRPOTrainer", "LATENT_STATE_FILE"]

#: Written into every checkpoint folder (VERL baselines, objective name); the Koopman dictionary sits beside it.
LATENT_STATE_FILE = "latentx_state.json"
_KOOPMAN_FILE = "latentx_koopman"
_MONITOR_KOOPMAN_FILE = "latentx_monitor_koopman"

@dataclass
class _Capture:
    """One armed capture: the next policy call to ``_get_per_token_logps_and_entropies`` is recorded."""

    keep_states: bool  # keep H (loss phase, with grad) instead of reducing each chunk
    reduce: Any = None  # rollout: callable(H [b, C, d], mask [b, C]) -> None
    states: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    logps: Tensor | None = None
    fired: bool = False
    reduce_seconds: float = 0.0
    # The latent monitor (no grad): its per-chunk reduction, and the call's per-token entropies.
    monitor: Any = None  # callable(H [b, C, d], mask [b, C]) -> None
    monitor_seconds: float = 0.0
    entropies: Tensor | None = None

    def on_chunk(self, states: Tensor, mask: Tensor) -> None:
        if self.keep_states:
            self.states.append(states)
            self.masks.append(mask)
        if self.reduce is not None:
            # The hook runs inside TRL's `accelerator.autocast()`: keep the statistics out of mixed precision.
            start = time.perf_counter()
            with torch.autocast(device_type=states.device.type, enabled=False):
                self.reduce(states, mask)
            self.reduce_seconds += time.perf_counter() - start
        if self.monitor is not None:
            start = time.perf_counter()
            with torch.autocast(device_type=states.device.type, enabled=False):
                self.monitor(states, mask)
            self.monitor_seconds += time.perf_counter() - start


@dataclass
class _PendingMonitor:
    """A monitored generation batch whose states come from TRL's loss forward, micro-batch by micro-batch."""

    batch: MonitorBatch
    local_size: int
    seen: int = 0  # local rows of the generation batch seen by loss forwards so far
    seconds: float = 0.0
    keep: Tensor | None = None  # the current micro-batch's monitored rows
    offset: int = 0  # rows of the current micro-batch passed to the hook so far


#: The multimodal inputs TRL 1.16's loss forward (``_compute_loss``) passes to the policy, read from the rollout.
_MULTIMODAL_FIELDS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                      "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def select_multimodal_rows(multimodal: dict[str, Any], rows: list[int], batch_size: int) -> dict[str, Any]:
    """The multimodal fields of the sequences ``rows`` of a rollout batch of ``batch_size`` sequences.

    Per-image tensors (``pixel_values`` patch rows, ``image_grid_thw``, ...) are split into per-sequence
    pieces by TRL's own ``split_pixel_values_by_grid`` (the split its shuffling uses), the pieces of ``rows``
    kept and merged back by ``unsplit_pixel_values_by_grid``; per-sequence fields (``num_images``,
    ``mm_token_type_ids``, ...) are indexed directly.
    """
    if not multimodal:
        return multimodal
    if multimodal.get("pixel_values") is not None and multimodal.get("num_images") is None:
        raise ValueError("selecting rows of a VLM rollout needs the rollout's num_images")
    split = split_pixel_values_by_grid(dict(multimodal))
    picked: dict[str, Any] = {}
    for key, value in split.items():
        if isinstance(value, (list, tuple)) or (isinstance(value, Tensor) and value.dim() > 0):
            if len(value) != batch_size:
                raise ValueError(f"multimodal field {key!r} has {len(value)} entries for {batch_size} sequences")
            picked[key] = value[torch.tensor(rows, device=value.device)] if isinstance(value, Tensor) else [value[i] for i in rows]
        else:
            picked[key] = value
    return unsplit_pixel_values_by_grid(picked)


class LatentGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` running the latentx objective chosen by ``args.latent_objective``.

    Takes TRL's arguments unchanged, with ``args`` a :class:`LatentGRPOConfig`.  Latent metrics are logged
    through TRL's ``self._metrics`` under the ``latent/`` prefix.  Latent objectives work on text LMs and
    vision-language models (the backbone hook reads the decoder's ``last_hidden_state``; the adapter's own
    rollout forward passes the same multimodal fields as TRL's loss forward).

    Extra attribute: ``latent_records`` — set it to a list to have every latent computation recorded
    (inputs, TRL's and latentx's numbers); used by the tests, off (None) by default.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: LatentGRPOConfig | None = None, **kwargs: Any):
        if not isinstance(args, LatentGRPOConfig):
            raise TypeError(f"args must be a LatentGRPOConfig, got {type(args).__name__}")
        self.latent_objective: str = args.latent_objective
        self.latent_config = args.method_config()
        self.latent_records: list[dict[str, Any]] | None = None
        # β_KL of METHODS.md §3 is TRL's own `beta`.  ReLaX's β·KL on the set I needs reference log-probs even
        # when β_KL = 0: TRL is then built with a non-zero beta (so it loads the reference and scores it at
        # rollout) and its loss runs with the user's β_KL (see `_trl_kl_coef`).
        self._kl_coef = float(args.beta)
        needs_reference = isinstance(self.latent_config, RelaxConfig) and self.latent_config.beta > 0
        trl_beta = args.beta if (args.beta != 0.0 or not needs_reference) else self.latent_config.beta
        # Lazy reference (as the core trainer's): when only ReLaX's KL set needs the reference, TRL does not score
        # it at rollout; the adapter scores the rows in I once I is known, and nothing when I is empty.
        self._lazy_reference = needs_reference and args.beta == 0.0
        user_beta = args.beta
        args.beta = trl_beta
        try:
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        finally:
            args.beta = user_beta
        self._capture: _Capture | None = None
        self._gathered_rewards: Tensor | None = None
        self.verl_baselines = VerlBaselines()
        self._verl_announced = False
        #: The Koopman estimator (METHODS.md §2), built once from the RelaxConfig; W frozen between fits.
        self.koopman: KoopmanDictionary | None = None
        if isinstance(self.latent_config, RelaxConfig):
            hidden_size = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
            self.koopman = KoopmanDictionary.from_config(
                self.latent_config, hidden_size, max_response_tokens=args.max_completion_length
            ).requires_grad_(False)
            self.koopman.to(self.accelerator.device)
        self.latent_monitor: RolloutMonitor | None = None
        self._monitor_pending: _PendingMonitor | None = None
        if args.latent_monitor:
            hidden_size = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
            self.latent_monitor = RolloutMonitor(
                args.section_config("verl"), args.section_config("relax"), hidden_size,
                every=args.latent_monitor_every, fraction=args.latent_monitor_fraction, seed=args.seed,
                koopman=self.koopman,
            )

    # ------------------------------------------------------------------------------------------
    # hidden-state capture
    # ------------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        capture = self._capture
        if capture is None or capture.fired:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        capture.fired = True  # exactly one call: the policy forward (TRL's reference forward comes after it)
        backbone = find_backbone(self.accelerator.unwrap_model(model))
        asked_entropy = bool(args[1] if len(args) > 1 else kwargs.get("compute_entropy", False))
        if capture.monitor is not None and not asked_entropy:  # the monitor reads the same forward's entropies
            if len(args) > 1:
                args = (args[0], True, *args[2:])
            else:
                kwargs["compute_entropy"] = True
        with capture_completion_states(backbone, logits_to_keep, capture.on_chunk):
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        capture.logps = result[0]
        if capture.monitor is not None:
            capture.entropies = result[1]
            if not asked_entropy:
                result = (result[0], None, *result[2:])
        return result

    @contextmanager
    def _armed(self, capture: _Capture) -> Iterator[_Capture]:
        self._capture = capture
        try:
            yield capture
        finally:
            self._capture = None

    def _trl_runs_old_logp_forward(self) -> bool:
        """TRL 1.16's condition for its no-grad old-log-prob forward in ``_generate_and_score_completions``."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or bool(
            self.use_vllm and self.vllm_importance_sampling_correction
        )

    def _policy_rollout_forward(self, output: dict[str, Any]) -> None:
        """The extra no-grad policy forward of ``relax`` / ``verl`` when TRL ran none (same call, chunking and
        autocast as TRL's)."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        # A VLM's rollout: the same multimodal fields TRL's loss forward passes (images, grids, 3-D rope ids).
        multimodal = {key: output[key] for key in _MULTIMODAL_FIELDS if output.get(key) is not None}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
                **multimodal,
            )

    # ------------------------------------------------------------------------------------------
    # rollout: rewards, advantages, rollout statistics
    # ------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # [B_global, n_funcs], gathered over processes; weighted sum as TRL logs it, NaN = unscorable.
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        self._gathered_rewards = rewards
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        if mode != "train" or self.latent_objective not in ("relax", "verl"):
            if mode == "train" and self.latent_monitor is not None:
                return self._generate_and_score_monitored(inputs)
            return super()._generate_and_score_completions(inputs)

        chunks: dict[str, list[Tensor]] = {"er": [], "erv": [], "era": [], "dsd": [], "H": [], "mask": []}
        fit_now = self.koopman is not None and self.koopman.refit_due(
            self.state.global_step, self.latent_config.refit_every
        )
        capture = _Capture(keep_states=False, reduce=lambda H, mask: self._reduce_rollout_chunk(H, mask, chunks, fit_now))
        monitored = self._monitor_capture(capture)
        trl_forward = self._trl_runs_old_logp_forward()
        scoring = self._trl_kl_coef() if self._lazy_reference else nullcontext()  # TRL skips its reference forward
        if trl_forward:
            with self._armed(capture), scoring:
                output = super()._generate_and_score_completions(inputs)
            if "old_per_token_logps" not in output or not capture.fired:
                raise RuntimeError(
                    "LatentGRPOTrainer expected TRL's old-log-prob forward to carry the rollout hidden states, but "
                    "TRL did not run it: this TRL version behaves differently from the supported range"
                )
        else:
            with scoring:
                output = super()._generate_and_score_completions(inputs)
            start = time.perf_counter()
            with self._armed(capture):
                self._policy_rollout_forward(output)
            self._metrics[mode]["latent/time/extra_forward_s"].append(
                time.perf_counter() - start - capture.reduce_seconds - capture.monitor_seconds
            )
        self._metrics[mode]["latent/extra_forward"].append(0.0 if trl_forward else 1.0)
        start = time.perf_counter()

        local_size = output["completion_ids"].size(0)
        device = output["advantages"].device
        if isinstance(self.latent_config, VerlConfig):
            self._apply_verl(output, chunks, mode)
        else:
            fit_states = None
            if fit_now:
                fit_states = (torch.cat(chunks["H"]), torch.cat(chunks["mask"]))
                self._fit_koopman(*fit_states, mode)
                chunks["dsd"] = [self.koopman.dsd(fit_states[0].to(device), fit_states[1].to(device))]
            self._apply_relax(output, torch.cat(chunks["dsd"]).to(device), local_size, mode, fit_states)
        # Latent rollout work (signals, dictionary fit, gathers), without the forward itself.
        self._metrics[mode]["latent/time/rollout_signals_s"].append(
            capture.reduce_seconds + time.perf_counter() - start
        )
        if monitored is not None:
            self._monitor_rollout_rows(monitored, capture, output)
            self._monitor_finish(monitored, mode, capture.monitor_seconds, output)
        return output

    # ------------------------------------------------------------------------------------------
    # the latent monitor (latent_monitor=True): statistics only, the objective is untouched
    # ------------------------------------------------------------------------------------------

    def _monitor_capture(self, capture: _Capture) -> MonitorBatch | None:
        """Let ``capture`` also feed the monitor (every row; and keep its forward's entropies); None when off."""
        if self.latent_monitor is None:
            return None
        batch = self.latent_monitor.begin(None)
        capture.monitor = lambda H, mask: self.latent_monitor.on_chunk(batch, H, mask)
        return batch

    def _monitor_rollout_rows(self, batch: MonitorBatch, capture: _Capture, output: dict[str, Any]) -> None:
        """Entropies, rewards and row order of a rollout forward that saw every local row, in order."""
        local_size = output["completion_ids"].size(0)
        rewards = self._gathered_rewards[local_rows(self.accelerator.process_index, local_size)]
        mask = torch.cat(batch.masks)
        self.latent_monitor.add_outcomes(batch, capture.entropies, mask, rewards, torch.arange(local_size, device=mask.device))

    def _generate_and_score_monitored(self, inputs):
        """TRL's rollout with the monitor reading TRL's old-log-prob forward, or (on-policy) marking the rows
        its loss forward will read (:mod:`.monitor`)."""
        mode = "train"
        monitor = self.latent_monitor
        assert monitor is not None
        if self._trl_runs_old_logp_forward():
            capture = _Capture(keep_states=False)
            batch = self._monitor_capture(capture)
            with self._armed(capture):
                output = super()._generate_and_score_completions(inputs)
            if not capture.fired:
                raise RuntimeError("the latent monitor expected TRL's old-log-prob forward, but TRL did not run it")
            self._metrics[mode]["latent/monitor/loss_forward"].append(0.0)
            self._monitor_rollout_rows(batch, capture, output)
            self._monitor_finish(batch, mode, capture.monitor_seconds, output)
            return output
        output = super()._generate_and_score_completions(inputs)
        step = self.state.global_step
        if not monitor.due(step):
            return output
        local_size = output["completion_ids"].size(0)
        device = output["completion_ids"].device
        rewards = self._gathered_rewards[local_rows(self.accelerator.process_index, local_size)]
        # Ride along TRL's shuffle and split into micro-batches (one more key of the same shuffle: no RNG moves).
        output["latent_monitor_row"] = torch.arange(local_size, device=device)
        output["latent_monitor_reward"] = rewards.float().to(device)
        batch = monitor.begin(monitor.sample_rows(local_size, step))
        self._monitor_pending = _PendingMonitor(batch=batch, local_size=local_size)
        self._metrics[mode]["latent/monitor/loss_forward"].append(1.0)
        self._record("monitor_rollout", output=output, rows=batch.rows)
        return output

    def _monitor_loss_watch(self, inputs: dict[str, Any]):
        """The per-chunk reader of this loss micro-batch's monitored rows, or None (no monitored batch pending)."""
        pending = self._monitor_pending
        if pending is None or "latent_monitor_row" not in inputs:
            return None
        order = inputs["latent_monitor_row"]
        rows = pending.batch.rows
        pending.keep = torch.ones_like(order, dtype=torch.bool) if rows is None else torch.isin(order, rows.to(order.device))
        pending.offset = 0

        def on_chunk(H: Tensor, mask: Tensor) -> None:
            keep = pending.keep[pending.offset : pending.offset + H.shape[0]].to(H.device)
            pending.offset += H.shape[0]
            if bool(keep.any()):
                self.latent_monitor.on_chunk(pending.batch, H.detach()[keep], mask[keep])

        return on_chunk

    def _monitor_loss_microbatch(self, capture: _Capture, inputs: dict[str, Any], mode: str) -> None:
        """After one loss micro-batch: add its monitored rows; after the generation batch's last one, log."""
        pending = self._monitor_pending
        assert pending is not None and pending.keep is not None
        start = time.perf_counter()
        keep = pending.keep
        if bool(keep.any()):
            mask = inputs["completion_mask"].bool()[keep]
            self.latent_monitor.add_outcomes(
                pending.batch, capture.entropies[keep], mask, inputs["latent_monitor_reward"][keep],
                inputs["latent_monitor_row"][keep],
            )
        pending.seen += keep.numel()
        pending.seconds += capture.monitor_seconds + time.perf_counter() - start
        if pending.seen >= pending.local_size:  # the same micro-batch on every process: the gather is safe
            self._monitor_pending = None
            self._monitor_finish(pending.batch, mode, pending.seconds)

    def _monitor_finish(self, batch: MonitorBatch, mode: str, seconds: float, output: dict[str, Any] | None = None) -> None:
        """Gather the monitored rows' signals with their rewards and log the batch statistics under latent/."""
        assert self.latent_monitor is not None
        start = time.perf_counter()
        metrics = self.latent_monitor.finish(batch, self.accelerator, self.state.global_step)
        for name, value in metrics.items():
            self._metrics[mode][f"latent/{name}"].append(value)
        self._metrics[mode]["latent/time/monitor_signals_s"].append(seconds + time.perf_counter() - start)
        if output is not None:
            self._record("monitor_rollout", output=output, rows=batch.rows)
        self._record("monitor_finish", rows=batch.rows, rewards=batch.rewards[0], entropies=batch.entropy[0],
                     metrics=metrics)

    def _reduce_rollout_chunk(self, H: Tensor, mask: Tensor, chunks: dict[str, list[Tensor]], fit_now: bool) -> None:
        """Per-chunk rollout statistics, so the whole batch's hidden states are never held at once
        (except on a dictionary-fit step, where they are kept on the CPU)."""
        H = H.detach()
        if isinstance(self.latent_config, VerlConfig):
            dynamics = rank_dynamics(H, mask, stride=self.latent_config.stride, window=self.latent_config.window)
            chunks["er"].append(dynamics.er.float())
            chunks["erv"].append(dynamics.erv.float())
            chunks["era"].append(dynamics.era.float())
        elif fit_now:
            chunks["H"].append(H.float().cpu())
            chunks["mask"].append(mask.cpu())
        else:
            chunks["dsd"].append(self.koopman.dsd(H, mask).float())

    def _apply_verl(self, output: dict[str, Any], chunks: dict[str, list[Tensor]], mode: str) -> None:
        cfg = self.latent_config
        assert isinstance(cfg, VerlConfig)
        behaviour = cfg.behaviour
        if not self._verl_announced:  # the configuration's one-line notice, once per run (the core's text)
            log_notice(cfg)
            self._verl_announced = True
        trl_advantages = output["advantages"]
        er, erv, era = (torch.cat(chunks[k]).to(trl_advantages.device) for k in ("er", "erv", "era"))
        used = self.verl_baselines
        needs_rewards = cfg.performance_scaling or behaviour.aux_in_reward or behaviour.bf16
        step = verl_rollout_step(
            trl_advantages, er, erv, era, used, cfg, self.accelerator.gather, self.accelerator.process_index,
            rewards=self._gathered_rewards if needs_rewards else None,
            num_generations=self.num_generations, scale_rewards=self.scale_rewards,
        )
        self.verl_baselines = step.baselines
        if behaviour.inert:
            pass  # TRL's advantages, untouched
        elif behaviour.apply_to == "last_token":
            mask = output["completion_mask"].bool()
            output["advantages"] = verl_token_advantages(step.advantages, step.shaped, mask, "last_token")
        else:
            output["advantages"] = step.shaped.to(trl_advantages.dtype)
        for name, value in step.metrics.items():
            self._metrics[mode][f"latent/{name}"].append(value)
        self._record(
            "verl_rollout",
            trl_advantages=trl_advantages, shaped=output["advantages"], er=er, erv=erv, era=era,
            baselines_used=asdict(used), rewards=self._gathered_rewards, output=output,
        )

    def _apply_relax(
        self, output: dict[str, Any], dsd: Tensor, local_size: int, mode: str, fit_states: tuple | None
    ) -> None:
        cfg = self.latent_config
        assert isinstance(cfg, RelaxConfig)
        device = output["advantages"].device
        groups = group_ids(self.accelerator.process_index, local_size, self.num_generations, device)
        output["latent_group"] = groups
        lengths = output["completion_mask"].sum(1).long()
        plan = relax_rollout_plan(
            output["advantages"], dsd, groups, cfg, self.accelerator.gather, self.accelerator.process_index,
            lengths=lengths, length_norm=cfg.resolved_pad_to(self.max_completion_length) or self.max_completion_length,
        )
        output["latent_in_set"] = plan.in_set
        output["latent_group_lse"] = plan.group_lse
        output["latent_group_count"] = plan.group_count
        output["latent_dsd_rollout"] = dsd.detach().float()
        # 0-dim tensors ride along unchanged through TRL's shuffle and split.
        output["latent_xp"] = torch.tensor(plan.xp, device=device)
        for name in ("groups", "responses", "tokens", "in_set", "length"):
            output[f"latent_total_{name}"] = torch.tensor(getattr(plan.totals, name), device=device)
        for name, value in plan.metrics.items():
            self._metrics[mode][f"latent/{name}"].append(value)
        if self._lazy_reference:
            self._score_reference_lazily(output, int(plan.totals.in_set), mode)
        self._record("relax_rollout", dsd=dsd, output=output, fit_states=fit_states)

    def _score_reference_lazily(self, output: dict[str, Any], in_set_total: int, mode: str) -> None:
        """ReLaX's reference log-probs for the local rows in I only (rows outside I are 0 and never read), and
        no reference forward at all when I is empty on every process (then no ``ref_per_token_logps``: the KL
        share is 0).  A VLM's rows keep their images (:func:`select_multimodal_rows`).  Sharded models (FSDP,
        DeepSpeed), whose forward every process must join, score every local row once I is non-empty anywhere."""
        start = time.perf_counter()
        in_set = output["latent_in_set"]
        rows = torch.nonzero(in_set).flatten()
        multimodal = {key: output[key] for key in _MULTIMODAL_FIELDS if output.get(key) is not None}
        if in_set_total > 0 and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            rows = torch.arange(in_set.numel(), device=in_set.device)
        if in_set_total > 0 and multimodal and 0 < rows.numel() < in_set.numel():
            multimodal = select_multimodal_rows(multimodal, rows.tolist(), in_set.numel())
        if in_set_total > 0:
            completion_ids = output["completion_ids"]
            ref = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
            if rows.numel():
                input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)[rows]
                attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)[rows]
                call = dict(batch_size=self.args.per_device_train_batch_size, **multimodal)
                with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                    if self.ref_model is not None:
                        logps = self._get_per_token_logps_and_entropies(
                            self.ref_model, input_ids, attention_mask, completion_ids.size(1), **call
                        )[0]
                    else:  # PEFT: the adapter disabled (or TRL's "ref" adapter), as TRL scores it
                        model = self.accelerator.unwrap_model(self.model)
                        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                            logps = self._get_per_token_logps_and_entropies(
                                self.model, input_ids, attention_mask, completion_ids.size(1), **call
                            )[0]
                ref[rows] = logps.float()
            output["ref_per_token_logps"] = ref
        self._metrics[mode]["latent/relax/reference_rows"].append(float(rows.numel() if in_set_total > 0 else 0))
        self._metrics[mode]["latent/time/reference_forward_s"].append(time.perf_counter() - start)

    def _fit_koopman(self, H: Tensor, mask: Tensor, mode: str) -> None:
        """Fit a fresh dictionary on process 0's share of the batch and broadcast W (METHODS.md §2)."""
        assert self.koopman is not None
        loss = fit_on_main_process(self.koopman, H, mask, self.state.global_step, self.accelerator)
        self._metrics[mode]["latent/koopman_fit_loss"].append(loss)

    # ------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------

    @contextmanager
    def _trl_kl_coef(self) -> Iterator[None]:
        """Run TRL's loss with the user's β_KL (TRL's ``beta`` may be non-zero only to score the reference)."""
        rollout_beta = self.beta
        self.beta = self._kl_coef
        try:
            yield
        finally:
            self.beta = rollout_beta

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        latent = mode == "train" and self.latent_objective in ("relax", "kl_cov")
        watch = self._monitor_loss_watch(inputs) if mode == "train" else None
        if not latent and watch is None:
            with self._trl_kl_coef():
                return super()._compute_loss(model, inputs)
        capture = _Capture(keep_states=latent and self.latent_objective == "relax", monitor=watch)
        with self._armed(capture), self._trl_kl_coef():
            trl_loss = super()._compute_loss(model, inputs)
        if not capture.fired or capture.logps is None:
            raise RuntimeError("TRL's loss forward did not go through _get_per_token_logps_and_entropies")
        if watch is not None:
            self._monitor_loss_microbatch(capture, inputs, mode)
        if not latent:
            return trl_loss
        start = time.perf_counter()
        if self.latent_objective == "relax":
            term, details = self._relax_term(inputs, capture, mode)
        else:
            term, details = self._kl_cov_term(inputs, capture.logps, mode)
        loss = trl_loss + term / self.current_gradient_accumulation_steps
        every = int(getattr(self.args, "latent_term_grads_every", 0) or 0)
        if every and self.state.global_step % every == 0 and self.latent_objective == "relax":
            # diagnostics.term_grads_every: each term's gradient on this micro-batch, separately (one extra
            # backward per term, only on these steps).
            cfg, steps = self.latent_config, self.current_gradient_accumulation_steps
            tracker = TermGradients(model.parameters())
            tracker.add({"pg": trl_loss, "xp": cfg.alpha * details["xp"] / steps, "kl": cfg.beta * details["kl"] / steps})
            for key, value in tracker.metrics().items():
                self._metrics[mode][f"latent/{key}"].append(value)
        self._metrics[mode]["latent/time/loss_terms_s"].append(time.perf_counter() - start)  # forward part only
        self._record(
            f"{self.latent_objective}_loss",
            inputs=inputs, trl_loss=trl_loss, latent_term=term, loss=loss, logps=capture.logps, **details,
        )
        return loss

    def _loss_mask(self, inputs: dict[str, Any]) -> Tensor:
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        return mask.bool()

    def _relax_term(self, inputs: dict[str, Any], capture: _Capture, mode: str) -> tuple[Tensor, dict[str, Any]]:
        """α·L_xp + β·mean_{i∈I} KL_i of this micro-batch (METHODS.md §3), with the update forward's gradient."""
        cfg = self.latent_config
        assert isinstance(cfg, RelaxConfig) and self.koopman is not None
        H = torch.cat(capture.states)
        state_mask = torch.cat(capture.masks)
        dsd = self.koopman.dsd(H, state_mask)  # [b], with grad into the policy
        logps = capture.logps
        mask = self._loss_mask(inputs)
        ref = inputs.get("ref_per_token_logps")
        kl_i = None
        if ref is not None:  # per response, over I only (a lazy reference is 0 outside I)
            member = mask & inputs["latent_in_set"].bool()[:, None]
            kl_i = per_response_mean(k3_kl(valid_only(logps, member), valid_only(ref.detach(), member)), member)
        advantages = inputs["advantages"]
        if advantages.dim() == 2:
            advantages = per_response_mean(advantages, mask)
        totals = BatchTotals(**{name: int(inputs[f"latent_total_{name}"]) for name in ("groups", "responses", "tokens", "in_set", "length")})
        num_shares = self.accelerator.num_processes * self.args.steps_per_generation
        shares = relax_microbatch_share(
            advantages.float(), dsd, inputs["latent_group"], mask, inputs["latent_in_set"], inputs["latent_group_lse"],
            inputs["latent_group_count"], totals, cfg, num_shares, logp=logps, ref_logp=ref,
        )
        xp, kl = shares.xp, shares.kl
        drift = (dsd.detach() - inputs["latent_dsd_rollout"]).abs().mean() if dsd.numel() else dsd.sum()
        term = shares.loss
        stats = torch.stack([xp.detach(), kl.detach(), dsd.detach().mean(), drift.float()]).float()
        xp_mean, kl_mean, dsd_mean, drift_mean = self.accelerator.gather(stats).view(-1, 4).mean(dim=0).tolist()
        self._metrics[mode]["latent/relax/xp"].append(xp_mean)
        self._metrics[mode]["latent/relax/kl_set_kl"].append(kl_mean)
        self._metrics[mode]["latent/relax/dsd_update_mean"].append(dsd_mean)
        self._metrics[mode]["latent/relax/dsd_drift"].append(drift_mean)
        return term, {"dsd": dsd, "xp": xp, "kl": kl, "kl_i": kl_i, "H": H, "state_mask": state_mask}

    def _kl_cov_term(self, inputs: dict[str, Any], logps: Tensor, mode: str) -> tuple[Tensor, dict[str, Any]]:
        """KL-Cov's replacement of the clipped surrogate on the top-covariance tokens, normalised as TRL
        normalises its own token sum for ``loss_type`` (METHODS.md §3 "kl_cov")."""
        cfg = self.latent_config
        assert isinstance(cfg, KLCovConfig)
        mask = self._loss_mask(inputs)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        token_sum = kl_cov_token_sum_correction(
            logps, old, inputs["advantages"], mask, cfg, self.epsilon_low, self.epsilon_high
        )
        loss_type = self.loss_type
        if loss_type == "bnpo":
            normalizer = mask.sum().clamp(min=1).float()
        elif loss_type == "dr_grpo":
            normalizer = torch.tensor(float(mask.shape[0] * self.max_completion_length), device=mask.device)
        elif loss_type == "dapo":
            # TRL: num_items_in_batch spans the generation batch; rescaled to one accumulation window, and
            # the result is not divided again by gradient_accumulation_steps (undone below).
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            normalizer = normalizer / self.current_gradient_accumulation_steps
        else:
            raise ValueError(f"kl_cov does not support loss_type={loss_type!r}")
        term = token_sum / normalizer
        self._metrics[mode]["latent/kl_cov/term"].append(float(self.accelerator.gather(term.detach()).mean()))
        return term, {"old_logps": old, "token_sum": token_sum}

    # ------------------------------------------------------------------------------------------
    # state: checkpoints and resume
    # ------------------------------------------------------------------------------------------

    def latent_state_dict(self) -> dict[str, Any]:
        """The cross-step latent state as plain JSON-able values (the dictionary is saved separately)."""
        return {"objective": self.latent_objective, "verl_baselines": asdict(self.verl_baselines)}

    def load_latent_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("objective") != self.latent_objective:
            raise ValueError(f"latent state is for objective {state.get('objective')!r}, this run is {self.latent_objective!r}")
        self.verl_baselines = VerlBaselines(**state["verl_baselines"])

    def save_latent_state(self, directory: str) -> None:
        """Write :data:`LATENT_STATE_FILE` (and the fitted Koopman dictionary) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, LATENT_STATE_FILE), "w") as fh:
            json.dump(self.latent_state_dict(), fh)
        if self.koopman is not None and self.koopman.fitted_:
            self.koopman.save(os.path.join(directory, _KOOPMAN_FILE))
        monitor = self.latent_monitor
        if monitor is not None and monitor.koopman is not self.koopman and monitor.koopman.fitted_:
            monitor.koopman.save(os.path.join(directory, _MONITOR_KOOPMAN_FILE))

    def load_latent_state(self, directory: str) -> None:
        path = os.path.join(directory, LATENT_STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist (not a LatentGRPOTrainer checkpoint?)")
        with open(path) as fh:
            self.load_latent_state_dict(json.load(fh))
        if self.koopman is not None:  # resume: no refit on the first rollout unless the schedule says so
            self.koopman = load_saved_dictionary(os.path.join(directory, _KOOPMAN_FILE), like=self.koopman)
        monitor = self.latent_monitor
        if monitor is not None:
            if self.koopman is not None:
                monitor.koopman = self.koopman  # shared with the relax objective
            elif os.path.exists(os.path.join(directory, _MONITOR_KOOPMAN_FILE)):
                monitor.koopman = load_saved_dictionary(os.path.join(directory, _MONITOR_KOOPMAN_FILE), monitor.koopman)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.save_latent_state(folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, LATENT_STATE_FILE)):
            self.load_latent_state(checkpoint)

    # ------------------------------------------------------------------------------------------

    def _record(self, kind: str, **values: Any) -> None:
        """Append a detached copy of ``values`` to ``latent_records`` when recording is on (tests)."""
        if self.latent_records is None:
            return

        def copy(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.detach().clone()
            if isinstance(value, dict):
                return {k: copy(v) for k, v in value.items()}
            return value

        params = {name: p.detach().clone() for name, p in self.accelerator.unwrap_model(self.model).named_parameters()}
        self.latent_records.append({"kind": kind, "step": self.state.global_step, "params": params, **copy(values)})
