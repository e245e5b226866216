"""``python -m latentx.integrations.verl.main <verl overrides> latentx.objective=relax ...``

verl's own entry (``verl/trainer/main_ppo.py``: ``@hydra.main(config_name="ppo_trainer")``, then
``validate_config`` and ``run_ppo(config, TaskRunnerV1)``) with one difference: the primary config is
``config/latentx_trainer.yaml`` here, i.e. verl's ``ppo_trainer`` plus a ``latentx`` block, and
``trainer.v1.trainer_mode=latentx_sync``.  Every verl override works as with ``verl.trainer.main_ppo``.

So that the TaskRunner and the workers can find the ``latentx_sync`` trainer, latentx must be importable in
every Ray process and its plugin loaded there: either install latentx in the cluster's environment (its
``verl.plugins`` entry point is then found by ``import verl``), or let this launcher add
``VERL_USE_EXTERNAL_MODULES=latentx.integrations.verl.plugin`` to the Ray runtime env (it does so unless the
variable is already set).
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from latentx.integrations.verl import PLUGIN_MODULE
from latentx.integrations.verl.settings import parse_settings

__all__ = ["main", "add_plugin_to_runtime_env", "check_config"]


def add_plugin_to_runtime_env(config: DictConfig) -> None:
    """Make every Ray process import the plugin: ``VERL_USE_EXTERNAL_MODULES`` in ``ray_kwargs.ray_init``."""
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if PLUGIN_MODULE not in modules:
        modules.append(PLUGIN_MODULE)
    os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)
    key = "ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES"
    OmegaConf.update(config, key, os.environ["VERL_USE_EXTERNAL_MODULES"], force_add=True)


def check_config(config: DictConfig) -> None:
    """latentx's own checks (the ``latentx`` block parses; the v1 sync trainer is in use)."""
    settings = parse_settings(config.get("latentx"))
    if settings.uses_worker:
        if not config.trainer.get("use_v1", True):
            raise ValueError("latentx needs verl's v1 trainer: set trainer.use_v1=True")
        mode = config.trainer.v1.trainer_mode
        if mode != "latentx_sync":
            what = f"latentx.objective={settings.objective}" if settings.objective != "grpo" else "latentx.monitor=true"
            raise ValueError(f"{what} needs trainer.v1.trainer_mode=latentx_sync, got {mode!r}")
        strategy = config.actor_rollout_ref.actor.strategy
        if strategy not in ("fsdp", "fsdp2"):
            raise ValueError(f"latentx supports actor_rollout_ref.actor.strategy fsdp / fsdp2, got {strategy!r}")


@hydra.main(config_path="config", config_name="latentx_trainer", version_base=None)
def main(config: DictConfig) -> None:
    from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    check_config(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    add_plugin_to_runtime_env(config)
    print("latentx:", OmegaConf.to_yaml(config.latentx))
    run_ppo(config, task_runner_class=TaskRunnerV1)


if __name__ == "__main__":
    main()
