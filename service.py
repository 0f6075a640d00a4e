"""The captioning service: an HTTP API service in front of a model service.

`CaptionAPI` (HTTP routes, input checks, image decoding, the web page,
feedback) depends on `CaptionModelService` (the Captioner, adaptive batching,
GPU when present). `bentoml serve service:CaptionAPI` runs both on one
machine; in Kubernetes each runs in its own Deployment and scales on its own
(see deploy/).

Environment:
  CAPTIONING_MODEL            package folder, models:/NAME@ALIAS, or bento:NAME:VERSION (a model in
                              BentoML's store, as a release's image carries it; default
                              models:/captioner@champion)
  MLFLOW_TRACKING_URI         the registry of a models:/ source (default: params.yaml tracking.uri)
  CAPTIONING_POLL_SECONDS     how often the model service asks the registry for a new champion
                              (default 60 for models:/ URIs, 0 = never)
  CAPTIONING_RELOAD_TOKEN     enables POST /reload (header X-Reload-Token or Authorization: Bearer)
  CAPTIONING_API_KEY          when set, every route but the health checks and the page needs X-API-Key
  CAPTIONING_ENV              "production" (the deploy configmap sets it): the API refuses to start without
                              CAPTIONING_API_KEY, and both services without CAPTIONING_INTERNAL_TOKEN
  CAPTIONING_ALLOW_NO_KEY     1 = in production, run without those keys on purpose (logged at start-up)
  CAPTIONING_INTERNAL_TOKEN   shared secret of the two services: when set, the model service answers only
                              calls that carry it (the API sends it on every call); unset, the model service
                              is open, as with `bentoml serve` on one machine, where it listens on a Unix
                              socket in a private (0700) folder
  CAPTIONING_FEEDBACK_PER_MINUTE  POST /feedback per client address and minute, per API worker (default 30,
                              0 = no limit); answered 429 with Retry-After past it
  CAPTIONING_TRUST_PROXY      1 = the client address is the last X-Forwarded-For entry (the one the ingress
                              appended; set it behind the ingress); otherwise the peer address
  CAPTIONING_MAX_CONCURRENCY  requests in flight per API worker before it answers 429 (default 32)
  CAPTIONING_DECODE_CONCURRENCY  uploads decoded at once per API worker (default 2)
  CAPTIONING_INFLIGHT_UPLOAD_MB  request bodies held at once per API worker before it answers 429 (default 200,
                              never less than one full /caption_batch)
  CAPTIONING_MAX_UPLOAD_MB    largest accepted image file (default 10)
  CAPTIONING_MAX_BATCH_IMAGES most images in one /caption_batch request (default 16)
  CAPTIONING_ADAPTIVE_BATCHING  0 turns adaptive batching off (benchmarks compare both)
  CAPTIONING_MAX_BATCH_SIZE / CAPTIONING_MAX_LATENCY_MS  adaptive batching bounds
  CAPTIONING_FEEDBACK_DB      feedback database URL (default SQLite under the data folder)
  CAPTIONING_TORCH_THREADS    torch threads of the model service (default: torch's choice)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from captioning.config import disable_telemetry

disable_telemetry()

logger = logging.getLogger("captioning.service")


def _show_info_logs() -> None:
    """BentoML's server logging shows its own loggers from INFO, others from WARNING: ours from
    INFO too (start-up modes, model loads, reloads)."""
    logging.getLogger("captioning").setLevel(logging.INFO)


WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_MODEL = "models:/captioner@champion"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


ADAPTIVE_BATCHING = os.environ.get("CAPTIONING_ADAPTIVE_BATCHING", "1").strip() not in ("0", "false", "no")
MAX_BATCH_SIZE = _env_int("CAPTIONING_MAX_BATCH_SIZE", 16)
MAX_LATENCY_MS = _env_int("CAPTIONING_MAX_LATENCY_MS", 30_000)
MAX_UPLOAD_BYTES = int(float(os.environ.get("CAPTIONING_MAX_UPLOAD_MB", "10")) * 1024 * 1024)
MAX_BATCH_IMAGES = _env_int("CAPTIONING_MAX_BATCH_IMAGES", 16)
MODEL_CALL_ATTEMPTS = 3
MAX_CONCURRENCY = max(1, _env_int("CAPTIONING_MAX_CONCURRENCY", 32))
DECODE_CONCURRENCY = max(1, _env_int("CAPTIONING_DECODE_CONCURRENCY", 2))
FEEDBACK_PER_MINUTE = _env_int("CAPTIONING_FEEDBACK_PER_MINUTE", 30)
READY_TIMEOUT_SECONDS = 2.0
INTERNAL_HEADER = "X-Captioning-Internal-Token"
# Room for the multipart headers and text fields around the files.
MULTIPART_OVERHEAD = 64 * 1024
# Request bodies held at once per API worker; never less than the largest request (one
# /caption_batch at its limits), which must always be able to go through alone.
INFLIGHT_UPLOAD_BYTES = max(
    _env_int("CAPTIONING_INFLIGHT_UPLOAD_MB", 200) * 1024 * 1024,
    MAX_UPLOAD_BYTES * MAX_BATCH_IMAGES + MULTIPART_OVERHEAD,
)

OPTION_LIMITS = {"beam_size": (1, 10), "max_length": (1, 60)}
HEALTH_PATHS = {"/livez", "/readyz", "/healthz"}
PUBLIC_PATHS = HEALTH_PATHS | {"/", "/web/app.js", "/web/style.css", "/favicon.ico"}
# What the model service answers without the internal token: probes and Prometheus.
MODEL_OPEN_PATHS = HEALTH_PATHS | {"/metrics"}


# ---------------------------------------------------------------- metrics

_METRICS: dict[str, Any] = {}


def metrics() -> dict[str, Any]:
    """The custom Prometheus metrics, created once per process.

    They go through `bentoml.metrics` (prometheus_client under BentoML's
    multi-process set-up), so /metrics shows them next to BentoML's own.
    """
    if _METRICS:
        return _METRICS
    m = bentoml.metrics
    latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    _METRICS.update(
        requests=m.Counter(
            name="captioning_requests_total",
            documentation="Caption API requests by route and HTTP status",
            labelnames=["route", "status"],
        ),
        latency=m.Histogram(
            name="captioning_request_latency_seconds",
            documentation="Caption API request latency by route",
            labelnames=["route"],
            buckets=latency_buckets,
        ),
        errors=m.Counter(
            name="captioning_errors_total",
            documentation="Rejected or failed requests by kind",
            labelnames=["kind"],
        ),
        caption_words=m.Histogram(
            name="captioning_caption_length_words",
            documentation="Words in the returned captions",
            buckets=(1, 2, 4, 6, 8, 10, 12, 15, 20, 30, 60),
        ),
        batch_size=m.Histogram(
            name="captioning_model_batch_size",
            documentation="Images per model call (after adaptive batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
        ),
        inference=m.Histogram(
            name="captioning_model_inference_seconds",
            documentation="Time of one model call (a whole batch)",
            buckets=latency_buckets,
        ),
        model_info=m.Gauge(
            name="captioning_model_info",
            documentation="The model version served (1 = current)",
            labelnames=["version", "source"],
            multiprocess_mode="livemax",
        ),
        feedback=m.Counter(
            name="captioning_feedback_total",
            documentation="Corrected captions stored",
        ),
        reloads=m.Counter(
            name="captioning_model_reloads_total",
            documentation="Model reloads by outcome",
            labelnames=["outcome"],
        ),
    )
    return _METRICS


# ---------------------------------------------------------------- start-up checks


class StartupRefused(RuntimeError):
    """A configuration the service must not run with (it says what to set)."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def production() -> bool:
    return os.environ.get("CAPTIONING_ENV", "").strip().lower() == "production"


