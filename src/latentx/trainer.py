"""The RL loop: GRPO with the ReLaX / VERL / token-level exploration objectives, readable in one sitting.

One step, in the order the data flows (METHODS.md §0-§3):

1. **task → rollout**: draw ``prompts_per_step`` training prompts, sample R responses each, score them
   with the task's verifier.
2. **one no-grad forward per micro-batch** gives the old log-probs, token entropies and last-layer
   hidden states; the hidden states are reduced to per-response signals (ER / ERV / ERA, DSD) on the
   spot and dropped (only the first step keeps them, to fit the Koopman dictionary).
3. **advantages**: GRPO group-normalised rewards, shaped by VERL when that is the objective.
4. **update**: forward with grad (hidden states too for ReLaX, whose DSD is differentiated), the
   objective's loss, backward, clip, step.
5. log one ``metrics.jsonl`` row; checkpoint atomically every ``checkpoint_every`` steps.

A run ends with a held-out evaluation (Mean@1 greedy, Pass@k from n samples) in ``summary.json``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from latentx import dynamics
from latentx import checkpoint as run_files
from latentx.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, save_weights, set_rng_state
from latentx.config import atomic_write_text, save_yaml, to_dict
from latentx.monitor import monitor_metrics
from latentx.objectives import REGISTRY, Objective
from latentx.objectives.base import GRPOConfig, PolicyBatch, per_response_mean
from latentx.objectives.clip_cov import ClipCovConfig
from latentx.objectives.entropy_bonus import EntropyBonusConfig
from latentx.objectives.kl_cov import KLCovConfig
from latentx.objectives.relax import BatchTotals, RelaxConfig, apply_train_preset
from latentx.diagnostics import DiagnosticsConfig, KLSetMonitor, TermGradients
from latentx.objectives.verl import VerlConfig
from latentx.reporting import LoggingConfig
from latentx.rollout import RolloutConfig, Sequences, policy_forward, sample_responses
from latentx.tasks import TaskConfig
from latentx.vision import save_tokenizer, task_images
from latentx.warmstart import WarmStartConfig

#: The objective names the trainer runs: the registry itself (iterating gives the names, in order).
OBJECTIVES = REGISTRY


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which policy to train.  ``name``: ``tiny``, a local directory, a hub id, a GGUF file or a run dir."""

    name: str = "tiny"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    reference: Literal["auto", "yes", "no"] = "auto"  # frozen copy for KL terms; auto = when a KL is weighted

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name must not be empty")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    updates_per_step: int = 1  # optimizer passes over each rollout batch (GRPO's μ)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0, got {self.grad_clip}")
        if self.updates_per_step < 1:
            raise ValueError(f"optim.updates_per_step must be >= 1, got {self.updates_per_step}")


@dataclass
class SignalConfig:
    """Latent signals of the rollouts.

    ``auto_scale``: the papers' stride (40) and dictionary size (50) assume responses of thousands of
    tokens.  When on, VERL's stride and ReLaX's m are scaled to ``rollout.max_new_tokens`` L as
    ``stride = clamp(L // 8, 2, 40)`` and ``m = clamp(L // 3, 4, 50)`` (both equal the papers'
    values from L = 320 / 150 tokens on); the resolved values are written to ``config.yaml``.
    ``monitor``: the latent monitor (:mod:`latentx.monitor`; the TRL adapter's ``latent_monitor``, verl's
    ``latentx.monitor``): compute ER / ERV / ERA and DSD on every step's rollouts even when the objective
    does not use them, and log their mean, std, quantiles and correlation with reward beside the token
    entropy's (off in the overhead benchmark's GRPO baseline).  ``track`` is its old name, still read from
    configs written before (a set value is copied into ``monitor``).
    """

    auto_scale: bool = True
    monitor: bool = True
    track: bool | None = None

    def __post_init__(self) -> None:
        if self.track is not None:
            self.monitor, self.track = bool(self.track), None


