"""Servers shared by the scale-out tests: one Prefect server and one PostgreSQL server per session."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.postgres import postgres_server  # noqa: F401  (a pytest fixture)
from tests.fixtures.processes import BIN, child_env, free_port, start, stop, wait_for_http

# Library log lines outside flow runs (tests call the library directly) stay local, before Prefect
# reads its settings: `flows` adds the library's loggers to the run logs sent to the server.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """`prefect server start` on a free port with its own PREFECT_HOME; this process and the
    children started after it (workers, flow runs) talk to it."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = child_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    server = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], home / "server.log", env
    )
    saved = {key: os.environ.get(key) for key in ("PREFECT_API_URL", "PREFECT_HOME")}
    try:
        wait_for_http(f"{url}/health", server, home / "server.log")
        os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=str(home))  # for children and settings read later
        with temporary_settings(
            {
                PREFECT_API_URL: url,
                PREFECT_HOME: str(home),
                PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(home / "storage"),
                PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore",
            }
        ):
            yield url
    finally:
        _drain_prefect_clients()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop(server)


def _drain_prefect_clients() -> None:
    """Send the logs and events this process still holds while the server is up: otherwise they
    are retried against the stopped server at exit, for a minute or more."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
