"""Prefect flows: each pipeline step as a flow, and `retrain` composing them.

Run any of them once with `python -m flows.NAME --help`. Settings come from
params.yaml, optionally overlaid by a partial YAML file (`--params FILE`) and
`--set section.key=value` items, in that order.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

# Library log lines (acquisition, training, evaluation) go to the Prefect run logs too.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "captioning")

LOCAL_SERVER = "http://127.0.0.1:4200/api"


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


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it, section by section."""
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = value
    return result


def load_settings(params_file: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """params.yaml, then the partial YAML `params_file` over it, then `section.key=value` overrides."""
    import yaml

    from captioning.config import load_params, override

    params = load_params()
    if params_file:
        with open(params_file, encoding="utf-8") as handle:
            params = deep_merge(params, yaml.safe_load(handle) or {})
    return override(params, list(overrides or []))


def settings_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params",
        metavar="FILE",
        default=os.environ.get("CAPTIONING_PARAMS_OVERLAY") or None,
        help="partial YAML laid over params.yaml (default $CAPTIONING_PARAMS_OVERLAY), e.g. params-synthetic.yaml",
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


def tracking_uri(params: dict[str, Any]) -> str:
    """$MLFLOW_TRACKING_URI first, then these settings' tracking.uri (as the registry resolves it)."""
    from captioning.registry import tracking_uri as resolve

    return resolve(None, params)


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
