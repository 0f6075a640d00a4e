"""What the last retraining saw, and whether anything is new since.

The state is a small JSON file under artifacts_dir() (`retrain/state.json`): the data
fingerprint, the settings hash and the time of the last training. Something is new when
the dataset's DVC hash (or, for data outside the repository, its file listing) changed,
when the service stored feedback rows after that time, or when the training settings changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import run_logger

STATE_FILE = "state.json"
# Sections that cannot change a trained model: editing them does not call for a retrain.
NEUTRAL_SECTIONS = ("register", "retrain", "tracking", "evaluate")


def state_path() -> Path:
    from captioning.config import artifacts_dir

    return artifacts_dir() / "retrain" / STATE_FILE


def read_state(path: Path | None = None) -> dict[str, Any] | None:
    path = path or state_path()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
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


def params_hash(params: dict[str, Any]) -> str:
    """Hash of the settings that shape a model (gates, schedule and tracking excluded)."""
    relevant = {key: value for key, value in params.items() if key not in NEUTRAL_SECTIONS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def listing_hash(folder: Path) -> str:
    """Names, sizes and modification times of every file under `folder` (stat only: fast)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "files:" + digest.hexdigest()[:32]


def data_fingerprint(dataset: str) -> str:
    """The DVC hash of data/ when this repository tracks it, else a listing hash of the dataset folder."""
    from captioning.config import PROJECT_ROOT, data_dir
    from captioning.data.versioning import data_hash

    if data_dir() == (PROJECT_ROOT / "data").resolve():
        tracked = data_hash(PROJECT_ROOT)
        if tracked:
            return f"dvc:{tracked}"
    folder = data_dir() / dataset
    return listing_hash(folder) if folder.is_dir() else "missing"


def feedback_since(timestamp: str | None) -> int:
    """Feedback rows stored after `timestamp` (ISO 8601); all rows when None."""
    from captioning.feedback import FeedbackStore, default_url

    url = default_url()
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        return 0  # the service never stored any (and opening the store would create the file)
    since = datetime.fromisoformat(timestamp) if timestamp else None
    return len(FeedbackStore(url).since(since))


def feedback_fingerprint() -> str:
    """Changes whenever a correction is stored or a stored file changes (keys the validation cache)."""
    from captioning.feedback import default_root

    root = default_root()
    listing = listing_hash(root) if root.is_dir() else "missing"
    return f"feedback:{feedback_since(None)}:{listing}"


@task(name="check-for-new-data", cache_policy=NO_CACHE)
def check_for_new_data(dataset: str, params: dict[str, Any], use_feedback: bool = True) -> dict[str, Any]:
    """Compare the data and settings with the last training: {"new": bool, "reasons": [...], ...}."""
    logger = run_logger()
    current = {
        "dataset": dataset,
        "data": data_fingerprint(dataset),
        "params": params_hash(params),
        "feedback_total": feedback_since(None) if use_feedback else 0,
    }
    last = read_state()
    reasons: list[str] = []
    feedback = 0
    if last is None:
        reasons.append("no model has been trained by this pipeline yet")
    else:
        if last.get("dataset") != dataset:
            reasons.append(f"dataset changed: {last.get('dataset')} -> {dataset}")
        elif last.get("data") != current["data"]:
            reasons.append(f"data changed: {last.get('data')} -> {current['data']}")
        if last.get("params") != current["params"]:
            reasons.append(f"training settings changed: {last.get('params')} -> {current['params']}")
        if use_feedback:
            feedback = feedback_since(last.get("trained_at"))
            if feedback:
                reasons.append(f"{feedback} feedback row(s) stored since {last.get('trained_at')}")
    result = {
        **current,
        "new": bool(reasons),
        "reasons": reasons,
        "feedback_rows": feedback,
        "last": last,
        "state_file": str(state_path()),
    }
    if reasons:
        logger.info("retraining: %s", "; ".join(reasons))
    else:
        logger.info(
            "nothing new since %s (data %s, settings %s)", last.get("trained_at"), current["data"], current["params"]
        )
    return result


@task(name="record-training", cache_policy=NO_CACHE)
def record_training(check: dict[str, Any], outcome: dict[str, Any], started_at: str) -> str:
    """Remember what this training saw; `started_at` bounds the feedback it could have used."""
    state = {
        "dataset": check["dataset"],
        "data": check["data"],
        "params": check["params"],
        "trained_at": started_at,
        "recorded_at": datetime.now(timezone.utc).isoformat(),
        **outcome,
    }
    path = write_state(state)
    run_logger().info("state written to %s", path)
    return str(path)
