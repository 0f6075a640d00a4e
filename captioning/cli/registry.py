"""`captioning register`, `captioning registry list`, `captioning registry rollback`.

A failed gate is an outcome, not a crash: `register` prints "gate failed: ..." and exits 0,
so a pipeline goes on (the champion is untouched); `--fail-on-gate` makes it exit 3 instead.
Bad input (missing package, unreadable metrics) exits 2; registry problems exit 1, among them a
tracking server that does not answer (named in the message, within seconds: see
`store.bounded_http_retries`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from captioning.cli.common import fail, params_option, print_json, set_option, settings

GATE_FAILED_EXIT = 3

app = typer.Typer(help="The MLflow model registry: versions, aliases, rollback.", no_args_is_help=True)


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
    from captioning.registry import locate, versions

    version, scored_on = versions.champion_query(tracking, name)
    if version is None or scored_on == query or not reevaluate:
        return None
    from captioning.evaluation.scoring import evaluate_model

    typer.echo(f"champion version {version} was scored on {scored_on!r}; evaluating it on {query!r}", err=True)
    folder = locate.locate(f"models:/{name}/{version}", tracking).path
    return evaluate_model(str(folder), query, attention_images=0).metrics


def _on_registry(config, tracking: Optional[str], action):
    """`action(tracking URI, model name)` on the registry at `tracking` (default: params
    tracking.uri) for params register.model_name; a registry problem exits 1 with the reason."""
    from captioning.registry import store, versions

    try:
        with store.bounded_http_retries():
            return action(store.tracking_uri(config, tracking), versions.model_name(config))
    except store.RegistryError as error:
        fail(str(error), code=1)


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
    from captioning.registry import store, versions
    from captioning.release.smoke import SmokeRecordError, registering

    config = settings(params_file, assignments)
    if not (model / "config.json").is_file():
        fail(f"{model} is not a model package folder (no config.json)")
    values = _read_metrics(metrics)
    query = data or config.data.test_query
    try:
        with store.bounded_http_retries():
            uri = store.tracking_uri(config, tracking)
            store.check_server(uri)
            champion = _champion_metrics(query, uri, versions.model_name(config), reevaluate)
            with registering(model, config) as logged:
                result = versions.register(
                    logged, values, query, config, tracking=uri, run_id=run_id, champion_metrics=champion
                )
    except PackageError as error:
        fail(str(error))
    except (store.RegistryError, SmokeRecordError) as error:
        fail(str(error), code=1)
    if as_json:
        print_json(result.to_dict())
    else:
        typer.echo(result.message)
    if fail_on_gate and not result.promoted:
        raise typer.Exit(GATE_FAILED_EXIT)


@app.command("list")
def list_command(
    tracking: Optional[str] = typer.Option(None, "--tracking-uri"),
    as_json: bool = typer.Option(False, "--json"),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Versions with their aliases, gate outcome and metrics."""
    from captioning.registry import versions

    config = settings(params_file, assignments)
    name = versions.model_name(config)
    rows = _on_registry(config, tracking, versions.list_versions)
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


@app.command("rollback")
def rollback_command(
    tracking: Optional[str] = typer.Option(None, "--tracking-uri"),
    as_json: bool = typer.Option(False, "--json"),
    params_file: Optional[Path] = params_option(),
    assignments: list[str] = set_option(),
) -> None:
    """Move `champion` back to `previous`."""
    from captioning.registry import versions

    moved = _on_registry(settings(params_file, assignments), tracking, versions.rollback)
    if as_json:
        print_json(moved)
    else:
        typer.echo(
            f"champion: version {moved['champion']} (was {moved['demoted']}); previous: {moved['previous'] or 'none'}"
        )