def internal_token() -> str:
    return os.environ.get("CAPTIONING_INTERNAL_TOKEN", "").strip()


def public_auth_mode() -> str:
    """How the public API authenticates: "key required" or "open"; refuses production without a key."""
    if os.environ.get("CAPTIONING_API_KEY", "").strip():
        return "key required"
    if production() and not _flag("CAPTIONING_ALLOW_NO_KEY"):
        raise StartupRefused(
            "CAPTIONING_ENV=production and CAPTIONING_API_KEY is not set: refusing to start the API. "
            "Set the key (secret captioning-secrets, key api-key), or CAPTIONING_ALLOW_NO_KEY=1 to run open on purpose."
        )
    return "open"


def internal_auth_mode() -> str:
    """How the model service authenticates its callers: "token required" or "open"."""
    if internal_token():
        return "token required"
    if production() and not _flag("CAPTIONING_ALLOW_NO_KEY"):
        raise StartupRefused(
            "CAPTIONING_ENV=production and CAPTIONING_INTERNAL_TOKEN is not set: refusing to start. Give both "
            "services the same token (secret captioning-secrets, key internal-token), or CAPTIONING_ALLOW_NO_KEY=1."
        )
    return "open"


def refuse_bad_settings(*checks) -> None:
    """Run the start-up checks; a refusal exits with its message (status 1, no traceback)."""
    try:
        for check in checks:
            check()
    except StartupRefused as error:
        sys.exit(f"error: {error}")


