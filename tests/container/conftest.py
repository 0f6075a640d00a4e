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


# Short rollout stages, so that a rollout takes a minute or two: what `make up`'s watcher reads
# (CAPTIONING_PARAMS_OVERLAY) in these tests.
ROLLOUT_SETTINGS = {
    "release": {
        "poll_seconds": 2,
        "scrape_seconds": 1,
        "prometheus_timeout_seconds": 20,
        "keep_previous_seconds": 600,
        "smoke": {"photos": 8, "max_drop": 0.5, "max_latency_seconds": 30},
        "shadow": {"share": 50, "min_requests": 5, "window_seconds": 10},
        "canary": {"steps": [50, 100], "window_seconds": 10, "min_requests": 5, "max_latency_ratio": 4.0},
    }
}


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict[str, str]:
    """Environment variables that point every step at this session's own folders."""
    import yaml

    home = tmp_path_factory.mktemp("container-workspace")
    overlay = home / "rollout.yaml"
    overlay.write_text(yaml.safe_dump(ROLLOUT_SETTINGS), encoding="utf-8")
    return workspace_env(home, STACK_NAME, OMP_NUM_THREADS="1", CAPTIONING_PARAMS_OVERLAY=str(overlay))


@pytest.fixture(scope="session")
def packages(tmp_path_factory) -> list[Path]:
    """Two different tiny models: what versions 1 and 2 of the registry hold (the second trained
    longer, so that it passes a rollout's comparison with the first)."""
    from harness.trained import train_tiny_model

    return [
        train_tiny_model(tmp_path_factory.mktemp("first"), decoder="attention", epochs=2),
        train_tiny_model(tmp_path_factory.mktemp("second"), decoder="attention", epochs=3),
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
    """Register `package` in the workspace's registry (no gates: promoted), with its smoke photos
    (synthetic validation scenes) and its captions of them recorded first, as registration does."""
    from captioning.registry.versions import register as register_version
    from captioning.release.smoke import record_smoke
    from harness.settings import test_settings
    from harness.trained import synthetic_data, tiny_params

    settings = test_settings(**tiny_params(), **ROLLOUT_SETTINGS)
    with synthetic_data():
        record_smoke(package, settings)
    return register_version(
        package,
        {"CIDEr": 10.0},
        "synthetic[test]",
        settings,
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
