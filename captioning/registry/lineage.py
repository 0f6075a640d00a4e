"""What a model is made from, as short fingerprints.

One canonical hash (`canonical_hash`: SHA-256 of sorted-key JSON) serves every settings hash:
`params_hash` covers all settings, `training_hash` only the sections that can change a trained
model. Beside them: the checked-out git commit, the DVC hash of data/, a dataset's fingerprint
(its DVC hash, else a listing of its files), the feedback store's fingerprint, and
`collect_lineage`, the tags a registered model version carries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from captioning.config import PROJECT_ROOT

if TYPE_CHECKING:
    from captioning.settings import Settings

logger = logging.getLogger(__name__)

# Sections that cannot change a trained model: editing them does not call for a retrain.
NEUTRAL_SECTIONS = ("register", "retrain", "tracking", "evaluate", "release")


def canonical_hash(data: Any) -> str:
    """16 hex digits of the SHA-256 of `data` as JSON with sorted keys (non-JSON values as text)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def settings_dict(settings: "Settings | Mapping[str, Any]") -> dict[str, Any]:
    """The settings as plain data, profiles left out (they are named overrides, not settings)."""
    data = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
    return {key: value for key, value in data.items() if key != "profiles"}


def params_hash(settings: "Settings | Mapping[str, Any]", exclude: Iterable[str] = ()) -> str:
    """Hash of the settings, without the sections named in `exclude`."""
    left_out = set(exclude)
    return canonical_hash({key: value for key, value in settings_dict(settings).items() if key not in left_out})


def training_hash(settings: "Settings | Mapping[str, Any]") -> str:
    """Hash of the settings that shape a model (gates, schedules, tracking and releases left out)."""
    return params_hash(settings, NEUTRAL_SECTIONS)


# What records data, pipeline state or settings rather than code: a change to them leaves the code
# clean. The data is recorded by its DVC hash, the settings by their values and hash.
NOT_CODE = ("*.dvc", "dvc.lock", ".dvc", ".gitignore", "reports", "params*.yaml")


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The checked-out commit (with "-dirty" when code changed since), or None outside git.

    Only code counts: `dvc add` staging data.dvc, `dvc repro` writing dvc.lock or `dvc exp run`
    setting params.yaml leave the commit clean (see NOT_CODE)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
            + [f":(exclude,glob)**/{pattern}" for pattern in NOT_CODE]
            + [f":(exclude,glob){pattern}" for pattern in NOT_CODE],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def data_version(root: Path = PROJECT_ROOT) -> str | None:
    """The DVC hash of the data folder when the project tracks it, else None."""
    try:
        from captioning.data.versioning import data_hash
    except ImportError:
        return None
    try:
        return data_hash(root)
    except Exception as error:  # lineage is informative; its absence must not stop training
        logger.warning("no DVC data hash: %s", error)
        return None


def listing_hash(folder: Path) -> str:
    """Names, sizes and modification times of every file under `folder` (stat only: fast)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "files:" + digest.hexdigest()[:32]


def data_fingerprint(dataset: str, data_root: Path | None = None, project_root: Path = PROJECT_ROOT) -> str:
    """The DVC hash of data/ when the project tracks it and `data_root` is that folder, else a
    listing hash of the dataset's folder (`data_root`, default the configured data folder)."""
    from captioning.config import data_dir
    from captioning.data.versioning import data_hash

    data_root = Path(data_root or data_dir()).resolve()
    if data_root == (project_root / "data").resolve():
        tracked = data_hash(project_root)
        if tracked:
            return f"dvc:{tracked}"
    folder = data_root / dataset
    return listing_hash(folder) if folder.is_dir() else "missing"


def feedback_since(timestamp: str | None, url: str | None = None, review=None) -> int:
    """Corrections admitted into training (by `review`, default params.yaml's rule) after
    `timestamp` (ISO 8601; all of them when None) in the store at `url` (default: the service's
    store). A correction stored earlier counts when its agreement or approval came later."""
    from captioning.data.feedback import FeedbackStore, default_url

    url = url or default_url()
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        return 0  # the service never stored any (and opening the store would create the file)
    since = datetime.fromisoformat(timestamp) if timestamp else None
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    admitted = FeedbackStore(url).admitted(review)
    return sum(1 for _, moment in admitted if since is None or moment > since)


def feedback_fingerprint(root: Path | None = None, url: str | None = None, review=None) -> str:
    """Changes whenever a correction is admitted or a stored file changes (keys the validation cache)."""
    from captioning.data.feedback import default_root

    root = root or default_root()
    listing = listing_hash(root) if root.is_dir() else "missing"
    return f"feedback:{feedback_since(None, url, review)}:{listing}"


def collect_lineage(settings: "Settings | Mapping[str, Any]") -> dict[str, str]:
    """git commit, DVC data hash and settings hash of the current checkout."""
    lineage = {"params_hash": params_hash(settings), "git_commit": git_commit() or "unknown"}
    try:
        from captioning.data.versioning import data_hash

        lineage["data_hash"] = data_hash() or "untracked (no data.dvc)"
    except Exception as error:  # no DVC tracking yet, or no data: say so rather than fail
        lineage["data_hash"] = f"unknown ({type(error).__name__}: {error})"
    return lineage
