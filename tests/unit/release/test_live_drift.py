"""Reading the live drift figures for the retrain decision: a model server's metrics page (the real
gauges, in prometheus_client's own exposition format), the choice of source, and the reasons given
when there are no figures. Reading them through a real Prometheus is in
tests/integration/test_prometheus_analysis.py."""

from __future__ import annotations

import json
import math
import time

import pytest

from captioning.release import live_drift
from captioning.release.live_drift import NO_SOURCE, figures_from_page, is_metrics_page, read_live_drift
from captioning.serving.drift import LiveDrift
from harness.metrics import OwnRegistry
from harness.serving import free_port

PAGE = "http://10.0.0.7:3001/metrics"


def model_server(score: float, threshold: float, p_value: float, version: str = "7") -> OwnRegistry:
    """A model server's series serving `version` with these drift figures (NaN: no value)."""
    series = OwnRegistry()
    series.metrics.model_info.labels(version="6", source="models:/captioner@champion").set(0)  # reloaded since
    series.metrics.model_info.labels(version=version, source="models:/captioner@champion").set(1)
    series.drift.score.set(score)
    series.drift.threshold.set(threshold)
    series.drift.p_value.set(p_value)
    return series


def test_a_metrics_url_is_a_model_server_and_any_other_url_prometheus():
    assert is_metrics_page("http://model:3001/metrics") and is_metrics_page("https://h/x/metrics/")
    assert not is_metrics_page("http://prometheus:9090") and not is_metrics_page("http://h/metrics-proxy/prom")
    assert is_metrics_page("http://h/metrics?name[]=x")  # the query string is not the path


def test_a_model_servers_page_gives_its_version_and_figures():
    live = figures_from_page(model_server(0.0123, 0.0040, 0.001).text(), PAGE)
    assert live["source"] == PAGE and live["reason"] == ""
    assert live["servers"] == [
        {
            "version": "7",
            "server": "10.0.0.7:3001",
            "score": 0.0123,
            "threshold": 0.004,
            "p_value": 0.001,
            "alarm": True,
            "note": "",
        }
    ]
    quiet = figures_from_page(model_server(0.0011, 0.0040, 0.42).text(), PAGE)["servers"][0]
    assert quiet["alarm"] is False and quiet["p_value"] == 0.42
    json.dumps(live)  # a task's result, handed on as JSON


def test_a_window_not_full_yet_or_no_drift_reference_is_said_not_judged():
    filling = figures_from_page(model_server(math.nan, 0.004, math.nan).text(), PAGE)["servers"][0]
    assert filling["alarm"] is None and filling["score"] is None and filling["threshold"] == 0.004
    assert filling["note"] == "fewer live photos than a window so far"
    series = OwnRegistry()
    LiveDrift(None, series.drift)  # a package without drift.npz: what the model service shows
    off = figures_from_page(series.text(), PAGE)["servers"][0]
    assert off["alarm"] is None and off["threshold"] is None and off["version"] == "unknown"
    assert off["note"].startswith("drift monitoring off")


def test_a_page_without_drift_series_or_not_a_metrics_page_gives_the_reason():
    api = OwnRegistry()
    api_page = "\n".join(line for line in api.text().splitlines() if "captioning_drift" not in line)
    missing = figures_from_page(api_page, PAGE)  # the API's page: no drift gauges there
    assert missing["servers"] == [] and missing["source"] == PAGE
    assert missing["reason"] == f"no live drift figures: {PAGE} shows no captioning_drift_score (not a model server?)"
    html = figures_from_page("<html><body>login</body></html>", PAGE)
    assert html["servers"] == [] and html["reason"].startswith(f"no live drift figures: {PAGE} is not a Prometheus")


def test_without_a_source_or_a_running_stack_there_is_nothing_to_read(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_STACK_DIR", str(tmp_path / "stack"))
    assert (
        read_live_drift("")["reason"]
        == NO_SOURCE
        == ("no live drift figures: no stack running and retrain.drift_source unset")
    )
    # A stack that was not stopped (a reboot) leaves its state, with no Prometheus behind it.
    (tmp_path / "stack" / "prometheus").mkdir(parents=True)
    (tmp_path / "stack" / "state.json").write_text(json.dumps({"port": free_port()}))
    (tmp_path / "stack" / "prometheus" / "prometheus.pid").write_text("999999999")
    assert live_drift.local_prometheus() is None and read_live_drift("")["reason"] == NO_SOURCE


@pytest.mark.parametrize("path", ["", "/metrics"])
def test_a_configured_source_that_does_not_answer_gives_the_reason_quickly(path):
    source = f"http://127.0.0.1:{free_port()}{path}"  # nothing listens there
    started = time.monotonic()
    live = read_live_drift(source, timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert live["servers"] == [] and source in live["source"]
    assert live["reason"].startswith("no live drift figures: ")
    assert ("Prometheus at" if not path else "did not answer") in live["reason"]
    assert "Connection refused" in live["reason"]
