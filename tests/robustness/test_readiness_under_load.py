"""The API's readiness does not queue behind caption batches.

Eight clients each send a batch of 16 images at beam 10; the service merges them into large
model batches (CAPTIONING_MAX_BATCH_SIZE=128 in the hardened set-up) that hold the model's
worker thread for seconds. Meanwhile the API's /readyz answers 200 within a second every time,
while /model, whose `info` call runs on that same thread, waits behind the batches: the
contrast shows the load was real.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from harness import serving
from tests.robustness.conftest import record_figures

CLIENTS = 8
IMAGES_PER_REQUEST = 16
PROBE_BOUND_S = 1.0


def timed_get(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        status = requests.get(url, timeout=10).status_code
    except requests.RequestException:
        status = 0  # no answer within the timeout
    return status, time.perf_counter() - started


def poll(url: str, stop: threading.Event, results: list, pause: float) -> None:
    while not stop.is_set():
        results.append(timed_get(url))
        stop.wait(pause)


def busy_batch(url: str, images: list[bytes]) -> int:
    files = [("image", (f"{n}.jpg", data, "image/jpeg")) for n, data in enumerate(images)]
    answer = requests.post(
        url + "/caption_batch", files=files, data={"beam_size": "10", "max_length": "60"}, timeout=300
    )
    return answer.status_code


def test_readyz_answers_while_the_model_is_busy(hardened_service):
    url = hardened_service.url
    images = [serving.synthetic_jpeg(seed) for seed in range(IMAGES_PER_REQUEST)]
    probes: list[tuple[int, float]] = []
    infos: list[tuple[int, float]] = []
    stop = threading.Event()
    pollers = [
        threading.Thread(target=poll, args=(url + "/readyz", stop, probes, 0.2)),
        threading.Thread(target=poll, args=(url + "/model", stop, infos, 0.1)),
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        batches = [pool.submit(busy_batch, url, images) for _ in range(CLIENTS)]
        time.sleep(0.3)  # let the batches reach the model first
        for poller in pollers:
            poller.start()
        statuses = [batch.result() for batch in batches]
    busy_seconds = time.perf_counter() - started
    stop.set()
    for poller in pollers:
        poller.join()

    assert statuses == [200] * CLIENTS
    latencies = [seconds for _, seconds in probes]
    record_figures(
        "readiness_under_load",
        {
            "clients": CLIENTS,
            "images_per_request": IMAGES_PER_REQUEST,
            "beam_size": 10,
            "busy_seconds": round(busy_seconds, 2),
            "readyz_probes": len(probes),
            "readyz_max_s": round(max(latencies), 3),
            "readyz_median_s": round(statistics.median(latencies), 3),
            "model_info_max_s": round(max(seconds for _, seconds in infos), 3),
        },
    )
    assert len(probes) >= 5, f"only {len(probes)} probes in {busy_seconds:.1f} s"
    assert all(status == 200 for status, _ in probes), probes
    assert max(latencies) < PROBE_BOUND_S, probes
    # The model's sync APIs did queue: a readiness check through them would have failed.
    assert max(seconds for _, seconds in infos) > PROBE_BOUND_S, infos
