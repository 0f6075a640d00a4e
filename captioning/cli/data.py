"""Commands of this group are added by register()."""

import typer


def register(app: typer.Typer) -> None:
    pass
