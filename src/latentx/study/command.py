"""``latentx study`` on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from latentx.config import ConfigError, from_dict, parse_int_list, to_dict
from latentx.study.config import StudyConfig, StudyError, load_study_config, preset_path
from latentx.study.runner import run_study



def _parse_seeds(text: str, option: str) -> str:
    """``"5"`` -> ``"5"`` (a count), ``"0,1,2"`` -> ``"[0, 1, 2]"`` (a list), as YAML for an override."""
    items = parse_int_list(text, option, expected="a count (5) or a comma list of integers (0,1,2)")
    return str(items[0]) if "," not in text else str(items)


def study_command(
    objectives: Optional[str] = typer.Option(None, help="comma list, e.g. grpo,relax,verl,entropy_bonus,kl_cov"),
    seeds: Optional[str] = typer.Option(None, help="a count N (seeds 0..N-1) or a comma list of seeds"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="study YAML: train sections + a study: section"),
    preset: Optional[str] = typer.Option(None, help="cpu | gpu-math | cpu-full | cpu-hard (configs/study-<preset>.yaml)"),
    workers: Optional[int] = typer.Option(None, help="parallel runs (default: one per available core)"),
    set_: list[str] = typer.Option([], "--set", help="override a field: --set steps=20, --set study.alpha=0.1"),
    tune: list[str] = typer.Option([], "--tune", help="grid for one objective's coefficient: relax.alpha=0.05,0.1,0.2"),
    validation_seeds: Optional[str] = typer.Option(None, help="seeds for tuning runs, disjoint from --seeds"),
    no_tune: bool = typer.Option(False, "--no-tune", help="ignore the config's tuning grid"),
    out: Path = typer.Option(Path("study"), help="study directory (reruns resume it)"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Every objective × every seed from one warm start; mean ± 95 % CI, paired tests against GRPO, plots."""
    try:
        if config is not None and preset is not None:
            raise ConfigError("give --config or --preset, not both")
        path = preset_path(preset) if preset is not None else config
        overrides = list(set_)
        if objectives is not None:
            overrides.append(f"study.objectives={objectives}")
        if seeds is not None:
            overrides.append(f"study.seeds={_parse_seeds(seeds, '--seeds')}")
        if workers is not None:
            overrides.append(f"study.workers={workers}")
        if no_tune:  # before validation: a preset's grid may name objectives that --objectives left out
            overrides.append("study.tune={}")
        if validation_seeds is not None:
            parsed = _parse_seeds(validation_seeds, "--validation-seeds")
            overrides.append(f"study.validation_seeds={parsed if parsed.startswith('[') else f'[{parsed}]'}")
        base, study = load_study_config(path, overrides)
        grid = {} if no_tune else dict(study.tune)
        for text in tune:
            if "=" not in text:
                raise ConfigError(f"--tune {text!r} must look like relax.alpha=0.05,0.1,0.2")
            key, values = text.split("=", 1)
            grid[key.strip()] = values
        study = from_dict(StudyConfig, {**to_dict(study), "tune": grid}, prefix="study")
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if base.eval.n < 64:
        typer.secho(f"note: eval.n = {base.eval.n}: the Pass@k curve stops at k = {base.eval.n} (the presets use 64)",
                    fg=typer.colors.YELLOW, err=True)
    try:
        results = run_study(base, study, out, progress=not quiet)
    except StudyError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"study directory: {out}  (this invocation: {results['wall_time_s'] / 60:.1f} min)")

