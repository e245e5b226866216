"""Training objectives: GRPO and the latent / token-level exploration methods (METHODS.md section 3).

One module per method, each a pure function of batch tensors (``<name>_loss(batch, ...) -> LossOutput``);
state that lives across steps (VERL's EMA baselines, the adaptive entropy coefficient, Clip-Cov's random
generator) sits in small objects with ``state_dict()`` / ``load_state_dict()``.  Each module registers
itself once (:func:`register_objective`: name, config class, the signals it needs, its advantage hook,
its loss, its per-step state); :data:`REGISTRY` is the one list of objective names, and
:class:`Objective` is the generic dispatch every caller uses::

    objective = Objective("relax", grpo=GRPOConfig(), config=RelaxConfig())
    objective.needs                     # frozenset of signals to compute: "dsd_grad", "rank", "entropy", "ref"
    adv = objective.advantages(rewards, group)                          # GRPO / Dr. GRPO advantages [B]
    adv, info = objective.shape(adv, {"er": er, "erv": erv, "era": era}, mask, rewards)  # once per step
    out = objective.loss(batch)         # LossOutput(loss, terms), per micro-batch
    out.loss.backward(); ...; optimizer.step(); objective.on_optimizer_step()
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from torch import Tensor

# The built-in methods register themselves on import, in this order (the order of every name list).
from latentx.objectives import grpo as _grpo  # noqa: F401  (registers "grpo")
from latentx.objectives import relax as _relax  # noqa: F401
from latentx.objectives import verl as _verl  # noqa: F401
from latentx.objectives import entropy_bonus as _entropy_bonus  # noqa: F401
from latentx.objectives import kl_cov as _kl_cov  # noqa: F401
from latentx.objectives import clip_cov as _clip_cov  # noqa: F401
from latentx.objectives.base import (
    REGISTRY,
    SIGNALS,
    ClipConfig,
    GRPOConfig,
    LossOutput,
    ObjectiveSpec,
    PolicyBatch,
    k3_kl,
    masked_mean,
    objective_spec,
    parse_objective_spec,
    per_response_mean,
    register_objective,
    token_mean,
)
from latentx.objectives.clip_cov import ClipCovConfig, clip_cov_loss, clip_cov_select
from latentx.objectives.entropy_bonus import EntropyBonusConfig, EntropyCoefController, entropy_bonus_loss
from latentx.objectives.grpo import clipped_surrogate, group_advantages, grpo_loss
from latentx.objectives.kl_cov import KLCovConfig, kl_cov_loss, kl_cov_select
from latentx.objectives.relax import RelaxConfig, exploration_term, relax_kl_set, relax_loss
from latentx.objectives.verl import (
    VerlBaselines,
    VerlConfig,
    VerlInputs,
    VerlShaper,
    verl_loss,
    verl_shape,
    verl_token_advantages,
    verl_update_baselines,
)

__all__ = [
    "REGISTRY",
    "ObjectiveSpec",
    "register_objective",
    "objective_spec",
    "parse_objective_spec",
    "OBJECTIVES",
    "CONFIGS",
    "SIGNALS",
    "Objective",
    "PolicyBatch",
    "LossOutput",
    "GRPOConfig",
    "ClipConfig",
    "RelaxConfig",
    "VerlConfig",
    "EntropyBonusConfig",
    "KLCovConfig",
    "ClipCovConfig",
    "VerlBaselines",
    "VerlInputs",
    "VerlShaper",
    "EntropyCoefController",
    "group_advantages",
    "clipped_surrogate",
    "grpo_loss",
    "relax_loss",
    "exploration_term",
    "relax_kl_set",
    "verl_loss",
    "verl_shape",
    "verl_update_baselines",
    "verl_token_advantages",
    "entropy_bonus_loss",
    "kl_cov_loss",
    "kl_cov_select",
    "clip_cov_loss",
    "clip_cov_select",
    "masked_mean",
    "token_mean",
    "per_response_mean",
    "k3_kl",
]


class _Column(Mapping[str, Any]):
    """A live read-only view ``name -> spec.<field>`` of :data:`REGISTRY` (follows later registrations)."""

    def __init__(self, field: str) -> None:
        self._field = field

    def __getitem__(self, name: str) -> Any:
        return getattr(REGISTRY[name], self._field)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


#: name -> the loss function of that method (``loss(batch, config, grpo, state)``); a view of REGISTRY.
OBJECTIVES: Mapping[str, Any] = _Column("loss")

#: name -> the method's own config class (GRPO has none beyond :class:`GRPOConfig`); a view of REGISTRY.
CONFIGS: Mapping[str, type | None] = _Column("config_class")

#: Attribute names older code used for an objective's state (``objective.verl_shaper`` ...).
def _state_attributes() -> set[str]:
    return {spec.state_attribute for spec in REGISTRY.values() if spec.state_attribute}


def _takes_context(hook: Any) -> bool:
    """Whether an advantage hook accepts the keywords ``group`` and ``grpo``."""
    import inspect

    try:
        params = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):
        return False
    names = {p.name for p in params}
    return any(p.kind is p.VAR_KEYWORD for p in params) or {"group", "grpo"} <= names


class Objective:
    """One training objective with its configs and cross-step state (METHODS.md §3), read from the registry.

    Args:
        name: a key of :data:`REGISTRY`.
        grpo: the shared clip / KL / advantage config (default ``GRPOConfig()``).
        config: the method's config (default: its class with default values; must be None for a method
            without a config class, such as "grpo").
        seed: seed of the method's state (Clip-Cov's token sampling generator).
    """

    def __init__(self, name: str, grpo: GRPOConfig | None = None, config: Any = None, seed: int = 0) -> None:
        spec = objective_spec(name)
        config_class = spec.config_class
        if config is None and config_class is not None:
            config = config_class()
        if config_class is None and config is not None:
            raise ValueError(f"objective {name!r} takes no method config, got {type(config).__name__}")
        if config_class is not None and not isinstance(config, config_class):
            raise ValueError(f"objective {name!r} needs a {config_class.__name__}, got {type(config).__name__}")
        if grpo is not None and not isinstance(grpo, GRPOConfig):
            raise ValueError(f"grpo must be a GRPOConfig, got {type(grpo).__name__}")
        self.spec = spec
        self.name = name
        self.grpo = grpo if grpo is not None else GRPOConfig()
        self.config = config
        self.state = spec.new_state(config, seed) if spec.new_state is not None else None

    @classmethod
    def from_config(cls, cfg: Any) -> "Objective":
        """The objective of a :class:`latentx.trainer.TrainConfig`-like ``cfg`` (``cfg.objective``, ``cfg.grpo``,
        the method section ``cfg.<name>`` when it has one, ``cfg.seed``)."""
        spec = objective_spec(cfg.objective)
        config = getattr(cfg, spec.name, None) if spec.config_class is not None else None
        return cls(spec.name, grpo=cfg.grpo, config=config, seed=getattr(cfg, "seed", 0))

    def __getattr__(self, attribute: str) -> Any:
        # ``objective.verl_shaper`` / ``.entropy_controller`` / ``.generator``: the state, under the name
        # its method registered, and None for the other methods' names.
        if attribute in ("spec", "state"):
            raise AttributeError(attribute)
        if attribute == self.spec.state_attribute:
            return self.state
        if attribute in _state_attributes():
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attribute!r}")

    @property
    def needs(self) -> frozenset[str]:
        """The signals (see :data:`SIGNALS`) the trainer must put in the batch / compute for this objective."""
        needs = set(self.spec.needs(self.config, self.grpo)) if self.spec.needs is not None else set()
        if self.grpo.kl_coef > 0:
            needs.add("ref")
        unknown = needs - set(SIGNALS)
        if unknown:
            raise ValueError(f"objective {self.name!r} needs unknown signals {sorted(unknown)} (known: {', '.join(SIGNALS)})")
        return frozenset(needs)

    def dsd_grad_rows(self, advantages: Tensor, lengths: Tensor, totals: Any = None) -> Tensor | None:
        """``[B]`` bool: the responses whose DSD this objective's loss differentiates (None: all of them).

        ``advantages``: per-response ``[B]``; ``lengths``: valid tokens per response; ``totals``: the batch's
        :class:`~latentx.objectives.relax.BatchTotals` (or None).  See :class:`ObjectiveSpec`.
        """
        hook = self.spec.dsd_grad_rows
        return None if hook is None else hook(self.config, advantages, lengths, totals)

    def inert_reason(self, updates_per_step: int = 1) -> str | None:
        """Why this objective's own term cannot act with its settings (the run is then plain GRPO), or None."""
        hook = self.spec.inert_reason
        return None if hook is None else hook(self.config, self.grpo, updates_per_step)

    @property
    def selects_reference_rows(self) -> bool:
        """Whether the reference forward runs only on rows chosen per batch (:meth:`reference_rows`)."""
        return self.spec.reference_rows is not None

    def reference_rows(self, advantages: Tensor, signals: Mapping[str, Tensor]) -> "tuple[Tensor, dict[str, float]] | None":
        """``([B] bool, info)``: the responses whose reference log-probs the loss reads (None: no hook, or
        the signals it needs are missing).  See :class:`ObjectiveSpec`."""
        hook = self.spec.reference_rows
        return None if hook is None else hook(self.config, advantages, signals)

    @property
    def shapes_advantages(self) -> bool:
        """Whether the method has an advantage hook (call :meth:`shape` once per rollout batch)."""
        return self.spec.shape_advantages is not None

    def advantages(self, rewards: Tensor, group: Tensor) -> Tensor:
        """GRPO advantages ``[B]`` with this objective's ``grpo.advantage_std`` / ``grpo.advantage_eps``."""
        return group_advantages(rewards, group, eps=self.grpo.advantage_eps, std_normalize=self.grpo.advantage_std)

    def shape(
        self,
        advantages: Tensor,
        signals: Mapping[str, Tensor],
        mask: Tensor,
        rewards: Tensor | None = None,
        group: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """The method's advantage hook (once per rollout batch); the advantages unchanged when it has none.

        ``signals`` maps signal names (``er``, ``erv``, ``era``, ``dsd`` ...) to per-response ``[B]`` tensors;
        ``group`` (``[B]`` prompt groups) lets a hook re-run GRPO with this objective's ``grpo`` settings.
        """
        hook = self.spec.shape_advantages
        if hook is None:
            return advantages, {}
        if _takes_context(hook):  # hooks that declare group / grpo (or **kwargs) receive them
            return hook(self.state, advantages, signals, mask, rewards, group=group, grpo=self.grpo)
        return hook(self.state, advantages, signals, mask, rewards)

    def shape_advantages(
        self,
        advantages: Tensor,
        er: Tensor,
        erv: Tensor,
        era: Tensor,
        mask: Tensor,
        rewards: Tensor | None = None,
        group: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """:meth:`shape` with the rank signals given positionally (only for objectives with an advantage hook)."""
        if self.spec.shape_advantages is None:
            raise ValueError(f"shape_advantages is only for objectives with an advantage hook, this one is {self.name!r}")
        return self.shape(advantages, {"er": er, "erv": erv, "era": era}, mask, rewards, group)

    def loss(self, batch: PolicyBatch) -> LossOutput:
        """The loss of one training micro-batch.  Stateful methods may record the micro-batch (the adaptive
        entropy coefficient does), so call it on training micro-batches only."""
        return self.spec.loss(batch, self.config, self.grpo, self.state)

    def on_optimizer_step(self) -> dict[str, float]:
        """Call after each optimizer step (updates e.g. the adaptive entropy coefficient).  Returns diagnostics."""
        if self.spec.on_optimizer_step is None:
            return {}
        return self.spec.on_optimizer_step(self.state)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name}
        if self.state is not None:
            save = self.spec.save_state or (lambda s: s.state_dict())
            state[self.spec.state_key or self.name] = save(self.state)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for objective {state.get('name')!r}, this one is {self.name!r}")
        if self.state is not None:
            key = self.spec.state_key or self.name
            if key not in state:
                raise ValueError(f"objective {self.name!r} state has no {key!r} entry")
            load = self.spec.load_state or (lambda s, saved: s.load_state_dict(saved))
            load(self.state, state[key])
