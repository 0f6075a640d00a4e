"""What a client reads when the model fails: a generic message and the request id to quote,
never the exception text (file paths, class names, a drill's words), which stays in the log.
A real `bentoml serve` whose model service fails every caption (the drill setting) and whose
package is damaged on disk before a reload."""

from __future__ import annotations

import shutil

import pytest
import requests

from harness import serving

TOKEN = "test-reload-token"
LEAKS = ("Error", "Traceback", "CAPTIONING_FAULT", "fault injected", "weights.pt", "sha256")


@pytest.fixture(scope="module")
def failing(tiny_model, tmp_path_factory):
    home = tmp_path_factory.mktemp("failing-service")
    package = home / "package"
    shutil.copytree(tiny_model, package)
    env = {"CAPTIONING_FAULT_FAIL_CAPTIONS": "1", "CAPTIONING_RELOAD_TOKEN": TOKEN}
    server = serving.start_service(package, home, env)
    try:
        yield server, package
    finally:
        server.stop()


def _leaks(text: str, package) -> list[str]:
    return [word for word in (*LEAKS, str(package)) if word in text]


def test_a_caption_the_model_failed_answers_500_with_the_request_id_only(failing, jpeg_bytes):
    server, package = failing
    answer = requests.post(
        server.url + "/caption",
        files={"image": ("a.jpg", jpeg_bytes)},
        headers={"X-Request-ID": "err-0001"},
        timeout=60,
    )
    assert answer.status_code == 500, answer.text
    body = answer.json()
    assert body["error"] == "the model failed on this image" and body["request_id"] == "err-0001"
    assert _leaks(answer.text, package) == []
    assert "fault injected" in server.log_path.read_text(errors="replace")  # the details are in the log


def test_a_failed_reload_answers_500_without_the_exception_and_keeps_serving(failing):
    server, package = failing
    served = requests.get(server.url + "/model", timeout=30).json()["model_version"]
    weights = package / "weights.pt"
    kept = weights.read_bytes()
    weights.write_bytes(b"not the weights that were checksummed")
    try:
        answer = requests.post(server.url + "/reload", headers={"X-Reload-Token": TOKEN}, timeout=120)
    finally:
        weights.write_bytes(kept)
    assert answer.status_code == 500, answer.text
    body = answer.json()
    assert body["reloaded"] is False and body["error"].startswith("the reload failed")
    assert body["request_id"] and _leaks(answer.text, package) == []
    assert requests.get(server.url + "/model", timeout=30).json()["model_version"] == served
