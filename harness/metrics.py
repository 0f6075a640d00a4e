"""The service's Prometheus series on a registry of their own, so a test can read exactly what it
counted, or serve them as a model server's /metrics page does."""

from __future__ import annotations

import prometheus_client

from captioning.serving.metrics import DriftMetrics, Metrics, create_drift_metrics, create_metrics


class Kinds:
    """prometheus_client's Counter, Histogram and Gauge, registered on `registry`: what
    `create_metrics` and `create_drift_metrics` make their series with."""

    def __init__(self, registry: prometheus_client.CollectorRegistry):
        self.registry = registry

    def Counter(self, **kwargs):
        return prometheus_client.Counter(registry=self.registry, **kwargs)

    def Histogram(self, **kwargs):
        return prometheus_client.Histogram(registry=self.registry, **kwargs)

    def Gauge(self, **kwargs):
        return prometheus_client.Gauge(registry=self.registry, **kwargs)


class OwnRegistry(Kinds):
    """Every series of the service (`metrics`, and the model service's `drift`) on a fresh registry."""

    def __init__(self):
        super().__init__(prometheus_client.CollectorRegistry())
        self.metrics: Metrics = create_metrics(self)
        self.drift: DriftMetrics = create_drift_metrics(self)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def text(self) -> str:
        """The /metrics page of these series (Prometheus' text format)."""
        return prometheus_client.generate_latest(self.registry).decode()
