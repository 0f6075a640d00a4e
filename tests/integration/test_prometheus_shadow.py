"""The shadow stage's analysis against a real Prometheus (as the local stack starts it) scraping
small real metric servers that expose the API's shadow series (captioning.serving.metrics, on a
registry of their own): API replicas that copied requests to candidates that agree, disagree or
fail, and a model server whose series must not count. The queries also pass promtool."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import prometheus_client
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from captioning.release import analysis
from captioning.release import prometheus as stack_prometheus
from captioning.release.analysis import (
    FAILED,
    INCONCLUSIVE,
    PASSED,
    Prometheus,
    ShadowLimits,
    analyse_shadow,
    measure_shadow,
)
from captioning.serving.metrics import create_metrics
from harness.serving import free_port

LIMITS = ShadowLimits(window_seconds=60, min_requests=10, max_error_rate=0.02, min_agreement=10.0)


class MetricsServer:
    """The service's own series (the same names, labels and buckets) on a port of their own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.metrics = create_metrics(self)
        self.port = free_port()
        self.server, self.thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def Counter(self, **kwargs):
        return prometheus_client.Counter(registry=self.registry, **kwargs)

    def Histogram(self, **kwargs):
        return prometheus_client.Histogram(registry=self.registry, **kwargs)

    def Gauge(self, **kwargs):
        kwargs.pop("multiprocess_mode", None)
        return prometheus_client.Gauge(registry=self.registry, **kwargs)

    def copies(self, candidate: str, agreements: list[float], errors: int = 0) -> None:
        """Copies to `candidate`: one answered per agreement (one image each), `errors` failed."""
        requests = self.metrics.shadow_requests
        for outcome in ("ok", "error", "dropped"):
            requests.labels(candidate=candidate, outcome=outcome)  # at 0 before the copies
        histogram = self.metrics.shadow_agreement.labels(candidate=candidate)
        for value in agreements:
            requests.labels(candidate=candidate, outcome="ok").inc()
            histogram.observe(value)
        requests.labels(candidate=candidate, outcome="error").inc(errors)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """Two API replicas copying to candidates 7 (agrees: 60 % and 40 %), 8 (disagrees: 5 %),
    9 (fails one copy in four), 10 (a few copies only); a model server with shadow series of
    candidate 8 that agree fully (not the API: must not count)."""
    folder: Path = tmp_path_factory.mktemp("prometheus-shadow")
    servers = {name: MetricsServer() for name in ("api-0", "api-1", "model")}
    for slot, (name, server) in enumerate(servers.items()):
        role = "model" if name == "model" else "api"
        stack_prometheus.set_target(folder, role, slot, f"127.0.0.1:{server.port}", "6")
    port = free_port()
    try:
        client = Prometheus(stack_prometheus.start(folder, port, scrape_seconds=1.0))
        _wait(lambda: len(client.query('up{job="captioning"} == 1')) == 3, "every target scraped")
        for server in servers.values():
            for candidate in ("7", "8", "9", "10"):
                server.copies(candidate, [])
        time.sleep(2.5)  # a few scrapes at 0 before the copies
        servers["api-0"].copies("7", [60.0] * 10)
        servers["api-1"].copies("7", [40.0] * 10)
        servers["api-0"].copies("8", [5.0] * 20)
        servers["api-1"].copies("9", [50.0] * 15, errors=5)
        servers["api-0"].copies("10", [50.0] * 3)
        servers["model"].copies("8", [100.0] * 200)
        seen = 'sum(captioning_shadow_requests_total{candidate="9",outcome="error"})'
        _wait(lambda: (client.value(seen) or 0) >= 5, "copies seen")
        time.sleep(2.5)  # a few scrapes after them
        yield client
    finally:
        stack_prometheus.stop(folder)
        for server in servers.values():
            server.stop()


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


def test_the_figures_of_each_candidate(scraped):
    agrees, disagrees, failing, few = (measure_shadow(scraped, c, LIMITS.window_seconds) for c in ("7", "8", "9", "10"))
    # increase() extrapolates to the window's edges: at least the copies sent, not far above.
    assert 20 <= agrees.copies < 28 and 3 <= few.copies < 5
    # The mean over both API replicas, weighted by count: (10 x 60 + 10 x 40) / 20 = 50. rate()
    # extrapolates each replica's count on its own scrape instants: each weight w is at least 10 and
    # the two sum under 28, as above, so 40 + 20 x w0 / (w0 + w1) lies within 40 + 20 x [10, 18] / 28.
    # A sum of the replicas' means (100) or the first replica's alone (60) falls outside.
    assert 40 + 20 * 10 / 28 <= agrees.agreement <= 40 + 20 * 18 / 28
    assert agrees.error_rate == 0.0
    # The model server's series of candidate 8 (all 100 %) are not the API's: left out.
    assert disagrees.agreement == pytest.approx(5.0, rel=1e-6)
    assert failing.error_rate == pytest.approx(0.25, rel=1e-6)


def test_the_verdicts_of_the_shadow_analysis(scraped):
    assert analyse_shadow(scraped, "7", LIMITS).outcome == PASSED
    disagrees = analyse_shadow(scraped, "8", LIMITS, stage="shadow 20%")
    assert disagrees.outcome == FAILED and disagrees.check == "shadow agreement"
    assert disagrees.figure == pytest.approx(5.0) and disagrees.threshold == 10.0
    failing = analyse_shadow(scraped, "9", LIMITS)
    assert failing.outcome == FAILED and failing.check == "shadow error rate"
    assert failing.reason.startswith("shadow: shadow error rate of version 9 25.0% > 2.0% allowed")
    assert analyse_shadow(scraped, "10", LIMITS).outcome == INCONCLUSIVE
    assert analyse_shadow(scraped, "11", LIMITS).outcome == INCONCLUSIVE  # never shadowed


def test_every_new_query_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run `make system-deps`")
    queries = [
        analysis.caption_failure_rate_query("7", "30s"),
        analysis.shadow_requests_query("7", "30s"),
        analysis.shadow_error_rate_query("7", "30s"),
        analysis.shadow_agreement_query("7", "500ms"),
    ]
    rules = {"groups": [{"name": "shadow", "rules": [{"record": f"q{n}", "expr": q} for n, q in enumerate(queries)]}]}
    path = tmp_path / "shadow-rules.yml"
    path.write_text(yaml.safe_dump(rules, width=1000))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(queries)} rules found" in result.stdout
