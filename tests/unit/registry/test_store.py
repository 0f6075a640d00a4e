"""The store's connection rules: HTTP retries bounded for a command, a server that is down named at once."""

from __future__ import annotations

import os
import socket

import pytest

from captioning.registry.store import HTTP_DEFAULTS, RegistryError, bounded_http_retries, check_server


def test_bounded_retries_fill_in_what_the_user_left_unset_and_restore_it(monkeypatch):
    for key in HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with bounded_http_retries():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"  # the user's own setting stays
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"


def test_a_tracking_server_that_refuses_connections_is_named():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RegistryError, match=f"cannot reach the MLflow tracking server at {url}: "):
        check_server(url, timeout=2)


def test_a_database_store_has_no_server_to_check(tmp_path):
    check_server(f"sqlite:///{tmp_path / 'absent.db'}")  # returns without touching the file
    assert not (tmp_path / "absent.db").exists()
