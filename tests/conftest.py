"""Settings shared by every test: isolated data/artifact folders, no telemetry, few threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captioning.config import disable_telemetry

disable_telemetry()
# Two cores: keep torch from oversubscribing them when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

TESTS = Path(__file__).resolve().parent
# The markers each folder's tests carry, so `-m` selects by folder (`make test-fast` leaves these out).
# A test marks itself only where it differs from its folder (a slow integration test).
FOLDER_MARKERS = {
    "integration": ("integration",),
    "browser": ("browser",),
    "container": ("container", "slow"),  # every test builds images
    "robustness": ("robustness",),
    "scaleout": ("scaleout",),
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(item.path).resolve()
        if not path.is_relative_to(TESTS):
            continue
        for marker in FOLDER_MARKERS.get(path.relative_to(TESTS).parts[0], ()):
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Every test writes its data, artifacts and reports under its own tmp folder."""
    monkeypatch.setenv("CAPTIONING_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPTIONING_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("CAPTIONING_REPORTS_DIR", str(tmp_path / "reports"))
