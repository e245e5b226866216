"""Actor-side plumbing: the engine hook, the Koopman dictionary, and the actor worker subclass.

verl 0.9.1 (v1 trainer) runs the actor in ``verl.workers.engine_workers.ActorRolloutRefWorker``; its
``compute_log_prob`` (old log-probs) and ``update_actor`` call the FSDP engine
(``FSDPEngineWithLMHead.forward_step``: ``module(...)`` -> ``prepare_model_outputs`` -> ``loss_fn``).
:class:`LatentxEngineHook` hooks the backbone and wraps *this engine instance's* ``prepare_model_outputs``
(nothing global is patched):

* old-log-prob forward (``mode="infer"``): the response trajectories of each micro-batch are reduced on the
  device to per-response ER/ERV/ERA (``verl``) and DSD (``relax``, once the dictionary exists), emitted as
  nested ``[B, 1]`` outputs ``latentx_*``; verl's TransferQueue bridge stores every output field with the
  batch, so the driver and the update read them from there.  Trajectories never leave the worker.
* update forward (``mode="train"``): DSD with gradient for :func:`latentx.integrations.verl.loss.relax_ppo_loss`.

The Koopman dictionary (ReLaX) is fitted once, at the end of the first old-log-prob pass, by the actor's
global rank 0 on (up to ``fit_max_trajectories`` of) its own response trajectories, saved to
``dictionary_path`` and broadcast to every actor rank; a run that finds the file (resume) loads it on rank 0
and broadcasts it the same way.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

import torch
from torch import Tensor

from latentx.dynamics import KoopmanDictionary
from latentx.integrations.verl.settings import LatentxSettings, parse_settings
from latentx.integrations.verl.signals import (
    HiddenStateCapture,
    find_backbone,
    packed_hidden_states,
    per_response_nested,
    rank_signals,
    response_trajectories,
)

__all__ = ["LatentxEngineHook", "DictionaryState", "LatentxActorRolloutRefWorker"]

logger = logging.getLogger(__name__)


class DictionaryState:
    """One actor process's frozen Koopman estimator, its first-step fit sample, and its sharing across ranks.

    Distribution plumbing only: the dictionary is :meth:`KoopmanDictionary.from_config` of the run's RelaxConfig,
    fitted by its own ``fit`` and queried by its own ``dsd`` (no Koopman hyper-parameter is handled here).
    """

    def __init__(self, settings: LatentxSettings) -> None:
        self.settings = settings
        self.dictionary: KoopmanDictionary | None = None
        self._sample_H: list[Tensor] = []
        self._sample_mask: list[Tensor] = []
        self._kept = 0

    @property
    def collecting(self) -> bool:
        return self.settings.needs_dictionary and self.dictionary is None

    def collect(self, H: Tensor, mask: Tensor) -> None:
        """Keep (on the CPU, in the model's dtype) response trajectories for the fit; rank 0 only."""
        if _rank() != 0:
            return
        limit = self.settings.fit_max_trajectories
        room = H.shape[0] if limit is None else max(0, limit - self._kept)
        if room == 0:
            return
        H, mask = H[:room].detach(), mask[:room]
        self._sample_H.extend(h.cpu() for h in H)
        self._sample_mask.extend(m.cpu() for m in mask)
        self._kept += H.shape[0]

    def _padded_sample(self) -> tuple[Tensor, Tensor]:
        width = max(h.shape[0] for h in self._sample_H)
        H = torch.stack([torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[0])) for h in self._sample_H])
        mask = torch.stack([torch.nn.functional.pad(m, (0, width - m.shape[0])) for m in self._sample_mask])
        return H, mask

    def fit_sample(self, hidden_size: int) -> KoopmanDictionary:
        """Fit W on the kept trajectories (METHODS.md §2 "Learning W"); rank 0."""
        cfg = self.settings.relax
        dictionary = KoopmanDictionary.from_config(cfg, hidden_size)
        if not self._sample_H:
            raise RuntimeError("latentx relax: rank 0 saw no response trajectory to fit the Koopman dictionary")
        H, mask = self._padded_sample()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else H.device
        dictionary.fit(H.to(device), mask.to(device))
        self._sample_H, self._sample_mask, self._kept = [], [], 0
        return dictionary

    def finish_first_pass(self, hidden_size: int, device: torch.device) -> None:
        """After the first old-log-prob pass: rank 0 fits and saves, then every rank receives W."""
        if not self.collecting:
            return
        weight = torch.zeros(self.settings.relax.m, hidden_size, dtype=torch.float32, device=device)
        if _rank() == 0:
            fitted = self.fit_sample(hidden_size)
            if self.settings.dictionary_path:
                os.makedirs(os.path.dirname(os.path.abspath(self.settings.dictionary_path)), exist_ok=True)
                fitted.save(self.settings.dictionary_path)
                logger.info("latentx: Koopman dictionary fitted and saved to %s", self.settings.dictionary_path)
            weight = fitted.weight.detach().to(device=device, dtype=torch.float32)
        self._install(_broadcast(weight))

    def load_if_saved(self, hidden_size: int, device: torch.device) -> bool:
        """On start-up (resume): rank 0 loads ``dictionary_path`` if it exists; all ranks get W.  True if loaded."""
        path = self.settings.dictionary_path
        if not self.settings.needs_dictionary or not path:
            return False
        found = torch.tensor([1.0 if (_rank() == 0 and os.path.exists(path)) else 0.0], device=device)
        if not bool(_broadcast(found)[0] > 0):
            return False
        weight = torch.zeros(self.settings.relax.m, hidden_size, dtype=torch.float32, device=device)
        if _rank() == 0:
            expect = dict(KoopmanDictionary.config_from(self.settings.relax), hidden_size=hidden_size)
            loaded = KoopmanDictionary.load(path, expect=expect)
            weight = loaded.weight.detach().to(device=device, dtype=torch.float32)
        self._install(_broadcast(weight))
        return True

    def _install(self, weight: Tensor) -> None:
        dictionary = KoopmanDictionary.from_config(self.settings.relax, int(weight.shape[1])).to(weight.device)
        dictionary.set_fitted_weight(weight.float())
        self.dictionary = dictionary.requires_grad_(False)  # frozen after the fit: gradient flows into H only


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _broadcast(tensor: Tensor) -> Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(tensor, src=0)
    return tensor


