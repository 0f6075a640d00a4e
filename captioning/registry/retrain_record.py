"""What the last retraining saw, and whether anything is new since.

The state is a small JSON file (default `artifacts_dir()/retrain/state.json`): the data
fingerprint, the training settings hash and the time of the last training. Something is new
when the dataset's DVC hash (or, for data outside the repository, its file listing) changed,
when the service stored feedback rows after that time, or when the training settings changed.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from captioning.registry.lineage import data_fingerprint, feedback_since, training_hash

if TYPE_CHECKING:
    from captioning.settings import Settings

STATE_FILE = "state.json"


def state_path() -> Path:
    from captioning.config import artifacts_dir

    return artifacts_dir() / "retrain" / STATE_FILE


def read_state(path: Path | None = None) -> dict[str, Any] | None:
    """The recorded state, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((path or state_path()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_state(state: dict[str, Any], path: Path | None = None) -> Path:
    """Write atomically: a run killed half-way leaves the previous state intact."""
    path = path or state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def check_for_new_data(
    dataset: str,
    settings: "Settings | Mapping[str, Any]",
    use_feedback: bool = True,
    path: Path | None = None,
) -> dict[str, Any]:
    """Compare the data and settings with the last training: {"new": bool, "reasons": [...], ...}."""
    path = path or state_path()
    current = {
        "dataset": dataset,
        "data": data_fingerprint(dataset),
        "params": training_hash(settings),
        "feedback_total": feedback_since(None) if use_feedback else 0,
    }
    last = read_state(path)
    feedback = feedback_since(last.get("trained_at")) if use_feedback and last is not None else 0
    reasons = _reasons(last, current, feedback)
    return {
        **current,
        "new": bool(reasons),
        "reasons": reasons,
        "feedback_rows": feedback,
        "last": last,
        "state_file": str(path),
    }


def _reasons(last: dict[str, Any] | None, current: dict[str, Any], feedback: int) -> list[str]:
    if last is None:
        return ["no model has been trained by this pipeline yet"]
    reasons = []
    if last.get("dataset") != current["dataset"]:
        reasons.append(f"dataset changed: {last.get('dataset')} -> {current['dataset']}")
    elif last.get("data") != current["data"]:
        reasons.append(f"data changed: {last.get('data')} -> {current['data']}")
    if last.get("params") != current["params"]:
        reasons.append(f"training settings changed: {last.get('params')} -> {current['params']}")
    if feedback:
        reasons.append(f"{feedback} feedback row(s) stored since {last.get('trained_at')}")
    return reasons


def record_training(check: dict[str, Any], outcome: dict[str, Any], started_at: str, path: Path | None = None) -> Path:
    """Remember what this training saw; `started_at` bounds the feedback it could have used."""
    state = {
        "dataset": check["dataset"],
        "data": check["data"],
        "params": check["params"],
        "trained_at": started_at,
        "recorded_at": datetime.now(timezone.utc).isoformat(),
        **outcome,
    }
    return write_state(state, path)
