"""`captioning register`, `captioning registry list`, `captioning registry rollback`.

A failed gate is an outcome, not a crash: `register` prints "gate failed: ..." and exits 0,
so a pipeline goes on (the champion is untouched); `--fail-on-gate` makes it exit 3 instead.
Bad input (missing package, unreadable metrics) exits 2; registry problems exit 1, among them a
tracking server that does not answer (named in the message, within seconds: see
`captioning.registry.store.bounded_http_retries`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from captioning.cli.common import fail, params_option, print_json, set_option, settings

GATE_FAILED_EXIT = 3


def _read_metrics(path: Path) -> dict[str, float]:
    """Metrics JSON: a flat {metric: value} or the `{"metrics": {...}}` that `evaluate --out` writes."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        fail(f"{path}: cannot read metrics ({error})")
    if isinstance(payload, dict) and isinstance(payload.get("metrics"), dict):
        payload = payload["metrics"]
    if not isinstance(payload, dict) or not payload:
        fail(f"{path}: expected a JSON object of metric values")
    try:
        return {str(k): float(v) for k, v in payload.items() if not isinstance(v, (dict, list))}
    except (TypeError, ValueError):
        fail(f"{path}: metric values must be numbers")


def _champion_metrics(query: str, tracking: str, name: str, reevaluate: bool) -> Optional[dict[str, float]]:
    """The champion's metrics on `query` when its stored ones were computed on another query."""
    from captioning.registry.locate import locate
    from captioning.registry.versions import champion_query

    version, scored_on = champion_query(tracking, name)
    if version is None or scored_on == query or not reevaluate:
        return None
    from captioning.evaluation.scoring import evaluate_model

    typer.echo(f"champion version {version} was scored on {scored_on!r}; evaluating it on {query!r}", err=True)
    folder = locate(f"models:/{name}/{version}", tracking).path
    return evaluate_model(str(folder), query, attention_images=0).metrics


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The MLflow model registry: versions, aliases, rollback.", no_args_is_help=True)
    app.add_typer(group, name="registry")

    @app.command("register")
    def register_command(
        model: Path = typer.Option(..., "--model", help="Model package folder."),
        metrics: Path = typer.Option(..., "--metrics", help="Test metrics JSON (percent)."),
        data: Optional[str] = typer.Option(
            None, "--data", help="Query the metrics were computed on (default: params data.test_query)."
        ),
        tracking: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: params tracking.uri."),
        run_id: Optional[str] = typer.Option(None, "--run-id", help="Log the model into this MLflow run."),
        reevaluate: bool = typer.Option(
            True, "--reevaluate/--no-reevaluate", help="Re-score the champion when it was scored on another query."
        ),
        fail_on_gate: bool = typer.Option(
            False, "--fail-on-gate", help=f"Exit {GATE_FAILED_EXIT} when the gates refuse the model."
        ),
        as_json: bool = typer.Option(False, "--json"),
        params_file: Optional[Path] = params_option(),
        assignments: list[str] = set_option(),
    ) -> None:
        """Register a model version; promote it to champion only if it passes the metric gates."""
        from captioning.inference.model_package import PackageError
        from captioning.registry.store import RegistryError, bounded_http_retries, check_server, tracking_uri
        from captioning.registry.versions import model_name
        from captioning.registry.versions import register as register_version

        config = settings(params_file, assignments)
        if not (model / "config.json").is_file():
            fail(f"{model} is not a model package folder (no config.json)")
        values = _read_metrics(metrics)
        query = data or config.data.test_query
        try:
            with bounded_http_retries():
                uri = tracking_uri(config, tracking)
                check_server(uri)
                champion = _champion_metrics(query, uri, model_name(config), reevaluate)
                result = register_version(
                    model, values, query, config, tracking=uri, run_id=run_id, champion_metrics=champion
                )
        except PackageError as error:
            fail(str(error))
        except RegistryError as error:
            fail(str(error), code=1)
        if as_json:
            print_json(result.to_dict())
        else:
            typer.echo(result.message)
        if fail_on_gate and not result.promoted:
            raise typer.Exit(GATE_FAILED_EXIT)

    @group.command("list")
    def list_command(
        tracking: Optional[str] = typer.Option(None, "--tracking-uri"),
        as_json: bool = typer.Option(False, "--json"),
        params_file: Optional[Path] = params_option(),
        assignments: list[str] = set_option(),
    ) -> None:
        """Versions with their aliases, gate outcome and metrics."""
        from captioning.registry.store import RegistryError, bounded_http_retries, tracking_uri
        from captioning.registry.versions import list_versions, model_name

        config = settings(params_file, assignments)
        name = model_name(config)
        try:
            with bounded_http_retries():
                rows = list_versions(tracking_uri(config, tracking), name)
        except RegistryError as error:
            fail(str(error), code=1)
        if as_json:
            print_json(rows)
            return
        if not rows:
            typer.echo(f"no versions of {name!r} registered")
            return
        for row in rows:
            metrics = " ".join(f"{k}={v:.2f}" for k, v in row["metrics"].items())
            aliases = ",".join(row["aliases"]) or "-"
            typer.echo(
                f"v{row['version']:<4} {aliases:<18} {row['gate'] or '-':<7} {metrics}  "
                f"[{row['data_query']}] {row['created']}"
            )

    @group.command("rollback")
    def rollback_command(
        tracking: Optional[str] = typer.Option(None, "--tracking-uri"),
        as_json: bool = typer.Option(False, "--json"),
        params_file: Optional[Path] = params_option(),
        assignments: list[str] = set_option(),
    ) -> None:
        """Move `champion` back to `previous`."""
        from captioning.registry.store import RegistryError, bounded_http_retries, tracking_uri
        from captioning.registry.versions import model_name, rollback

        config = settings(params_file, assignments)
        try:
            with bounded_http_retries():
                moved = rollback(tracking_uri(config, tracking), model_name(config))
        except RegistryError as error:
            fail(str(error), code=1)
        if as_json:
            print_json(moved)
        else:
            typer.echo(
                f"champion: version {moved['champion']} (was {moved['demoted']}); "
                f"previous: {moved['previous'] or 'none'}"
            )