class LatentxEngineHook:
    """Backbone hook + per-instance wrapper of an FSDP engine's ``prepare_model_outputs`` (module docstring)."""

    def __init__(self, engine: Any, settings: LatentxSettings) -> None:
        if not hasattr(engine, "prepare_model_outputs") or not hasattr(engine, "module"):
            raise TypeError(f"latentx supports verl's FSDP engine (FSDPEngineWithLMHead), got {type(engine).__name__}")
        self.engine = engine
        self.settings = settings
        self.state = DictionaryState(settings)
        self.capture = HiddenStateCapture(find_backbone(engine.module))
        self.hidden_size: int | None = None
        #: Debug / test aid: keep the last micro-batch's (H, mask) in :attr:`last_trajectories` (off: memory).
        self.keep_last = False
        self.last_trajectories: tuple[Tensor, Tensor] | None = None
        self._original = engine.prepare_model_outputs
        engine.prepare_model_outputs = self.prepare_model_outputs  # this instance only

    @property
    def mode(self) -> str | None:
        return self.capture.mode

    @mode.setter
    def mode(self, value: str | None) -> None:
        if value not in (None, "infer", "train"):
            raise ValueError(f"mode must be None, 'infer' or 'train', got {value!r}")
        self.capture.mode = value

    def _trajectories(self, output_args: dict, micro_batch: Any) -> tuple[Tensor, Tensor]:
        from verl.utils import tensordict_utils as tu

        hidden = self.capture.pop()
        use_rmpad = bool(tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True))
        sp = bool(getattr(self.engine, "use_ulysses_sp", False))
        gather = self.engine._gather_and_unpad_packed if (use_rmpad and sp) else None
        packed = packed_hidden_states(hidden, micro_batch, use_rmpad, int(output_args.get("pad_size", 0) or 0), gather)
        self.hidden_size = int(packed.shape[-1])
        H, mask = response_trajectories(packed, micro_batch)
        self.last_trajectories = (H, mask) if self.keep_last else None
        return H, mask

    def prepare_model_outputs(self, output: Any, output_args: dict, micro_batch: Any, logits_processor_func: Any):
        model_output = self._original(
            output=output, output_args=output_args, micro_batch=micro_batch, logits_processor_func=logits_processor_func
        )
        mode = self.capture.mode
        if mode is None:
            return model_output
        H, mask = self._trajectories(output_args, micro_batch)
        if mode == "train":
            if self.settings.needs_dsd:
                if self.state.dictionary is None:
                    raise RuntimeError("latentx relax: the Koopman dictionary is not fitted before the actor update")
                model_output["latentx_dsd"] = self.state.dictionary.dsd(H, mask)  # with grad (METHODS.md §2)
            return model_output
        with torch.no_grad():
            if self.settings.emits_rank_signals:
                for key, value in rank_signals(H, mask, self.settings.verl).items():
                    model_output[key] = per_response_nested(value)
            if self.settings.needs_dictionary:
                if self.state.dictionary is not None:
                    value = self.state.dictionary.dsd(H.detach(), mask)
                    model_output["latentx_dsd"] = per_response_nested(value)
                else:
                    self.state.collect(H, mask)
                    if self.settings.monitor:  # the monitor's batch field exists from step 1 on (NaN: not fitted)
                        model_output["latentx_dsd"] = per_response_nested(torch.full((H.shape[0],), float("nan")))
        return model_output


