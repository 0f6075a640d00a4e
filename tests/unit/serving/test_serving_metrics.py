"""One middleware counts and times every route of the API; the series are those the alert rules
and the dashboard query."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from captioning.config import PROJECT_ROOT
from captioning.release.watcher_metrics import WatcherMetrics
from captioning.serving.errors import InputError, add_error_handlers
from captioning.serving.metrics import RequestMetrics


@pytest.fixture
def client(series):
    app = FastAPI()
    add_error_handlers(app, lambda: series.metrics)
    app.add_middleware(RequestMetrics, metrics=lambda: series.metrics, skip_paths={"/healthz"})

    @app.post("/caption")
    async def caption() -> dict:
        return {"caption": "a dog"}

    @app.get("/web/{name}")
    async def asset(name: str) -> dict:
        if name != "app.js":
            raise InputError(404, "not_found", f"no asset {name!r}")
        return {}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/bug")
    async def bug() -> dict:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_each_request_is_counted_by_route_and_status(client, series):
    for _ in range(3):
        assert client.post("/caption").status_code == 200
    assert client.get("/caption").status_code == 405
    assert series.value("captioning_requests_total", route="/caption", status="200") == 3
    assert series.value("captioning_requests_total", route="/caption", status="405") == 1
    assert series.value("captioning_request_latency_seconds_count", route="/caption") == 4
    assert series.value("captioning_request_latency_seconds_sum", route="/caption") > 0


def test_the_route_label_is_the_template_not_the_path(client, series):
    client.get("/web/app.js")
    client.get("/web/secret.txt")
    client.get("/web/other.txt")
    assert series.value("captioning_requests_total", route="/web/{name}", status="200") == 1
    assert series.value("captioning_requests_total", route="/web/{name}", status="404") == 2
    assert "secret.txt" not in series.text()


def test_probes_and_unknown_paths_are_not_counted(client, series):
    assert client.get("/healthz").status_code == 200
    assert client.get("/no/such/route").status_code == 404
    assert "captioning_requests_total{" not in series.text()
    assert series.value("captioning_errors_total", kind="http") == 1  # the 404 is still an error


def test_a_route_that_raised_counts_as_500(client, series):
    assert client.get("/bug").status_code == 500
    assert series.value("captioning_requests_total", route="/bug", status="500") == 1
    assert series.value("captioning_request_latency_seconds_count", route="/bug") == 1


def test_every_series_the_rules_and_the_dashboard_use_exists(series):
    used = set()
    for path in [
        *(PROJECT_ROOT / "deploy" / "prometheus").glob("*.yml"),
        PROJECT_ROOT / "deploy/grafana/dashboard.json",
    ]:
        used |= set(re.findall(r"\bcaptioning_[a-z_]+", path.read_text(encoding="utf-8")))
    assert {"captioning_requests_total", "captioning_request_latency_seconds_bucket"} <= used
    series.metrics.model_info.labels(version="1", source="models:/captioner@champion").set(1)
    series.metrics.errors.labels(kind="busy").inc()
    series.metrics.requests.labels(route="/caption", status="200").inc()
    series.metrics.latency.labels(route="/caption").observe(0.1)
    exposed = set(re.findall(r"^(captioning_[a-z_]+)", series.text(), flags=re.MULTILINE))
    # The release watcher's series (captioning/release/watcher_metrics.py) come from another target.
    watcher = set(re.findall(r"^# TYPE (captioning_[a-z_]+)", WatcherMetrics().page(), flags=re.MULTILINE))
    assert used - watcher <= exposed, used - watcher - exposed
