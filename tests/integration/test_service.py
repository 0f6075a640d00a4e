"""The real service (`bentoml serve`) with a tiny trained model, over HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from harness.serving import synthetic_jpeg
from tests.integration.conftest import API_KEY, RELOAD_TOKEN


def post_image(service, data: bytes, route: str = "/caption", field: str = "image", **options):
    files = {field: ("scene.jpg", data, "image/jpeg")}
    return requests.post(service.url + route, files=files, data=options, timeout=60)


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_caption_real_image(caption_service, jpeg_bytes):
    response = post_image(caption_service, jpeg_bytes, beam_size=3, max_length=12)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["caption"], str) and body["caption"].strip()
    assert len(body["caption"].split()) <= 12
    assert 1 <= len(body["alternatives"]) <= 3
    assert body["alternatives"][0]["caption"] == body["caption"]
    log_probs = [alt["log_prob"] for alt in body["alternatives"]]
    assert all(isinstance(value, float) and value <= 0 for value in log_probs)
    assert body["latency_ms"] > 0
    info = requests.get(caption_service.url + "/model", timeout=10).json()
    assert body["model_version"] == info["model_version"]
    assert info["source"] == caption_service.env["CAPTIONING_MODEL"]
    assert "attention" not in body


def test_caption_with_attention_maps(caption_service, jpeg_bytes):
    body = post_image(caption_service, jpeg_bytes, return_attention="true").json()
    attention = body["attention"]
    assert attention["words"], body
    assert len(attention["maps"]) == len(attention["words"])
    rows, columns = attention["grid"]
    for word_map in attention["maps"]:
        flat = [v for row in word_map for v in row] if isinstance(word_map[0], list) else word_map
        assert len(flat) == rows * columns == 49  # EfficientNet-Lite0: a 7 x 7 feature grid
        assert sum(flat) == pytest.approx(1.0, abs=0.05)  # a distribution over the grid


def test_same_image_same_caption_in_batch(caption_service, jpeg_bytes):
    single = post_image(caption_service, jpeg_bytes).json()["caption"]
    other = synthetic_jpeg(seed=11)
    files = [
        ("image", ("a.jpg", jpeg_bytes, "image/jpeg")),
        ("image", ("b.jpg", other, "image/jpeg")),
        ("image", ("c.jpg", jpeg_bytes, "image/jpeg")),
    ]
    response = requests.post(caption_service.url + "/caption_batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["a.jpg", "b.jpg", "c.jpg"]
    assert results[0]["caption"] == single == results[2]["caption"]


TRUNCATED = synthetic_jpeg(seed=5)[:700]
BAD_INPUTS = {
    "non-image bytes": (
        dict(files={"image": ("notes.txt", b"just some text, not a picture" * 20, "text/plain")}),
        415,
        "not an image",
    ),
    "truncated jpeg": (dict(files={"image": ("cut.jpg", TRUNCATED, "image/jpeg")}), 422, "truncated"),
    "empty body": (dict(), 400, "no body"),
    "empty file": (dict(files={"image": ("empty.jpg", b"", "image/jpeg")}), 400, "empty"),
    "wrong field name": (dict(files={"picture": ("scene.jpg", synthetic_jpeg(1), "image/jpeg")}), 400, "'image'"),
    "only text fields": (dict(files={"beam_size": (None, "3")}), 400, "'image'"),
    "over the size limit": (
        dict(files={"image": ("big.jpg", b"\xff\xd8\xff" + b"0" * (11 * 1024 * 1024), "image/jpeg")}),
        413,
        "MB",
    ),
    "over the pixel limit": (dict(files={"image": ("huge.png", png_bytes(8000, 6000), "image/png")}), 413, "pixels"),
    "beam size zero": (
        dict(files={"image": ("s.jpg", synthetic_jpeg(1), "image/jpeg")}, data={"beam_size": "0"}),
        400,
        "beam_size",
    ),
    "beam size not a number": (
        dict(files={"image": ("s.jpg", synthetic_jpeg(1), "image/jpeg")}, data={"beam_size": "three"}),
        400,
        "beam_size",
    ),
    "max length too long": (
        dict(files={"image": ("s.jpg", synthetic_jpeg(1), "image/jpeg")}, data={"max_length": "5000"}),
        400,
        "max_length",
    ),
    "attention flag not boolean": (
        dict(files={"image": ("s.jpg", synthetic_jpeg(1), "image/jpeg")}, data={"return_attention": "maybe"}),
        400,
        "return_attention",
    ),
    "json instead of multipart": (dict(json={"image": "aGVsbG8="}), 415, "multipart"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_json(caption_service, case):
    kwargs, status, words = BAD_INPUTS[case]
    response = requests.post(caption_service.url + "/caption", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert words.lower() in body["error"].lower(), body


def test_bad_requests_elsewhere(caption_service, jpeg_bytes):
    too_many = [("image", (f"{i}.jpg", jpeg_bytes, "image/jpeg")) for i in range(17)]
    response = requests.post(caption_service.url + "/caption_batch", files=too_many, timeout=60)
    assert response.status_code == 413 and "at most 16" in response.json()["error"]
    response = requests.get(caption_service.url + "/caption", timeout=10)
    assert response.status_code == 405 and "error" in response.json()


def test_service_survives_bad_input(caption_service, jpeg_bytes):
    """A burst of bad requests mixed with good ones: every good one still succeeds."""
    for kwargs, status, _ in BAD_INPUTS.values():
        assert requests.post(caption_service.url + "/caption", timeout=60, **kwargs).status_code == status
        assert post_image(caption_service, jpeg_bytes).status_code == 200
    assert requests.get(caption_service.url + "/livez", timeout=5).status_code == 200
    assert requests.get(caption_service.url + "/readyz", timeout=5).status_code == 200


def test_feedback_is_stored_and_becomes_a_dataset(caption_service, jpeg_bytes):
    from captioning.data.feedback import Review, load_feedback

    predicted = post_image(caption_service, jpeg_bytes).json()
    response = requests.post(
        caption_service.url + "/feedback",
        files={"image": ("scene.jpg", jpeg_bytes, "image/jpeg")},
        data={
            "caption": "  A corrected   caption of the scene ",
            "predicted_caption": predicted["caption"],
            "model_version": predicted["model_version"],
        },
        timeout=30,
    )
    assert response.status_code == 201, response.text
    stored = response.json()
    dataset = load_feedback(caption_service.data_dir / "feedback", review=Review("none"))  # stored, unreviewed
    record = next(r for r in dataset.records if r.image_id == stored["image_sha256"])
    assert "A corrected caption of the scene" in record.captions
    assert record.split == "train"
    # Kept re-encoded without metadata, named by the SHA-256 of the stored bytes: same picture, same size.
    kept = open(record.path, "rb").read()
    assert hashlib.sha256(kept).hexdigest() == stored["image_sha256"]
    assert Image.open(io.BytesIO(kept)).size == Image.open(io.BytesIO(jpeg_bytes)).size

    missing = requests.post(
        caption_service.url + "/feedback",
        files={"image": ("s.jpg", jpeg_bytes, "image/jpeg")},
        data={"caption": "   "},
        timeout=30,
    )
    assert missing.status_code == 400 and "caption" in missing.json()["error"]
    not_image = requests.post(
        caption_service.url + "/feedback",
        files={"image": ("s.txt", b"hello", "text/plain")},
        data={"caption": "a cat"},
        timeout=30,
    )
    assert not_image.status_code == 415
    assert len(load_feedback(caption_service.data_dir / "feedback", review=Review("none")).records) == len(
        dataset.records
    )


def test_metrics_expose_custom_series(caption_service, jpeg_bytes):
    post_image(caption_service, jpeg_bytes)
    post_image(caption_service, b"not an image at all")
    text = requests.get(caption_service.url + "/metrics", timeout=10).text
    version = requests.get(caption_service.url + "/model", timeout=10).json()["model_version"]
    assert 'captioning_requests_total{route="/caption",status="200"}' in text
    assert 'captioning_errors_total{kind="not_image"}' in text
    assert "captioning_request_latency_seconds_bucket" in text
    assert "captioning_model_batch_size_bucket" in text
    assert "captioning_caption_length_words_count" in text
    assert (
        f'captioning_model_info{{source="{caption_service.env["CAPTIONING_MODEL"]}",version="{version}"}} 1.0' in text
    )
    assert "bentoml_service_request_total" in text  # BentoML's own metrics sit beside ours


def test_reload_needs_the_token(caption_service, jpeg_bytes):
    url = caption_service.url + "/reload"
    assert requests.post(url, timeout=30).status_code == 401
    assert requests.post(url, headers={"X-Reload-Token": "wrong"}, timeout=30).status_code == 401
    response = requests.post(url, headers={"X-Reload-Token": RELOAD_TOKEN}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["reloaded"] is True
    assert post_image(caption_service, jpeg_bytes).status_code == 200


def test_api_key(champion_service, caption_service, jpeg_bytes):
    server, _, _ = champion_service
    url = server.url
    refused = post_image(server, jpeg_bytes)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    wrong = requests.post(
        url + "/caption", files={"image": ("s.jpg", jpeg_bytes)}, headers={"X-API-Key": "nope"}, timeout=30
    )
    assert wrong.status_code == 401
    ok = requests.post(
        url + "/caption", files={"image": ("s.jpg", jpeg_bytes)}, headers={"X-API-Key": API_KEY}, timeout=60
    )
    assert ok.status_code == 200 and ok.json()["caption"]
    for health in ("/livez", "/readyz"):
        assert requests.get(url + health, timeout=10).status_code == 200
    assert requests.get(url + "/metrics", timeout=10).status_code == 401
    assert requests.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).status_code == 200
    assert requests.get(url + "/model", timeout=10).status_code == 401
    # Without CAPTIONING_API_KEY the same request needs no key.
    assert post_image(caption_service, jpeg_bytes).status_code == 200


def test_bounded_load_without_errors(caption_service):
    """300 requests, 16 at a time, on loopback: every one answered 200 within the time bound."""
    images = [synthetic_jpeg(seed) for seed in range(8)]
    local = threading.local()

    def one(index: int) -> int:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        files = {"image": ("s.jpg", images[index % len(images)], "image/jpeg")}
        return session.post(
            caption_service.url + "/caption", files=files, data={"beam_size": 2}, timeout=60
        ).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(one, range(300)))
    elapsed = time.monotonic() - started
    assert statuses.count(200) == 300, {s: statuses.count(s) for s in set(statuses)}
    assert elapsed < 150


def test_serves_the_champion_and_follows_a_new_one(champion_service, tiny_model):
    """models:/captioner@champion resolved at start-up; a newly promoted champion is picked up
    by polling the registry, without a restart."""
    from captioning.config import PARAMS_FILE
    from captioning.registry.versions import register
    from captioning.settings import load_settings

    server, store, first = champion_service
    key = {"X-API-Key": API_KEY}
    info = requests.get(server.url + "/model", headers=key, timeout=10).json()
    assert info["source"] == "models:/captioner@champion"
    assert info["registry_version"] == info["model_version"] == str(first.version)
    second = register(
        tiny_model, {"CIDEr": 20.0}, "synthetic[test]", load_settings(PARAMS_FILE), gates={}, tracking=store, lineage={}
    )
    assert second.promoted, second.message
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and info["model_version"] != str(second.version):
        time.sleep(0.5)
        info = requests.get(server.url + "/model", headers=key, timeout=10).json()
    assert info["model_version"] == info["registry_version"] == str(second.version)
    answer = requests.post(
        server.url + "/caption", files={"image": ("s.jpg", synthetic_jpeg(2), "image/jpeg")}, headers=key, timeout=60
    ).json()
    assert answer["model_version"] == str(second.version)
    metrics = requests.get(server.url + "/metrics", headers=key, timeout=10).text
    assert f'version="{second.version}"}} 1.0' in metrics and f'version="{first.version}"}} 0.0' in metrics
