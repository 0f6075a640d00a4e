"""Settings shared by every test: isolated data/artifact folders, no telemetry, few threads."""

from __future__ import annotations

import os

import pytest

from captioning.config import disable_telemetry

disable_telemetry()
# Two cores: keep torch from oversubscribing them when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path, monkeypatch):
    """Every test writes its data, artifacts and reports under its own tmp folder."""
    monkeypatch.setenv("CAPTIONING_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPTIONING_ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("CAPTIONING_REPORTS_DIR", str(tmp_path / "reports"))
