"""`captioning profile`: the overrides of a named configuration in params.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from captioning.cli.common import fail


def register(app: typer.Typer) -> None:
    @app.command("profile")
    def profile(
        name: str = typer.Argument(..., help="A key of params.yaml `profiles`, e.g. full."),
        params_file: Optional[Path] = typer.Option(None, "--params", help="Default: params.yaml."),
        dvc: bool = typer.Option(False, "--dvc", help="Print `-S key=value` flags for `dvc exp run`."),
    ) -> None:
        """Print the `section.key=value` overrides of a profile, one per line."""
        import shlex

        from captioning.config import load_params, profile_overrides

        try:
            assignments = profile_overrides(load_params(params_file), name)
        except (OSError, ValueError) as error:
            fail(str(error))
        for item in assignments:
            typer.echo(f"-S {shlex.quote(item)}" if dvc else item)
