"""The ``latentx`` command line (typer).  Each sub-command lives beside the code it drives."""

from __future__ import annotations

import os

# Spinning OpenMP threads waste most of the CPU when cores are shared (measured here: one forward +
# backward of the tiny model took 0.7-3.3 CPU-s instead of 0.15 s); must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
    from typer.exceptions import Abort, Exit
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import Abort, ClickException, Exit, UsageError

from latentx import __version__

DEBUG_ENV = "LATENTX_DEBUG"
#: exceptions that mean "the input is wrong" (a bad setting, file, model spec, data file): exit code 2.
USER_ERRORS = (ValueError, OSError, LookupError)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_line(error: BaseException) -> tuple[str, int]:
    """The one line ``latentx`` prints for an exception, and its exit code (2: user error, 1: other)."""
    message = _one_line(str(error)) or type(error).__name__
    if isinstance(error, USER_ERRORS):
        if isinstance(error, (OSError, UnicodeError)) and type(error).__name__ not in message:
            message = f"{type(error).__name__}: {message}"
        return f"error: {message}", 2
    return (f"error: {type(error).__name__}: {message} (an internal error; {DEBUG_ENV}=1 shows the traceback)", 1)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {_one_line(str(message))}\n"


class _Group(TyperGroup):
    """Every error of every sub-command becomes one ``error: ...`` line on stderr (no traceback unless
    ``LATENTX_DEBUG=1``): exit 2 for a user error (bad option, setting, file, model, data), 1 otherwise."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as error:
            self._usage_error(error)

    def invoke(self, ctx):
        import logging
        import warnings

        warnings.formatwarning = _warning_line
        # The hub client logs every retry of an unreachable host (five lines, then our one-line error).
        logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)
        try:
            return super().invoke(ctx)
        except (Exit, Abort):
            raise
        except UsageError as error:
            self._usage_error(error)
        except ClickException:
            raise  # typer shows these in one short block already
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise Exit(130) from None
        except Exception as error:  # noqa: BLE001 - shown as one line, the traceback only on request
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            line, code = error_line(error)
            typer.echo(line, err=True)
            raise Exit(code) from None

    @staticmethod
    def _usage_error(error: UsageError):
        if type(error).__name__ == "NoArgsIsHelpError" or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise error
        where = error.ctx.command_path if error.ctx is not None else "latentx"
        typer.echo(f"error: {_one_line(error.format_message())} (see `{where} --help`)", err=True)
        raise Exit(2) from None


app = typer.Typer(
    name="latentx",
    cls=_Group,
    help="RLVR with exploration steered by hidden-state dynamics (ReLaX, VERL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"latentx {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """latentx: train, evaluate and analyse reasoning models by their latent dynamics."""


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    typer.echo(f"latentx {__version__}")


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (sections as in config.yaml)."),
    objective: Optional[str] = typer.Option(None, help="a registered objective: grpo | relax | verl | entropy_bonus | kl_cov | clip_cov"),
    model: Optional[str] = typer.Option(None, help="tiny | local dir | hub id | .gguf | run dir"),
    task: Optional[str] = typer.Option(None, help="countdown | math | a registered task"),
    steps: Optional[int] = typer.Option(None, help="number of RL steps"),
    seed: Optional[int] = typer.Option(None, help="random seed"),
    out: Optional[str] = typer.Option(None, help="run directory (default runs/<objective>-<task>-s<seed>)"),
    resume: Optional[Path] = typer.Option(None, help="continue the run in this directory exactly where it stopped"),
    set_: list[str] = typer.Option([], "--set", help="override any field: --set relax.alpha=0.2 (repeatable)"),
    report_to: Optional[str] = typer.Option(
        None, "--report-to", help="none | tensorboard | wandb, or a comma list (config: logging.report_to)"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing but errors (for scripts)"),
) -> None:
    """Train a policy with GRPO, ReLaX, VERL or a token-level baseline (defaults: the laptop demo)."""
    from latentx.config import ConfigError, from_dict, load_yaml
    from latentx.trainer import TrainConfig, train

    overrides = list(set_)
    for key, value in (("objective", objective), ("model.name", model), ("task.name", task),
                       ("steps", steps), ("seed", seed), ("out", out), ("logging.report_to", report_to)):
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        if resume is not None:
            if not (resume / "config.yaml").is_file():
                raise ConfigError(f"--resume {resume}: no config.yaml there; is it a latentx run directory?")
            cfg = load_yaml(TrainConfig, resume / "config.yaml", overrides + [f"out={resume}"])
        elif config is not None:
            cfg = load_yaml(TrainConfig, config, overrides)
        else:
            from latentx.config import merge_overrides

            cfg = from_dict(TrainConfig, merge_overrides({}, overrides))
        _validate_before_loading(cfg)
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    from latentx.reporting import ReportingError, require_trackers
    from latentx.terminal import silence_third_party

    silence_third_party()
    try:
        require_trackers(cfg.logging)
        summary = train(cfg, quiet=quiet)
    except ReportingError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if not quiet:
        _print_summary(summary, cfg)


def _validate_before_loading(cfg) -> None:
    """Checks that need no model: the run directory being continued was made with the same settings
    (:func:`latentx.checkpoint.check_same_run`), and the model can be found (a run with a checkpoint
    continues from its own weights and no longer needs ``model.name``).  Nothing is written."""
    from latentx.checkpoint import check_same_run, latest_checkpoint
    from latentx.config import ConfigError, to_dict
    from latentx.models import TINY_SPEC, resolve_model_path
    from latentx.trainer import resolve_config

    check_same_run(cfg.run_dir, to_dict(resolve_config(cfg)))
    if cfg.model.name == TINY_SPEC or latest_checkpoint(cfg.run_dir) is not None:
        return
    try:
        resolve_model_path(cfg.model.name)
    except ValueError as err:
        raise ConfigError(f"model.name: {err}") from None


def _print_summary(summary: dict, cfg) -> None:
    from rich.console import Console
    from rich.table import Table

    from latentx.evaluate import headline_metrics

    console = Console()
    if summary.get("eval"):
        ev = headline_metrics(summary["eval"])
        try:
            before = headline_metrics((summary.get("warm_start") or {}).get("eval") or {})
        except ValueError:  # no starting evaluation (or one from an older version)
            before = {}
        table = Table(title=f"held-out evaluation — {cfg.objective}, {ev['instances']} instances")
        table.add_column("metric")
        table.add_column("warm start", justify="right")
        table.add_column("after RL", justify="right")
        rows = [("Mean@1 (greedy)", "mean@1_greedy"), (f"Mean@{ev['n']}", f"mean@{ev['n']}")]
        for label, key in rows:
            table.add_row(label, f"{before[key]:.3f}" if key in before else "-", f"{ev[key]:.3f}")
        for k, v in ev["pass@k"].items():
            b = (before.get("pass@k") or {}).get(k)
            table.add_row(f"Pass@{k}", f"{b:.3f}" if b is not None else "-", f"{v:.3f}")
        table.add_row("distinct correct / problem", "-", f"{ev['distinct_correct_per_problem']:.2f}")
        console.print(table)
    index = cfg.run_dir / "plots" / "index.html"
    console.print(f"run directory: {cfg.run_dir}" + (f"  (plots: {index})" if index.is_file() else ""))


# --- sub-commands (one line each; the command functions live in their own modules) ---
# COMMANDS-BEGIN
from latentx.study import study_command; app.command("study")(study_command)  # noqa: E402,E702
from latentx.analyze.command import analyze_cmd; app.command("analyze")(analyze_cmd)  # noqa: E402,E702
from latentx.evaluate import eval_command; app.command("eval")(eval_command)  # noqa: E402,E702
from latentx.plots import plot_command; app.command("plot")(plot_command)  # noqa: E402,E702
# COMMANDS-END


if __name__ == "__main__":  # pragma: no cover
    app()
