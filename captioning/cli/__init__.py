"""The `captioning` command.

Each sub-module adds its commands through `register(app)`; heavy imports
(torch, MLflow, ...) happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import typer

from captioning.cli import data, evaluate, params, registry, release, train

app = typer.Typer(
    name="captioning",
    help="Image captioning: data, training, evaluation, registry and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (data, train, evaluate, registry, release, params):
    module.register(app)


def main() -> None:
    from captioning.config import disable_telemetry

    disable_telemetry()
    app()
