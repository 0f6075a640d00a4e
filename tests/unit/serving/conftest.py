"""Metrics on a registry of each test's own, so a test can read exactly what it counted."""

from __future__ import annotations

import pytest

from harness.metrics import OwnRegistry


@pytest.fixture
def series() -> OwnRegistry:
    return OwnRegistry()
