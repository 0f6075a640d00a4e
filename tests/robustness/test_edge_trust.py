"""Trust at the edge of the API.

Forged X-Forwarded-For: in the local stack haproxy adds its own X-Forwarded-For line after
whatever the client wrote, so a client that writes a new address on every request must still
count as one client (CAPTIONING_TRUST_PROXY=1 in the hardened set-up: one trusted hop, the last
entry). It sends more /caption requests than its bucket holds and is answered 429.

Probe flood: /readyz is public and unauthenticated. A flood of probes costs no model calls:
the API asks the model service about once a second in the background and probes read that
answer, so they stay fast and the questions asked do not grow with the probes.
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import requests

from tests.robustness.conftest import CAPTIONS_PER_MINUTE, record_figures

FORGED_REQUESTS = CAPTIONS_PER_MINUTE + 600  # more than the bucket and its refill meanwhile
PROBE_THREADS = 16
PROBE_SECONDS = 8.0
PROBE_BOUND_S = 1.0


def forged_caption_requests(url: str, real: str, count: int) -> list[int]:
    """`count` empty POST /caption, each with a new forged X-Forwarded-For line and then the line
    the proxy adds (the real client): the limit is taken before the body is read, so an empty
    body costs no model call and is answered 400 when the client is within its limit."""
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    statuses = []
    try:
        for number in range(count):
            connection.putrequest("POST", "/caption")
            connection.putheader("X-Forwarded-For", f"100.64.{number // 250}.{number % 250 + 1}")
            connection.putheader("X-Forwarded-For", real)
            connection.putheader("Content-Type", "image/jpeg")
            connection.putheader("Content-Length", "0")
            connection.endheaders()
            answer = connection.getresponse()
            answer.read()
            statuses.append(answer.status)
            if answer.status == 429:
                assert int(answer.getheader("Retry-After")) >= 1
    finally:
        connection.close()
    return statuses


def test_forged_forwarded_for_lines_do_not_make_new_clients(hardened_service):
    url = hardened_service.url
    statuses = forged_caption_requests(url, "203.0.113.77", FORGED_REQUESTS)
    refused = statuses.count(429)
    unexpected = [status for status in statuses if status >= 500]
    # A client writing the address on one line with the proxy's entry last is no different.
    single_line = requests.post(
        url + "/caption", headers={"X-Forwarded-For": "100.64.9.9, 203.0.113.77"}, data=b"", timeout=30
    )
    # Another client is not affected.
    other = requests.post(url + "/caption", headers={"X-Forwarded-For": "203.0.113.78"}, data=b"", timeout=30)
    record_figures(
        "forged_forwarded_for",
        {
            "requests": FORGED_REQUESTS,
            "captions_per_minute": CAPTIONS_PER_MINUTE,
            "forged_addresses": FORGED_REQUESTS,
            "answered_429": refused,
            "answered_400_empty_body": statuses.count(400),
            "unexpected_5xx": len(unexpected),
            "route": "/caption",
        },
    )
    assert not unexpected, unexpected
    assert statuses[:100] == [400] * 100  # within the burst: served (an empty body is a 400)
    assert refused >= 100, f"only {refused} of {FORGED_REQUESTS} refused: forged lines made new clients"
    assert single_line.status_code == 429 and int(single_line.headers["Retry-After"]) >= 1
    assert other.status_code == 400


def readiness_checks(url: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("captioning_readiness_checks_total"):
            return float(line.split()[-1])
    raise AssertionError("no captioning_readiness_checks_total on /metrics")


def probe(url: str, stop: threading.Event) -> list[tuple[int, float]]:
    session, results = requests.Session(), []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            status = session.get(url + "/readyz", timeout=10).status_code
        except requests.RequestException:
            status = 0
        results.append((status, time.perf_counter() - started))
    return results


def test_a_probe_flood_costs_no_model_calls(hardened_service):
    url = hardened_service.url
    before = readiness_checks(url)
    stop = threading.Event()
    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        futures = [pool.submit(probe, url, stop) for _ in range(PROBE_THREADS)]
        started = time.perf_counter()
        caption = requests.post(  # a client served meanwhile
            url + "/caption", files={"image": ("a.jpg", _jpeg(), "image/jpeg")}, timeout=60
        )
        time.sleep(max(0.0, PROBE_SECONDS - (time.perf_counter() - started)))
        stop.set()
        results = [result for future in futures for result in future.result()]
    elapsed = time.perf_counter() - started
    asked = readiness_checks(url) - before
    latencies = sorted(seconds for _, seconds in results)
    statuses = [status for status, _ in results]
    record_figures(
        "readiness_probe_flood",
        {
            "probe_threads": PROBE_THREADS,
            "seconds": round(elapsed, 1),
            "probes": len(results),
            "probes_per_second": round(len(results) / elapsed, 1),
            "not_200": len([status for status in statuses if status != 200]),
            "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
            "latency_p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1000, 1),
            "latency_max_ms": round(latencies[-1] * 1000, 1),
            "model_readiness_questions": asked,
            "caption_status_during_flood": caption.status_code,
        },
    )
    assert statuses and all(status == 200 for status in statuses), set(statuses)
    assert latencies[int(len(latencies) * 0.95)] < PROBE_BOUND_S
    assert caption.status_code == 200, caption.text
    # About one question a second, whatever the number of probes.
    assert asked <= elapsed + 3 and asked < len(results) / 20, (asked, len(results))


def _jpeg() -> bytes:
    from harness.serving import synthetic_jpeg

    return synthetic_jpeg(seed=11)
