"""Sixteen kinds of bad input, each sent to every route it applies to: each gets its expected 4xx
with a JSON error, none gets a 5xx, and the service stays up (same worker processes, still
captioning). The counts go to reports/robustness_service.json."""

from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass, field

import psutil
import requests
from PIL import Image

from harness import serving
from tests.robustness.conftest import record_figures

IMAGE_ROUTES = ("/caption", "/caption_batch", "/feedback")
OPTION_ROUTES = ("/caption", "/caption_batch")
# The table's client for the feedback limit, apart from the rate-limit test's clients.
CLIENT = {"X-Forwarded-For": "192.0.2.10"}


@dataclass
class Case:
    kind: str
    route: str
    status: int
    words: str  # in the error message
    method: str = "POST"
    request: dict = field(default_factory=dict)
    # Our routes answer a JSON error; paths no route matches get BentoML's plain "Not Found".
    json_error: bool = True


def jpeg() -> bytes:
    return serving.synthetic_jpeg(seed=1)


def bomb_png() -> bytes:
    """144 megapixels of one bit in a ~20 kB PNG: over the 40 MP limit, refused before decoding."""
    buffer = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def upload(
    route: str, name: str, data: bytes, kind: str = "image/jpeg", options: dict | None = None, field_name: str = "image"
) -> dict:
    """The multipart request for one file, with the caption /feedback needs."""
    fields = dict(options or {})
    if route == "/feedback":
        fields.setdefault("caption", "a red square")
    return {"files": {field_name: (name, data, kind)}, "data": fields}


def image_cases() -> list[Case]:
    noise = random.Random(0).randbytes(50_000)
    files = {
        "truncated": (upload, ("cut.jpg", jpeg()[:700]), 422, "truncated"),
        "empty": (upload, ("empty.jpg", b""), 400, "empty"),
        "noise": (upload, ("noise.jpg", noise), 415, "not an image"),
        "wrong field": (upload, ("scene.jpg", jpeg(), "image/jpeg", None, "picture"), 400, "'image'"),
        "12 MB": (upload, ("big.jpg", b"\xff\xd8\xff" + bytes(12 * 2**20)), 413, "MB"),
        "decompression bomb": (upload, ("bomb.png", bomb_png(), "image/png"), 413, "pixels"),
    }
    cases = [
        Case(kind, route, status, words, request=make(route, *args))
        for kind, (make, args, status, words) in files.items()
        for route in IMAGE_ROUTES
    ]
    cases += [
        Case("JSON body", route, 415, "multipart", request={"json": {"image": "aGVsbG8="}}) for route in IMAGE_ROUTES
    ]
    return cases


def option_cases() -> list[Case]:
    return [
        Case(
            f"beam {value}",
            route,
            400,
            "beam_size",
            request=upload(route, "s.jpg", jpeg(), options={"beam_size": value}),
        )
        for value in ("1000", "-1", "0", "abc")
        for route in OPTION_ROUTES
    ]


def other_cases() -> list[Case]:
    return [
        Case(
            "600-char correction",
            "/feedback",
            422,
            "characters",
            request=upload("/feedback", "s.jpg", jpeg(), options={"caption": "a cat " * 100}),
        ),
        Case(
            "empty correction",
            "/feedback",
            400,
            "caption",
            request=upload("/feedback", "s.jpg", jpeg(), options={"caption": "   "}),
        ),
        *[Case("GET on a POST route", route, 405, "method", method="GET") for route in IMAGE_ROUTES],
        Case("traversal path", "/web/..%2F..%2Fservice.py", 404, "not found", method="GET", json_error=False),
        Case("traversal path", "/web/%2e%2e%2fpyproject.toml", 404, "not found", method="GET", json_error=False),
        Case(
            "17 images in a batch",
            "/caption_batch",
            413,
            "at most 16",
            request={"files": [("image", (f"{n}.jpg", jpeg(), "image/jpeg")) for n in range(17)]},
        ),
    ]


def all_cases() -> list[Case]:
    return image_cases() + option_cases() + other_cases()


def worker_pids(server: serving.ServiceProcess) -> set[int]:
    return {child.pid for child in psutil.Process(server.process.pid).children(recursive=True)}


def send(url: str, case: Case) -> requests.Response:
    return requests.request(case.method, url + case.route, headers=CLIENT, timeout=60, **case.request)


def error_text(response: requests.Response, case: Case) -> str:
    """The error message the case expects: the JSON "error" field, or the whole plain-text body."""
    if not case.json_error:
        return response.text if len(response.text) < 100 else ""  # a short message, not a file
    if "json" not in response.headers.get("content-type", ""):
        return ""
    return str(response.json().get("error", ""))


def test_bad_inputs_get_4xx_and_the_service_stays_up(hardened_service):
    url = hardened_service.url
    cases = all_cases()
    workers = worker_pids(hardened_service)
    wrong, server_errors = [], []
    for case in cases:
        response = send(url, case)
        error = error_text(response, case)
        if response.status_code >= 500:
            server_errors.append((case.kind, case.route, response.status_code))
        if response.status_code != case.status or case.words.lower() not in error.lower():
            wrong.append((case.kind, case.route, response.status_code, response.text[:200]))

    kinds = Counter(case.kind for case in cases)
    record_figures(
        "bad_inputs",
        {
            "inputs": len(cases),
            "kinds": len(kinds),
            "per_kind": dict(kinds),
            "unexpected_5xx": len(server_errors),
            "unexpected_answers": len(wrong),
        },
    )
    assert not server_errors, server_errors
    assert not wrong, wrong
    assert len(kinds) == 16
    # Still up: the same worker processes (none crashed and was restarted), still captioning.
    assert hardened_service.process.poll() is None
    assert worker_pids(hardened_service) == workers
    answer = requests.post(url + "/caption", files={"image": ("ok.jpg", jpeg(), "image/jpeg")}, timeout=60)
    assert answer.status_code == 200 and answer.json()["caption"], answer.text
    assert requests.get(url + "/readyz", timeout=10).status_code == 200
