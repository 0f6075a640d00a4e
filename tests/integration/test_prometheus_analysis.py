"""The rollout analysis against a real Prometheus (Debian's, started as the local stack starts it)
scraping small real metric servers: each exposes BentoML's request metrics, the count of
captions by outcome and the drift gauges, as a model server of one version does, and Prometheus
labels them through the stack's file_sd targets. The retrain decision's live drift figures are
read from the same Prometheus."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from captioning.release import prometheus as stack_prometheus
from captioning.release.analysis import (
    FAILED,
    INCONCLUSIVE,
    PASSED,
    Limits,
    Prometheus,
    analyse,
    duration,
    latency_ratio_query,
    measure,
    wait_for_verdict,
)
from captioning.release.live_drift import read_live_drift
from captioning.serving.drift import LiveDrift
from captioning.serving.metrics import create_drift_metrics
from harness.metrics import Kinds
from harness.serving import free_port

LIMITS = Limits(window_seconds=60, min_requests=20, max_error_rate=0.02, max_latency_ratio=2.0, max_p95_seconds=5.0)
LABELS = ["endpoint", "service_name", "service_version", "http_response_code"]
DRIFT = {"1": (0.0011, 0.0042, 0.37), "2": (0.0215, 0.0042, 0.001), "3": (math.nan, 0.0042, math.nan)}


class Replica:
    """A metrics endpoint with the model server's request metrics (names and labels as BentoML's),
    its count of captions by outcome and, for a model server, its drift gauges (as
    captioning.serving.metrics names them)."""

    def __init__(self, model: bool = True):
        self.registry = CollectorRegistry()
        self.drift = create_drift_metrics(Kinds(self.registry)) if model else None
        self.requests = Counter("bentoml_service_request_total", "requests", LABELS, registry=self.registry)
        self.latency = Histogram("bentoml_service_request_duration_seconds", "duration", LABELS, registry=self.registry)
        self.captions = Counter("captioning_model_captions_total", "captions", ["outcome"], registry=self.registry)
        for code in ("200", "500"):  # the series exist, at 0, before any request
            self.requests.labels("/caption", "caption_model", "", code)
            self.latency.labels("/caption", "caption_model", "", code)
        for outcome in ("ok", "error", "empty"):
            self.captions.labels(outcome)
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def answer(self, count: int, seconds: float, failed: int = 0, failed_captions: int = 0) -> None:
        """`count` requests of one image, `failed` of them answered 500, and of the others (answered
        200) `failed_captions` with an error inside the result."""
        for n in range(count):
            code = "500" if n < failed else "200"
            self.requests.labels("/caption", "caption_model", "", code).inc()
            self.latency.labels("/caption", "caption_model", "", code).observe(seconds)
            if code == "200":
                self.captions.labels("error" if n - failed < failed_captions else "ok").inc()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """Prometheus scraping: model servers of versions 1 (healthy), 2 (10 % errors), 3 (three times
    slower), 4 (few requests), 5 (answers 200 with every caption failed), and an API replica of
    version 1 that fails (not a model server). Their live photos: version 1's look like the
    training images, version 2's drifted, version 3 has not seen a window of them yet, versions 4
    and 5 serve a package without a drift reference. The folder is a stack's (`<stack>/prometheus`)."""
    folder: Path = tmp_path_factory.mktemp("stack") / "prometheus"
    replicas = {name: Replica(model=name != "api") for name in ("1", "2", "3", "4", "5", "api")}
    for name, (score, threshold, p_value) in DRIFT.items():
        drift = replicas[name].drift
        drift.score.set(score), drift.threshold.set(threshold), drift.p_value.set(p_value)
    for name in ("4", "5"):
        LiveDrift(None, replicas[name].drift)  # what the model service shows without drift.npz
    for slot, (name, replica) in enumerate(replicas.items()):
        role, version = ("api", "1") if name == "api" else ("model", name)
        stack_prometheus.set_target(folder, role, slot, f"127.0.0.1:{replica.port}", version)
    port = free_port()
    try:
        url = stack_prometheus.start(folder, port, scrape_seconds=1.0)
        client = Prometheus(url)
        _wait(lambda: len(client.query('up{job="captioning"} == 1')) == 6, "every target scraped")
        time.sleep(2.5)  # a few scrapes at 0 before the requests
        replicas["1"].answer(100, 0.2)
        replicas["2"].answer(100, 0.2, failed=10)
        replicas["3"].answer(100, 0.6)
        replicas["4"].answer(3, 0.2)
        replicas["5"].answer(100, 0.2, failed_captions=100)
        replicas["api"].answer(50, 0.2, failed=50)
        _wait(lambda: (client.value('sum(bentoml_service_request_total{version="3"})') or 0) >= 100, "requests seen")
        time.sleep(2.5)  # a few scrapes after them
        yield {"folder": folder, "url": url, "port": port, "client": client, "replicas": replicas}
    finally:
        stack_prometheus.stop(folder)
        for replica in replicas.values():
            replica.stop()


