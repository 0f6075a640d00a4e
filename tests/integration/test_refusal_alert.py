"""A refused rollout alerted, at any stage: versions of the tiny model registered on a real
`mlflow server`, refused as the rollout refuses them (captioning.registry.refusals.refuse), the
release watcher (`python -m flows.release --watch`, a real process with no stack running) showing
them on its metrics page, and the stack's Prometheus (started as the stack starts it) scraping it
and firing CaptioningRolloutRefused as deploy/prometheus/alerts.yml writes it."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from captioning.config import PARAMS_FILE
from captioning.registry.refusals import parse_time, refuse
from captioning.registry.store import mlflow_client
from captioning.registry.versions import register
from captioning.release import prometheus as stack_prometheus
from captioning.release.analysis import Prometheus
from captioning.release.watcher_metrics import REFUSED
from captioning.settings import load_settings
from tests.fixtures.processes import MlflowServer, child_env, free_port, start, stop, tail, wait_until

NAME = "captioner"
SETTINGS = load_settings(PARAMS_FILE, None, [f"register.model_name={NAME}"])


class Watcher:
    """`python -m flows.release --watch` polling every 0.5 s, its metrics on 127.0.0.1:`port`
    (the stack's port is `port` - 10), with a stack folder where no stack runs."""

    def __init__(self, tracking: str, folder: Path):
        self.tracking, self.folder = tracking, folder
        self.port = free_port()
        self.log = folder / "watch.log"
        self.proc = None

    def start(self) -> "Watcher":
        env = child_env(MLFLOW_TRACKING_URI=self.tracking, CAPTIONING_STACK_DIR=str(self.folder / "stack"))
        command = [sys.executable, "-m", "flows.release", "--watch", "--port", str(self.port - 10)]
        self.proc = start(command + ["--set", "release.poll_seconds=0.5"], self.log, env)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def refusals(self) -> dict[tuple[str, str], float]:
        """The refusal series on its metrics page, (version, stage) -> time; {} while it does not answer."""
        assert self.proc is not None and self.proc.poll() is None, tail(self.log)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as answer:
                page = answer.read().decode()
        except OSError:
            return {}
        return {
            (sample.labels["version"], sample.labels["stage"]): sample.value
            for family in text_string_to_metric_families(page)
            for sample in family.samples
            if sample.name == REFUSED
        }


def refused_at(tracking: str, version: str) -> float:
    """The time of the refusal as the registry recorded it."""
    tags = mlflow_client(tracking).get_model_version(NAME, version).tags
    return parse_time(tags["rollout_refused_at"])


@pytest.fixture(scope="module")
def registry(tiny_model, tmp_path_factory):
    """A real MLflow server holding versions 1 to 3 of the tiny model, 3 the champion; the
    rollout of version 3 refused at its smoke stage, so the champion is 2 again."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("refusal-alert")
    MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").search_experiments()  # tables before the server
    server = MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "mlflow.log").start(timeout=90)
    try:
        for cider in (50.0, 55.0, 60.0):
            result = register(tiny_model, {"CIDEr": cider}, "synthetic[test]-24", SETTINGS, {}, server.url, {})
            assert result.promoted, result.message
        reason = "smoke: captions unlike the package's own on 50% of the photos"
        aliases = refuse(server.url, NAME, "3", "2", reason, "smoke", 0.5, 0.25)
        assert aliases["champion"] == "2"
        yield {"url": server.url, "root": root}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def watcher(registry):
    watcher = Watcher(registry["url"], registry["root"]).start()
    try:
        yield watcher
    finally:
        watcher.stop()


def test_the_watcher_shows_each_refused_version_with_its_stage_and_time(registry, watcher):
    url = registry["url"]
    shown = wait_until(watcher.refusals, 60, "refusal on the watcher's metrics page")
    assert shown == {("3", "smoke"): refused_at(url, "3")}
    assert f"metrics on http://127.0.0.1:{watcher.port}/metrics" in tail(watcher.log)

    # A rollout run by hand refuses version 2 at its canary: the next poll shows it.
    refuse(url, NAME, "2", "1", "canary 10%: error rate of version 2 10.0% > 2.0% allowed", "canary", 0.1, 0.02)
    both = wait_until(lambda: len(watcher.refusals()) == 2 and watcher.refusals(), 30, "the second refusal")
    assert both == {("3", "smoke"): refused_at(url, "3"), ("2", "canary"): refused_at(url, "2")}
    assert time.time() - both[("2", "canary")] < 60

    # Read from the registry, not remembered: a watcher started again shows them at once.
    watcher.stop()
    watcher.start()
    again = wait_until(lambda: len(watcher.refusals()) == 2 and watcher.refusals(), 60, "refusals after a restart")
    assert again == both


def test_the_stacks_prometheus_fires_the_alert_for_each_refusal(registry, watcher, tmp_path):
    wait_until(lambda: len(watcher.refusals()) >= 1, 60, "the watcher's metrics")
    port = free_port()
    try:
        url = stack_prometheus.start(tmp_path / "prometheus", port, 1.0, watcher=f"127.0.0.1:{watcher.port}")
        client = Prometheus(url)
        up = wait_until(lambda: client.query('up{component="release"} == 1'), 30, "the watcher scraped")
        assert up[0]["metric"]["job"] == "release"
        firing = lambda: client.query('ALERTS{alertname="CaptioningRolloutRefused",alertstate="firing"}')  # noqa: E731
        alerts = wait_until(lambda: len(firing()) == len(watcher.refusals()) and firing(), 30, "the alert firing")
        shown = {(a["metric"]["version"], a["metric"]["stage"]) for a in alerts}
        assert shown == set(watcher.refusals()) and ("3", "smoke") in shown
        assert {a["metric"]["severity"] for a in alerts} == {"ticket"}
    finally:
        stack_prometheus.stop(tmp_path / "prometheus")
