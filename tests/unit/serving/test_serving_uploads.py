"""Reading uploads within their limits (body size, uploads held at once), and checking the images."""

from __future__ import annotations

import io

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request as StarletteRequest

from captioning.serving.errors import InputError, add_error_handlers
from captioning.serving.uploads import ReleaseUploads, UploadBudget, Uploads, check_images
from harness.serving import synthetic_jpeg

KB = 1024


def uploads_app(uploads: Uploads, series) -> FastAPI:
    """An app that reads the upload of a request and says what it found."""
    app = FastAPI()
    add_error_handlers(app, lambda: series.metrics)
    app.add_middleware(ReleaseUploads, budget=uploads.budget)

    @app.post("/upload")
    async def upload(request: Request, max_files: int = 2) -> dict:
        files, fields = await uploads.read(request, max_files=max_files)
        await uploads.check_images(files)
        held = uploads.budget.used
        return {"files": [[name, len(data)] for name, data in files], "fields": fields, "held": held}

    return app


@pytest.fixture
def uploads() -> Uploads:
    return Uploads(max_upload_bytes=64 * KB, inflight_bytes=1024 * KB, decode_concurrency=1)


def test_multipart_images_and_fields_are_read(uploads, series):
    image = synthetic_jpeg(seed=1, size=64)
    files = [("image", ("a.jpg", image, "image/jpeg")), ("image", ("b.jpg", image, "image/jpeg"))]
    with TestClient(uploads_app(uploads, series)) as client:
        answer = client.post("/upload?beam_size=2", files=files, data={"max_length": "9"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["files"] == [["a.jpg", len(image)], ["b.jpg", len(image)]]
    assert body["fields"]["beam_size"] == "2" and body["fields"]["max_length"] == "9"
    assert body["held"] >= 2 * len(image)  # held while the request is answered
    assert uploads.budget.used == 0  # and given back once it is


def test_a_raw_image_body_is_one_image(uploads, series):
    image = synthetic_jpeg(seed=2, size=64)
    with TestClient(uploads_app(uploads, series)) as client:
        answer = client.post("/upload", content=image, headers={"content-type": "image/jpeg"})
    assert answer.status_code == 200 and answer.json()["files"] == [["body", len(image)]]


@pytest.mark.parametrize(
    "kwargs, status, kind",
    [
        (dict(content=b"", headers={"content-type": "image/jpeg"}), 400, "empty_body"),
        (dict(json={"image": "aGVsbG8="}), 415, "bad_content_type"),
        (dict(files={"photo": ("a.jpg", b"xx", "image/jpeg")}), 400, "wrong_field"),
        (dict(content=b"x" * (200 * KB), headers={"content-type": "image/jpeg"}), 413, "too_large"),
        (dict(files={"image": ("a.txt", b"hello", "text/plain")}), 415, "not_image"),
        (dict(files={"image": ("a.jpg", synthetic_jpeg(seed=3, size=64)[:300], "image/jpeg")}), 422, "corrupt_image"),
    ],
)
def test_bad_uploads_are_refused(uploads, series, kwargs, status, kind):
    with TestClient(uploads_app(uploads, series)) as client:
        answer = client.post("/upload", **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.json()["kind"] == kind
    assert series.value("captioning_errors_total", kind=kind) == 1
    assert uploads.budget.used == 0  # a refused request gives its bytes back too


def test_the_budget_refuses_what_it_cannot_hold():
    budget = UploadBudget(limit=100)
    first, second = (StarletteRequest({"type": "http", "headers": []}) for _ in range(2))
    budget.take(first, 60)
    with pytest.raises(InputError) as refused:
        budget.take(second, 50)
    assert (refused.value.status, refused.value.kind) == (429, "busy")
    assert refused.value.headers == {"Retry-After": "2"}
    assert "CAPTIONING_INFLIGHT_UPLOAD_MB" in refused.value.message
    budget.take(second, 40)
    assert budget.used == 100
    budget.release(first)
    budget.release(first)  # releasing twice gives back nothing more
    assert budget.used == 40


def test_a_request_over_the_budget_is_answered_429(series):
    uploads = Uploads(max_upload_bytes=64 * KB, inflight_bytes=8 * KB, decode_concurrency=1)
    image = synthetic_jpeg(seed=4, size=224)
    assert len(image) > 8 * KB
    with TestClient(uploads_app(uploads, series)) as client:
        answer = client.post("/upload", files={"image": ("a.jpg", image, "image/jpeg")})
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "2"
    assert uploads.budget.used == 0


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_are_checked_by_decoding_them():
    check_images([("a.jpg", synthetic_jpeg(seed=5, size=64))], max_bytes=64 * KB)
    cases = [
        ([("a", b"")], 400, "empty_image"),
        ([("a", b"x" * (65 * KB))], 413, "too_large"),
        ([("a", b"plain text")], 415, "not_image"),
        ([("a", png(8000, 6000))], 413, "too_many_pixels"),
    ]
    for files, status, kind in cases:
        with pytest.raises(InputError) as refused:
            check_images(files, max_bytes=64 * KB)
        assert (refused.value.status, refused.value.kind) == (status, kind)
    # With several images, the refusal names the culprit.
    with pytest.raises(InputError, match="'b.jpg'"):
        check_images([("a.jpg", synthetic_jpeg(seed=6, size=64)), ("b.jpg", b"")], max_bytes=64 * KB)


def test_an_image_to_keep_is_decoded_bounded_and_upright():
    import asyncio

    from PIL import ExifTags

    from captioning.images import DECODE_SIDE

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8
    buffer = io.BytesIO()
    Image.new("RGBA", (3000, 1000), (10, 120, 200, 128)).save(buffer, format="PNG", exif=exif)
    uploads = Uploads(max_upload_bytes=1024 * KB, inflight_bytes=4096 * KB, decode_concurrency=2)
    image = asyncio.run(uploads.decode_to_keep(buffer.getvalue()))
    assert image.mode == "RGB" and image.size == (DECODE_SIDE // 3, DECODE_SIDE)  # reduced, then turned
    with pytest.raises(InputError) as refused:
        asyncio.run(uploads.decode_to_keep(b"not an image"))
    assert refused.value.status == 415


def test_a_malformed_multipart_body_is_refused_without_the_parsers_words(uploads, series):
    fields = {f"field{n}": "x" for n in range(60)}  # more than the parser takes: it raises, naming its limit
    with TestClient(uploads_app(uploads, series)) as client:
        answer = client.post("/upload", data=fields, files={"image": ("a.jpg", synthetic_jpeg(1, 32), "image/jpeg")})
    assert answer.status_code == 400 and answer.json() == {
        "error": "the multipart body cannot be parsed",
        "kind": "bad_multipart",
    }
