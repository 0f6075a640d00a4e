"""POST /feedback is limited per client (CAPTIONING_FEEDBACK_PER_MINUTE, 20 in the hardened
set-up): past it a client gets 429 with Retry-After, other clients do not, and the client is
served again once it has waited that long. Clients are told apart by the X-Forwarded-For entry
the proxy appends (CAPTIONING_TRUST_PROXY=1)."""

from __future__ import annotations

import time

import requests

from harness import serving
from tests.robustness.conftest import FEEDBACK_PER_MINUTE


def send_feedback(url: str, client: str, image: bytes) -> requests.Response:
    return requests.post(
        url + "/feedback",
        files={"image": ("scene.jpg", image, "image/jpeg")},
        data={"caption": "a red square on a blue background"},
        headers={"X-Forwarded-For": client},
        timeout=30,
    )


def test_feedback_rate_limit(hardened_service):
    url, image = hardened_service.url, serving.synthetic_jpeg(seed=7)
    greedy, other = "203.0.113.5", "203.0.113.6"
    allowed = [send_feedback(url, greedy, image).status_code for _ in range(FEEDBACK_PER_MINUTE)]
    assert allowed == [201] * FEEDBACK_PER_MINUTE

    refused = send_feedback(url, greedy, image)
    assert refused.status_code == 429, refused.text
    assert refused.json()["kind"] == "rate_limited" and "retry in" in refused.json()["error"]
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 60 / FEEDBACK_PER_MINUTE + 1  # one token comes back every 3 s

    # A spoofed first entry does not make a new client: the proxy's (last) entry counts.
    assert send_feedback(url, f"198.51.100.77, {greedy}", image).status_code == 429
    assert send_feedback(url, other, image).status_code == 201

    time.sleep(wait)
    assert send_feedback(url, greedy, image).status_code == 201
