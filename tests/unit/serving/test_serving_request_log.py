"""Every request gets an id (or keeps a plausible one of the client's), answered in X-Request-ID,
carried on the calls it makes through OpenTelemetry's propagator (as BentoML's client sends its
headers), and written in one JSON line."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import propagate

from captioning.serving.errors import InputError, add_error_handlers
from captioning.serving.request_log import (
    LOGGER_NAME,
    RequestLog,
    current_request_id,
    note_model_version,
    note_served_version,
    propagate_request_id,
    request_id,
)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture
def lines():
    handler = Lines()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def app_with_log(service: str, series) -> FastAPI:
    app = FastAPI()
    add_error_handlers(app, lambda: series.metrics)
    app.add_middleware(RequestLog, service=service)

    @app.post("/caption")
    async def caption() -> dict:
        note_model_version("7")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # what BentoML's client does with the headers of each model call
        return {"caption": "a dog", "sent": carrier, "id": current_request_id()}

    @app.get("/web/{name}")
    async def asset(name: str) -> dict:
        raise InputError(404, "not_found", f"no asset {name!r}")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


@pytest.mark.parametrize("sent", ["abc-123", "4f0c2b8e9d6a4e0f8a1b2c3d4e5f6a7b", "a.b:c_d-e", "x" * 64])
def test_a_plausible_client_id_is_kept(sent):
    assert request_id(sent) == sent


@pytest.mark.parametrize("sent", [None, "", "x" * 65, "has space", "new\nline", "<script>", "é", "a;b=c"])
def test_anything_else_gets_a_new_id(sent):
    made = request_id(sent)
    assert made != sent and len(made) == 32 and int(made, 16) >= 0
    assert request_id(sent) != made  # a new one each time


def test_the_clients_id_is_answered_carried_and_logged(series, lines):
    propagate_request_id()
    with TestClient(app_with_log("api", series)) as client:
        answer = client.post("/caption", headers={"X-Request-ID": "client-42"})
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "client-42"
    assert answer.json()["id"] == "client-42"
    assert answer.json()["sent"]["X-Request-ID"] == "client-42"  # on the call to the model service
    (line,) = lines
    assert line["request_id"] == "client-42" and line["service"] == "api"
    assert (line["method"], line["route"], line["status"], line["model_version"]) == ("POST", "/caption", 200, "7")
    assert line["latency_ms"] >= 0 and line["client"] == "testclient" and line["time"].endswith("Z")


def test_without_an_id_one_is_made_for_each_request(series, lines):
    with TestClient(app_with_log("api", series)) as client:
        first = client.post("/caption").headers["X-Request-ID"]
        second = client.post("/caption", headers={"X-Request-ID": "bad id"}).headers["X-Request-ID"]
    assert len({first, second}) == 2 and "bad id" not in (first, second)
    assert [line["request_id"] for line in lines] == [first, second]
    assert current_request_id() is None  # nothing leaks out of a request


def test_refusals_are_logged_with_their_status_and_route_template(series, lines):
    with TestClient(app_with_log("api", series)) as client:
        answer = client.get("/web/secret.txt", headers={"X-Request-ID": "r-404"})
    assert answer.status_code == 404 and answer.headers["X-Request-ID"] == "r-404"
    assert [(line["route"], line["status"], line["model_version"]) for line in lines] == [("/web/{name}", 404, None)]


def test_probes_get_no_line(series, lines):
    with TestClient(app_with_log("api", series)) as client:
        answer = client.get("/healthz")
    assert answer.status_code == 200 and "X-Request-ID" not in answer.headers
    assert lines == []


def test_the_model_services_lines_carry_the_version_it_serves(series, lines):
    note_served_version("local-abc")
    try:
        with TestClient(app_with_log("model", series)) as client:
            client.get("/web/x", headers={"X-Request-ID": "from-the-api"})
    finally:
        note_served_version(None)
    assert [(line["service"], line["request_id"], line["model_version"]) for line in lines] == [
        ("model", "from-the-api", "local-abc")
    ]


def test_the_propagator_is_added_once_and_writes_only_within_a_request():
    propagate_request_id()
    propagate_request_id()
    fields = propagate.get_global_textmap().fields
    assert "x-request-id" in fields and "traceparent" in fields  # OpenTelemetry's own still there
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    assert "X-Request-ID" not in carrier
