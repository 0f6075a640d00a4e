"""The service's own Prometheus series, and the middleware that counts and times the API's routes.

The names are those the alert rules and the dashboard query (deploy/prometheus, deploy/grafana).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class Metrics:
    requests: Any
    latency: Any
    errors: Any
    caption_words: Any
    batch_size: Any
    inference: Any
    model_info: Any
    feedback: Any
    reloads: Any


def create_metrics(kinds: Any) -> Metrics:
    """The series, made by `kinds`: anything with prometheus_client's Counter, Histogram and Gauge
    (`bentoml.metrics` in a server)."""
    return Metrics(
        requests=kinds.Counter(
            name="captioning_requests_total",
            documentation="Caption API requests by route and HTTP status",
            labelnames=["route", "status"],
        ),
        latency=kinds.Histogram(
            name="captioning_request_latency_seconds",
            documentation="Caption API request latency by route",
            labelnames=["route"],
            buckets=LATENCY_BUCKETS,
        ),
        errors=kinds.Counter(
            name="captioning_errors_total",
            documentation="Rejected or failed requests by kind",
            labelnames=["kind"],
        ),
        caption_words=kinds.Histogram(
            name="captioning_caption_length_words",
            documentation="Words in the returned captions",
            buckets=(1, 2, 4, 6, 8, 10, 12, 15, 20, 30, 60),
        ),
        batch_size=kinds.Histogram(
            name="captioning_model_batch_size",
            documentation="Images per model call (after adaptive batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
        ),
        inference=kinds.Histogram(
            name="captioning_model_inference_seconds",
            documentation="Time of one model call (a whole batch)",
            buckets=LATENCY_BUCKETS,
        ),
        model_info=kinds.Gauge(
            name="captioning_model_info",
            documentation="The model version served (1 = current)",
            labelnames=["version", "source"],
            multiprocess_mode="livemax",
        ),
        feedback=kinds.Counter(
            name="captioning_feedback_total",
            documentation="Corrected captions stored",
        ),
        reloads=kinds.Counter(
            name="captioning_model_reloads_total",
            documentation="Model reloads by outcome",
            labelnames=["outcome"],
        ),
    )


_CREATED: list[Metrics] = []
_CREATING = threading.Lock()


def metrics() -> Metrics:
    """The process's series, created once on first use.

    They go through `bentoml.metrics` (prometheus_client under BentoML's multi-process set-up),
    so /metrics shows them next to BentoML's own.
    """
    with _CREATING:  # the model service's worker threads and the event loop may ask at once
        if not _CREATED:
            import bentoml

            _CREATED.append(create_metrics(bentoml.metrics))
        return _CREATED[0]


class RequestMetrics:
    """Counts every request to a route of the app by route and status, and times it.

    The route label is the route's path template ("/web/{name}"), so made-up paths cannot grow
    the series; requests that match no route, and the `skip_paths` (probes), are not counted.
    A route that raised counts as 500, the answer the app's error handler gives.
    """

    def __init__(self, app, metrics: Callable[[], Metrics] = metrics, skip_paths: Collection[str] = ()):
        self.app, self.metrics, self.skip_paths = app, metrics, frozenset(skip_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.skip_paths:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = getattr(scope.get("route"), "path", None)  # set by the router once it matched
            if route is not None:
                series = self.metrics()
                series.requests.labels(route=route, status=str(status)).inc()
                series.latency.labels(route=route).observe(time.perf_counter() - started)
