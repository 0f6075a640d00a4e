"""The service's own Prometheus series, and the middleware that counts and times the API's routes.

The names are those the alert rules, the dashboard and the rollout analysis query
(deploy/prometheus, deploy/grafana, captioning/release/analysis.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
AGREEMENT_BUCKETS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 100)  # percent
CAPTION_OUTCOMES = ("ok", "error", "empty")


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
    captions: Any
    shadow_requests: Any
    shadow_agreement: Any
    readiness_checks: Any


def create_metrics(kinds: Any) -> Metrics:
    """The series, made by `kinds`: anything with prometheus_client's Counter, Histogram and Gauge
    (`bentoml.metrics` in a server)."""
    series = Metrics(
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
        readiness_checks=kinds.Counter(
            name="captioning_readiness_checks_total",
            documentation="Readiness questions the API asked the model service (in the background, not per probe)",
        ),
        **_rollout_series(kinds),
    )
    for outcome in CAPTION_OUTCOMES:  # at 0 from the start: a rate sees a new server's first failures
        series.captions.labels(outcome=outcome)
    return series


def _rollout_series(kinds: Any) -> dict[str, Any]:
    """The series a rollout's analysis reads: the model service's caption outcomes, the API's shadow copies."""
    return {
        # One per image the model service captioned. The model service answers 200 with an error
        # inside a failed image's result, so HTTP error rates do not see a model that fails
        # every caption: this counter does.
        "captions": kinds.Counter(
            name="captioning_model_captions_total",
            documentation="Images captioned by the model service, by outcome (ok, error, empty caption)",
            labelnames=["outcome"],
        ),
        "shadow_requests": kinds.Counter(
            name="captioning_shadow_requests_total",
            documentation="Copies of caption requests sent to a shadow candidate, by its version and outcome "
            "(ok, error, dropped: too many copies in flight)",
            labelnames=["candidate", "outcome"],
        ),
        "shadow_agreement": kinds.Histogram(
            name="captioning_shadow_agreement",
            documentation="Agreement of a shadow candidate's captions with the served ones, in percent "
            "(smoothed sentence BLEU-4 against the served caption)",
            labelnames=["candidate"],
            buckets=AGREEMENT_BUCKETS,
        ),
    }


def caption_outcome(result: dict) -> str:
    """What the model service made of one image: "error", "empty" (no words) or "ok"."""
    if "error" in result:
        return "error"
    return "ok" if str(result.get("caption") or "").strip() else "empty"


def count_captions(counter: Any, results: list) -> None:
    """Count each image's outcome in `counter` (Metrics.captions)."""
    for result in results:
        counter.labels(outcome=caption_outcome(result if isinstance(result, dict) else {})).inc()


@dataclass(frozen=True)
class DriftMetrics:
    """The model service's drift gauges (captioning/serving/drift.py sets them)."""

    score: Any
    threshold: Any
    p_value: Any


def create_drift_metrics(kinds: Any) -> DriftMetrics:
    """The drift gauges, made by `kinds` (as for `create_metrics`). Several workers: the highest
    score and threshold, the lowest p-value (the most drifted worker's figures)."""
    return DriftMetrics(
        score=kinds.Gauge(
            name="captioning_drift_score",
            documentation="Drift of the last live images' encoder features from the training images' "
            "(MMD squared; NaN until a window is full or without the package's drift.npz)",
            multiprocess_mode="livemax",
        ),
        threshold=kinds.Gauge(
            name="captioning_drift_threshold",
            documentation="Drift score above which the live images differ from the training images "
            "(p below the package's alpha, for its window of images)",
            multiprocess_mode="livemax",
        ),
        p_value=kinds.Gauge(
            name="captioning_drift_p_value",
            documentation="Permutation p-value of the drift score against windows of training images",
            multiprocess_mode="livemin",
        ),
    )


_CREATED: list[Metrics] = []
_DRIFT: list[DriftMetrics] = []
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


def drift_metrics() -> DriftMetrics:
    """The drift gauges, created on first use, which only the model service makes: a gauge exists
    from its creation on, and the API's process would export it at 0 next to the real figures."""
    with _CREATING:
        if not _DRIFT:
            import bentoml

            _DRIFT.append(create_drift_metrics(bentoml.metrics))
        return _DRIFT[0]


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
