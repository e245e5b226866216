"""The ``latentx`` block of the verl config: which objective, and its options (METHODS.md section 3).

It lives at the top level of verl's Hydra config (``latentx.objective=relax latentx.relax.alpha=0.1``).
The driver copies it to ``actor_rollout_ref.latentx`` so that the actor workers, which only receive
``actor_rollout_ref``, see the same settings.  Every option of :class:`latentx.objectives.RelaxConfig` and
:class:`latentx.objectives.VerlConfig` is accepted under ``latentx.relax`` / ``latentx.verl``; validation
is theirs, and errors name the full ``latentx.`` path of the field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from latentx.objectives import RelaxConfig, VerlConfig
from latentx.objectives.base import adapter_objective

__all__ = ["OBJECTIVES", "LatentxSettings", "parse_settings", "settings_to_dict"]

#: The registered objectives (:data:`latentx.objectives.REGISTRY`) the verl plugin has code paths for;
#: any other registered objective is refused with an error that says so.  ``grpo`` leaves verl untouched
#: (the plugin is inert).
OBJECTIVES = ("grpo", "relax", "verl")

#: Options that only the verl plugin has (not part of RelaxConfig).
_RELAX_PLUGIN_KEYS = ("fit_max_trajectories", "dictionary_path")


@dataclass
class LatentxSettings:
    """Parsed ``latentx`` config.

    Attributes:
        objective: "grpo" (plain verl), "relax" (ReLaX loss in the actor update) or "verl" (VERL advantage
            shaping on the driver).
        relax: ReLaX options (METHODS.md §2-3).  ``refit_every`` must be 0 (fit once, on the first step).
        verl: VERL options (METHODS.md §1, §3).
        fit_max_trajectories: at most this many response trajectories of the first step (those of the actor's
            rank 0) are kept on the CPU to fit the Koopman dictionary; ``None`` keeps all of rank 0's share.
        dictionary_path: where the fitted dictionary is saved (and re-loaded on resume); the driver fills it
            with ``<trainer.default_local_dir>/latentx_koopman.safetensors`` when empty.
        group_size: R, responses per prompt (``actor_rollout_ref.rollout.n``), filled in by the driver.
        monitor: the latent monitor (:mod:`latentx.monitor`, for any objective, ``grpo`` included): the actor's
            old-log-prob forward also emits ER / ERV / ERA (``latentx.verl.stride`` / ``window``) and DSD (a
            dictionary with the ``latentx.relax`` settings, fitted on the first step), and the driver logs
            their batch statistics beside the token entropy's under ``latent/``; loss and advantages untouched.
    """

    objective: str = "grpo"
    relax: RelaxConfig = field(default_factory=RelaxConfig)
    verl: VerlConfig = field(default_factory=VerlConfig)
    fit_max_trajectories: int | None = 256
    dictionary_path: str | None = None
    group_size: int | None = None
    monitor: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.monitor, bool):
            raise ValueError(f"latentx.monitor must be true or false, got {self.monitor!r}")
        adapter_objective(self.objective, "the verl plugin", OBJECTIVES, field="latentx.objective")
        if self.relax.refit_every != 0:
            raise ValueError(
                "latentx.relax.refit_every must be 0 with the verl plugin (the dictionary is fitted once, on the "
                f"first step), got {self.relax.refit_every!r}"
            )
        value = self.fit_max_trajectories
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise ValueError(f"latentx.relax.fit_max_trajectories must be an integer >= 2 or null, got {value!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"latentx.group_size must be a positive integer, got {self.group_size!r}")

    @property
    def needs_rank_signals(self) -> bool:
        """ER / ERV / ERA per response from the old-log-prob forward (VERL)."""
        return self.objective == "verl"

    @property
    def needs_dsd(self) -> bool:
        """DSD with gradient in the actor update, and a Koopman dictionary (ReLaX)."""
        return self.objective == "relax"

    @property
    def emits_rank_signals(self) -> bool:
        """The old-log-prob forward emits ER / ERV / ERA (VERL's shaping, or the monitor)."""
        return self.needs_rank_signals or self.monitor

    @property
    def needs_dictionary(self) -> bool:
        """A Koopman dictionary fitted on the first step (ReLaX, or the monitor's DSD)."""
        return self.needs_dsd or self.monitor

    @property
    def uses_worker(self) -> bool:
        """Whether the latentx actor worker (and trainer) is needed at all (False: plain verl)."""
        return self.objective != "grpo" or self.monitor


def _plain(value: Any) -> Any:
    """An OmegaConf node (or anything mapping-like) as plain python containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    return value


def _build(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown option(s) latentx.{section}.{', latentx.{section}.'.join(unknown)}")
    try:
        return cls(**values)
    except ValueError as err:  # RelaxConfig / VerlConfig name the field as "relax.x" / "verl.x"
        message = re.sub(r"(?<![\w.])(relax|verl)\.", r"latentx.\1.", str(err))  # every field named in full
        raise ValueError(message) from None


def parse_settings(config: Any) -> LatentxSettings:
    """Build :class:`LatentxSettings` from the ``latentx`` node (DictConfig or dict); ``None`` -> grpo."""
    raw = _plain(config) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"latentx must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    known = {"objective", "relax", "verl", "group_size", "monitor"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown option(s) latentx.{', latentx.'.join(unknown)}")
    relax_raw = dict(_plain(raw.get("relax")) or {})
    plugin = {key: relax_raw.pop(key) for key in _RELAX_PLUGIN_KEYS if key in relax_raw}
    return LatentxSettings(
        objective=raw.get("objective", "grpo"),
        relax=_build(RelaxConfig, "relax", relax_raw),
        verl=_build(VerlConfig, "verl", dict(_plain(raw.get("verl")) or {})),
        fit_max_trajectories=plugin.get("fit_max_trajectories", 256),
        dictionary_path=plugin.get("dictionary_path") or None,
        group_size=raw.get("group_size"),
        monitor=raw.get("monitor", False),
    )


def settings_to_dict(settings: LatentxSettings) -> dict[str, Any]:
    """The inverse of :func:`parse_settings` (plain containers, for OmegaConf / Ray)."""
    relax = dataclasses.asdict(settings.relax)
    relax["fit_max_trajectories"] = settings.fit_max_trajectories
    relax["dictionary_path"] = settings.dictionary_path
    return {
        "objective": settings.objective,
        "relax": relax,
        "verl": dataclasses.asdict(settings.verl),  # unset §3b options stay None (the preset decides)
        "group_size": settings.group_size,
        "monitor": settings.monitor,
    }
