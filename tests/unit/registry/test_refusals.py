"""Versions a rollout refused, tagged on a real sqlite store and read back for the watcher's metrics."""

from __future__ import annotations

import time

import pytest

from captioning.registry.refusals import REFUSED_TAG, Refusal, parse_time, refuse, refused_versions
from captioning.registry.store import RegistryError, alias_version, mlflow_client

NAME = "captioner"


def versions(store: str, count: int) -> None:
    """`count` versions of the model (no package behind them: only their tags are read here),
    the last one the champion."""
    client = mlflow_client(store)
    client.create_registered_model(NAME)
    for _ in range(count):
        version = client.create_model_version(NAME, source="/nonexistent/package").version
    client.set_registered_model_alias(NAME, "champion", version)


def test_no_model_registered_yet_has_no_refusal(store):
    assert refused_versions(store, NAME) == []


def test_each_refused_version_with_its_stage_reason_and_time(store):
    versions(store, 4)
    before = int(time.time())
    refuse(store, NAME, "4", "1", "canary 10%: error rate of version 4 10.0% > 2.0% allowed", "canary", 0.1, 0.02)
    refuse(store, NAME, "2", None, "smoke: version 2 answered 500", "smoke")
    after = time.time()
    found = refused_versions(store, NAME)
    assert [(r.version, r.stage) for r in found] == [("2", "smoke"), ("4", "canary")]  # by version
    assert found[1].reason == "canary 10%: error rate of version 4 10.0% > 2.0% allowed"
    assert all(before <= r.refused_at <= after for r in found)  # the tag has whole seconds
    assert alias_version(mlflow_client(store), NAME, "champion") == "1"  # the refused champion's place


def test_a_tag_set_by_hand_without_a_time_or_stage(store):
    versions(store, 1)
    mlflow_client(store).set_model_version_tag(NAME, "1", REFUSED_TAG, "bad captions, seen by hand")
    assert refused_versions(store, NAME) == [Refusal("1", "unknown", "bad captions, seen by hand", None)]


def test_refusal_times_are_utc():
    assert parse_time("1970-01-01T00:01:40Z") == 100.0
    assert parse_time(" 2026-03-01T12:00:00Z\n") == 1772366400.0
    assert parse_time("yesterday") is None and parse_time("") is None


def test_a_server_that_does_not_answer_is_an_error_not_an_empty_list():
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(RegistryError, match="cannot reach the MLflow tracking server"):
        refused_versions(url, NAME)
