"""Ten clients each upload a ~40 MP JPEG at once: every answer is a caption or a 4xx, the service
stays up, and the memory of its process tree grows by less than GROWTH_BOUND_MB.

Decoded at full size, the ten uploads alone would need 10 x 7300 x 5470 x 3 bytes = 1.2 GB (more
in the model service, which decodes them again, and for the mirrored views). Decoded in JPEG draft
mode to at most DECODE_SIDE px, each costs about 1 MB.
"""

from __future__ import annotations

import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from PIL import Image, ImageDraw

from captioning.images import DECODE_SIDE, MAX_PIXELS, open_image
from harness import serving
from tests.robustness.conftest import MemorySampler, record_figures, tree_rss

CLIENTS = 10
SIZE = (7300, 5470)  # 39.9 MP, under the 40 MP limit
GROWTH_BOUND_MB = 200


def big_jpeg(seed: int) -> bytes:
    """A ~40 MP JPEG that compresses to well under a megabyte (flat colours, one block)."""
    image = Image.new("RGB", SIZE, (90, 140, 200))
    ImageDraw.Draw(image).rectangle((800 + 100 * seed, 900, 4000, 3100), fill=(200, 60, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def post_all(url: str, uploads: list[bytes]) -> list[int]:
    def post(data: bytes) -> int:
        files = {"image": ("big.jpg", data, "image/jpeg")}
        return requests.post(url + "/caption", files=files, timeout=120).status_code

    with ThreadPoolExecutor(len(uploads)) as pool:
        return list(pool.map(post, uploads))


def settled_rss(pid: int) -> int:
    """The tree's memory at rest: the median of a few samples."""
    samples = []
    for _ in range(5):
        samples.append(tree_rss(pid))
        time.sleep(0.2)
    return int(statistics.median(samples))


def test_decoding_stops_at_the_decode_side():
    data = big_jpeg(0)
    assert SIZE[0] * SIZE[1] <= MAX_PIXELS
    width, height = open_image(data, max_side=DECODE_SIDE).size
    assert width == DECODE_SIDE and abs(height - DECODE_SIDE * SIZE[1] / SIZE[0]) <= 1  # aspect ratio kept
    panorama = io.BytesIO()
    Image.new("RGB", (8000, 1000), (10, 200, 30)).save(panorama, format="JPEG")
    assert open_image(panorama.getvalue(), max_side=DECODE_SIDE).size == (640, 80)


def test_ten_concurrent_40mp_uploads(hardened_service):
    uploads = [big_jpeg(seed) for seed in range(CLIENTS)]
    pid = hardened_service.process.pid
    # The same concurrency with small images first: the model's batch of ten (activations,
    # thread pools) is then allocated, so what follows measures the large uploads alone.
    warm = post_all(hardened_service.url, [serving.synthetic_jpeg(seed) for seed in range(CLIENTS)])
    assert warm == [200] * CLIENTS
    baseline = settled_rss(pid)
    with MemorySampler(pid, period=0.2) as sampler:
        statuses = post_all(hardened_service.url, uploads)
    peak = max(sampler.samples)
    growth_mb = (peak - baseline) / 2**20

    assert all(status == 200 or 400 <= status < 500 for status in statuses), statuses
    assert hardened_service.process.poll() is None
    assert requests.get(hardened_service.url + "/livez", timeout=10).status_code == 200
    record_figures(
        "concurrent_40mp_uploads",
        {
            "clients": CLIENTS,
            "pixels_per_image": SIZE[0] * SIZE[1],
            "upload_bytes": [len(data) for data in uploads],
            "statuses": statuses,
            "baseline_mb": round(baseline / 2**20, 1),
            "peak_mb": round(peak / 2**20, 1),
            "growth_mb": round(growth_mb, 1),
            "growth_bound_mb": GROWTH_BOUND_MB,
            "samples": len(sampler.samples),
            "sample_period_s": 0.2,
            "memory": "resident set size summed over the server's process tree (supervisor, API, model)",
        },
    )
    assert growth_mb < GROWTH_BOUND_MB, f"the service grew by {growth_mb:.0f} MB"
