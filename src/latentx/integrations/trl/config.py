"""``LatentGRPOConfig``: TRL's ``GRPOConfig`` plus the latentx objective options (docs/trl.md).

Mapping (one name per knob):

- ``latent_objective`` picks the objective: ``"grpo"`` (TRL unchanged), ``"relax"``, ``"verl"``,
  ``"entropy_bonus"`` or ``"kl_cov"`` (METHODS.md section 3).
- The method options are the fields of latentx's own method configs, flattened with the method name as
  prefix: ``RelaxConfig.alpha`` -> ``relax_alpha``, ``VerlConfig.stride`` -> ``verl_stride``,
  ``KLCovConfig.k_ratio`` -> ``kl_cov_k_ratio``.  The fields are generated from those dataclasses, so
  they always carry the same names, types and defaults as ``latentx train``'s ``relax.alpha`` etc.
- Knobs TRL already has keep TRL's names and TRL's implementation: the clip range (``epsilon``,
  ``epsilon_high``), the global KL (``beta``, METHODS.md §3 β_KL), the advantage normalisation
  (``scale_rewards="group"`` = GRPO, ``"none"`` = Dr. GRPO), the loss aggregation (``loss_type``), and the
  entropy bonus (``entropy_coef``, ``use_adaptive_entropy``, ``entropy_target``, ``entropy_coef_delta``,
  ``entropy_coef_min``, ``entropy_coef_max`` = latentx's ``entropy_bonus.coef``, ``adaptive``,
  ``target_entropy``, ``coef_lr``, ``coef_min``, ``coef_max``).
"""

from __future__ import annotations

import dataclasses
import re
import typing
import warnings
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Union

from trl import GRPOConfig as TRLGRPOConfig

from latentx.objectives import EntropyBonusConfig, KLCovConfig, RelaxConfig, VerlConfig
from latentx.objectives.base import adapter_objective
from latentx.objectives.kl_cov import kl_cov_inert_reason

__all__ = ["LatentGRPOConfig", "LATENT_OBJECTIVES", "FLATTENED_SECTIONS", "KL_COV_LOSS_TYPES"]

#: The registered objectives (:data:`latentx.objectives.REGISTRY`) the TRL adapter has code paths for
#: (METHODS.md section 3); any other registered objective is refused with an error that says so.
LATENT_OBJECTIVES = ("grpo", "relax", "verl", "entropy_bonus", "kl_cov")

#: Method configs whose fields are flattened into ``LatentGRPOConfig`` as ``<section>_<field>``.
FLATTENED_SECTIONS: dict[str, type] = {"relax": RelaxConfig, "verl": VerlConfig, "kl_cov": KLCovConfig}

#: TRL loss types with the clipped surrogate of METHODS.md §3 and a token-sum normalisation (KL-Cov edits it).
KL_COV_LOSS_TYPES = ("bnpo", "dr_grpo", "dapo")

# latentx's entropy-bonus option -> the TRL GRPOConfig field that implements it.
_ENTROPY_FIELDS = {
    "coef": "entropy_coef",
    "adaptive": "use_adaptive_entropy",
    "target_entropy": "entropy_target",
    "coef_lr": "entropy_coef_delta",
    "coef_min": "entropy_coef_min",
    "coef_max": "entropy_coef_max",
}


