"""What the last retraining saw (its `RetrainRecord`), and whether anything is new since.

The record is a small JSON file (default `artifacts_dir()/retrain/state.json`): the data
fingerprint, the training settings hash and the time of the last training. Something is new
when the dataset's DVC hash (or, for data outside the repository, its file listing) changed,
when the service stored feedback rows after that time, or when the training settings changed.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypedDict

from captioning.registry.lineage import data_fingerprint, feedback_since, training_hash

if TYPE_CHECKING:
    from captioning.settings import Settings

RECORD_FILE = "state.json"


class RetrainRecord(TypedDict, total=False):
    """What the last retraining saw, as its JSON file holds it: the dataset, its fingerprint and
    the training settings hash it trained on, when it started (`trained_at`, which bounds the
    feedback it could use) and when it was written, then the outcome the flow adds (package
    folder, registry version, whether it was promoted, its metrics)."""

    dataset: str
    data: str
    params: str
    trained_at: str
    recorded_at: str
    package_dir: str
    version: str | None
    promoted: bool
    metrics: dict[str, float]


def record_path() -> Path:
    from captioning.config import artifacts_dir

    return artifacts_dir() / "retrain" / RECORD_FILE


def read_record(path: Path | None = None) -> RetrainRecord | None:
    """The last retraining's record, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((path or record_path()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(record: RetrainRecord, path: Path | None = None) -> Path:
    """Write atomically: a run killed half-way leaves the previous record intact."""
    path = path or record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def check_for_new_data(
    dataset: str,
    settings: "Settings | Mapping[str, Any]",
    use_feedback: bool = True,
    path: Path | None = None,
) -> dict[str, Any]:
    """Compare the data and settings with the last training: {"new": bool, "reasons": [...], ...}."""
    path = path or record_path()
    current = {
        "dataset": dataset,
        "data": data_fingerprint(dataset),
        "params": training_hash(settings),
        "feedback_total": feedback_since(None) if use_feedback else 0,
    }
    last = read_record(path)
    feedback = feedback_since(last.get("trained_at")) if use_feedback and last is not None else 0
    reasons = _reasons(last, current, feedback)
    return {
        **current,
        "new": bool(reasons),
        "reasons": reasons,
        "feedback_rows": feedback,
        "last": last,
        "record_file": str(path),
    }


def _reasons(last: RetrainRecord | None, current: dict[str, Any], feedback: int) -> list[str]:
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
    record: RetrainRecord = {
        "dataset": check["dataset"],
        "data": check["data"],
        "params": check["params"],
        "trained_at": started_at,
        "recorded_at": datetime.now(timezone.utc).isoformat(),
        **outcome,
    }
    return write_record(record, path)
