"""Every refusal is a JSON answer {"error", "kind"}, counted by kind; a bug answers 500, not a crash."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from captioning.serving.errors import InputError, add_error_handlers, error_response


@pytest.fixture
def client(series):
    app = FastAPI()
    add_error_handlers(app, lambda: series.metrics)

    @app.get("/refused")
    async def refused() -> dict:
        raise InputError(429, "busy", "come back later", headers={"Retry-After": "2"})

    @app.get("/number")
    async def number(n: int) -> dict:
        return {"n": n}

    @app.get("/bug")
    async def bug() -> dict:
        raise ZeroDivisionError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_a_refusal_answers_its_status_kind_message_and_headers(client, series):
    answer = client.get("/refused")
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "2"
    assert answer.json() == {"error": "come back later", "kind": "busy"}
    assert series.value("captioning_errors_total", kind="busy") == 1


@pytest.mark.parametrize(
    "method, path, status, kind",
    [
        ("GET", "/nowhere", 404, "http"),
        ("POST", "/refused", 405, "http"),
        ("GET", "/number?n=many", 400, "bad_request"),
        ("GET", "/bug", 500, "internal"),
    ],
)
def test_other_failures_answer_json_too(client, series, method, path, status, kind):
    answer = client.request(method, path)
    assert answer.status_code == status
    body = answer.json()
    assert body["kind"] == kind and body["error"]
    assert series.value("captioning_errors_total", kind=kind) == 1


def test_a_bug_names_its_type_only(client):
    assert client.get("/bug").json()["error"] == "internal error: ZeroDivisionError"
    assert client.get("/number?n=3").json() == {"n": 3}  # and the app serves on


def test_error_response_shape():
    response = error_response(413, "too_large", "too big", {"X-Why": "size"})
    assert response.status_code == 413 and response.headers["X-Why"] == "size"
    assert response.body == b'{"error":"too big","kind":"too_large"}'
