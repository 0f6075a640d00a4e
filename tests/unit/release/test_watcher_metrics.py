"""The release watcher's metrics: refusals read from a real sqlite registry, served over HTTP on
127.0.0.1, and the stack's Prometheus configured to scrape them at the stack's port + 10."""

from __future__ import annotations

import shutil
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from captioning.registry.refusals import REFUSED_TAG, Refusal, refuse
from captioning.registry.store import RegistryError, mlflow_client
from captioning.release import prometheus, stack
from captioning.release.watcher_metrics import REFUSED, WatcherMetrics

NAME = "captioner"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store, monkeypatch) -> str:
    """A sqlite store of this test's own with versions 1 to 3 of the model, 3 the champion."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source="/nonexistent/package")
    client.set_registered_model_alias(NAME, "champion", "3")
    return uri


def samples(page: str) -> dict[tuple[str, tuple], float]:
    """Each sample of a metrics page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def refused(page: str) -> dict[tuple[str, str], float]:
    """The refusal series of a page: (version, stage) -> time."""
    return {
        (dict(labels)["version"], dict(labels)["stage"]): value
        for (name, labels), value in samples(page).items()
        if name == REFUSED
    }


def test_a_new_watcher_shows_every_series_before_any_refusal_or_release():
    page = WatcherMetrics().page()
    for name in (
        REFUSED,
        "captioning_rollout_refused_versions",
        "captioning_release_watcher_last_poll_timestamp_seconds",
    ):
        assert f"# TYPE {name} gauge" in page
    values = samples(page)
    assert refused(page) == {}
    assert values[("captioning_rollout_refused_versions", ())] == 0
    assert values[("captioning_release_watcher_releases_total", (("outcome", "completed"),))] == 0
    assert values[("captioning_release_watcher_releases_total", (("outcome", "failed"),))] == 0


def test_refusals_replace_each_other_and_a_time_that_is_not_one_has_no_series():
    metrics = WatcherMetrics()
    metrics.refusals.replace([Refusal("4", "canary", "why", 1000.0), Refusal("5", "unknown", "by hand", None)])
    assert refused(metrics.page()) == {("4", "canary"): 1000.0}
    assert samples(metrics.page())[("captioning_rollout_refused_versions", ())] == 2
    metrics.refusals.replace([Refusal("6", "smoke", "why", 2000.0)])  # 4's tag removed by hand: gone
    assert refused(metrics.page()) == {("6", "smoke"): 2000.0}


def test_refusals_are_read_from_the_registry_at_each_poll(store):
    metrics = WatcherMetrics()
    assert metrics.read_refusals(store, NAME) == []
    before = int(time.time())
    refuse(store, NAME, "3", "2", "shadow: mean agreement 3.1 < 10.0", "shadow", 3.1, 10.0)
    refuse(store, NAME, "1", None, "smoke: version 1 answered 500", "smoke")
    metrics.read_refusals(store, NAME)
    page = metrics.page()
    times = refused(page)
    assert set(times) == {("1", "smoke"), ("3", "shadow")}
    assert all(before <= value <= time.time() for value in times.values())
    assert time.time() - samples(page)[("captioning_release_watcher_last_poll_timestamp_seconds", ())] < 60
    mlflow_client(store).delete_model_version_tag(NAME, "1", REFUSED_TAG)  # released again by hand
    metrics.read_refusals(store, NAME)
    assert set(refused(metrics.page())) == {("3", "shadow")}


def test_a_lost_registry_keeps_the_last_refusals_and_counts_the_error(store):
    metrics = WatcherMetrics()
    refuse(store, NAME, "3", "2", "canary 10%: p95 latency 7.0 s > 5.0 s allowed", "canary", 7.0, 5.0)
    metrics.read_refusals(store, NAME)
    polled = samples(metrics.page())[("captioning_release_watcher_last_poll_timestamp_seconds", ())]
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        lost = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(RegistryError):
        metrics.read_refusals(lost, NAME)
    values = samples(metrics.page())
    assert set(refused(metrics.page())) == {("3", "canary")}
    assert values[("captioning_release_watcher_registry_errors_total", ())] == 1
    assert values[("captioning_release_watcher_last_poll_timestamp_seconds", ())] == polled


def test_releases_are_counted_by_outcome():
    metrics = WatcherMetrics()
    for completed in (True, False, False):
        metrics.release_started()
        metrics.release_finished(completed)
    values = samples(metrics.page())
    assert values[("captioning_release_watcher_releases_started_total", ())] == 3
    assert values[("captioning_release_watcher_releases_total", (("outcome", "completed"),))] == 1
    assert values[("captioning_release_watcher_releases_total", (("outcome", "failed"),))] == 2


def test_served_over_http_on_127_0_0_1_until_stopped():
    from harness.serving import free_port

    metrics, port = WatcherMetrics(), free_port()
    metrics.refusals.replace([Refusal("9", "smoke", "why", 1234.0)])
    metrics.serve(port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            assert refused(answer.read().decode()) == {("9", "smoke"): 1234.0}
        with pytest.raises(OSError):  # the port is taken: a second watcher does not serve
            WatcherMetrics().serve(port)
    finally:
        metrics.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_the_watcher_port_is_the_stacks_plus_10(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPTIONING_STACK_DIR", str(tmp_path / "stack"))
    assert stack.ports(3000)["watcher"] == 3010 and stack.ports(3000)["prometheus"] == 3009
    assert stack.watcher_port(5000) == 5010
    assert stack.watcher_port() == stack.DEFAULT_PORT + 10  # no stack: the default port's
    (tmp_path / "stack").mkdir()
    stack.write_state({"port": 4000})
    assert stack.watcher_port() == 4010  # the running stack's


def test_the_stacks_prometheus_scrapes_the_watcher_as_component_release():
    alone = prometheus.config(1.0)
    assert [job["job_name"] for job in alone["scrape_configs"]] == ["captioning"]
    jobs = {job["job_name"]: job for job in prometheus.config(1.0, watcher="127.0.0.1:3010")["scrape_configs"]}
    assert jobs["release"]["static_configs"] == [{"targets": ["127.0.0.1:3010"], "labels": {"component": "release"}}]
    assert "file_sd_configs" in jobs["captioning"]
