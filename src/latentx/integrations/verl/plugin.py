"""verl plugin entry: imported in every process that imports verl (driver, TaskRunner, Ray workers).

verl 0.9.1 loads plugins at the end of ``verl/__init__.py``: every entry point of the ``verl.plugins`` group
(``VERL_USE_EXTERNAL_PLUGINS``: "auto" = all, "none", or a comma list of names) and every module named in
``VERL_USE_EXTERNAL_MODULES`` (comma list).  Entry-point failures are only logged at DEBUG level there, so
this module logs its own failure as a warning.  Importing it registers the ``latentx_sync`` trainer in
verl's v1 trainer registry, which is what ``trainer.v1.trainer_mode=latentx_sync`` looks up inside
verl's TaskRunner (a Ray actor).
"""

from __future__ import annotations

import logging

__all__ = ["registered"]

logger = logging.getLogger(__name__)


def _register() -> bool:
    try:
        from latentx.integrations.verl import trainer  # noqa: F401  (registers "latentx_sync")
    except ImportError as err:  # e.g. verl without its verl-core extra (TransferQueue)
        logger.warning("latentx verl plugin not registered: %s", err)
        return False
    return True


#: Whether the ``latentx_sync`` trainer is registered in this process.
registered = _register()
