"""The study's settings: the ``study:`` section of a study YAML, presets, objective variants."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from latentx.config import ConfigError, from_dict, merge_overrides

if TYPE_CHECKING:  # the heavy modules (torch) load only when a study runs
    from latentx.trainer import TrainConfig

EVAL_FILE = "study_eval.json"
PRESETS = ("cpu", "gpu-math", "cpu-full", "cpu-hard")
#: training signals reported and plotted: (metrics.jsonl key, label)
SIGNALS = (("reward_mean", "training reward"), ("entropy_mean", "token entropy"), ("dsd_mean", "DSD"),
           ("er_mean", "effective rank"))


class StudyError(RuntimeError):
    """A study that cannot run or finish as asked; the message says why and what to do."""




@dataclass
class StudyConfig:
    """The ``study:`` section of a study YAML (every other section is a :class:`TrainConfig` section).

    ``seeds``: a count N (seeds 0..N-1) or a list.  ``tune``: ``{"relax.alpha": [0.05, 0.1, 0.2]}``,
    keys ``<objective>.<field>``; every tuned objective must get the same number of values.
    ``validation_overrides``: ``section.field=value`` strings applied to tuning runs only (e.g. another
    eval file for a fixed benchmark, or a cheaper ``eval.n``).  ``workers`` 0: one per available core.
    """

    objectives: list[str] = field(default_factory=lambda: ["grpo", "relax", "verl"])
    seeds: int | list[int] = 3
    workers: int = 0
    baseline: str = "grpo"
    level: float = 0.95
    alpha: float = 0.05
    tune: dict[str, Any] = field(default_factory=dict)
    validation_seeds: list[int] = field(default_factory=lambda: [100, 101])
    tune_metric: str = "mean@1_greedy"
    validation_overrides: list[str] = field(default_factory=list)
    target_difference: float = 0.03
    power: float = 0.8
    variants: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from latentx.trainer import OBJECTIVES

        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise ValueError(f"study.seeds must be a positive count or a list of seeds, got {self.seeds}")
            self.seeds = list(range(self.seeds))
        self.seeds = [int(s) for s in self.seeds]
        self.objectives = list(self.objectives)
        self.variants = {str(k): _override_list(k, v) for k, v in self.variants.items()}
        for label in self.objectives:
            objective_of(label, self.variants)  # raises on an unknown objective, preset or variant
        if not (math.isfinite(self.target_difference) and self.target_difference > 0):
            raise ValueError(f"study.target_difference must be > 0, got {self.target_difference}")
        if not 0 < self.power < 1:
            raise ValueError(f"study.power must lie in (0, 1), got {self.power}")
        for label, items in (("objectives", self.objectives), ("seeds", self.seeds),
                             ("validation_seeds", self.validation_seeds)):
            if len(set(items)) != len(items):
                raise ValueError(f"study.{label} has duplicates: {items}")
        if not self.objectives or not self.seeds:
            raise ValueError("a study needs at least one objective and one seed")
        if self.workers < 0:
            raise ValueError(f"study.workers must be >= 0 (0 = one per core), got {self.workers}")
        if not 0 < self.level < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"study.level and study.alpha must lie in (0, 1), got {self.level}, {self.alpha}")
        self.tune = {str(k): _grid_values(k, v) for k, v in self.tune.items()}
        sizes: dict[int, list[str]] = {}
        labels = {label: objective_of(label, self.variants)[0] for label in self.objectives}
        for key in self.tune:
            section = key.split(".", 1)[0]
            # <objective>.<field> tunes every entry of that objective, each on its own;
            # <label>.<field> (verl@enabled.coef, a variant's label) tunes that entry only
            method = labels.get(section, section)
            if "." not in key or method not in OBJECTIVES or OBJECTIVES[method].config_class is None:
                raise ValueError(
                    f"study.tune: {key!r} must be <objective>.<field> for a non-GRPO objective "
                    f"(grpo.* settings are shared by every objective, so tuning them is not per objective)"
                )
            if section not in labels and section not in labels.values():
                raise ValueError(f"study.tune: {key!r} tunes {section}, which is not among the study's objectives")
            sizes.setdefault(len(self.tune[key]), []).append(key)
        for label in self.objectives:
            specific = [k for k in self.tune if k.split(".", 1)[0] == label and label != labels[label]]
            generic = [k for k in self.tune if k.split(".", 1)[0] == labels[label]]
            if len(specific) > 1 or (not specific and len(generic) > 1):
                raise ValueError(f"study.tune: tune one main coefficient per objective, got {sorted(specific or generic)} for {label}")
        if len(sizes) > 1:
            raise ValueError(
                "study.tune: every tuned objective must get the same budget (number of grid values); got "
                + "; ".join(f"{n} for {', '.join(keys)}" for n, keys in sorted(sizes.items()))
            )
        if self.tune:
            if not self.validation_seeds:
                raise ValueError("study.validation_seeds must not be empty when tuning")
            overlap = sorted(set(self.validation_seeds) & set(self.seeds))
            if overlap:
                raise ValueError(f"study.validation_seeds must be disjoint from the study seeds; both have {overlap}")
        if self.baseline not in self.objectives:
            raise ValueError(f"study.baseline {self.baseline!r} must be one of the study's objectives {self.objectives}")

    def tuned_key(self, label: str) -> str | None:
        """The tuned key that applies to study entry ``label``: ``<label>.<field>`` if the grid names the
        entry itself, else ``<objective>.<field>`` of its objective; None when the entry is not tuned."""
        objective = objective_of(label, self.variants)[0]
        for section in (label, objective):
            for key in self.tune:
                if key.split(".", 1)[0] == section:
                    return key
        return None

    def tune_override(self, label: str, key: str, value: Any) -> str:
        """The ``section.field=value`` override that sets tuned ``key`` to ``value`` for entry ``label``."""
        return f"{objective_of(label, self.variants)[0]}.{key.split('.', 1)[1]}={value}"


def _override_list(label: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ValueError(f"study.variants.{label} must be a list of section.field=value overrides, got {value!r}")
    return list(value)


def objective_of(label: str, variants: dict[str, list[str]] | None = None) -> tuple[str, list[str]]:
    """The registered objective and the overrides behind one study entry.

    - ``relax``: a registered objective as configured;
    - ``relax@authors``: the objective with ``relax.preset=authors`` (any objective whose config has a
      ``preset`` field; ``verl@enabled``, ``verl@paper``);
    - a key of ``study.variants``, e.g. ``relax-quantile: [objective=relax, relax.xi_mode=quantile]``:
      the overrides, which must name the objective (``objective=...``).
    """
    from latentx.trainer import OBJECTIVES

    variants = variants or {}
    if label in variants:
        names = [o.split("=", 1)[1].strip() for o in variants[label] if o.split("=", 1)[0].strip() == "objective"]
        if len(names) != 1 or names[0] not in OBJECTIVES:
            raise ValueError(
                f"study.variants.{label} must name one registered objective with objective=NAME "
                f"(known: {', '.join(OBJECTIVES)}), got {variants[label]}"
            )
        return names[0], [o for o in variants[label] if o.split("=", 1)[0].strip() != "objective"]
    from latentx.objectives import parse_objective_spec

    if label.partition("@")[0] not in OBJECTIVES:
        raise ValueError(f"study.objectives: unknown objective {label!r} (known: {', '.join(OBJECTIVES)}"
                         + (f"; variants: {', '.join(variants)}" if variants else "") + ")")
    try:
        return parse_objective_spec(label)
    except ValueError as err:
        raise ValueError(f"study.objectives: {err}") from None


def _grid_values(key: str, values: Any) -> list[Any]:
    if isinstance(values, str):
        values = [yaml.safe_load(v.strip()) for v in values.split(",") if v.strip()]
    if not isinstance(values, (list, tuple)):
        values = [values]
    if not values:
        raise ValueError(f"study.tune: {key!r} has no values")
    if len(set(map(repr, values))) != len(values):
        raise ValueError(f"study.tune: {key!r} has duplicate values {list(values)}")
    return list(values)


def preset_path(name: str) -> Path:
    """``configs/study-<name>.yaml`` of the current directory or of the latentx checkout."""
    if name not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        path = root / "configs" / f"study-{name}.yaml"
        if path.is_file():
            return path
    raise ConfigError(
        f"preset {name!r}: configs/study-{name}.yaml not found here or in the latentx checkout; "
        "pass the file with --config"
    )


def load_study_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> tuple["TrainConfig", StudyConfig]:
    """The base train config and the study settings from a study YAML (or the defaults) plus
    ``section.field=value`` overrides (``study.*`` ones go to the study section).  The file is read by
    :func:`latentx.config.load_yaml` (errors name the file and the field)."""
    from latentx.config import load_yaml

    if path is not None:
        whole = load_yaml(_study_file_class(), path, overrides)
    else:
        whole = from_dict(_study_file_class(), merge_overrides({}, overrides))
    from latentx.trainer import TrainConfig

    base = TrainConfig(**{f.name: getattr(whole, f.name) for f in fields(TrainConfig)})
    return base, whole.study


def _study_file_class():
    """A study YAML: every :class:`TrainConfig` section plus ``study:``."""
    global _STUDY_FILE
    if _STUDY_FILE is None:
        from latentx.trainer import TrainConfig

        _STUDY_FILE = make_dataclass("StudyFile", [("study", StudyConfig, field(default_factory=StudyConfig))],
                                     bases=(TrainConfig,))
    return _STUDY_FILE


_STUDY_FILE = None