# ---------------------------------------------------------------- model service


def _option(name: str, default: int | None = None):
    """A decoding option with the API's limits, checked again by the model service itself."""
    low, high = OPTION_LIMITS[name]
    return Field(default, ge=low, le=high)


class CaptionJob(BaseModel):
    """One image to caption and its decoding options (what the API sends the model)."""

    image: bytes = Field(max_length=MAX_UPLOAD_BYTES)
    beam_size: int | None = _option("beam_size")  # None: the package's decoding defaults
    max_length: int | None = _option("max_length")
    return_attention: bool = False


class InternalTokenMiddleware:
    """With $CAPTIONING_INTERNAL_TOKEN set, the model service answers only callers that send it in
    the X-Captioning-Internal-Token header (the API service does); probes and /metrics stay open.

    Checked before the body is read: the API's calls carry pickled data, which must never be
    unpickled for a caller we do not know.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        token = internal_token()
        if token and scope["type"] == "http" and scope["path"] not in MODEL_OPEN_PATHS:
            sent = Request(scope).headers.get(INTERNAL_HEADER, "")
            if not hmac.compare_digest(sent.encode(), token.encode()):
                response = JSONResponse(
                    {"error": f"missing or wrong internal token (header {INTERNAL_HEADER})", "kind": "unauthorized"},
                    status_code=401,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


BENTO_PREFIX = "bento:"


def _bento_model(source: str):
    """The BentoML model a `bento:NAME:VERSION` source names (a served bento's own store first)."""
    return bentoml.models.get(source[len(BENTO_PREFIX) :])


def _tracking(source: str) -> str | None:
    """The tracking URI for a registry source: $MLFLOW_TRACKING_URI (None: the registry reads it),
    else the project's params.yaml tracking.uri, as `make serve` from the source tree has it."""
    if os.environ.get("MLFLOW_TRACKING_URI") or not source.startswith(("models:", "runs:")):
        return None
    from captioning.config import PARAMS_FILE
    from captioning.registry.store import tracking_uri
    from captioning.settings import load_settings

    return tracking_uri(load_settings(PARAMS_FILE))


def _locate(source: str, tracking: str | None, download: bool = True):
    """The registry version and package folder of the model source (`captioning.registry.client.Located`):
    a bento model's from its metadata, any other's from the registry at `tracking`; with
    download=False only the version is sure (what an alias points at now)."""
    from captioning.registry.locate import Located, locate

    if source.startswith(BENTO_PREFIX):
        model = _bento_model(source)
        version = model.info.metadata.get("registry_version")
        return Located(str(version) if version is not None else None, Path(model.path))
    return locate(source, tracking, download=download)


@bentoml.service(
    name="caption_model",
    workers=1,
    traffic={"timeout": 120, "max_concurrency": 256},
    # How the API's client connects to this service. BentoML's default recycles the HTTP
    # session every 100 requests, cutting the requests in flight on it; recycle hourly instead
    # (the API retries a dropped connection anyway).
    runner_connection={"max_requests": 1_000_000_000, "max_age": 3600.0},
    resources={"gpu": 1} if os.environ.get("CAPTIONING_GPU") == "1" else {"cpu": "2"},
)
class CaptionModelService:
    """Holds the Captioner; merges concurrent requests into batches."""

    @bentoml.on_deployment
    def check_settings() -> None:
        # Runs in the server's supervisor before any worker starts: a refusal stops the server.
        refuse_bad_settings(internal_auth_mode)

    def __init__(self) -> None:
        from captioning.config import get_device

        _show_info_logs()
        logger.info("model service: callers %s", internal_auth_mode())
        self.source = os.environ.get("CAPTIONING_MODEL", DEFAULT_MODEL)
        self.device = str(get_device())
        threads = _env_int("CAPTIONING_TORCH_THREADS", 0)
        if threads > 0:  # on a CPU shared with other work, fewer threads avoid OpenMP contention
            import torch

            torch.set_num_threads(threads)
        self.tracking = _tracking(self.source)  # read once: polls ask the same registry
        self._lock = threading.Lock()  # one load or reload at a time
        self.captioner = None
        self.registry_version: str | None = None
        self.loaded_at = 0.0
        try:
            self._load()
        except Exception as error:
            raise RuntimeError(
                f"cannot load the model {self.source!r} ({type(error).__name__}: {error}). "
                "Train and register a champion first (`make run`), or point CAPTIONING_MODEL "
                "(MODEL for `make serve`) at a package folder."
            ) from error
        default_poll = 60 if self.source.startswith("models:/") else 0
        self.poll_seconds = _env_int("CAPTIONING_POLL_SECONDS", default_poll)
        if self.poll_seconds > 0:
            threading.Thread(target=self._poll, name="registry-poll", daemon=True).start()

    def _load(self) -> str:
        from captioning.config import get_device
        from captioning.inference.predict import Captioner

        started = time.perf_counter()
        # One look-up gives the version and its folder: a champion promoted meanwhile is caught by the next poll.
        located = _locate(self.source, self.tracking)
        captioner = Captioner.load(located.path, device=get_device(), version=located.version, source=self.source)
        self.registry_version = located.version
        previous = self.captioner
        self.captioner = captioner  # one assignment: in-flight calls keep the old one
        self.loaded_at = time.time()
        gauge = metrics()["model_info"]
        if previous is not None and _version_of(previous) != _version_of(captioner):
            gauge.labels(version=_version_of(previous), source=self.source).set(0)
        gauge.labels(version=_version_of(captioner), source=self.source).set(1)
        logger.info(
            "loaded model %s from %s in %.1fs", _version_of(captioner), self.source, time.perf_counter() - started
        )
        return _version_of(captioner)

    def _poll(self) -> None:
        while True:
            time.sleep(self.poll_seconds)
            try:
                latest = _locate(self.source, self.tracking, download=False).version
                if latest is not None and latest != self.registry_version:
                    logger.info("registry points at version %s: reloading", latest)
                    self._reload()
            except Exception:  # a registry hiccup must not stop serving
                logger.exception("registry poll failed; still serving %s", _version_of(self.captioner))

    def __is_ready__(self) -> bool:
        return self.captioner is not None

    @bentoml.api(
        batchable=ADAPTIVE_BATCHING,
        max_batch_size=MAX_BATCH_SIZE,
        max_latency_ms=MAX_LATENCY_MS,
    )
    def caption(self, jobs: list[CaptionJob]) -> list[dict]:
        """Caption a batch; jobs with the same options share one model call."""
        captioner = self.captioner
        m = metrics()
        results: list[dict | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault((job.beam_size, job.max_length, job.return_attention), []).append(index)
        for (beam_size, max_length, return_attention), indices in groups.items():
            options = dict(beam_size=beam_size, max_length=max_length, return_attention=return_attention)
            started = time.perf_counter()
            try:
                outputs = captioner.caption([jobs[i].image for i in indices], **options)
            except Exception:
                # Other users' images share this batch: caption one by one so only the culprit fails.
                logger.exception("batch of %d failed; captioning its images one by one", len(indices))
                outputs = [self._caption_one(captioner, jobs[i].image, options) for i in indices]
            m["inference"].observe(time.perf_counter() - started)
            m["batch_size"].observe(len(indices))
            for i, output in zip(indices, outputs):
                results[i] = _jsonable({**output, "model_version": _version_of(captioner)})
        return results

    @staticmethod
    def _caption_one(captioner, image: bytes, options: dict) -> dict:
        try:
            return captioner.caption([image], **options)[0]
        except Exception as error:
            logger.exception("captioning one image failed")
            return {"error": f"{type(error).__name__}: {error}"}

    @bentoml.api
    async def ready(self) -> dict:
        """Readiness for the API service. Async on purpose: BentoML runs the sync APIs (caption,
        info, reload) one at a time on one worker thread, so `info` waits behind caption batches;
        this answers from the event loop at once."""
        captioner = self.captioner
        return {
            "ready": captioner is not None,
            "model_version": _version_of(captioner) if captioner is not None else None,
        }

    @bentoml.api
    def info(self) -> dict:
        captioner = self.captioner
        config = getattr(captioner, "config", None)
        return _jsonable(
            {
                "model_version": _version_of(captioner),
                "source": self.source,
                "registry_version": self.registry_version,
                "device": self.device,
                "loaded_at": self.loaded_at,
                "poll_seconds": self.poll_seconds,
                "adaptive_batching": ADAPTIVE_BATCHING,
                "max_batch_size": MAX_BATCH_SIZE,
                # The package settings, without the per-tensor shapes.
                "config": {k: v for k, v in config.items() if k != "parameter_shapes"}
                if isinstance(config, dict)
                else None,
            }
        )

    @bentoml.api
    def reload(self) -> dict:
        """Load the model again from its source (a new champion, a rewritten folder)."""
        return self._reload()

    def _reload(self) -> dict:
        with self._lock:
            previous = _version_of(self.captioner)
            try:
                version = self._load()
            except Exception as error:
                metrics()["reloads"].labels(outcome="failed").inc()
                logger.exception("reload failed; still serving %s", previous)
                return {"reloaded": False, "model_version": previous, "error": f"{type(error).__name__}: {error}"}
        metrics()["reloads"].labels(outcome="ok").inc()
        return {
            "reloaded": True,
            "previous_version": previous,
            "model_version": version,
            "changed": previous != version,
        }


def _version_of(captioner) -> str:
    """The registry version; for a package folder ("local") the weights checksum makes it specific."""
    version = str(captioner.version)
    sha = (getattr(captioner, "config", None) or {}).get("weights_sha256")
    return f"local-{sha[:12]}" if version == "local" and sha else version


def _jsonable(value: Any) -> Any:
    """Tensors and numpy arrays to plain lists, so every answer is JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float):
        return round(value, 6)
    return value


# ---------------------------------------------------------------- HTTP API


class InputError(Exception):
    """A request we refuse: HTTP status, error kind (metrics label) and message."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    metrics()["errors"].labels(kind=kind).inc()
    return JSONResponse({"error": message, "kind": kind}, status_code=status, headers=headers)


app = FastAPI(title="Image captioning", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(InputError)
async def _input_error(_: Request, error: InputError) -> JSONResponse:
    return _error(error.status, error.kind, error.message, error.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return _error(error.status_code, "http", str(error.detail))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    return _error(400, "bad_request", f"invalid request: {error.errors()}")


def _parse_option(name: str, raw: str | None, default: Any) -> Any:
    if raw is None or str(raw).strip() == "":
        return default
    raw = str(raw).strip()
    if name == "return_attention":
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise InputError(400, "bad_option", f"return_attention must be true or false, got {raw!r}")
    low, high = OPTION_LIMITS[name]
    try:
        value = int(raw)
    except ValueError:
        raise InputError(400, "bad_option", f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise InputError(400, "bad_option", f"{name} must be between {low} and {high}, got {value}")
    return value


def _limit_text() -> str:
    return f"the limit is {MAX_UPLOAD_BYTES / 1024 / 1024:g} MB per image (CAPTIONING_MAX_UPLOAD_MB)"


class UploadBudget:
    """Bytes of request bodies this worker holds at once, across requests.

    max_concurrency bounds the requests in flight, but each may carry up to a full batch of
    uploads; this bounds their sum. A request's bytes count from the moment they arrive until
    its answer is ready (they travel on to the model service meanwhile). Used from the
    worker's event loop only (no lock needed).
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


UPLOADS = UploadBudget(INFLIGHT_UPLOAD_BYTES)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes, or with 429 when
    the worker holds too many uploads already."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InputError(413, "too_large", f"the request is {int(declared)} bytes: {_limit_text()}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, "too_large", f"the request is more than {limit} bytes: {_limit_text()}")
        UPLOADS.take(request, len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_upload(request: Request, max_files: int) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """Images (name, bytes) and text fields of a multipart form, or one raw image body."""
    limit = MAX_UPLOAD_BYTES * max_files + MULTIPART_OVERHEAD
    body = await _read_body(request, limit)
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
    try:
        # The body size is already bounded; count the files ourselves for a clearer message.
        form = await request.form(max_files=1000, max_fields=50)
    except Exception as error:  # malformed multipart, too many parts
        raise InputError(400, "bad_multipart", f"the multipart body cannot be parsed: {error}") from None
    files: list[tuple[str, bytes]] = []
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            elif key in ("image", "images"):
                files.append((value.filename or f"image {len(files) + 1}", await value.read()))
            else:
                raise InputError(
                    400,
                    "wrong_field",
                    f"unexpected file field {key!r}: send the image in the field 'image'",
                )
    finally:
        await form.close()
    return files, fields


# Uploads decoded at once in this worker: the others wait here, holding no decoded pixels.
_DECODE_SLOTS = asyncio.Semaphore(DECODE_CONCURRENCY)


async def _check_images_bounded(files: list[tuple[str, bytes]]) -> None:
    async with _DECODE_SLOTS:
        await asyncio.to_thread(_check_images, files)


def _check_images(files: list[tuple[str, bytes]]) -> None:
    """Decode each image with the training code (no larger than the model will); a bad one is
    refused with a 4xx."""
    from captioning.images import DECODE_SIDE, ImageError, open_image

    for name, data in files:
        label = f"{name!r}" if len(files) > 1 else "the image"
        if not data:
            raise InputError(400, "empty_image", f"{label} is empty (0 bytes)")
        if len(data) > MAX_UPLOAD_BYTES:
            raise InputError(
                413,
                "too_large",
                f"{label} is {len(data)} bytes: {_limit_text()}",
            )
        try:
            open_image(data, max_side=DECODE_SIDE)
        except ImageError as error:
            message = str(error)
            if "MAX_PIXELS" in message or "too large" in message:
                raise InputError(413, "too_many_pixels", f"{label}: {message}") from None
            if "not an image" in message:
                raise InputError(415, "not_image", f"{label}: {message}") from None
            raise InputError(422, "corrupt_image", f"{label}: {message}") from None


def _options(fields: dict[str, str]) -> dict[str, Any]:
    return {
        "beam_size": _parse_option("beam_size", fields.get("beam_size"), None),
        "max_length": _parse_option("max_length", fields.get("max_length"), None),
        "return_attention": _parse_option("return_attention", fields.get("return_attention"), False),
    }


def _public(result: dict, return_attention: bool) -> dict:
    answer = {
        "caption": result["caption"],
        "alternatives": [
            {"caption": alt["caption"], "log_prob": alt["log_prob"]} for alt in result.get("alternatives", [])
        ],
        "model_version": result["model_version"],
    }
    if return_attention and result.get("attention") is not None:
        answer["attention"] = result["attention"]
    return answer


def _sent_key(request: Request) -> str:
    sent = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if not sent and auth.lower().startswith("bearer "):
        sent = auth[7:].strip()
    return sent


def _api_key_ok(request: Request) -> bool:
    key = os.environ.get("CAPTIONING_API_KEY", "")
    if not key:
        return True
    return hmac.compare_digest(_sent_key(request).encode(), key.encode())


def client_id(request: Request) -> str:
    """Who a request counts against: its address. Not the API key: that is one secret shared
    by every legitimate client, so it would put them all in one bucket."""
    forwarded = request.headers.get("x-forwarded-for", "")
    if forwarded and _flag("CAPTIONING_TRUST_PROXY"):
        # The last entry is the one our proxy appended; a client can write any entries before it.
        return forwarded.split(",")[-1].strip()
    return request.client.host if request.client else "unknown"


class RateLimiter:
    """At most `per_minute` requests per client: a token bucket per client, refilled continuously.

    Used from the worker's event loop only (no lock needed). The least recently seen clients
    are forgotten beyond `max_clients`, so made-up addresses cannot grow it without bound.
    """

    def __init__(self, per_minute: int, max_clients: int = 10_000):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    def wait(self, client: str, now: float | None = None) -> float:
        """0 when the request may go (it takes a token), else the seconds until it may."""
        if self.capacity <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, then = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return wait


FEEDBACK_LIMITER = RateLimiter(FEEDBACK_PER_MINUTE)


def _check_rate(request: Request, limiter: RateLimiter, route: str) -> None:
    wait = limiter.wait(client_id(request))
    if wait > 0:
        seconds = math.ceil(wait)
        raise InputError(
            429,
            "rate_limited",
            f"too many requests to {route}: retry in {seconds} s",
            headers={"Retry-After": str(seconds)},
        )


class ApiKeyMiddleware:
    """With $CAPTIONING_API_KEY set, every route but health checks and the page needs the key.

    Applied to the whole BentoML app, so /metrics and BentoML's own routes are
    covered too (Prometheus sends it as `Authorization: Bearer`).
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            request = Request(scope)
            if not _api_key_ok(request):
                metrics()["errors"].labels(kind="unauthorized").inc()
                response = JSONResponse(
                    {"error": "missing or wrong API key: send it in the X-API-Key header", "kind": "unauthorized"},
                    status_code=401,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _send_internal_token(model) -> None:
    """Make every call of the API's model client carry the internal token.

    BentoML 1.4's client has no per-call headers in its public interface; its default headers
    are the ones each of its HTTP sessions is created with, so the token goes there before the
    first call (the robustness tests check that calls carry it).
    """
    token = internal_token()
    headers = getattr(getattr(model, "to_async", None), "default_headers", None)
    if token and isinstance(headers, dict):
        headers[INTERNAL_HEADER] = token
    elif token:
        logger.warning("the model client has no default headers: calls go without the internal token")


def _may_retry(error: BaseException, attempt: int) -> bool:
    """Whether a failed model call goes out again (to whichever model pod the Service picks).

    Never when a model answered, even with an error: that pod read the request and another
    would answer the same. A connection that could not be made, or a session closed before
    sending, never reached a model: retried up to MODEL_CALL_ATTEMPTS times. A connection
    dropped after sending is a stale keep-alive, a recycled session, or a model that died on
    this very request: retried once only, so such a request cannot take down pod after pod.
    """
    import aiohttp

    if attempt + 1 >= MODEL_CALL_ATTEMPTS:
        return False
    if isinstance(error, aiohttp.ClientConnectorError):
        return True
    if isinstance(error, RuntimeError) and "closed" in str(error).lower():
        return True
    return isinstance(error, aiohttp.ClientConnectionError) and attempt == 0


def _model_failure(error: BaseException) -> InputError:
    """The API's answer when a model call failed.

    503 when the model service could not be reached or said it is busy (retrying later may
    work); 502 when it answered with an error (retrying the same request would not help).
    """
    status = int(getattr(error, "error_code", 0) or 0)
    if status in (401, 403):
        logger.error("the model service refused the call (%d): is CAPTIONING_INTERNAL_TOKEN the same on both?", status)
        return InputError(502, "model_refused", "the model service refused the call (internal token)")
    if status and status not in (429, 503):
        logger.error("the model service answered %d: %s", status, error)
        return InputError(502, "model_refused", f"the model service answered with an error ({status})")
    logger.error("model service call failed: %s: %s", type(error).__name__, error)
    return InputError(
        503, "model_unavailable", f"the model service is unavailable ({type(error).__name__}); retry shortly"
    )


@bentoml.service(
    name="caption_api",
    workers=1,
    # Beyond max_concurrency requests in flight BentoML answers 429 (health checks and /metrics
    # bypass it): each request holds its upload, so this bounds the worker's memory.
    traffic={"timeout": 120, "max_concurrency": MAX_CONCURRENCY},
)
@bentoml.asgi_app(app, path="/")
class CaptionAPI:
    """HTTP routes: checks and decodes input, calls the model service, serves the page."""

    model = bentoml.depends(CaptionModelService)

    @bentoml.on_deployment
    def check_settings() -> None:
        # Runs in the server's supervisor before any worker starts: a refusal stops the server.
        refuse_bad_settings(public_auth_mode, internal_auth_mode)

    def __init__(self) -> None:
        _show_info_logs()
        public, internal = public_auth_mode(), internal_auth_mode()
        log = logger.warning if public == "open" and production() else logger.info
        log(
            "public API: %s%s; model service calls: %s",
            public,
            " (CAPTIONING_ALLOW_NO_KEY=1)" if public == "open" and production() else "",
            internal,
        )
        self._feedback_store = None
        self._feedback_lock = threading.Lock()
        _send_internal_token(self.model)
        metrics()  # create the series at start-up so /metrics lists them at once

    async def __is_ready__(self) -> bool:
        # The model's `ready`, not `info`: sync model APIs queue behind caption batches.
        try:
            answer = await asyncio.wait_for(self.model.to_async.ready(), timeout=READY_TIMEOUT_SECONDS)
            return bool(answer.get("ready"))
        except Exception:
            return False

    def feedback_store(self):
        with self._feedback_lock:
            if self._feedback_store is None:
                from captioning.data.feedback import FeedbackStore

                self._feedback_store = FeedbackStore()
            return self._feedback_store

    async def _caption(self, jobs: list[CaptionJob]) -> list[dict]:
        results = await self._call_model(jobs)
        for result in results:
            if "error" in result:
                raise InputError(500, "model_error", f"the model failed on this image: {result['error']}")
        return results

    async def _call_model(self, jobs: list[CaptionJob]) -> list[dict]:
        """Call the model service; a dropped connection is retried (captioning is idempotent),
        an answer is not, even an error (see _may_retry).

        BentoML 1.4's client closes its HTTP session when it recycles it, even with other
        requests in flight on it, and a model pod can go away during a rollout: both show
        up as connection errors, not as answers.
        """
        for attempt in range(MODEL_CALL_ATTEMPTS):
            try:
                return await self.model.to_async.caption(jobs)
            except Exception as error:
                if not _may_retry(error, attempt):
                    raise _model_failure(error) from None
                metrics()["errors"].labels(kind="model_retry").inc()
                logger.warning("model service connection dropped (%s); retrying", type(error).__name__)
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _timed(self, route: str, handler, request: Request | None = None) -> JSONResponse:
        m = metrics()
        started = time.perf_counter()
        try:
            response = await handler(started)
        except InputError as error:
            response = _error(error.status, error.kind, error.message, error.headers)
        except Exception as error:  # never let a bug take the process down
            logger.exception("unexpected error on %s", route)
            response = _error(500, "internal", f"internal error: {type(error).__name__}")
        finally:
            if request is not None:
                UPLOADS.release(request)
        m["requests"].labels(route=route, status=str(response.status_code)).inc()
        m["latency"].labels(route=route).observe(time.perf_counter() - started)
        return response

    @app.get("/")
    async def index(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}")
    async def asset(self, name: str) -> FileResponse:
        types = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in types:
            raise InputError(404, "not_found", f"no asset {name!r}")
        return FileResponse(WEB_DIR / name, media_type=types[name])

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def _caption_files(self, files: list, fields: dict, missing: str) -> list[dict]:
        """Check the uploaded images and options, caption them, count caption lengths."""
        if not files:
            raise InputError(400, "missing_field", missing)
        options = _options(fields)
        await _check_images_bounded(files)
        results = await self._caption([CaptionJob(image=data, **options) for _, data in files])
        answers = [_public(result, options["return_attention"]) for result in results]
        for answer in answers:
            metrics()["caption_words"].observe(len(answer["caption"].split()))
        return answers

    @app.post("/caption")
    async def caption(self, request: Request) -> JSONResponse:
        async def handle(started: float) -> JSONResponse:
            files, fields = await _read_upload(request, max_files=1)
            if len(files) > 1:
                raise InputError(400, "too_many_images", "send one image to /caption (several go to /caption_batch)")
            (answer,) = await self._caption_files(files, fields, "no file in the multipart field 'image'")
            answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            return JSONResponse(answer)

        return await self._timed("/caption", handle, request)

    @app.post("/caption_batch")
    async def caption_batch(self, request: Request) -> JSONResponse:
        async def handle(started: float) -> JSONResponse:
            files, fields = await _read_upload(request, max_files=MAX_BATCH_IMAGES)
            if len(files) > MAX_BATCH_IMAGES:
                raise InputError(413, "too_many_images", f"{len(files)} images, at most {MAX_BATCH_IMAGES} per request")
            answers = await self._caption_files(
                files, fields, "no file in the multipart field 'image' (repeat it per image)"
            )
            for answer, (name, _) in zip(answers, files):
                answer["filename"] = name
            return JSONResponse(
                {
                    "results": answers,
                    "model_version": answers[0]["model_version"],
                    "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                }
            )

        return await self._timed("/caption_batch", handle, request)

    @app.post("/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        async def handle(started: float) -> JSONResponse:
            from captioning.data.feedback import FeedbackError

            _check_rate(request, FEEDBACK_LIMITER, "/feedback")  # before reading the upload
            files, fields = await _read_upload(request, max_files=1)
            if not files:
                raise InputError(400, "missing_field", "no file in the multipart field 'image'")
            caption = fields.get("caption", "")
            if not caption.strip():
                raise InputError(400, "missing_caption", "the field 'caption' (the corrected caption) is empty")
            await _check_images_bounded(files)
            store = self.feedback_store()
            try:
                item = await asyncio.to_thread(
                    store.add,
                    files[0][1],
                    caption,
                    fields.get("model_version") or None,
                    fields.get("predicted_caption") or None,
                )
            except FeedbackError as error:
                raise InputError(422, "bad_feedback", str(error)) from None
            metrics()["feedback"].inc()
            return JSONResponse(
                {"stored": True, "id": item.id, "image_sha256": item.image_sha256, "caption": item.caption},
                status_code=201,
            )

        return await self._timed("/feedback", handle, request)

    @app.get("/model")
    async def model_info(self) -> JSONResponse:
        async def handle(started: float) -> JSONResponse:
            try:
                info = await self.model.to_async.info()
            except Exception as error:
                raise _model_failure(error) from None
            return JSONResponse(info)

        return await self._timed("/model", handle)

    @app.post("/reload")
    async def reload(self, request: Request) -> JSONResponse:
        async def handle(started: float) -> JSONResponse:
            token = os.environ.get("CAPTIONING_RELOAD_TOKEN", "")
            if not token:
                raise InputError(403, "reload_disabled", "reload is disabled: set CAPTIONING_RELOAD_TOKEN to enable it")
            sent = request.headers.get("x-reload-token", "")
            auth = request.headers.get("authorization", "")
            if not sent and auth.lower().startswith("bearer "):
                sent = auth[7:].strip()
            if not hmac.compare_digest(sent.encode(), token.encode()):
                raise InputError(401, "bad_reload_token", "missing or wrong reload token (header X-Reload-Token)")
            try:
                answer = await self.model.to_async.reload()
            except Exception as error:
                raise _model_failure(error) from None
            return JSONResponse(answer, status_code=200 if answer.get("reloaded") else 500)

        return await self._timed("/reload", handle)


CaptionAPI.add_asgi_middleware(ApiKeyMiddleware)
CaptionModelService.add_asgi_middleware(InternalTokenMiddleware)