from verl.single_controller.base.decorator import (  # noqa: E402  (verl is this module's runtime)
    Dispatch,
    make_nd_compute_dataproto_dispatch_fn,
    register,
)
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.engine_workers import ActorRolloutRefWorker  # noqa: E402

from latentx.integrations.verl.loss import relax_ppo_loss  # noqa: E402


class LatentxActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker with latentx's hidden-state signals on the actor engine.

    Its settings come from ``config.latentx`` (the driver copies the top-level ``latentx`` block into
    ``actor_rollout_ref``).  Only the actor's engine is hooked: a separate reference model is untouched, and
    the LoRA "reference" forward (``no_lora_adapter``) runs with the hook off.
    """

    latentx: LatentxEngineHook | None = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        super().init_model()
        self.latentx = None
        if self.actor is None:
            return
        settings = parse_settings(self.config.get("latentx"))
        if not settings.uses_worker:
            return
        if settings.needs_dsd and self.distillation_enabled:
            raise ValueError("latentx.objective=relax cannot be combined with verl's distillation loss")
        self.latentx = LatentxEngineHook(self.actor.engine, settings)
        if settings.needs_dictionary:
            self.latentx.state.load_if_saved(_hidden_size(self.actor.engine), _device())
        if settings.needs_dsd:
            actor_config = self.loss_fn.keywords["config"]
            self.loss_fn = partial(
                relax_ppo_loss, config=actor_config, relax=settings.relax, group_size=settings.group_size
            )
            self.actor.set_loss_fn(self.loss_fn)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data):
        hook = self.latentx
        if hook is None:
            return super().compute_log_prob(data)
        hook.mode = None if tu.get(data, "no_lora_adapter", default=False) else "infer"
        try:
            output = super().compute_log_prob(data)
        finally:
            mode, hook.mode = hook.mode, None
        if mode == "infer":
            hook.state.finish_first_pass(_hidden_size(self.actor.engine), _device())
        return output

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        hook = self.latentx
        if hook is None:
            return super().update_actor(data)
        hook.mode = "train" if hook.settings.needs_dsd else None
        try:
            return super().update_actor(data)
        finally:
            hook.mode = None


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _hidden_size(engine: Any) -> int:
    config = getattr(getattr(engine, "model_config", None), "hf_config", None)
    text = getattr(config, "text_config", None) or config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError("latentx relax: cannot read hidden_size from the actor's hf_config")
    return size
