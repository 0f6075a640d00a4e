"""An unreachable feedback database does not freeze the API.

The service is started with CAPTIONING_FEEDBACK_DB pointing at a port that accepts connections
and never answers (a hung PostgreSQL). The store is opened at start-up on a thread, each attempt
cut after CAPTIONING_FEEDBACK_CONNECT_SECONDS: meanwhile POST /feedback answers 503 at once, and
/readyz and /caption answer as usual (opened on the event loop, the first /feedback would hold
the whole worker for as long as the connection attempt lasts: with libpq's default, forever).
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from harness import serving
from tests.robustness.conftest import HARDENED_ENV


@pytest.fixture
def silent_database():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # connections complete in the kernel's backlog; nothing is ever said
    yield f"postgresql://feedback:pw-secret@127.0.0.1:{listener.getsockname()[1]}/feedback"
    listener.close()


def timed(call) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        status = call().status_code
    except requests.RequestException:
        status = 0
    return status, time.perf_counter() - started


def test_a_hung_feedback_database_leaves_the_other_routes_serving(robust_model, tmp_path, silent_database):
    env = {**HARDENED_ENV, "CAPTIONING_FEEDBACK_DB": silent_database, "CAPTIONING_FEEDBACK_CONNECT_SECONDS": "2"}
    server = serving.start_service(robust_model, tmp_path, env)
    try:
        url, image = server.url, serving.synthetic_jpeg(seed=5)

        def feedback() -> requests.Response:
            files = {"image": ("a.jpg", image, "image/jpeg")}
            return requests.post(url + "/feedback", files=files, data={"caption": "a scene"}, timeout=30)

        with ThreadPoolExecutor(4) as pool:
            corrections = [pool.submit(timed, feedback) for _ in range(3)]
            time.sleep(0.3)
            ready = timed(lambda: requests.get(url + "/readyz", timeout=30))
            caption = timed(lambda: requests.post(url + "/caption", files={"image": ("a.jpg", image)}, timeout=30))
            answers = [future.result() for future in corrections]
        assert ready[0] == 200 and ready[1] < 2.0, ready
        assert caption[0] == 200 and caption[1] < 10.0, caption
        assert all(status == 503 and seconds < 5.0 for status, seconds in answers), answers
        refused = feedback()
        assert refused.json()["kind"] == "feedback_unavailable" and int(refused.headers["Retry-After"]) >= 1
        deadline = time.monotonic() + 60  # the first attempt ends after its connect timeouts
        while "cannot open the feedback store" not in server.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
        assert "pw-secret" not in server.log_path.read_text(errors="replace")
    finally:
        server.stop()
