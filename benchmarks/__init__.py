"""Benchmarks: each module writes its measurements as JSON into reports/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OVERLAY_VARIABLE = "CAPTIONING_PARAMS_OVERLAY"


def write_report(report: dict[str, Any], name: str, output: Path | None = None) -> Path:
    """Write `report` to `output`, or to reports/benchmark_NAME.json; return the path."""
    from captioning.config import reports_dir

    path = Path(output) if output else reports_dir() / f"benchmark_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def add_model_options(parser) -> None:
    """--tracking-uri and --params: where a models:/ or runs:/ --model is read from, as the
    `captioning` commands resolve it."""
    import os

    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store of a models:/ reference (default: $MLFLOW_TRACKING_URI, else params tracking.uri)",
    )
    parser.add_argument(
        "--params",
        default=os.environ.get(OVERLAY_VARIABLE) or None,
        help=f"partial YAML laid over params.yaml (default ${OVERLAY_VARIABLE})",
    )


def model_store(args) -> str | None:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the params' tracking.uri (None: no store named)."""
    from captioning.config import PARAMS_FILE
    from captioning.registry.store import RegistryError, tracking_uri
    from captioning.settings import load_settings

    try:
        return tracking_uri(load_settings(PARAMS_FILE, args.params), args.tracking_uri)
    except RegistryError:
        return None
