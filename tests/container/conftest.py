"""A workspace of its own for the container tests: an MLflow registry (sqlite), artifacts, bentos,
a stack folder, and images under localhost/captioning-test, so nothing of a developer's real
stack or images is touched. Two tiny models trained on the synthetic data are its versions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from captioning.config import PROJECT_ROOT, mirror_dir
from harness.workspace import workspace_env

IMAGE_REPO = "localhost/captioning-test"
STACK_NAME = "captioning-test"


def run_cli(*args: str, env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess:
    captioning = Path(sys.executable).parent / "captioning"
    return subprocess.run(
        [str(captioning), *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict[str, str]:
    """Environment variables that point every step at this session's own folders."""
    home = tmp_path_factory.mktemp("container-workspace")
    return workspace_env(home, STACK_NAME, OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def packages(tmp_path_factory) -> list[Path]:
    """Two different tiny models: what versions 1 and 2 of the registry hold."""
    from harness.trained import train_tiny_model

    return [
        train_tiny_model(tmp_path_factory.mktemp("first"), decoder="attention", epochs=2),
        train_tiny_model(tmp_path_factory.mktemp("second"), decoder="show_tell", epochs=2),
    ]


@pytest.fixture(scope="session")
def photo() -> bytes:
    """A real photo from the Flickr8k mirror when there is one, else a synthetic JPEG."""
    mirror = mirror_dir()
    images = sorted((mirror / "flickr8k" / "images").glob("*.jpg"))[:1] if mirror else []
    if images:
        return images[0].read_bytes()
    from harness.serving import synthetic_jpeg

    return synthetic_jpeg(seed=5)


def register(package: Path, env: dict[str, str], gates: dict | None = None):
    """Register `package` in the workspace's registry (no gates: promoted)."""
    from captioning.config import PARAMS_FILE
    from captioning.registry.versions import register as register_version
    from captioning.settings import load_settings

    return register_version(
        package,
        {"CIDEr": 10.0},
        "synthetic[test]",
        load_settings(PARAMS_FILE),
        gates=gates or {},
        tracking=env["MLFLOW_TRACKING_URI"],
        lineage={},
    )


@pytest.fixture(scope="session")
def first_release(workspace, packages) -> str:
    """Version 1 registered and released with `captioning release`; returns the image's tag."""
    registration = register(packages[0], workspace)
    assert registration.promoted and registration.version == "1", registration.message
    result = run_cli("release", env=workspace)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]
