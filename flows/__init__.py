"""Prefect flows: each pipeline step as a flow, and `retrain` composing them.

Run any of them once with `python -m flows.NAME --help`. Settings come from
params.yaml, optionally overlaid by a partial YAML file (`--params FILE`) and
`--set section.key=value` items, in that order.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from captioning.settings import Settings

# Library log lines (acquisition, training, evaluation) go to the Prefect run logs too.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "captioning")

LOCAL_SERVER = "http://127.0.0.1:4200/api"
OVERLAY_VARIABLE = "CAPTIONING_PARAMS_OVERLAY"


def _use_local_server() -> None:
    """Talk to the Prefect server of `make run` / `make prefect-ui` when one answers on 127.0.0.1:4200.

    Without a server URL every flow run would start (and stop) a temporary server of its own.
    Must run before Prefect reads its settings, hence here, before any Prefect import.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from urllib.request import urlopen

    try:
        with urlopen(f"{LOCAL_SERVER}/health", timeout=0.5) as response:
            if response.status == 200:
                os.environ["PREFECT_API_URL"] = LOCAL_SERVER
    except OSError:
        pass


_use_local_server()

from captioning.config import disable_telemetry  # noqa: E402

disable_telemetry()


def load_settings(params_file: str | Path | None = None, overrides: Sequence[str] | None = ()) -> Settings:
    """params.yaml, then the partial YAML `params_file` over it, then `section.key=value` overrides
    (SettingsError with one line when a key or a value is wrong)."""
    from captioning.config import PARAMS_FILE
    from captioning.settings import load_settings as load

    return load(PARAMS_FILE, params_file, tuple(overrides or ()))


def settings_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params",
        metavar="FILE",
        default=os.environ.get(OVERLAY_VARIABLE) or None,
        help=f"partial YAML laid over params.yaml (default ${OVERLAY_VARIABLE}), e.g. params-synthetic.yaml",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one setting, e.g. --set train.epochs=2 (repeatable)",
    )
    return parser


def parse_settings(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, Settings]:
    """The arguments and the settings they name; a bad setting exits 2 with `error: <reason>`
    on stderr, before any flow run starts."""
    from captioning.settings import SettingsError

    args = parser.parse_args(argv)
    try:
        return args, load_settings(args.params, args.overrides)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def tracking_uri(settings: Settings) -> str:
    """$MLFLOW_TRACKING_URI first, then these settings' tracking.uri (as the registry resolves it)."""
    from captioning.registry.store import tracking_uri as resolve

    return resolve(settings)


def run_settings() -> Settings:
    """The settings the current flow run works with, for naming it: its `settings` parameter,
    else params.yaml with its `params_file` and `overrides` parameters (as the flows load them)."""
    from prefect.runtime import flow_run

    from captioning.settings import Settings

    parameters = flow_run.parameters
    given = parameters.get("settings")
    if isinstance(given, Settings):
        return given
    if isinstance(given, dict):
        return Settings.model_validate(given)
    return load_settings(parameters.get("params_file"), parameters.get("overrides"))


def run_parameter(name: str, default: Any = None) -> Any:
    from prefect.runtime import flow_run

    value = flow_run.parameters.get(name)
    return default if value is None else value


def label_run(name: str | None = None, tags: Sequence[str] = ()) -> None:
    """Rename the current flow run and add `tags` to it (the Prefect UI lists runs by both)."""
    from prefect import get_client
    from prefect.runtime import flow_run

    if flow_run.id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run.id)
        merged = list(dict.fromkeys([*(current.tags or []), *tags]))
        client.update_flow_run(flow_run.id, name=name, tags=merged)


def finish(state, describe) -> int:
    """Print the outcome of a flow run and return the process exit code (0 completed, 1 otherwise)."""
    if state.is_completed():
        print(describe(state.result()))
        return 0
    print(f"{state.name}: {state.message}")
    return 1


def flow_reports() -> Path:
    """Reports of flow runs: reports/flows/ (dvc.yaml owns the files directly under reports/)."""
    from captioning.config import reports_dir

    return reports_dir() / "flows"
