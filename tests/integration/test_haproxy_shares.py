"""A canary's share of the requests through the stack's real haproxy: three model slots answering
who they are, weights set as a rollout sets them, four clients one request after another."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from collections import Counter

import pytest
import requests

from captioning.release import haproxy, stack
from tests.fixtures.processes import free_block, start, stop, wait_for_http

SLOT = textwrap.dedent(
    """
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slot(BaseHTTPRequestHandler):
        def do_GET(self):
            body = sys.argv[2].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Slot).serve_forever()
    """
)
REQUESTS = 400


@pytest.fixture
def model_backend(tmp_path):
    """haproxy with model slots s0, s1 (the stable version) and s2 (the candidate) up."""
    ports = stack.ports(free_block())
    slots, names = [], ("stable", "stable", "candidate")
    try:
        for n, name in enumerate(names):
            port = ports["slots"]["model"][n]
            log = tmp_path / f"s{n}.log"
            slots.append(start([sys.executable, "-c", SLOT, str(port), name], log, dict(os.environ)))
            wait_for_http(f"http://127.0.0.1:{port}/readyz", slots[-1], log, timeout=30)
        haproxy.start(ports, tmp_path)
        for n in range(len(names)):
            haproxy.set_state(tmp_path, "model", n, "ready")
        yield tmp_path, f"http://127.0.0.1:{ports['model']}"
    finally:
        haproxy.stop(tmp_path)
        for proc in slots:
            stop(proc)


def shares(url: str) -> Counter:
    counts: Counter = Counter()
    lock = threading.Lock()

    def client(n: int) -> None:
        with requests.Session() as session:
            for _ in range(n):
                answer = session.get(url + "/readyz", timeout=10).text
                with lock:
                    counts[answer] += 1

    threads = [threading.Thread(target=client, args=(REQUESTS // 4,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts


@pytest.mark.parametrize("percent", [10, 50, 100])
def test_the_candidate_gets_its_share_of_the_requests(model_backend, percent):
    folder, url = model_backend
    candidate, each_stable = haproxy.shares(percent, stable_slots=2)
    haproxy.set_weight(folder, "model", 0, each_stable)
    haproxy.set_weight(folder, "model", 1, each_stable)
    haproxy.set_weight(folder, "model", 2, candidate)
    counts = shares(url)
    assert sum(counts.values()) == REQUESTS
    seen = 100 * counts["candidate"] / REQUESTS
    assert abs(seen - percent) <= 3, (percent, counts)
