"""latentx objectives inside TRL's ``GRPOTrainer`` (docs/trl.md; METHODS.md section 3).

    from latentx.integrations.trl import LatentGRPOConfig, LatentGRPOTrainer

    args = LatentGRPOConfig(output_dir="runs/trl", latent_objective="relax", relax_alpha=0.1, ...)
    trainer = LatentGRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=reward, args=args,
                                train_dataset=dataset)
    trainer.train()

The adapter overrides private methods of TRL's ``GRPOTrainer`` (``_generate_and_score_completions``,
``_compute_loss``, ``_get_per_token_logps_and_entropies``, ``_calculate_rewards``), so it supports exactly
the TRL releases it was checked against: :data:`SUPPORTED_TRL`.  Importing it with another TRL raises
``ImportError``; set ``LATENTX_ALLOW_UNTESTED_TRL=1`` to try anyway.
"""

from __future__ import annotations

import os

from packaging.version import Version

#: TRL releases this adapter was written and tested against (``>=`` lower, ``<`` upper).
SUPPORTED_TRL = ("1.16.0", "1.17.0")


def check_trl_version(version: str | None = None) -> str:
    """Return TRL's version; raise ``ImportError`` if TRL is missing or outside :data:`SUPPORTED_TRL`."""
    if version is None:
        try:
            import trl
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError('latentx.integrations.trl needs TRL: pip install "latentx[trl]"') from err
        version = trl.__version__
    low, high = SUPPORTED_TRL
    if not Version(low) <= Version(version) < Version(high):
        if os.environ.get("LATENTX_ALLOW_UNTESTED_TRL") == "1":
            return version
        raise ImportError(
            f"latentx.integrations.trl supports trl>={low},<{high} (it overrides private GRPOTrainer methods); "
            f"found trl {version}. Install a supported release, or set LATENTX_ALLOW_UNTESTED_TRL=1 to try anyway."
        )
    return version


check_trl_version()

from latentx.integrations.trl.config import LATENT_OBJECTIVES, LatentGRPOConfig  # noqa: E402
from latentx.integrations.trl.trainer import LATENT_STATE_FILE, LatentGRPOTrainer  # noqa: E402

__all__ = [
    "SUPPORTED_TRL",
    "check_trl_version",
    "LatentGRPOConfig",
    "LatentGRPOTrainer",
    "LATENT_OBJECTIVES",
    "LATENT_STATE_FILE",
]
