"""What the release watcher (`python -m flows.release --watch`) shows Prometheus, on 127.0.0.1 at
the stack's port + 10 (captioning/release/stack.py), scraped by the stack's Prometheus as
`component="release"`.

    metrics = WatcherMetrics()
    metrics.serve(port)                    # /metrics on a thread of its own
    metrics.read_refusals(tracking, name)  # each poll: the refused versions, from the registry
    metrics.release_started(); metrics.release_finished(completed=True)

| series | what it is |
| --- | --- |
| `captioning_rollout_refused_timestamp_seconds{version, stage}` | when a rollout refused (rolled back) the version, at which stage (its `rollout_refused_at` and `rollout_stage` tags): one series per refused version of the model |
| `captioning_rollout_refused_versions` | how many versions of the model a rollout refused |
| `captioning_release_watcher_last_poll_timestamp_seconds` | when the watcher last read the registry |
| `captioning_release_watcher_registry_errors_total` | polls whose registry read failed (the refusals shown are the last ones read) |
| `captioning_release_watcher_releases_started_total` | releases the watcher started |
| `captioning_release_watcher_releases_total{outcome}` | releases it saw end, `completed` or `failed` (rolled back, or broken) |

The refusals are read from the registry at each poll rather than counted as they happen, so they
survive a restart of the watcher and include the rollouts run by hand (`python -m flows.release`);
the alert `CaptioningRolloutRefused` (deploy/prometheus/alerts.yml) fires on their times.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from captioning.registry.refusals import Refusal, refused_versions

REFUSED = "captioning_rollout_refused_timestamp_seconds"


class RefusalCollector(Collector):
    """The refused versions as last read: replaced as a whole, so a version whose tag was removed
    by hand leaves no series behind."""

    def __init__(self):
        self._lock = threading.Lock()
        self._refusals: list[Refusal] = []

    def replace(self, refusals: list[Refusal]) -> None:
        with self._lock:
            self._refusals = list(refusals)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            refusals = list(self._refusals)
        times = GaugeMetricFamily(
            REFUSED, "When a rollout refused (rolled back) the model version, by stage.", labels=["version", "stage"]
        )
        for refusal in refusals:
            if refusal.refused_at is not None:  # a time tagged by hand that is not one: no series
                times.add_metric([refusal.version, refusal.stage], refusal.refused_at)
        yield times
        count = GaugeMetricFamily("captioning_rollout_refused_versions", "Versions of the model a rollout refused.")
        count.add_metric([], len(refusals))
        yield count


class WatcherMetrics:
    """The watcher's metrics in a registry of their own (nothing of the process' default registry)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.refusals = RefusalCollector()
        self.registry.register(self.refusals)
        prefix = "captioning_release_watcher"
        self.last_poll = Gauge(
            f"{prefix}_last_poll_timestamp_seconds", "When the watcher last read the registry.", registry=self.registry
        )
        self.registry_errors = Counter(
            f"{prefix}_registry_errors", "Polls whose registry read failed.", registry=self.registry
        )
        self.started = Counter(f"{prefix}_releases_started", "Releases the watcher started.", registry=self.registry)
        self.finished = Counter(
            f"{prefix}_releases", "Releases the watcher saw end, by outcome.", ["outcome"], registry=self.registry
        )
        for outcome in ("completed", "failed"):  # both series exist, at 0, before any release
            self.finished.labels(outcome)
        self._server = None
        self._thread = None

    def read_refusals(self, tracking: str | None, name: str) -> list[Refusal]:
        """Read the refused versions of `name` from the registry; on a failure keep the last ones
        read, count the error and raise it (the watcher reports it and tries again next poll)."""
        try:
            refusals = refused_versions(tracking, name)
        except Exception:
            self.registry_errors.inc()
            raise
        self.refusals.replace(refusals)
        self.last_poll.set(time.time())
        return refusals

    def release_started(self) -> None:
        self.started.inc()

    def release_finished(self, completed: bool) -> None:
        self.finished.labels("completed" if completed else "failed").inc()

    def page(self) -> str:
        """The metrics as Prometheus reads them."""
        return generate_latest(self.registry).decode("utf-8")

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Answer /metrics on address:port from a thread (OSError when the port is taken)."""
        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = self._thread = None
