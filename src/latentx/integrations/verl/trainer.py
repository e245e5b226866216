"""The driver side: verl's synchronous v1 trainer with latentx's worker and VERL shaping.

Registered in verl's trainer registry (``verl.trainer.ppo.v1.register_trainer``) as ``latentx_sync``, the
name :mod:`latentx.integrations.verl.main` puts in ``trainer.v1.trainer_mode``.  Relative to verl's
``PPOTrainerSync`` it changes exactly four things:

* ``__init__``: parses the ``latentx`` block, fills R (``actor_rollout_ref.rollout.n``) and the dictionary
  path, and copies it to ``actor_rollout_ref.latentx`` (the workers receive only ``actor_rollout_ref``);
* ``_init_resource_pool_mgr``: the actor role runs :class:`LatentxActorRolloutRefWorker`;
* ``_compute_advantage``: after verl's estimator, VERL shaping (:mod:`latentx.integrations.verl.advantage`),
  with the EMA baselines in a :class:`latentx.objectives.VerlShaper` held here, on the driver;
* ``_save_checkpoint`` / ``_load_checkpoint``: the shaper's state travels with verl's checkpoints
  (``global_step_N/latentx_state.json``).
"""

from __future__ import annotations

import json
import logging
import os

import ray
import torch
import transfer_queue as tq
from omegaconf import DictConfig, open_dict
from tensordict import TensorDict
from verl.trainer.ppo.utils import Role, need_reference_policy
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from latentx.integrations.verl.advantage import shape_advantages, shaping_fields
from latentx.integrations.verl.monitor import MONITOR_FIELDS, monitor_batch_metrics
from latentx.integrations.verl.settings import LatentxSettings, parse_settings, settings_to_dict
from latentx.integrations.verl.worker import LatentxActorRolloutRefWorker
from latentx.objectives import VerlShaper

__all__ = ["TRAINER_NAME", "STATE_FILE", "LatentxPPOTrainerSync", "prepare_config"]

logger = logging.getLogger(__name__)

TRAINER_NAME = "latentx_sync"
STATE_FILE = "latentx_state.json"
DICTIONARY_FILE = "latentx_koopman.safetensors"


def prepare_config(config: DictConfig) -> LatentxSettings:
    """Validate the ``latentx`` block against the rest of verl's config and copy it to the workers' part."""
    settings = parse_settings(config.get("latentx"))
    settings.group_size = int(config.actor_rollout_ref.rollout.n)
    if settings.objective == "verl" and config.algorithm.adv_estimator == "gae":
        raise ValueError(
            "latentx.objective=verl shapes response-level advantages; algorithm.adv_estimator=gae gives "
            "token-level ones (use grpo or another outcome estimator)"
        )
    if settings.uses_worker:
        rollout_corr = config.algorithm.get("rollout_correction", None)
        if rollout_corr is not None and rollout_corr.get("bypass_mode", False):
            raise ValueError(
                "latentx needs the actor's old-log-prob forward (hidden states come from it): set "
                "algorithm.rollout_correction.bypass_mode=False"
            )
    if settings.needs_dictionary and not settings.dictionary_path:
        root = config.trainer.default_local_dir
        settings.dictionary_path = os.path.join(os.path.abspath(str(root)), DICTIONARY_FILE)
    if settings.needs_dsd:
        if settings.relax.pad_to == -1:  # relax.preset=authors: L_max = verl's max response length
            object.__setattr__(settings.relax, "pad_to", int(config.data.max_response_length))
        if settings.relax.beta > 0 and not need_reference_policy(config):
            raise ValueError(
                f"latentx.relax.beta={settings.relax.beta} needs reference log-probs: set "
                "actor_rollout_ref.actor.use_kl_loss=True (with actor_rollout_ref.actor.kl_loss_coef=0.0 for "
                "ReLaX's KL alone), or latentx.relax.beta=0"
            )
    with open_dict(config):
        config.actor_rollout_ref.latentx = settings_to_dict(settings)
    return settings


