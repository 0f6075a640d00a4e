"""The internal model service is closed: called straight on its own socket (as a pod elsewhere in
the cluster would call its Service), it refuses callers without the internal token and options
outside the API's limits; probes and /metrics stay open, and the API (which sends the token)
works."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import httpx
import pytest
import requests

from harness import serving
from tests.robustness.conftest import INTERNAL_TOKEN

TOKEN_HEADER = {"X-Captioning-Internal-Token": INTERNAL_TOKEN}


@pytest.fixture(scope="module")
def model_client(hardened_service):
    """An HTTP client on the model service's Unix socket, bypassing the API."""
    socket = serving.model_socket(hardened_service)
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket), base_url="http://model", timeout=30) as client:
        yield client


def job(**options) -> dict:
    """A caption request body for the model service's JSON interface."""
    return {"jobs": [{"image": "not decoded: refused before", **options}]}


def reloads_counted(client: httpx.Client) -> float:
    """Successful reloads the model service has counted (its /metrics, open to Prometheus)."""
    text = client.get("/metrics").text
    return sum(
        float(value)
        for value in re.findall(r'^captioning_model_reloads_total\{[^}]*outcome="ok"[^}]*\} ([0-9.e+]+)$', text, re.M)
    )


@pytest.mark.parametrize("route", ["/caption", "/info", "/reload", "/ready", "/docs.json"])
def test_calls_without_the_token_are_refused(model_client, route):
    for headers in ({}, {"X-Captioning-Internal-Token": "a guess"}):
        response = model_client.request(
            "GET" if route.endswith(".json") else "POST", route, json=job(beam_size=3), headers=headers
        )
        assert response.status_code == 401, response.text
        assert "internal token" in response.json()["error"]


def test_unauthenticated_reload_does_not_reload(model_client):
    before = reloads_counted(model_client)
    assert model_client.post("/reload", json={}).status_code == 401
    assert reloads_counted(model_client) == before
    answer = model_client.post("/reload", json={}, headers=TOKEN_HEADER)
    assert answer.status_code == 200 and answer.json()["reloaded"] is True, answer.text
    assert reloads_counted(model_client) == before + 1


@pytest.mark.parametrize(
    "options",
    [
        {"beam_size": 1000},
        {"beam_size": -1},
        {"beam_size": 0},
        {"beam_size": "abc"},
        {"max_length": 61},
        {"max_length": 0},
    ],
)
def test_options_out_of_range_are_refused_even_with_the_token(model_client, options):
    response = model_client.post("/caption", json=job(**options), headers=TOKEN_HEADER)
    assert response.status_code == 400, response.text
    assert list(options)[0] in response.text


def test_probes_and_metrics_stay_open(model_client):
    for route in ("/readyz", "/livez", "/metrics"):
        assert model_client.get(route).status_code == 200, route


def test_the_api_sends_the_token(hardened_service):
    image = serving.synthetic_jpeg(seed=4)
    answer = requests.post(
        hardened_service.url + "/caption",
        files={"image": ("a.jpg", image, "image/jpeg")},
        data={"beam_size": "3"},
        timeout=60,
    )
    assert answer.status_code == 200 and answer.json()["caption"], answer.text
    assert requests.get(hardened_service.url + "/model", timeout=30).status_code == 200
    assert requests.get(hardened_service.url + "/readyz", timeout=10).status_code == 200


def test_the_local_socket_is_private(hardened_service):
    """Without a token (`make serve` on one machine) the socket's folder is the only fence: 0700."""
    folder = Path(serving.model_socket(hardened_service)).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert folder.stat().st_uid == os.getuid()