def _wait(condition, what: str, seconds: float = 40) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # Prometheus still starting
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_targets_carry_role_slot_and_version(scraped):
    up = scraped["client"].query("up")
    labels = sorted((s["metric"]["role"], s["metric"]["component"], s["metric"]["version"]) for s in up)
    assert labels == [("api", "api", "1")] + [("model", "model", v) for v in "12345"]
    assert {s["metric"]["slot"] for s in up} == {"0", "1", "2", "3", "4", "5"}


def test_the_queries_give_each_versions_figures(scraped):
    client = scraped["client"]
    healthy, failing, slow, few = (measure(client, v, LIMITS.window_seconds) for v in "1234")
    # increase() extrapolates to the window's edges: at least the requests sent, not far above.
    assert 100 <= healthy.requests < 140 and 3 <= few.requests < 5
    # The API replica of version 1 failed all its requests: not a model server, not counted.
    assert healthy.error_rate == 0.0
    assert failing.error_rate == pytest.approx(0.10, rel=1e-6)
    # p95 interpolated within the bucket holding the observations: (0.1, 0.25] and (0.5, 0.75].
    assert healthy.p95_seconds == pytest.approx(0.1 + 0.15 * 0.95, rel=1e-6)
    assert slow.p95_seconds == pytest.approx(0.5 + 0.25 * 0.95, rel=1e-6)
    # Failed captions inside 200 answers: no HTTP error, every caption a failure.
    broken = measure(client, "5", LIMITS.window_seconds)
    assert broken.error_rate == 0.0 and broken.caption_failure_rate == pytest.approx(1.0)
    assert healthy.caption_failure_rate == 0.0 and slow.caption_failure_rate == 0.0
    # Version 2's failed requests counted no caption: its captions all came out.
    assert failing.caption_failure_rate == 0.0


def test_the_verdicts_of_the_analysis(scraped):
    client = scraped["client"]
    failing = analyse(client, "2", "1", LIMITS, "canary 10%")
    assert failing.outcome == FAILED and failing.check == "error rate"
    assert failing.figure == pytest.approx(0.10) and failing.threshold == 0.02
    assert failing.reason.startswith("canary 10%: error rate of version 2 10.0% > 2.0% allowed")
    slow = analyse(client, "3", "1", LIMITS, "canary 50%")
    assert slow.outcome == FAILED and slow.check == "p95 latency ratio"
    assert slow.figure == pytest.approx(0.7375 / 0.2425, rel=1e-6)
    assert analyse(client, "4", "1", LIMITS, "canary 10%").outcome == INCONCLUSIVE
    broken = analyse(client, "5", "1", LIMITS, "canary 10%")
    assert broken.outcome == FAILED and broken.check == "caption failure rate"
    assert broken.figure == pytest.approx(1.0) and broken.threshold == 0.02
    assert broken.reason.startswith("canary 10%: caption failure rate of version 5 100.0% > 2.0% allowed")
    assert analyse(client, "1", "1", LIMITS, "canary 100%").outcome == PASSED