def _flattened_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` for every field of every config in :data:`FLATTENED_SECTIONS`."""
    out = []
    for section, cls in FLATTENED_SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            help_text = (
                f"latentx {cls.__name__}.{f.name} (`latentx train` option {section}.{f.name}); "
                f"used when latent_objective='{section}'. See METHODS.md section 3."
            )
            out.append((f"{section}_{f.name}", hints[f.name], field(default=f.default, metadata={"help": help_text})))
    return out


# The flattened method options, generated so they can never drift from latentx's own configs.
_FlattenedLatentOptions = make_dataclass("_FlattenedLatentOptions", _flattened_fields(), bases=(TRLGRPOConfig,))


def _rename_fields(message: str) -> str:
    """``"relax.alpha must be ..."`` -> ``"relax_alpha must be ..."`` (the names of this config)."""
    sections = "|".join(FLATTENED_SECTIONS)
    message = re.sub(rf"\b({sections})\.(\w+)", r"\1_\2", message)
    for ours, theirs in _ENTROPY_FIELDS.items():
        message = message.replace(f"entropy_bonus.{ours}", theirs)
    return message


@dataclass
class LatentGRPOConfig(_FlattenedLatentOptions):
    """TRL ``GRPOConfig`` + latentx objectives (METHODS.md section 3; docs/trl.md has the full mapping).

    Args:
        latent_objective: ``"grpo"``, ``"relax"`` (default), ``"verl"``, ``"entropy_bonus"`` or ``"kl_cov"``.
        relax_*: :class:`latentx.objectives.RelaxConfig` fields (``relax_alpha``, ``relax_beta``, ``relax_xi``, ...).
        verl_*: :class:`latentx.objectives.VerlConfig` fields (``verl_ema_rate``, ``verl_stride``, ...).
        kl_cov_*: :class:`latentx.objectives.KLCovConfig` fields (``kl_cov_k_ratio``, ``kl_cov_coef``, ...).
        latent_monitor: log the latent monitor's ``latent/`` statistics (:mod:`latentx.integrations.trl.monitor`);
            its ER uses ``verl_stride`` / ``verl_window``, its DSD the ``relax_*`` dictionary settings.
        latent_monitor_every, latent_monitor_fraction: how often, and on which share of the batch, the monitor
            reads TRL's loss forward when TRL runs no no-grad forward (on-policy GRPO).

    Everything else is TRL's ``GRPOConfig``.  With ``latent_objective="entropy_bonus"`` and neither
    ``entropy_coef`` nor ``use_adaptive_entropy`` set, ``entropy_coef`` defaults to latentx's c_H = 0.001.
    """

    latent_objective: str = field(
        default="relax",
        metadata={
            "help": "latentx objective: 'grpo' (TRL unchanged), 'relax', 'verl', 'entropy_bonus' or 'kl_cov' "
            "(METHODS.md section 3).",
            "choices": list(LATENT_OBJECTIVES),
        },
    )
    latent_term_grads_every: int = field(
        default=0,
        metadata={"help": "every N steps log each loss term's gradient norm and cosine with pg under latent/ (0 = off)."},
    )

    latent_monitor: bool = field(
        default=False,
        metadata={
            "help": "log ER / ERV / ERA, DSD and token entropy of the rollouts (mean, std, quantiles, correlation "
            "with reward) under latent/, for any latent_objective; the loss is untouched (`latentx train` option "
            "signals.monitor, verl latentx.monitor).  See docs/trl.md."
        },
    )
    latent_monitor_every: int = field(
        default=10,
        metadata={
            "help": "when TRL runs no no-grad policy forward of its own (on-policy GRPO), the monitor reads TRL's loss "
            "forward every this many optimizer steps (1 = every step); it never runs a forward of its own."
        },
    )
    latent_monitor_fraction: float = field(
        default=0.25,
        metadata={"help": "fraction of the local batch the monitor reads from TRL's loss forward, in (0, 1]."},
    )

    def __post_init__(self) -> None:
        every = self.latent_monitor_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"latent_monitor_every must be an integer >= 1, got {every!r}")
        fraction = self.latent_monitor_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"latent_monitor_fraction must be a number in (0, 1], got {fraction!r}")
        adapter_objective(self.latent_objective, "the TRL adapter", LATENT_OBJECTIVES, field="latent_objective")
        if self.latent_objective == "entropy_bonus" and self.entropy_coef == 0.0 and not self.use_adaptive_entropy:
            self.entropy_coef = EntropyBonusConfig().coef
        super().__post_init__()
        self.method_config()  # validates the method options, naming the offending field
        if self.latent_monitor:  # the monitor reads the ER and DSD settings whatever the objective
            self.section_config("verl")
            self.section_config("relax")
        if self.latent_objective == "kl_cov":
            self._check_kl_cov_compatible()

    def section_config(self, section: str) -> Union[RelaxConfig, VerlConfig, KLCovConfig]:
        """The latentx config of one flattened section (``"relax"``, ``"verl"``, ``"kl_cov"``), whatever the
        objective (the monitor reads the ``verl_*`` and ``relax_*`` signal settings)."""
        cls = FLATTENED_SECTIONS[section]
        try:
            return cls(**{f.name: getattr(self, f"{section}_{f.name}") for f in dataclasses.fields(cls)})
        except ValueError as err:
            raise ValueError(_rename_fields(str(err))) from None

    def method_config(self) -> Union[RelaxConfig, VerlConfig, KLCovConfig, EntropyBonusConfig, None]:
        """The latentx method config of ``latent_objective`` built from this config's fields (None for grpo).

        Raises ``ValueError`` naming this config's field (``relax_alpha``, ``entropy_coef``, ...).
        """
        name = self.latent_objective
        try:
            if name in FLATTENED_SECTIONS:
                cls = FLATTENED_SECTIONS[name]
                built = cls(**{f.name: getattr(self, f"{name}_{f.name}") for f in dataclasses.fields(cls)})
                if isinstance(built, RelaxConfig) and built.pad_to == -1:  # the preset's L_max = max completion length
                    object.__setattr__(built, "pad_to", int(self.max_completion_length))
                return built
            if name == "entropy_bonus":
                values = {ours: getattr(self, theirs) for ours, theirs in _ENTROPY_FIELDS.items()}
                if not values["adaptive"]:
                    values["target_entropy"] = None  # TRL's entropy_target is only read in adaptive mode
                return EntropyBonusConfig(**values)
        except ValueError as err:
            raise ValueError(_rename_fields(str(err))) from None
        return None

    def _check_kl_cov_compatible(self) -> None:
        """KL-Cov edits the per-token clipped surrogate; only TRL losses built on it can take the edit."""
        problems = []
        if self.loss_type not in KL_COV_LOSS_TYPES:
            problems.append(f"loss_type must be one of {', '.join(KL_COV_LOSS_TYPES)} (got {self.loss_type!r})")
        if self.importance_sampling_level != "token":
            problems.append(f"importance_sampling_level must be 'token' (got {self.importance_sampling_level!r})")
        if self.delta is not None:
            problems.append(f"delta must be None (got {self.delta!r})")
        if self.top_entropy_quantile < 1.0:
            problems.append(f"top_entropy_quantile must be 1.0 (got {self.top_entropy_quantile!r})")
        if self.off_policy_mask_threshold is not None:
            problems.append(f"off_policy_mask_threshold must be None (got {self.off_policy_mask_threshold!r})")
        if problems:
            raise ValueError("latent_objective='kl_cov' needs: " + "; ".join(problems))
        # TRL's updates per generation batch: num_iterations passes, each split over steps_per_generation /
        # gradient_accumulation_steps optimizer steps; only the first step of the first pass is on-policy.
        per_generation = max(1, int(self.steps_per_generation or 1) // max(1, int(self.gradient_accumulation_steps)))
        inert = kl_cov_inert_reason(self.method_config(), int(self.num_iterations) * per_generation)
        if inert:
            warnings.warn(f"latentx: {inert}", UserWarning, stacklevel=3)
