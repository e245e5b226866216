"""Live run reporting to TensorBoard and Weights & Biases, beside ``metrics.jsonl``.

``metrics.jsonl`` stays the record of a run; a :class:`Reporter` mirrors every row of it, the held-out
evaluations and the resolved config to the trackers named in ``logging.report_to`` (``--report-to``):

- ``tensorboard``: :class:`torch.utils.tensorboard.SummaryWriter` writing to ``<run>/tensorboard``
  (``logging.tensorboard_dir``).  The resolved config goes in as hyper-parameters (HParams tab) and as
  YAML text.  A resumed run re-opens the same directory with ``purge_step`` = the first step it re-runs,
  so TensorBoard hides the points the interrupted run logged after its last checkpoint: every step
  appears once, with the value that ``metrics.jsonl`` keeps.
- ``wandb``: ``wandb.init`` with the run named after the run directory, the resolved config as its
  config, files under ``<run>/wandb``, and an id kept in ``<run>/wandb/latentx-run-id`` so that a resumed
  run continues the same W&B run.  ``WANDB_MODE=offline`` (read by wandb itself) logs locally only.
  wandb is an optional extra: ``pip install 'latentx[wandb]'``.

Keys are namespaced the way TRL and CleanRL name theirs (:func:`tag_for`):

=================  ===================================================================================
``train/``         rollout outcome: ``reward`` (= ``reward_mean``), ``reward_std``, ``accuracy``,
                   ``group_pass_rate``, ``entropy``, ``length``, advantages, ``grad_norm``, ``tokens``
``latent/``        hidden-state signals and what VERL derives from them: ``dsd_mean``, ``er_mean``,
                   ``erv_mean``, ``era_mean`` (+ ``_std`` / ``_min`` / ``_max``), ``verl_*``; the monitor's
                   quantiles and reward correlations (``er_q50``, ``entropy_q50``, ``dsd_reward_corr``, ...:
                   the names TRL's ``latent_monitor`` and verl's ``latentx.monitor`` log, :mod:`latentx.monitor`)
``grads/``         per-term gradient diagnostics (``diagnostics.term_grads_every``): ``grad_share/xp`` ->
                   ``grads/share/xp``, ``grads/norm/<term>``, ``grads/cos_pg/<term>``
``time/``          ``time_step`` -> ``time/step``, ``time/generate``, ``time/signals``, ...
``losses/``        everything else the objective reports: ``loss``, ``pg``, ``xp``, ``kl``, clip fractions
``eval/``          held-out evaluation: ``mean@1_greedy``, ``mean@n``, ``pass@k``, logged at step 0 for
                   the starting policy and at the last step after RL
=================  ===================================================================================
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

__all__ = ["LoggingConfig", "Reporter", "ReportingError", "REPORTERS", "tag_for", "eval_scalars", "eval_tags",
           "eval_line", "flat_config", "headline", "require_trackers"]

REPORTERS = ("none", "tensorboard", "wandb")

_TRAIN_MEANS = ("reward", "entropy", "length")  # <name>_mean -> train/<name>
_TRAIN_KEYS = {"accuracy", "group_pass_rate", "adv_mean", "adv_std", "adv_abs_mean", "grad_norm", "tokens",
               "reward_std", "entropy_std", "length_std"}
_LATENT_PREFIXES = ("dsd_", "er_", "erv_", "era_", "verl_", "entropy_q", "entropy_reward_corr")  # + latentx.monitor


class ReportingError(ValueError):
    """A tracker cannot be used as configured (library missing, init failed); the message says why."""


@dataclass
class LoggingConfig:
    """Where a run reports besides ``metrics.jsonl`` and its plots.

    ``report_to``: ``none``, ``tensorboard``, ``wandb`` or a comma list of the last two.
    ``tensorboard_dir``: event files (default ``<run>/tensorboard``).  ``wandb_project`` /
    ``wandb_entity``: where the W&B run goes (entity empty = wandb's default).  ``plots``: write
    ``<run>/plots`` (the ``latentx plot`` panels) at the end of the run."""

    report_to: tuple[str, ...] = ("none",)
    tensorboard_dir: str = ""
    wandb_project: str = "latentx"
    wandb_entity: str = ""
    plots: bool = True

    def __post_init__(self) -> None:
        names = self.report_to
        if isinstance(names, str):
            names = tuple(n for n in names.split(","))
        names = tuple(str(n).strip().lower() for n in names if str(n).strip())
        unknown = [n for n in names if n not in REPORTERS]
        if unknown:
            raise ValueError(
                f"logging.report_to: unknown tracker {unknown[0]!r}; choose from {', '.join(REPORTERS)} (comma list)"
            )
        if "none" in names and len(set(names)) > 1:
            raise ValueError(f"logging.report_to: 'none' cannot be combined with others, got {','.join(names)}")
        self.report_to = tuple(dict.fromkeys(names)) or ("none",)

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(n for n in self.report_to if n != "none")


def tag_for(key: str) -> str | None:
    """The namespaced tracker key of a ``metrics.jsonl`` field (``None`` for ``step``); see the module doc."""
    if key == "step":
        return None
    if key.startswith("time_"):
        return f"time/{key[len('time_'):]}"
    for name in _TRAIN_MEANS:
        if key == f"{name}_mean":
            return f"train/{name}"
    if key in _TRAIN_KEYS:
        return f"train/{key}"
    if key.startswith(_LATENT_PREFIXES):
        return f"latent/{key}"
    if key.startswith("grad_") and "/" in key:  # per-term diagnostics: grad_share/xp -> grads/share/xp
        return f"grads/{key[len('grad_'):]}"
    return f"losses/{key}"


def headline(result: dict[str, Any] | None) -> dict[str, Any]:
    """The flat headline numbers of a held-out evaluation (``summary.json``'s ``eval``): ``eval.json``'s
    schema through :func:`latentx.evaluate.headline_metrics`, an already flat one (older runs) as it is,
    ``{}`` for none."""
    if not result:
        return {}
    if "benchmarks" in result:
        from latentx.evaluate import headline_metrics

        return headline_metrics(result)
    return result


def eval_scalars(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """Flatten a held-out evaluation (``summary.json``'s ``eval``) into ``eval/pass@4``-style scalars."""
    out: dict[str, float] = {}
    for key, value in headline(result).items():
        if key == "pass@k" and isinstance(value, dict):
            out.update({f"{prefix}/pass@{k}": float(v) for k, v in value.items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("instances", "n"):
            out[f"{prefix}/{key}"] = float(value)
    return out


def eval_tags(n: int, ks: Iterable[int], prefix: str = "eval") -> list[str]:
    """The ``eval/*`` scalars :func:`eval_scalars` makes of an evaluation with ``n`` samples and ``ks``."""
    return [f"{prefix}/mean@1_greedy", f"{prefix}/mean@{n}"] + [f"{prefix}/pass@{k}" for k in ks] + [
        f"{prefix}/distinct_correct_per_problem"]


def eval_line(result: dict[str, Any]) -> str:
    """A one-line reading of an evaluation: ``Mean@1 0.125, Pass@1 0.10, Pass@16 0.55``."""
    result = headline(result)
    parts = []
    if "mean@1_greedy" in result:
        parts.append(f"Mean@1 {result['mean@1_greedy']:.3f}")
    parts += [f"Pass@{k} {v:.3f}" for k, v in (result.get("pass@k") or {}).items()]
    return ", ".join(parts)


def flat_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"relax": {"alpha": 0.1}}`` -> ``{"relax.alpha": 0.1}``; lists become strings (HParams takes scalars)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        tag = tag_for(key)
        if tag is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


def require_trackers(cfg: LoggingConfig) -> None:
    """Fail before any training when a tracker's library is missing (one-line :class:`ReportingError`)."""
    import importlib.util

    for name, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
        if name in cfg.trackers and importlib.util.find_spec(module) is None:
            raise ReportingError(f"logging.report_to={name} needs the {module} package: pip install 'latentx[{extra}]'")


class _TensorBoard:
    def __init__(self, log_dir: Path, start_step: int, config: dict[str, Any], metric_tags: Iterable[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as err:
            raise ReportingError(
                f"logging.report_to=tensorboard needs the tensorboard package: pip install 'latentx[tensorboard]' ({err})"
            ) from None
        resumed = log_dir.is_dir() and any(p.name.startswith("events.") for p in log_dir.iterdir())
        # Steps > start_step of an earlier (interrupted) session are re-run now: purge them.  A run that
        # restarts from step 0 re-logs everything, the starting-policy evaluation at step 0 included.
        purge = (start_step + 1 if start_step > 0 else 0) if resumed else None
        self.dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=10)
        if start_step == 0:
            flat = flat_config(config)
            writer = self.writer._get_file_writer()
            # The three HParams summaries are written into this run itself (``add_hparams`` would make
            # a sub-run); the metric columns are the eval/* scalars logged at the end.
            for summary in hparams(flat, {tag: 0.0 for tag in metric_tags}):
                writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ReportingError(
                "logging.report_to=wandb needs the wandb package: pip install 'latentx[wandb]'"
            ) from None
        self.wandb = wandb
        root = run_dir / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "latentx-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:8]
            id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(
                project=cfg.wandb_project, entity=cfg.wandb_entity or None, name=run_dir.resolve().name,
                id=run_id, resume="allow", dir=str(run_dir), config=config, reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as err:  # wandb raises its own types for a missing login, network errors, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ReportingError(
                f"logging.report_to=wandb: wandb.init failed: {first} (WANDB_MODE=offline logs locally)"
            ) from None
        self.dir = Path(self.run.dir).parent if self.run is not None else root
        self.offline = bool(getattr(self.run.settings, "_offline", False)) or os.environ.get("WANDB_MODE") == "offline"

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def summary(self, scalars: dict[str, float]) -> None:
        self.run.summary.update(scalars)

    def close(self) -> None:
        self.run.finish()


class Reporter:
    """Fans one run's metrics out to its trackers; with ``report_to: none`` every call is a no-op.

    ``start_step``: the step the run (re)starts from (0 for a new run, the checkpoint's step on resume).
    ``config``: the resolved config as a nested dict.  ``eval_tags``: the ``eval/*`` scalars the run will
    log (declared as HParams metrics)."""

    def __init__(
        self, cfg: LoggingConfig, run_dir: str | os.PathLike, start_step: int = 0,
        config: dict[str, Any] | None = None, eval_tags: Iterable[str] = (), log: Callable[[str], Any] | None = None,
    ) -> None:
        run_dir = Path(run_dir)
        config = config or {}
        self.tensorboard: _TensorBoard | None = None
        self.wandb: _WandB | None = None
        if "tensorboard" in cfg.trackers:
            tb_dir = Path(cfg.tensorboard_dir) if cfg.tensorboard_dir else run_dir / "tensorboard"
            self.tensorboard = _TensorBoard(tb_dir, start_step, config, list(eval_tags))
            if log:
                log(f"TensorBoard: tensorboard --logdir {tb_dir}")
        if "wandb" in cfg.trackers:
            try:
                self.wandb = _WandB(run_dir, cfg, config)
            except BaseException:
                self.close()
                raise
            if log:
                mode = "offline run" if self.wandb.offline else "run"
                log(f"W&B: {mode} {self.wandb.run.name} ({self.wandb.run.id}) in {self.wandb.dir}")

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def log_row(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row, at its ``step``."""
        if not self.active:
            return
        scalars = _scalars(row)
        for tracker in (self.tensorboard, self.wandb):
            if tracker is not None:
                tracker.log(scalars, int(row["step"]))

    def log_eval(self, result: dict[str, Any], step: int, final: bool = False) -> None:
        """A held-out evaluation at ``step`` (0: the starting policy); ``final`` also sets the W&B summary."""
        if not self.active:
            return
        scalars = eval_scalars(result)
        for tracker in (self.tensorboard, self.wandb):
            if tracker is not None:
                tracker.log(scalars, step)
        if final and self.wandb is not None:
            self.wandb.summary(scalars)

    def close(self) -> None:
        for tracker in (self.tensorboard, self.wandb):
            if tracker is not None:
                tracker.close()
        self.tensorboard = self.wandb = None

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
