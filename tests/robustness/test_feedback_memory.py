"""Thirty clients each send a correction with a flat ~40 MP RGBA PNG at once: every answer is a
stored correction or a 4xx, the service stays up, and the memory of its process tree grows by
less than GROWTH_BOUND_MB.

Such a PNG is a few hundred kilobytes on the wire and 160 MB once decoded (7300 x 5470 x 4 bytes);
PNG has no reduced decoding, so each decode holds that much for a moment. Feedback images are
decoded one at a time, inside the service's bound on concurrent decodes, reduced to DECODE_SIDE
there, and the stored copy is encoded from that reduced image: unbounded, thirty such decodes
(and their RGB copies) at once would need gigabytes.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import requests
from PIL import Image, ImageDraw

from captioning.images import DECODE_SIDE
from tests.robustness.conftest import MemorySampler, record_figures
from tests.robustness.test_upload_memory import settled_rss

CLIENTS = 30
SIZE = (7300, 5470)  # 39.9 MP, under the 40 MP limit
GROWTH_BOUND_MB = 300


def flat_png() -> bytes:
    image = Image.new("RGBA", SIZE, (90, 140, 200, 255))
    ImageDraw.Draw(image).rectangle((800, 900, 4000, 3100), fill=(200, 60, 40, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def send_all(url: str, data: bytes, clients: int) -> list[requests.Response]:
    def send(number: int) -> requests.Response:
        return requests.post(
            url + "/feedback",
            files={"image": ("flat.png", data, "image/png")},
            data={"caption": "a red rectangle on a blue background"},
            headers={"X-Forwarded-For": f"198.18.0.{number + 1}"},  # one client each: none is rate limited
            timeout=300,
        )

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(send, range(clients)))


def test_thirty_concurrent_40mp_feedback_pngs(hardened_service):
    data = flat_png()
    pid = hardened_service.process.pid
    baseline = settled_rss(pid)
    with MemorySampler(pid, period=0.1) as sampler:
        answers = send_all(hardened_service.url, data, CLIENTS)
    peak = max(sampler.samples)
    growth_mb = (peak - baseline) / 2**20
    statuses = [answer.status_code for answer in answers]

    assert all(status == 201 or 400 <= status < 500 for status in statuses), statuses
    assert hardened_service.process.poll() is None
    assert requests.get(hardened_service.url + "/livez", timeout=10).status_code == 200
    stored = [answer.json() for answer in answers if answer.status_code == 201]
    assert stored, statuses
    path = hardened_service.data_dir / "feedback" / "images" / f"{stored[0]['image_sha256']}.jpg"
    with Image.open(path) as kept:  # encoded from the bounded decode
        assert max(kept.size) == DECODE_SIDE and kept.format == "JPEG"
    record_figures(
        "feedback_burst_40mp_png",
        {
            "clients": CLIENTS,
            "pixels_per_image": SIZE[0] * SIZE[1],
            "decoded_bytes_per_image": SIZE[0] * SIZE[1] * 4,
            "upload_bytes": len(data),
            "statuses": {str(status): statuses.count(status) for status in sorted(set(statuses))},
            "stored_size": list(Image.open(path).size),
            "baseline_mb": round(baseline / 2**20, 1),
            "peak_mb": round(peak / 2**20, 1),
            "growth_mb": round(growth_mb, 1),
            "growth_bound_mb": GROWTH_BOUND_MB,
            "samples": len(sampler.samples),
            "sample_period_s": 0.1,
            "memory": "resident set size summed over the server's process tree (supervisor, API, model)",
        },
    )
    assert growth_mb < GROWTH_BOUND_MB, f"the service grew by {growth_mb:.0f} MB"
