"""Benchmarks: each module writes its measurements as JSON into reports/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], name: str, output: Path | None = None) -> Path:
    """Write `report` to `output`, or to reports/benchmark_NAME.json; return the path."""
    from captioning.config import reports_dir

    path = Path(output) if output else reports_dir() / f"benchmark_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path