@register_trainer(TRAINER_NAME)
class LatentxPPOTrainerSync(PPOTrainerSync):
    """verl's ``PPOTrainerSync`` + latentx (module docstring)."""

    def __init__(self, config: DictConfig):
        self.latentx_settings = prepare_config(config)
        self.latentx_shaper = VerlShaper(self.latentx_settings.verl) if self.latentx_settings.needs_rank_signals else None
        super().__init__(config)

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if not self.latentx_settings.uses_worker:
            return
        for role in (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(LatentxActorRolloutRefWorker)

    def _compute_advantage(self, batch, metrics: dict):
        meta = batch
        batch = super()._compute_advantage(batch, metrics=metrics)
        if self.latentx_settings.monitor:  # statistics only: read from TransferQueue, nothing written back
            data = tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=list(MONITOR_FIELDS))
            keep = torch.tensor([not tag.get("is_padding", False) for tag in meta.tags], dtype=torch.bool)
            metrics.update(monitor_batch_metrics(data, keep))
        settings = getattr(self, "latentx_settings", None)
        if settings is not None and settings.needs_dsd:
            return self._latentx_relax_plan(batch, metrics)
        if self.latentx_shaper is None:
            return batch
        fields = shaping_fields(self.latentx_shaper)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        keep = torch.tensor([not tag.get("is_padding", False) for tag in batch.tags], dtype=torch.bool)
        algorithm = getattr(getattr(self, "config", None), "algorithm", None)
        norm_by_std = bool(algorithm.get("norm_adv_by_std_in_grpo", True)) if algorithm is not None else True
        shaped, info = shape_advantages(data, self.latentx_shaper, keep, norm_adv_by_std=norm_by_std)
        output = TensorDict({"advantages": response_to_nested(shaped, data["response_mask"])}, batch_size=len(batch))
        batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)
        metrics.update(info)
        return batch

    def _latentx_relax_plan(self, batch, metrics: dict):
        """ReLaX: I, |I| and each group's rollout log-sum-exp on the whole batch (``relax_plan_fields``), written
        into the batch for the actor's loss.  Before the dictionary exists (first pass) there is no rollout
        DSD and nothing is written (the loss then decides I per micro-batch)."""
        from latentx.integrations.verl.loss import relax_plan_fields

        fields = ["advantages", "response_mask", "latentx_dsd", "uid"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        if "latentx_dsd" not in data.keys():
            return batch
        padded = data.select("advantages", "response_mask").to_padded_tensor()
        uids = data["uid"]
        uids = uids.tolist() if hasattr(uids, "tolist") else list(uids)
        rc = self.latentx_settings.relax
        length = int(self.config.data.get("max_response_length", padded["response_mask"].shape[1]))
        plan, info = relax_plan_fields(
            padded["advantages"], padded["response_mask"], data["latentx_dsd"], uids, rc, rc.resolved_pad_to(length) or length
        )
        metrics.update(info)
        return tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(plan, batch_size=len(batch)))

    def _save_checkpoint(self):
        super()._save_checkpoint()
        if self.latentx_shaper is None:
            return
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, STATE_FILE), "w") as handle:
            json.dump({"verl_shaper": self.latentx_shaper.state_dict()}, handle)

    def _load_checkpoint(self):
        result = super()._load_checkpoint()
        if self.latentx_shaper is None or not self.global_steps:
            return result
        root = self.config.trainer.default_local_dir
        if self.config.trainer.resume_mode == "resume_path":
            folder = self.config.trainer.resume_from_path
        else:
            folder = os.path.join(root if os.path.isabs(root) else os.path.join(os.getcwd(), root), f"global_step_{self.global_steps}")
        path = os.path.join(folder, STATE_FILE)
        if os.path.exists(path):
            with open(path) as handle:
                self.latentx_shaper.load_state_dict(json.load(handle)["verl_shaper"])
        else:
            logger.warning("latentx: %s not found; VERL baselines restart from zero", path)
        return result
