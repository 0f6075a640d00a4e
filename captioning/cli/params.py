"""`captioning profile` (the overrides of a named configuration in params.yaml) and `captioning settings`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from captioning.cli.common import fail, params_option, print_json, set_option, settings


def profile_command(
    name: str = typer.Argument(..., help="A key of params.yaml `profiles`, e.g. full."),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
    dvc: bool = typer.Option(False, "--dvc", help="Print `-S key=value` flags for `dvc exp run`."),
) -> None:
    """Print the `section.key=value` overrides of a profile, one per line."""
    import shlex

    from captioning.settings import SettingsError, profile_overrides

    try:
        items = profile_overrides(settings(params_file, assignments), name)
    except SettingsError as error:
        fail(str(error))
    for item in items:
        typer.echo(f"-S {shlex.quote(item)}" if dvc else item)


def settings_command(
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object of the sections."),
) -> None:
    """Print the settings a command would use: params.yaml, the --params overlay, the --set items."""
    from captioning.settings import flatten

    chosen = settings(params_file, assignments)
    if as_json:
        print_json(chosen.to_dict())
        return
    for key, value in flatten(chosen).items():
        typer.echo(f"{key}={value}")