@dataclass
class FinalEvalConfig:
    """Held-out evaluation at the end of a run: Mean@1 greedy and Pass@k from ``n`` samples."""

    enabled: bool = True
    instances: int = 64
    n: int = 16
    ks: tuple[int, ...] = (1, 4, 16)
    temperature: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"eval.instances must be >= 1, got {self.instances}")
        if any(k < 1 or k > self.n for k in self.ks):
            raise ValueError(f"eval.ks must lie in [1, eval.n={self.n}], got {list(self.ks)}")


@dataclass
class TrainConfig:
    """Everything a run needs; ``latentx train`` builds it from defaults, ``--config`` YAML and flags."""

    objective: str = "relax"  # a name in latentx.objectives.REGISTRY
    steps: int = 100
    seed: int = 0
    out: str = ""  # default: runs/<objective>-<task>-s<seed>
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    signals: SignalConfig = field(default_factory=SignalConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    relax: RelaxConfig = field(default_factory=RelaxConfig)
    verl: VerlConfig = field(default_factory=VerlConfig)
    entropy_bonus: EntropyBonusConfig = field(default_factory=EntropyBonusConfig)
    kl_cov: KLCovConfig = field(default_factory=KLCovConfig)
    clip_cov: ClipCovConfig = field(default_factory=ClipCovConfig)
    eval: FinalEvalConfig = field(default_factory=FinalEvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def __post_init__(self) -> None:
        if self.objective not in REGISTRY:
            raise ValueError(f"objective must be one of {', '.join(REGISTRY)}, got {self.objective!r}")
        # relax.preset's GRPO / rollout part and pad_to = L_max (objectives/relax.py; METHODS.md §3a).
        apply_train_preset(self.objective, self.relax, self.grpo, self.rollout, self.rollout.max_new_tokens)
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.objective}-{self.task.name}-s{self.seed}")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill in derived values (signal scaling) so that ``config.yaml`` records what actually ran."""
    cfg = copy.deepcopy(cfg)
    if cfg.signals.auto_scale:
        length = cfg.rollout.max_new_tokens
        cfg.verl.stride = int(min(40, max(2, length // 8)))
        cfg.relax.m = int(min(50, max(4, length // 3)))
        cfg.signals.auto_scale = False  # resolved: a resumed run must not rescale
    return cfg


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _mean_std(values: torch.Tensor) -> tuple[float, float]:
    values = values.detach().float()
    if values.numel() == 0:
        return 0.0, 0.0
    std = values.std(unbiased=False).item() if values.numel() > 1 else 0.0
    return values.mean().item(), std


@dataclass
class Rollout:
    """One step's rollout batch; every tensor stays on the training device until the step ends.

    Rows ``g*R .. g*R+R-1`` are the R responses of prompt ``g`` (``group``).  ``signals`` maps a signal
    name (``er``, ``erv``, ``era``, ``dsd``) to its per-response ``[N]`` values on the rollout policy.
    """

    seqs: Sequences  # prompt + response tokens, [N, P + T]
    rewards: torch.Tensor  # [N] float
    correct: torch.Tensor  # [N] bool
    old_logp: torch.Tensor  # [N, T] log π_old of the sampled tokens (0 at padding)
    ref_logp: torch.Tensor | None  # [N, T] log π_ref, when a reference model is loaded
    entropy: torch.Tensor  # [N] mean token entropy per response
    signals: dict[str, torch.Tensor]
    group: torch.Tensor  # [N] long, the prompt index of each response
    time_generate: float = 0.0
    time_signals: float = 0.0
    time_fit: float = 0.0
    sampling_info: dict[str, float] = field(default_factory=dict)  # rollout.dynamic_sampling diagnostics
    in_set: torch.Tensor | None = None  # [N] bool, ReLaX's KL set I (decided by Trainer.kl_set)


class Trainer:
    """Holds the run's state; ``run()`` trains to ``cfg.steps`` (resuming if the run dir has a checkpoint)."""

    def __init__(self, cfg: TrainConfig, progress: bool = True, log=print) -> None:
        from latentx.models import load_model
        from latentx.tasks import build_task

        run_files.check_same_run(cfg.run_dir, to_dict(resolve_config(cfg)))  # before anything is written
        self.cfg = cfg
        self.progress = progress
        self.log = log
        self.run_dir = cfg.run_dir
        self.device = _device(cfg.model.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)

        self.task = build_task(cfg.task)  # bad task data is an error before the run directory exists
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint = latest_checkpoint(self.run_dir)
        if self.checkpoint is not None:
            self.model, self.tokenizer = load_model(str(self.checkpoint), device=str(self.device), dtype=cfg.model.dtype)
            self.warm_info: dict[str, Any] = {"resumed_from": str(self.checkpoint)}
        else:
            self.model, self.tokenizer, self.warm_info = initial_policy(cfg, self.task, progress, log)
        self.model.to(self.device)
        self.objective = Objective.from_config(cfg)
        # The frozen reference is the policy the run started from (after the warm start); it is saved
        # once so that a resumed run compares against the same weights.  ReLaX's β term needs it only for
        # the responses in I: then it is loaded on the first step whose I is non-empty (never, when I stays
        # empty).  A GRPO KL (grpo.kl_coef > 0) needs it on every token of every step: loaded now.
        self.reference = None
        self._reference_dir: Path | None = None
        self._full_reference = cfg.grpo.kl_coef > 0 or not self.objective.selects_reference_rows
        if self._wants_reference():
            ref_dir = self.run_dir / "reference"
            if not (self.checkpoint is not None and ref_dir.is_dir()):
                save_weights(self.model, ref_dir)
                save_tokenizer(self.tokenizer, ref_dir)  # a VLM's processor too
            self._reference_dir = ref_dir
            if self._full_reference:
                self._load_reference()
        rc = cfg.relax
        self.kl_set_monitor = KLSetMonitor(rc.beta, float(rc.xi), rc.xi_mode, str(rc.spectrum), enabled=self.objective.selects_reference_rows)
        inert = self.objective.inert_reason(cfg.optim.updates_per_step)
        if inert:  # a term that cannot act at these settings says so (the run is plain GRPO)
            self.log(f"warning: {inert}")

        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.train_pool = self.task.train_instances(cfg.task.train_size, seed=cfg.seed)
        self.sampler = np.random.default_rng(cfg.seed)
        self.dictionary: dynamics.KoopmanDictionary | None = None
        self.step = 0
        if self.checkpoint is not None:
            self._restore(self.checkpoint)
        # Rows after the checkpoint (all rows, without one) belong to steps that will run again.
        run_files.sweep_temporaries(self.run_dir)
        run_files.truncate_metrics(self.run_dir, self.step)

    # -- set-up helpers ---------------------------------------------------------------------------

    def _load_reference(self):
        """The frozen reference (the starting policy saved in ``run_dir/reference``), loaded once."""
        if self.reference is None:
            from latentx.models import load_model

            assert self._reference_dir is not None
            self.reference, _ = load_model(str(self._reference_dir), device=str(self.device), dtype=self.cfg.model.dtype)
            self.reference.to(self.device).eval().requires_grad_(False)
        return self.reference

    def _wants_reference(self) -> bool:
        choice = self.cfg.model.reference
        if choice != "auto":
            return choice == "yes"
        return "ref" in self.objective.needs

    @property
    def needs_dsd(self) -> bool:
        return "dsd_grad" in self.objective.needs or self.cfg.signals.monitor

    @property
    def needs_rank(self) -> bool:
        return "rank" in self.objective.needs or self.cfg.signals.monitor

    # -- checkpoints ------------------------------------------------------------------------------

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "sampler": self.sampler.bit_generator.state,
            "objective": self.objective.state_dict(),
            "warm_info": self.warm_info,
        }

    def save(self) -> Path:
        return save_checkpoint(
            self.run_dir, self.step, self.model, self.tokenizer, self._trainer_state(),
            dictionary=self.dictionary, keep_last=self.cfg.keep_checkpoints,
        )

    def _restore(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.bit_generator.state = state["sampler"]
        self.objective.load_state_dict(state["objective"])
        self.warm_info = state.get("warm_info") or self.warm_info
        if (checkpoint / "koopman.safetensors").is_file():
            self.dictionary = dynamics.KoopmanDictionary.load(
                checkpoint / "koopman.safetensors",
                expect=dynamics.KoopmanDictionary.config_from(self.cfg.relax, self.cfg.rollout.max_new_tokens),
            )
            self.dictionary.to(self.device)
        set_rng_state(state["rng"])

    # -- one RL step ------------------------------------------------------------------------------

    def _micro_batches(self, n: int) -> list[slice]:
        """Group-aligned slices of at most ``micro_batch_size`` responses (at least one whole group)."""
        r = self.cfg.rollout.samples_per_prompt
        size = max(r, (self.cfg.rollout.micro_batch_size // r) * r)
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]

    def _signals(self, hidden: torch.Tensor, mask: torch.Tensor, fitting: bool = False) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.needs_rank:
            rd = dynamics.rank_dynamics(hidden, mask, stride=self.cfg.verl.stride, window=self.cfg.verl.window)
            out.update(er=rd.er, erv=rd.erv, era=rd.era)
        if self.needs_dsd and self.dictionary is not None and not fitting:  # a fit step: DSD after the fit
            out["dsd"] = self._dsd(hidden, mask)
        return out

    def _dsd(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dictionary.dsd(hidden, mask)

    def _update_dsd(self, hidden: torch.Tensor, batch: PolicyBatch, rollout_dsd: torch.Tensor | None,
                    sl: slice) -> torch.Tensor:
        """DSD of the update forward, with gradient on the rows the loss differentiates
        (:meth:`Objective.dsd_grad_rows`: ReLaX's responses with Â > 0) and the rollout forward's no-grad DSD
        elsewhere, where the loss does not depend on it; the same loss and gradient as DSD on every row, at
        a fraction of the Koopman work.  With ``optim.updates_per_step > 1`` the logged ``dsd_*`` of those
        other rows are the rollout's values."""
        rows = self.objective.dsd_grad_rows(batch.response_advantages(), batch.mask.sum(1), batch.totals)
        if rows is None or rollout_dsd is None:
            return self._dsd(hidden, batch.mask)
        dsd = rollout_dsd[sl].to(device=hidden.device, dtype=torch.float32)
        index = torch.nonzero(rows.to(hidden.device)).squeeze(1)
        if index.numel() == 0:
            return dsd
        return dsd.index_put((index,), self._dsd(hidden[index], batch.mask[index]).float())

    def _fit_dictionary(self, trajectories: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        rc = self.cfg.relax
        hidden_size = trajectories[0][0].shape[-1]
        t = max(h.shape[1] for h, _ in trajectories)
        H = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, t - h.shape[1])) for h, _ in trajectories])
        M = torch.cat([torch.nn.functional.pad(m, (0, t - m.shape[1])) for _, m in trajectories])
        start = time.perf_counter()
        self.dictionary = dynamics.KoopmanDictionary.from_config(
            rc, hidden_size, max_response_tokens=self.cfg.rollout.max_new_tokens
        ).to(H.device)
        self.dictionary.fit(H, M, step=self.step)
        self.dictionary.requires_grad_(False)
        return time.perf_counter() - start

    def rollout(self) -> "Rollout":
        """Sample, score, and run the no-grad forward: everything the update needs, on the device."""
        cfg = self.cfg
        dev = self.device
        t0 = time.perf_counter()
        r = cfg.rollout.samples_per_prompt
        self.model.eval()

        def draw(n_prompts: int):
            idx = self.sampler.choice(len(self.train_pool), size=n_prompts, replace=False)
            instances = [self.train_pool[i] for i in idx]
            prompts = [self.task.format_prompt(inst, self.tokenizer) for inst in instances]
            seqs = sample_responses(
                self.model, self.tokenizer, prompts, r, cfg.rollout.max_new_tokens,
                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                generation_batch_size=cfg.rollout.generation_batch_size, images=task_images(self.task, instances),
            )
            rewards = torch.tensor(
                [self.task.reward(instances[i // r], text) for i, text in enumerate(seqs.texts)], dtype=torch.float32
            )
            correct = torch.tensor(
                [self.task.is_correct(instances[i // r], text) for i, text in enumerate(seqs.texts)], dtype=torch.bool
            )
            return instances, seqs, rewards, correct

        sampling_info: dict[str, float] = {}
        if cfg.rollout.dynamic_sampling:  # DAPO: drop all-equal-reward groups, refill (latentx.dynamic_sampling)
            from latentx.dynamic_sampling import fill_informative

            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            _, seqs, rewards, correct, sampling_info = fill_informative(
                draw, cfg.rollout.prompts_per_step, r, cfg.rollout.dynamic_sampling_retries, int(pad_id)
            )
        else:
            _, seqs, rewards, correct = draw(cfg.rollout.prompts_per_step)
        seqs, rewards, correct = seqs.to(dev), rewards.to(dev), correct.to(dev)
        t_gen = time.perf_counter() - t0

        # One no-grad forward per micro-batch: old log-probs, entropies, signals (METHODS.md §0).
        n, T = seqs.response_mask.shape
        old_logp = torch.zeros(n, T, device=dev)
        ref_logp = torch.zeros(n, T, device=dev) if self.reference is not None and self._full_reference else None
        entropy = torch.zeros(n, device=dev)
        signals: dict[str, torch.Tensor] = {}
        refit = self.dictionary is None or self.dictionary.refit_due(self.step, cfg.relax.refit_every)
        fit_now = self.needs_dsd and refit
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        t_signals = 0.0
        need_hidden = self.needs_rank or self.needs_dsd
        with torch.no_grad():
            for sl in self._micro_batches(n):
                mb = seqs.select(sl)
                mask = mb.response_mask
                fo = policy_forward(self.model, mb, want_hidden=need_hidden)
                t = mb.response_length
                old_logp[sl, :t] = fo.logp.float()
                entropy[sl] = per_response_mean(fo.entropy, mask)
                if ref_logp is not None:
                    ref_logp[sl, :t] = policy_forward(self.reference, mb, want_hidden=False, want_entropy=False).logp.float()
                if need_hidden:
                    ts = time.perf_counter()
                    for key, value in self._signals(fo.hidden, mask, fitting=fit_now).items():
                        signals.setdefault(key, torch.zeros(n, device=dev))[sl] = value.detach().float()
                    if fit_now:
                        kept.append((fo.hidden.detach().float(), mask))
                    t_signals += time.perf_counter() - ts
        fit_time = 0.0
        if fit_now and kept:
            fit_time = self._fit_dictionary(kept)
            ts = time.perf_counter()
            signals["dsd"] = torch.cat([self._dsd(h, m).detach().float() for h, m in kept])
            t_signals += time.perf_counter() - ts
        return Rollout(
            seqs=seqs, rewards=rewards, correct=correct, old_logp=old_logp, ref_logp=ref_logp, entropy=entropy,
            signals=signals, group=torch.arange(n, device=dev) // r,
            time_generate=t_gen, time_signals=t_signals, time_fit=fit_time, sampling_info=sampling_info,
        )

    def kl_set(self, ro: "Rollout", adv: torch.Tensor) -> dict[str, float]:
        """ReLaX: decide I on the rollout DSDs (the no-grad forward's; METHODS.md §3) and run the reference
        forward for the responses in I only (none when I is empty).  Sets ``ro.in_set`` and, when needed,
        ``ro.ref_logp`` (rows outside I are 0 and never read); returns the step's I diagnostics.

        With ``optim.updates_per_step = 1`` the update forward is the rollout forward (same weights), so
        membership equals what the update forward's DSD would give; with more passes I stays the one
        decided here for every pass (the DSD with gradient changes between passes, I does not).
        """
        adv_resp = adv if adv.dim() == 1 else per_response_mean(adv, ro.seqs.response_mask)
        selected = self.objective.reference_rows(adv_resp, ro.signals)
        if selected is None:
            return {}
        in_set, info = selected
        ro.in_set = in_set
        size = int(in_set.sum())
        t0 = time.perf_counter()
        if "ref" in self.objective.needs and size > 0 and ro.ref_logp is None and self._reference_dir is not None:
            reference = self._load_reference()
            seqs = ro.seqs
            n, T = seqs.response_mask.shape
            ref_logp = torch.zeros(n, T, device=self.device)
            rows = torch.nonzero(in_set).flatten()
            chunk = max(1, self.cfg.rollout.micro_batch_size)
            with torch.no_grad():
                for start in range(0, rows.numel(), chunk):
                    sel = rows[start : start + chunk]
                    mb = seqs.select(sel)
                    ref_logp[sel, : mb.response_length] = policy_forward(
                        reference, mb, want_hidden=False, want_entropy=False
                    ).logp.float()
            ro.ref_logp = ref_logp
        info["time_reference"] = time.perf_counter() - t0
        if ro.ref_logp is None:
            info["reference_rows"] = 0.0
        else:
            info["reference_rows"] = float(len(ro.rewards) if self._full_reference else size)
        warning = self.kl_set_monitor.observe(size, ro.signals.get("dsd"))
        if warning:
            self.log(warning)
        return info

    def advantages(self, ro: "Rollout") -> tuple[torch.Tensor, dict[str, float]]:
        """GRPO advantages (METHODS.md §0), then the objective's advantage hook (VERL's shaping, §3)."""
        adv = self.objective.advantages(ro.rewards, ro.group)
        adv, info = self.objective.shape(adv, ro.signals, ro.seqs.response_mask, ro.rewards, ro.group)
        return adv, {k: float(v) for k, v in info.items()}

    def update(self, ro: "Rollout", adv: torch.Tensor, term_grads: bool = False) -> dict[str, float]:
        """Gradient step(s) on the rollout batch (:meth:`accumulate`, then clip and step)."""
        cfg = self.cfg
        terms: dict[str, float] = {}
        grad_norm = 0.0
        self.model.train()
        for k in range(cfg.optim.updates_per_step):
            self.optimizer.zero_grad(set_to_none=True)
            for key, v in self.accumulate(ro, adv, term_grads=term_grads and k == 0).items():
                terms[key] = terms.get(key, 0.0) + v / (1 if key.startswith("grad_") else cfg.optim.updates_per_step)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
            self.optimizer.step()
            terms.update(self.objective.on_optimizer_step())
        terms["grad_norm"] = grad_norm
        return terms

    def accumulate(self, ro: "Rollout", adv: torch.Tensor, term_grads: bool = False) -> dict[str, float]:
        """Backward of the batch loss over the micro-batches into ``.grad`` (no zeroing, no step).

        A micro-batch loss that is a mean over the micro-batch is weighted by its token share; a summable one
        (ReLaX with :class:`BatchTotals`, whose L_xp is response-level) is added as is, so the gradient is the
        unsplit batch's for any ``rollout.micro_batch_size``.  ``term_grads``: also the gradient of each loss
        term separately (``diagnostics.term_grads_every``), returned as ``grad_norm/*``, ``grad_cos_pg/*``.
        """
        cfg = self.cfg
        seqs = ro.seqs
        n = seqs.response_mask.shape[0]
        total_tokens = max(int(seqs.response_mask.sum()), 1)
        want_hidden = "dsd_grad" in self.objective.needs and self.dictionary is not None
        totals = None
        if want_hidden and ro.in_set is not None:
            totals = BatchTotals(
                groups=int(torch.unique(ro.group).numel()), responses=n, tokens=total_tokens,
                in_set=int(ro.in_set.sum()),
                length=cfg.relax.resolved_pad_to(cfg.rollout.max_new_tokens) or cfg.rollout.max_new_tokens,
            )
        tracker = TermGradients(self.model.parameters()) if term_grads else None
        terms: dict[str, float] = {}
        for sl in self._micro_batches(n):
            mb = seqs.select(sl)
            t = mb.response_length
            mask = mb.response_mask
            fo = policy_forward(self.model, mb, want_hidden=want_hidden, want_entropy=True)
            batch = PolicyBatch(
                logp=fo.logp,
                old_logp=ro.old_logp[sl, :t],
                mask=mask,
                advantages=adv[sl, :t] if adv.dim() == 2 else adv[sl],
                group=ro.group[sl],
                ref_logp=ro.ref_logp[sl, :t] if ro.ref_logp is not None else None,
                entropy=fo.entropy,
                totals=totals,
                in_set=ro.in_set[sl] if totals is not None else None,
            )
            if want_hidden:
                batch = replace(batch, dsd=self._update_dsd(fo.hidden, batch, ro.signals.get("dsd"), sl))
            out = self.objective.loss(batch)
            weight = 1.0 if out.summable else int(mask.sum()) / total_tokens
            if tracker is not None:
                tracker.add(out.parts or {"pg": out.loss}, weight)
            (out.loss * weight).backward()
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + weight * float(v)
        if tracker is not None:
            terms.update(tracker.metrics())
        return terms

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        ro = self.rollout()
        adv, adv_info = self.advantages(ro)
        set_info = self.kl_set(ro, adv)
        t1 = time.perf_counter()
        every = self.cfg.diagnostics.term_grads_every
        terms = self.update(ro, adv, term_grads=every > 0 and (self.step + 1) % every == 0)
        t_update = time.perf_counter() - t1
        self.step += 1

        seqs = ro.seqs
        r = self.cfg.rollout.samples_per_prompt
        lengths = seqs.response_mask.sum(1).float()
        adv_resp = adv if adv.dim() == 1 else (adv * seqs.response_mask).sum(1) / seqs.response_mask.sum(1).clamp(min=1)
        row: dict[str, Any] = {"step": self.step}
        row["reward_mean"], row["reward_std"] = _mean_std(ro.rewards)
        row["accuracy"] = ro.correct.float().mean().item()
        row["group_pass_rate"] = ro.correct.view(-1, r).any(1).float().mean().item()
        row["entropy_mean"], row["entropy_std"] = _mean_std(ro.entropy)
        row["length_mean"], row["length_std"] = _mean_std(lengths)
        for key, value in ro.signals.items():
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(value)
        # The monitor's quantiles and reward correlations (latentx.monitor: the names TRL / verl log under latent/).
        monitored = monitor_metrics({"entropy": ro.entropy, **ro.signals}, ro.rewards)
        row.update({key: value for key, value in monitored.items() if key not in row})
        row["adv_mean"], row["adv_std"] = _mean_std(adv_resp)
        row["adv_abs_mean"] = adv_resp.abs().mean().item()
        row.update({k: float(v) for k, v in terms.items()})
        row.update(adv_info)
        row.update(set_info)
        row.update(ro.sampling_info)
        row["time_generate"] = ro.time_generate
        row["time_signals"] = ro.time_signals
        row["time_fit"] = ro.time_fit
        row["time_update"] = t_update
        row["time_step"] = time.perf_counter() - t0
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise FloatingPointError(f"step {self.step}: metric {key} is {value}; stopping before it spreads")
        run_files.append_metrics(self.run_dir, row)
        return row

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from latentx.reporting import Reporter, eval_tags

        cfg = self.cfg
        save_yaml(cfg, self.run_dir / "config.yaml")
        start_step = self.step
        if self.checkpoint is not None:
            self.log(f"resuming at step {start_step} from {self.checkpoint}")
        announce = getattr(self.objective.state, "announce", None)  # an objective's one-line notice (VERL presets)
        if callable(announce):
            announce(log=self.log)
        reporter = Reporter(cfg.logging, self.run_dir, start_step=start_step, config=to_dict(cfg),
                            eval_tags=eval_tags(cfg.eval.n, cfg.eval.ks) if cfg.eval.enabled else (), log=self.log)
        with reporter:
            if cfg.eval.enabled and self.step == 0 and "eval" not in self.warm_info:
                self.warm_info["eval"] = self.timed_evaluate("starting policy")
            if self.step == 0 and "eval" in self.warm_info:
                reporter.log_eval(self.warm_info["eval"], step=0)
            self._loop(reporter)
            summary: dict[str, Any] = {"steps": self.step, "objective": cfg.objective, "warm_start": self.warm_info}
            if cfg.eval.enabled:
                summary["eval"] = self.timed_evaluate("final policy")
                reporter.log_eval(summary["eval"], step=self.step, final=True)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        if cfg.logging.plots:
            self.plot()
        return summary

    def _loop(self, reporter) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        cfg = self.cfg
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not self.progress,
        ) as bar:
            task_id = bar.add_task(f"{cfg.objective}", total=cfg.steps, completed=self.step, info="")
            while self.step < cfg.steps:
                row = self.train_step()
                reporter.log_row(row)
                if row.get("time_fit"):
                    self.log(f"Koopman dictionary fitted on step {self.step}'s rollouts ({row['time_fit']:.1f} s)")
                bar.update(
                    task_id, completed=self.step,
                    info=f"reward {row['reward_mean']:.3f} acc {row['accuracy']:.3f} "
                    f"DSD {row.get('dsd_mean', float('nan')):.3g} {row['time_step']:.2f}s/step",
                )
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()

    def plot(self) -> list[Path]:
        """``<run>/plots``: the ``latentx plot`` panels of this run (curves, Pass@k, index.html)."""
        from latentx.plots import plot_runs

        return plot_runs([self.run_dir], self.run_dir / "plots") if read_metrics(self.run_dir) else []

    def timed_evaluate(self, which: str) -> dict[str, Any]:
        """:meth:`evaluate` between two terminal lines that name it and give its result and wall time."""
        from latentx.reporting import eval_line
        from latentx.terminal import phase

        ec = self.cfg.eval
        with phase(f"evaluating the {which} on {ec.instances} held-out problems ({ec.n} samples each)", self.log,
                   done=f"  {which}") as ph:
            result = self.evaluate()
            ph["result"] = eval_line(result)
        return result

    def evaluate(self) -> dict[str, Any]:
        """Held-out Mean@1 (greedy) and Pass@k from ``eval.n`` samples (METHODS.md §4), in ``eval.json``'s
        schema (:func:`latentx.evaluate.held_out_evaluation`); the training RNG does not move."""
        return evaluate_held_out(self.model, self.tokenizer, self.task, self.cfg)


def initial_policy(cfg: TrainConfig, task, progress: bool = True, log=print):
    """The policy a run starts from: ``cfg.model`` loaded on its device, then the supervised warm start
    on ``task`` when enabled (cached).  Returns ``(model, tokenizer, warm_info)``."""
    from latentx.models import load_model
    from latentx.warmstart import warm_start

    model, tokenizer = load_model(cfg.model.name, device=str(_device(cfg.model.device)), dtype=cfg.model.dtype)
    warm_info: dict[str, Any] = {}
    if cfg.warm_start.enabled:
        model, warm_info = warm_start(model, tokenizer, task, cfg.warm_start, progress=progress)
        if warm_info.get("cache_hit"):
            log(f"warm start: {warm_info.get('steps')} SFT steps loaded from the cache "
                f"({warm_info['wall_time_s']:.1f} s)")
    return model, tokenizer, warm_info


def evaluate_held_out(model, tokenizer, task, cfg: TrainConfig) -> dict[str, Any]:
    """The run's held-out evaluation of ``model`` (METHODS.md §4) with ``cfg.eval`` / ``cfg.rollout``
    settings, through the one evaluator :func:`latentx.evaluate.held_out_evaluation`."""
    from latentx.evaluate import held_out_evaluation

    ec, rc = cfg.eval, cfg.rollout
    return held_out_evaluation(
        model, tokenizer, task, ec.instances, ec.n, ec.ks, ec.temperature, ec.seed,
        rc.max_new_tokens, top_p=rc.top_p, batch_size=rc.generation_batch_size,
    )


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    return run_files.read_metrics(run_dir)


def train(cfg: TrainConfig, progress: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Resolve ``cfg`` and run it to completion (resuming from the run directory's latest checkpoint).
    ``quiet``: no bars and no phase lines (for scripts)."""
    from latentx.terminal import printer

    return Trainer(resolve_config(cfg), progress=progress and not quiet, log=printer(quiet)).run()
