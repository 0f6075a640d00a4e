"""The public API key, the token between the two services, and the reload token."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from captioning.serving.auth import (
    INTERNAL_HEADER,
    ApiKeyMiddleware,
    InternalTokenMiddleware,
    check_reload_token,
    sent_secret,
)
from captioning.serving.errors import InputError


def ok(_: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def app_behind(middleware, **options) -> TestClient:
    paths = ["/caption", "/metrics", "/livez", "/", "/web/app.js"]
    app = Starlette(routes=[Route(path, ok, methods=["GET", "POST"]) for path in paths])
    app.add_middleware(middleware, **options)
    return TestClient(app)


def test_with_a_key_every_route_but_probes_and_the_page_needs_it(series):
    client = app_behind(ApiKeyMiddleware, key="the-key", metrics=lambda: series.metrics)
    refused = client.post("/caption")
    assert refused.status_code == 401
    assert refused.json() == {
        "error": "missing or wrong API key: send it in the X-API-Key header",
        "kind": "unauthorized",
    }
    assert client.post("/caption", headers={"X-API-Key": "not-the-key"}).status_code == 401
    assert series.value("captioning_errors_total", kind="unauthorized") == 2
    assert client.post("/caption", headers={"X-API-Key": "the-key"}).text == "ok"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer the-key"}).text == "ok"  # as Prometheus sends it
    for public in ("/livez", "/", "/web/app.js"):
        assert client.get(public).status_code == 200, public


def test_without_a_key_the_api_is_open(series):
    client = app_behind(ApiKeyMiddleware, key="", metrics=lambda: series.metrics)
    assert client.post("/caption").text == "ok"


def test_with_a_token_the_model_service_answers_only_its_callers():
    client = app_behind(InternalTokenMiddleware, token="internal")
    assert client.post("/caption").status_code == 401
    assert client.post("/caption", headers={INTERNAL_HEADER: "other"}).json()["kind"] == "unauthorized"
    # A bearer token is not the internal header: the API sends the header.
    assert client.post("/caption", headers={"Authorization": "Bearer internal"}).status_code == 401
    assert client.post("/caption", headers={INTERNAL_HEADER: "internal"}).text == "ok"
    assert client.get("/metrics").status_code == 200 and client.get("/livez").status_code == 200
    assert app_behind(InternalTokenMiddleware, token="").post("/caption").text == "ok"


def request(**headers: str) -> Request:
    raw = [(key.lower().replace("_", "-").encode(), value.encode()) for key, value in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/reload", "headers": raw})


def test_sent_secret_reads_the_header_else_the_bearer_token():
    assert sent_secret(request(x_api_key="a").headers, "x-api-key") == "a"
    assert sent_secret(request(authorization="Bearer  b ").headers, "x-api-key") == "b"
    assert sent_secret(request(authorization="Basic c").headers, "x-api-key") == ""


def test_reload_needs_its_token():
    with pytest.raises(InputError) as disabled:
        check_reload_token(request(x_reload_token="anything"), token="")
    assert (disabled.value.status, disabled.value.kind) == (403, "reload_disabled")
    for wrong in (request(), request(x_reload_token="wrong")):
        with pytest.raises(InputError) as refused:
            check_reload_token(wrong, token="reload")
        assert (refused.value.status, refused.value.kind) == (401, "bad_reload_token")
    check_reload_token(request(x_reload_token="reload"), token="reload")
    check_reload_token(request(authorization="Bearer reload"), token="reload")