def test_the_one_query_ratio_of_other_engines(scraped):
    """deploy/rollouts' latency ratio, one PromQL figure: the local analysis' ratio where both
    versions answered enough requests, no result where either did not (Argo's condition passes
    an empty result, leaving it to the requests metric)."""
    client, window = scraped["client"], duration(LIMITS.window_seconds)
    ratio = lambda candidate, stable: client.query(latency_ratio_query(candidate, stable, window, LIMITS.min_requests))
    (slow,) = ratio("3", "1")
    assert float(slow["value"][1]) == pytest.approx(0.7375 / 0.2425, rel=1e-6)
    assert ratio("4", "1") == [] and ratio("1", "4") == []  # 3 requests to version 4, 20 needed


def test_the_breach_alert_fires_for_the_failing_version(scraped):
    client = scraped["client"]
    firing = lambda: client.query('ALERTS{alertname="CaptioningRolloutBreach",alertstate="firing"}')
    _wait(lambda: len(firing()) >= 2, "the alert for both failing versions")
    assert {s["metric"]["version"] for s in firing()} == {"2", "5"}


def test_the_retrain_decision_reads_each_model_servers_drift(scraped, monkeypatch):
    """From the local stack's Prometheus, found through the stack's state as `make up` leaves it,
    and from the same Prometheus named by retrain.drift_source."""
    folder, url, replicas = scraped["folder"], scraped["url"], scraped["replicas"]
    monkeypatch.setenv("CAPTIONING_STACK_DIR", str(folder.parent))
    (folder.parent / "state.json").write_text(json.dumps({"port": scraped["port"] - 9}))  # Prometheus at port + 9
    local = read_live_drift("")
    assert local["reason"] == "" and local["source"] == f"the local stack's Prometheus ({url})"
    servers = {server["version"]: server for server in local["servers"]}
    assert sorted(servers) == ["1", "2", "3", "4", "5"]  # the API replica exports no drift gauges
    for version, server in servers.items():
        assert server["server"] == f"127.0.0.1:{replicas[version].port}"
    quiet, drifted, filling = servers["1"], servers["2"], servers["3"]
    assert (quiet["score"], quiet["threshold"], quiet["p_value"], quiet["alarm"]) == (0.0011, 0.0042, 0.37, False)
    assert (drifted["score"], drifted["p_value"], drifted["alarm"]) == (0.0215, 0.001, True)
    assert filling["score"] is None and filling["threshold"] == 0.0042 and filling["alarm"] is None
    assert filling["note"] == "fewer live photos than a window so far"
    assert servers["4"]["alarm"] is None and servers["4"]["note"].startswith("drift monitoring off")

    configured = read_live_drift(url + "/")
    assert configured["source"] == f"Prometheus at {url}" and configured["servers"] == local["servers"]


def test_an_analysis_waits_for_prometheus_then_fails_without_it(scraped):
    """Last in this module: it stops Prometheus, then starts it again on the same port and data."""
    folder, port, client = scraped["folder"], scraped["port"], scraped["client"]
    stack_prometheus.stop(folder)
    assert not client.ready()
    started = time.monotonic()
    verdict = wait_for_verdict(client, "1", "1", LIMITS, "canary 10%", timeout_seconds=3, interval_seconds=0.5)
    assert verdict.failed and verdict.check == "prometheus unreachable" and verdict.paused_seconds >= 3
    assert "Prometheus unreachable" in verdict.reason and time.monotonic() - started >= 3

    # Back within the timeout: the analysis resumes with figures instead of failing.
    import threading

    restart = threading.Timer(2.0, stack_prometheus.start, args=(folder, port, 1.0))
    restart.start()
    try:
        verdict = wait_for_verdict(
            client, "1", "1", LIMITS, "canary 10%", timeout_seconds=60, patience_seconds=0, interval_seconds=0.5
        )
    finally:
        restart.join()
    assert verdict.check != "prometheus unreachable" and verdict.paused_seconds >= 1.5
    assert verdict.candidate is not None and verdict.candidate.version == "1"
