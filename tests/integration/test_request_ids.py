"""One request followed through both services of the real service (`bentoml serve`): the API
answers its id in X-Request-ID, and the API and the model service each write a JSON line with it
in the server's log."""

from __future__ import annotations

import json
import time
import uuid

import requests


def request_lines(server, request_id: str, services: set[str], seconds: float = 15) -> list[dict]:
    """The JSON lines of the server's log with `request_id`, once every one of `services` wrote one."""
    deadline = time.monotonic() + seconds
    while True:
        found = []
        for text in server.log_path.read_text(errors="replace").splitlines():
            if text.startswith("{") and request_id in text:
                found.append(json.loads(text))
        if {line["service"] for line in found} >= services or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def caption(server, image: bytes, headers: dict | None = None, route: str = "/caption") -> requests.Response:
    files = [("image", (f"scene{n}.jpg", image, "image/jpeg")) for n in range(2 if route == "/caption_batch" else 1)]
    return requests.post(server.url + route, files=files, headers=headers or {}, timeout=60)


def test_a_clients_id_is_answered_and_found_in_both_services_lines(caption_service, jpeg_bytes):
    sent = f"itest-{uuid.uuid4().hex[:12]}"
    answer = caption(caption_service, jpeg_bytes, {"X-Request-ID": sent})
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Request-ID"] == sent
    lines = request_lines(caption_service, sent, {"api", "model"})
    by_service = {line["service"]: line for line in lines}
    assert set(by_service) == {"api", "model"} and len(lines) == 2, lines
    api, model = by_service["api"], by_service["model"]
    assert (api["route"], api["status"], api["method"]) == ("/caption", 200, "POST")
    assert api["model_version"] == answer.json()["model_version"] == model["model_version"]
    assert api["client"] == "127.0.0.1"
    assert (model["route"], model["status"]) == ("/caption", 200)
    assert api["latency_ms"] >= model["latency_ms"] > 0  # the API's time includes the model's


def test_without_an_id_the_api_makes_one_and_passes_it_on(caption_service, jpeg_bytes):
    answer = caption(caption_service, jpeg_bytes, route="/caption_batch")
    assert answer.status_code == 200, answer.text
    made = answer.headers["X-Request-ID"]
    assert len(made) == 32 and int(made, 16) >= 0
    lines = request_lines(caption_service, made, {"api", "model"})
    assert sorted((line["service"], line["route"]) for line in lines) == [
        ("api", "/caption_batch"),
        ("model", "/caption"),
    ]


def test_an_implausible_id_is_replaced_not_echoed(caption_service, jpeg_bytes):
    for bad in ("has spaces in it", "x" * 65, 'quote"and{brace}'):
        answer = caption(caption_service, jpeg_bytes, {"X-Request-ID": bad})
        assert answer.status_code == 200
        made = answer.headers["X-Request-ID"]
        assert made != bad and len(made) == 32
        assert request_lines(caption_service, made, {"api", "model"})
        assert bad not in caption_service.log_path.read_text(errors="replace")


def test_a_refused_request_has_an_id_and_a_line_too(caption_service):
    sent = f"itest-{uuid.uuid4().hex[:12]}"
    answer = requests.post(caption_service.url + "/caption", headers={"X-Request-ID": sent}, timeout=30)
    assert answer.status_code == 400 and answer.headers["X-Request-ID"] == sent
    (line,) = request_lines(caption_service, sent, {"api"})
    assert (line["service"], line["route"], line["status"], line["model_version"]) == ("api", "/caption", 400, None)
