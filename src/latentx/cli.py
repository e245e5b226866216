"""The ``latentx`` command line (typer).  Each sub-command lives beside the code it drives."""

from __future__ import annotations

from typing import Optional

import typer

from latentx import __version__

app = typer.Typer(
    name="latentx",
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


# --- sub-commands (one line each; the command functions live in their own modules) ---
# COMMANDS-BEGIN
# COMMANDS-END


if __name__ == "__main__":  # pragma: no cover
    app()
