"""Helpers every command shares: the settings, one-line failures and JSON output."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional, Sequence

import typer

if TYPE_CHECKING:
    from captioning.settings import Settings

OVERLAY_VARIABLE = "CAPTIONING_PARAMS_OVERLAY"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line reason on stderr and exit (2: bad usage or input, 1: the work failed)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def params_option() -> Any:
    return typer.Option(
        None,
        "--params",
        envvar=OVERLAY_VARIABLE,
        show_envvar=False,
        help=f"Partial YAML laid over params.yaml (default ${OVERLAY_VARIABLE}), e.g. params-synthetic.yaml.",
    )


def set_option() -> Any:
    return typer.Option([], "--set", help="Override one setting: section.key=value (repeatable).")


def tracking_option() -> Any:
    return typer.Option(
        None,
        "--tracking-uri",
        help="MLflow store a models:/ or runs:/ reference is read from "
        "(default: $MLFLOW_TRACKING_URI, else params tracking.uri).",
    )


def is_registry_reference(model: str) -> bool:
    """Whether `model` names a registered model or a run (models:/, runs:/, any URI), not a folder."""
    return "://" in model or model.startswith(("models:", "runs:"))


def model_store(config: "Settings", uri: Optional[str]) -> str:
    """The store model references are read from, the same way for every command: --tracking-uri,
    else $MLFLOW_TRACKING_URI, else params tracking.uri; exit 2 when none is given."""
    from captioning.registry.store import RegistryError, tracking_uri

    try:
        return tracking_uri(config, uri)
    except RegistryError as error:
        fail(str(error))


def settings(params_file: Optional[Path], overrides: Sequence[str] = ()) -> "Settings":
    """params.yaml, the partial YAML `params_file` laid over it, then the `--set` items;
    exit 2 with the reason when a key or a value is wrong, before any work."""
    from captioning.config import PARAMS_FILE
    from captioning.settings import SettingsError, load_settings

    try:
        return load_settings(PARAMS_FILE, params_file, tuple(overrides))
    except SettingsError as error:
        fail(str(error))


def print_json(payload: Any) -> None:
    """Strict JSON on stdout: a NaN or inf (not JSON) is written as null."""
    json.dump(_finite(payload), sys.stdout, indent=2, ensure_ascii=False, allow_nan=False)
    sys.stdout.write("\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
