"""Authentication fails closed: in production (CAPTIONING_ENV=production) the service refuses to
start without its keys unless told to run open (CAPTIONING_ALLOW_NO_KEY=1), and logs at start-up
which mode it runs in. Also, on that production set-up: past the public API's max_concurrency,
or past the bytes of uploads a worker may hold, requests get 429 at once."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from captioning.config import PROJECT_ROOT
from harness import serving
from tests.robustness.conftest import INTERNAL_TOKEN

API_KEY = "robustness-api-key"
AUTH_VARIABLES = ("CAPTIONING_API_KEY", "CAPTIONING_INTERNAL_TOKEN", "CAPTIONING_ALLOW_NO_KEY", "CAPTIONING_ENV")


def serve_until_exit(model: Path, home: Path, **settings: str) -> subprocess.CompletedProcess:
    """`bentoml serve` with only the given authentication settings; it is expected to exit."""
    env = {key: value for key, value in os.environ.items() if key not in AUTH_VARIABLES}
    env.update(
        settings,
        CAPTIONING_MODEL=str(model),
        BENTOML_HOME=str(home / "bentoml"),
        CAPTIONING_DATA_DIR=str(home / "data"),
        BENTOML_DO_NOT_TRACK="true",
        OMP_NUM_THREADS="1",
    )
    bentoml = Path(sys.executable).parent / "bentoml"
    command = [str(bentoml), "serve", "service:CaptionAPI", "--host", "127.0.0.1", "--port", str(serving.free_port())]
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize(
    "settings, missing",
    [
        ({"CAPTIONING_INTERNAL_TOKEN": INTERNAL_TOKEN}, "CAPTIONING_API_KEY"),
        ({"CAPTIONING_API_KEY": API_KEY}, "CAPTIONING_INTERNAL_TOKEN"),
        ({"CAPTIONING_ALLOW_NO_KEY": "0"}, "CAPTIONING_API_KEY"),
    ],
)
def test_production_refuses_to_start_without_keys(robust_model, tmp_path, settings, missing):
    result = serve_until_exit(robust_model, tmp_path, CAPTIONING_ENV="production", **settings)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"{missing} is not set: refusing to start" in output
    assert "CAPTIONING_ALLOW_NO_KEY=1" in output  # says how to run open on purpose
    assert "loaded model" not in output  # refused before any worker started


@pytest.mark.parametrize(
    "settings, line",
    [
        ({"CAPTIONING_MAX_UPLOAD_MB": "ten"}, "error: CAPTIONING_MAX_UPLOAD_MB='ten': Input should be a valid number"),
        ({"CAPTIONING_MAX_CONCURRENCY": "0"}, "error: CAPTIONING_MAX_CONCURRENCY='0': Input should be greater than"),
        (
            {"CAPTIONING_FEEDBACK_MAX_BYTES": "lots"},
            "error: CAPTIONING_FEEDBACK_MAX_BYTES='lots': Input should be a valid",
        ),
        (
            {"CAPTIONING_FEEDBACK_DB": "mysql://user:pw-secret@db/f"},
            "error: CAPTIONING_FEEDBACK_DB: a feedback database",
        ),
    ],
)
def test_a_bad_setting_refuses_to_start_with_one_line(robust_model, tmp_path, settings, line):
    result = serve_until_exit(robust_model, tmp_path, **settings)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert line in output and "Traceback" not in output
    assert "loaded model" not in output
    assert "pw-secret" not in output  # a database URL may hold a password: never echoed


def test_production_run_open_on_purpose_says_so(hardened_service):
    """The hardened service runs with CAPTIONING_ALLOW_NO_KEY=1: it warns, and answers without a key."""
    log = hardened_service.log_path.read_text(errors="replace")
    assert "[WARNING]" in next(line for line in log.splitlines() if "public API: open" in line)
    assert "public API: open (CAPTIONING_ALLOW_NO_KEY=1); model service calls: token required" in log
    assert "model service: callers token required" in log
    assert requests.get(hardened_service.url + "/model", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def keyed_service(robust_model, tmp_path_factory):
    """Production as deployed: an API key and the internal token. Small bounds: two requests in
    flight, 100 kB per image, so uploads held at once are bounded by one full batch (1.6 MB)."""
    server = serving.start_service(
        robust_model,
        tmp_path_factory.mktemp("keyed"),
        {
            "CAPTIONING_ENV": "production",
            "CAPTIONING_API_KEY": API_KEY,
            "CAPTIONING_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "CAPTIONING_MAX_CONCURRENCY": "2",
            "CAPTIONING_MAX_UPLOAD_MB": "0.1",
            "CAPTIONING_INFLIGHT_UPLOAD_MB": "1",
            "OMP_NUM_THREADS": "1",
            "CAPTIONING_TORCH_THREADS": "1",
        },
    )
    yield server
    server.stop()


def test_production_with_a_key(keyed_service, robust_model):
    log = keyed_service.log_path.read_text(errors="replace")
    assert "public API: key required; model service calls: token required" in log
    image = {"image": ("a.jpg", serving.synthetic_jpeg(seed=2), "image/jpeg")}
    refused = requests.post(keyed_service.url + "/caption", files=image, timeout=60)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    answer = requests.post(keyed_service.url + "/caption", files=image, headers={"X-API-Key": API_KEY}, timeout=60)
    assert answer.status_code == 200, answer.text


def test_max_concurrency_answers_429(keyed_service):
    """Six slow requests against a bound of two: the extra ones get 429 at once (their uploads
    are never read), the others are captioned, and the probes still answer."""
    images = [("image", (f"{n}.jpg", serving.synthetic_jpeg(seed=n), "image/jpeg")) for n in range(16)]

    def slow_batch(_):
        answer = requests.post(
            keyed_service.url + "/caption_batch",
            files=images,
            headers={"X-API-Key": API_KEY},
            data={"beam_size": "10", "max_length": "60"},
            timeout=300,
        )
        return answer.status_code, answer.json()

    with ThreadPoolExecutor(6) as pool:
        answers = pool.map(slow_batch, range(6))
        time.sleep(0.3)
        ready = requests.get(keyed_service.url + "/readyz", timeout=5).status_code
        answers = list(answers)
    statuses = sorted(status for status, _ in answers)
    assert ready == 200
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    assert all(body["error"] == "Too many requests" for status, body in answers if status == 429)


def noise_jpeg(seed: int) -> bytes:
    """A 224 px JPEG of noise: ~60 kB, as noise barely compresses."""
    pixels = np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_uploads_held_at_once_are_bounded(keyed_service):
    """Two batches of 16 noise images (~0.95 MB each) against a budget of one full batch (1.7 MB):
    the second arrives while the first is at the model, and gets 429 with Retry-After."""
    images = [("image", (f"{n}.jpg", noise_jpeg(n), "image/jpeg")) for n in range(16)]
    budget = 16 * int(0.1 * 2**20) + 64 * 1024  # the floor: one full batch
    body_bytes = sum(len(data) for _, (_, data, _) in images)
    assert budget / 2 < body_bytes < budget and all(len(data) < 0.1 * 2**20 for _, (_, data, _) in images)

    def batch(delay: float) -> requests.Response:
        time.sleep(delay)
        return requests.post(
            keyed_service.url + "/caption_batch",
            files=images,
            headers={"X-API-Key": API_KEY},
            data={"beam_size": "10", "max_length": "60"},
            timeout=300,
        )

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(batch, (0.0, 0.3))
    assert first.status_code == 200, first.text
    assert second.status_code == 429 and second.json()["kind"] == "busy", second.text
    assert second.headers["Retry-After"] == "2" and "CAPTIONING_INFLIGHT_UPLOAD_MB" in second.json()["error"]
    # Released once answered: the same batch alone goes through.
    assert batch(0.0).status_code == 200
