"""The Koopman estimator in a (possibly multi-process) TRL run: two helpers, no state (METHODS.md section 2).

The estimator itself (settings, fit, DSD, persistence) is :class:`latentx.dynamics.KoopmanDictionary`, built
with ``KoopmanDictionary.from_config`` of the ``relax_*`` options.  What TRL adds is the sharing: process 0
fits on its share of the generation batch, then W is broadcast, so every process holds the same dictionary.
(The paper fits on all B·R trajectories of the first step; with P processes this fits on the B·R/P of
process 0 — docs/trl.md.)
"""

from __future__ import annotations

import math
import os

from torch import Tensor

from latentx.dynamics import KoopmanDictionary

__all__ = ["fit_on_main_process", "load_saved_dictionary"]


def fit_on_main_process(dictionary: KoopmanDictionary, H: Tensor, mask: Tensor, step: int, accelerator) -> float:
    """Fit ``dictionary`` on process 0 (a fresh fit, on the device of ``H``), give every process its W, and
    return the last mini-batch loss (NaN on the other processes).  The dictionary ends on the accelerator's
    device, marked fitted at ``step``."""
    loss = math.nan
    if accelerator.is_main_process:
        dictionary.fit(H, mask, step=step)
        loss = float(dictionary.loss_history_[-1]) if dictionary.loss_history_ else math.nan
    weight = dictionary.weight.detach().to(accelerator.device).contiguous()
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        weight = broadcast(weight, from_process=0)
    dictionary.to(accelerator.device).set_fitted_weight(weight, step=step)
    return loss


def load_saved_dictionary(path: str, like: KoopmanDictionary) -> KoopmanDictionary:
    """Reload a saved dictionary on resume; a file saved with other settings than ``like``'s is an error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the checkpoint has no fitted Koopman dictionary")
    return KoopmanDictionary.load(path, device=like.weight.device, expect=like).requires_grad_(False)
