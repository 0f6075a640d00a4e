"""Metrics on a registry of each test's own, so a test can read exactly what it counted."""

from __future__ import annotations

import prometheus_client
import pytest

from captioning.serving.metrics import DriftMetrics, Metrics, create_drift_metrics, create_metrics


class OwnRegistry:
    """prometheus_client's Counter, Histogram and Gauge, registered on a fresh registry."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry()
        self.metrics: Metrics = create_metrics(self)
        self.drift: DriftMetrics = create_drift_metrics(self)

    def Counter(self, **kwargs):
        return prometheus_client.Counter(registry=self.registry, **kwargs)

    def Histogram(self, **kwargs):
        return prometheus_client.Histogram(registry=self.registry, **kwargs)

    def Gauge(self, **kwargs):
        return prometheus_client.Gauge(registry=self.registry, **kwargs)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def text(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()


@pytest.fixture
def series() -> OwnRegistry:
    return OwnRegistry()
