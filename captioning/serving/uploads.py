"""Uploaded images: reading request bodies within their limits, and checking the images in them."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from starlette.requests import Request

from captioning.serving.config import MULTIPART_OVERHEAD, ServiceConfig
from captioning.serving.errors import InputError

logger = logging.getLogger("captioning.service")

Files = list[tuple[str, bytes]]  # (file name, bytes) per uploaded image


class UploadBudget:
    """Bytes of request bodies this worker holds at once, across requests.

    max_concurrency bounds the requests in flight, but each may carry up to a full batch of
    uploads; this bounds their sum. A request's bytes count from the moment they arrive until
    its answer is sent (they travel on to the model service meanwhile). Used from the worker's
    event loop only (no lock needed).
    """

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, request: Request, size: int) -> None:
        if self.used + size > self.limit:
            raise InputError(
                429,
                "busy",
                f"the service holds {self.limit // 2**20} MB of uploads already "
                "(CAPTIONING_INFLIGHT_UPLOAD_MB): retry in a few seconds",
                headers={"Retry-After": "2"},
            )
        self.used += size
        request.state.upload_bytes = getattr(request.state, "upload_bytes", 0) + size

    def release(self, request: Request) -> None:
        self.used -= getattr(request.state, "upload_bytes", 0)
        request.state.upload_bytes = 0


class ReleaseUploads:
    """Gives each request's bytes back to the budget once it is answered, however it ended."""

    def __init__(self, app, budget: UploadBudget):
        self.app, self.budget = app, budget

    async def __call__(self, scope, receive, send):
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.budget.release(Request(scope))


class Uploads:
    """Reads the images of requests within the service's limits and checks that they decode."""

    def __init__(self, max_upload_bytes: int, inflight_bytes: int, decode_concurrency: int):
        self.max_upload_bytes = max_upload_bytes
        self.budget = UploadBudget(inflight_bytes)
        # Uploads decoded at once in this worker: the others wait here, holding no decoded pixels.
        self.decode_slots = asyncio.Semaphore(decode_concurrency)
        # Images decoded to be kept (feedback) take one slot of their own first: a burst of them
        # holds at most one full-size decode (a 40 MP RGBA PNG is 160 MB before its reduction)
        # and leaves the other slots to /caption. They run on one thread of their own: the C
        # allocator keeps a freed decode's memory in the arena of the thread that used it, so
        # on the shared pool's threads a burst would leave one full-size decode behind per thread.
        self.keep_slot = asyncio.Semaphore(1)
        self.keep_thread = ThreadPoolExecutor(1, thread_name_prefix="keep-decode")

    @classmethod
    def from_config(cls, config: ServiceConfig) -> "Uploads":
        return cls(config.max_upload_bytes, config.inflight_upload_bytes, config.decode_concurrency)

    async def read_body(self, request: Request, limit: int) -> bytes:
        """The request body, refused with 413 as soon as it passes `limit` bytes, or with 429 when
        the worker holds too many uploads already."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise InputError(
                413, "too_large", f"the request is {int(declared)} bytes: {limit_text(self.max_upload_bytes)}"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InputError(
                    413, "too_large", f"the request is more than {limit} bytes: {limit_text(self.max_upload_bytes)}"
                )
            self.budget.take(request, len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)

    async def read(self, request: Request, max_files: int) -> tuple[Files, dict[str, str]]:
        """Images and text fields (form fields over query parameters) of a multipart form, or one
        raw image body."""
        body = await self.read_body(request, self.max_upload_bytes * max_files + MULTIPART_OVERHEAD)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields = {key: value for key, value in request.query_params.items()}
        if not body:
            raise InputError(400, "empty_body", "the request has no body: send an image as the multipart field 'image'")
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return [("body", body)], fields
        if content_type != "multipart/form-data":
            raise InputError(
                415,
                "bad_content_type",
                f"send multipart/form-data with the field 'image' (or a raw image/* body), not {content_type or 'no content type'!r}",
            )
        request._body = body  # parse the form from the bytes already read
        files = await read_form(request, fields)
        return files, fields

    async def check_images(self, files: Files) -> None:
        """Decode the images off the event loop, a few at a time; a bad one is refused with a 4xx."""
        async with self.decode_slots:
            await asyncio.to_thread(check_images, files, self.max_upload_bytes)

    async def decode_to_keep(self, data: bytes):
        """One upload decoded for keeping (a feedback image): bounded like `check_images` and
        turned upright, one such decode at a time; the PIL image it gives is at most DECODE_SIDE."""
        async with self.keep_slot, self.decode_slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self.keep_thread, decode_upload, "the image", data, self.max_upload_bytes, True
            )


async def read_form(request: Request, fields: dict[str, str]) -> Files:
    """The image files of a multipart form whose body is read already; its text fields go to `fields`."""
    try:
        # The body size is already bounded; count the files ourselves for a clearer message.
        form = await request.form(max_files=1000, max_fields=50)
    except Exception as error:  # malformed multipart, too many parts
        # The parser's words stay in the log: they may quote the body back.
        logger.info("multipart body refused: %s: %s", type(error).__name__, error)
        raise InputError(400, "bad_multipart", "the multipart body cannot be parsed") from None
    files: Files = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            elif key in ("image", "images"):
                files.append((value.filename or f"image {len(files) + 1}", await value.read()))
            else:
                raise InputError(
                    400, "wrong_field", f"unexpected file field {key!r}: send the image in the field 'image'"
                )
    finally:
        await form.close()
    return files


def limit_text(max_bytes: int) -> str:
    return f"the limit is {max_bytes / 1024 / 1024:g} MB per image (CAPTIONING_MAX_UPLOAD_MB)"


def check_images(files: Files, max_bytes: int) -> None:
    """Decode each image with the training code (no larger than the model will); a bad one is
    refused with a 4xx."""
    for name, data in files:
        decode_upload(f"{name!r}" if len(files) > 1 else "the image", data, max_bytes)


def decode_upload(label: str, data: bytes, max_bytes: int, upright: bool = False):
    """One upload decoded no larger than DECODE_SIDE (a PIL image); a bad one is refused with a 4xx."""
    from captioning.images import DECODE_SIDE, ImageError, open_image

    if not data:
        raise InputError(400, "empty_image", f"{label} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InputError(413, "too_large", f"{label} is {len(data)} bytes: {limit_text(max_bytes)}")
    try:
        return open_image(data, max_side=DECODE_SIDE, upright=upright)
    except ImageError as error:
        message = str(error)
        if "MAX_PIXELS" in message or "too large" in message:
            raise InputError(413, "too_many_pixels", f"{label}: {message}") from None
        if "not an image" in message:
            raise InputError(415, "not_image", f"{label}: {message}") from None
        raise InputError(422, "corrupt_image", f"{label}: {message}") from None
