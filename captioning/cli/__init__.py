"""The `captioning` command.

The sub-modules define the commands as plain functions and the command groups (`data`,
`feedback`, `registry`, `stack`) as Typer apps; this module puts them together. Heavy imports (torch,
MLflow, ...) happen inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import typer

from captioning.cli import data, evaluate, feedback, params, registry, release, train

app = typer.Typer(
    name="captioning",
    help="Image captioning: data, training, evaluation, registry and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(data.app, name="data")
app.add_typer(feedback.app, name="feedback")
app.command("features")(train.features_command)
app.command("train")(train.train_command)
app.command("caption")(train.caption_command)
app.command("evaluate")(evaluate.evaluate_command)
app.command("evaluate-predictions")(evaluate.evaluate_predictions_command)
app.command("compare")(evaluate.compare_command)
app.add_typer(registry.app, name="registry")
app.command("register")(registry.register_command)
app.add_typer(release.stack_app, name="stack")
app.command("release")(release.release_command)
app.command("profile")(params.profile_command)
app.command("settings")(params.settings_command)


def main() -> None:
    from captioning.config import disable_telemetry

    disable_telemetry()
    app()
