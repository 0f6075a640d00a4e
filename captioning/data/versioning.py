"""Version acquired data with DVC: `data.dvc` records the whole top-level `data/` folder.

Called after `acquire` by the CLI or a flow, never from inside a `dvc repro` stage
(the stage already holds the repository lock that `dvc add` needs).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from captioning.config import PROJECT_ROOT

log = logging.getLogger(__name__)


class VersioningError(RuntimeError):
    """`dvc add` failed; the message carries DVC's own last words."""


def is_dvc_repo(repo_root: str | Path = PROJECT_ROOT) -> bool:
    return (Path(repo_root) / ".dvc").is_dir()


def _dvc_command() -> list[str]:
    """The dvc of this environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return [str(beside)] if beside.exists() else ["dvc"]


def track_with_dvc(path: str | Path, repo_root: str | Path = PROJECT_ROOT) -> Path | None:
    """`dvc add` the top-level folder of `path` inside `repo_root`; return its .dvc file.

    Returns None (and logs why) when `repo_root` is not a DVC repository or `path`
    lies outside it (e.g. $CAPTIONING_DATA_DIR points elsewhere).
    """
    repo_root = Path(repo_root).resolve()
    path = Path(path).resolve()
    if not is_dvc_repo(repo_root):
        log.info("%s is not a DVC repository: %s is not versioned", repo_root, path)
        return None
    try:
        top = path.relative_to(repo_root).parts[0]
    except (ValueError, IndexError):
        log.info("%s is outside %s: not versioned", path, repo_root)
        return None
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    result = subprocess.run(
        [*_dvc_command(), "add", top], cwd=repo_root, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise VersioningError(f"dvc add {top} failed in {repo_root}: {lines[-1]}")
    log.info("DVC now tracks %s (%s.dvc)", repo_root / top, top)
    return repo_root / f"{top}.dvc"


def data_hash(repo_root: str | Path = PROJECT_ROOT, name: str = "data") -> str | None:
    """The md5 that `NAME.dvc` records (as written, e.g. `...e4.dir`), or None if untracked."""
    dvc_file = Path(repo_root) / f"{name}.dvc"
    if not dvc_file.is_file():
        return None
    content = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    outs = content.get("outs") or [{}]
    return outs[0].get("md5")
