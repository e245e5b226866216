"""The ``latentx analyze`` command (typer).  Only typer is imported here; the analysis loads on use."""

from __future__ import annotations

from typing import Optional

import typer

__all__ = ["analyze_cmd", "parse_task_options"]


def parse_task_options(items: list[str]) -> dict:
    """``["key=value", ...]`` -> dict, values read as YAML scalars (``4`` -> 4, ``true`` -> True)."""
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--task-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return options


def analyze_cmd(
    model: list[str] = typer.Option(..., "--model", help="tiny | HF dir | hub id | .gguf | latentx run dir; "
                                    "NAME=SPEC sets the label. Repeat to compare models."),
    task: str = typer.Option("countdown", help="countdown | math | a registered task"),
    data: Optional[str] = typer.Option(None, help="problem file for --task math (JSONL / JSON / Parquet or a benchmark name)"),
    task_option: list[str] = typer.Option([], "--task-option", help="task option KEY=VALUE, e.g. prompt_style=question (repeatable)"),
    prompts: int = typer.Option(16, help="number of problems (the same for every model)"),
    samples: int = typer.Option(4, help="responses per problem, R"),
    out: str = typer.Option("report", help="output directory"),
    max_new_tokens: int = typer.Option(64, help="response length cap L"),
    temperature: float = typer.Option(1.0, help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(1.0, help="nucleus sampling threshold"),
    dictionary: list[str] = typer.Option([], "--dictionary", help="Koopman dictionary: koopman.safetensors, a "
                                         "checkpoint or a run dir; once for all models or once per model"),
    stride: Optional[int] = typer.Option(None, help="ER prefix stride s (default clamp(L // 8, 2, 40))"),
    m: Optional[int] = typer.Option(None, "--m", help="dictionary size when fitted (default clamp(L // 3, 4, 50))"),
    window: int = typer.Option(512, help="tail window of the ER prefix series"),
    seed: int = typer.Option(0, help="seed of problems, sampling and dictionary initialisation"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N"),
    batch_size: int = typer.Option(16, help="responses per generate / forward chunk"),
    fit_epochs: int = typer.Option(1, help="passes of the dictionary fit (1 = as latentx train)"),
    examples: int = typer.Option(2, help="responses per model in the ER prefix-curve figure"),
    method: str = typer.Option("spearman", help="correlation shown in the figure: spearman | pearson"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    quiet: bool = typer.Option(False, help="no progress output"),
    image_blind: bool = typer.Option(False, help="vision-language models: also run each model with blank images "
                                     "(the image-blind control)"),
) -> None:
    """Latent-dynamics diagnostics: DSD, Koopman spectra, ER / ERV / ERA per response; tables, figures, HTML report."""
    from latentx.analyze.pipeline import AnalysisError, AnalyzeConfig, run_analysis
    from latentx.analyze.report import print_summary

    try:
        options = parse_task_options(task_option)
        cfg = AnalyzeConfig(
            models=list(model), out=out, task=task, data=data, task_options=options, prompts=prompts, samples=samples,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, dictionaries=list(dictionary),
            stride=stride, m=m, window=window, seed=seed, device=device, batch_size=batch_size, fit_epochs=fit_epochs,
            examples=examples, method=method, image_blind=image_blind,
        )
        if threads is not None:
            import torch

            if threads < 1:
                raise AnalysisError(f"--threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        log = (lambda message: None) if quiet else (lambda message: typer.echo(message, err=True))
        analysis = run_analysis(cfg, progress=not quiet, log=log)
    except (AnalysisError, ValueError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    print_summary(analysis)
    if analysis.failures:
        raise typer.Exit(1)
