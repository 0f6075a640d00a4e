"""The captioning service: an HTTP API service in front of a model service.

`CaptionAPI` (HTTP routes, input checks, image decoding, the web page,
feedback) depends on `CaptionModelService` (the Captioner, adaptive batching,
GPU when present). `bentoml serve service:CaptionAPI` runs both on one
machine; in Kubernetes each runs in its own Deployment and scales on its own
(see deploy/).

The settings come from the environment, read once (captioning/serving/config.py lists the
variables); the checks, limits and metrics the routes use live in captioning/serving/.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from captioning.config import disable_telemetry
from captioning.serving.answers import jsonable, public_answer
from captioning.serving.auth import HEALTH_PATHS, ApiKeyMiddleware, InternalTokenMiddleware, check_reload_token
from captioning.serving.batches import caption_jobs
from captioning.serving.config import config_from_env, refuse_bad_settings, show_info_logs
from captioning.serving.drift import LiveDrift
from captioning.serving.errors import InputError, add_error_handlers
from captioning.serving.feedback_store import FeedbackStoreOpener, with_connect_timeout
from captioning.serving.limits import RateLimiter, client_id
from captioning.serving.metrics import RequestMetrics, drift_metrics, metrics
from captioning.serving.model_calls import call_model, send_internal_token
from captioning.serving.model_source import locate, registry_tracking, version_of
from captioning.serving.options import decoding_options, option_field
from captioning.serving.readiness import CachedReadiness
from captioning.serving.request_log import add_request_logs, current_request_id, note_model_version, note_served_version
from captioning.serving.shadow import shadow_from_config
from captioning.serving.uploads import ReleaseUploads, Uploads

disable_telemetry()

logger = logging.getLogger("captioning.service")

CONFIG = config_from_env()  # a bad value stops the server here, with one line
WEB_DIR = Path(__file__).resolve().parent / "web"
READY_TIMEOUT_SECONDS = 2.0
READY_REFRESH_SECONDS = 1.0  # how often the API asks the model service whether it is ready


# ---------------------------------------------------------------- model service


class CaptionJob(BaseModel):
    """One image to caption and its decoding options (what the API sends the model)."""

    image: bytes = Field(max_length=CONFIG.max_upload_bytes)
    beam_size: int | None = option_field("beam_size")  # None: the package's decoding defaults
    max_length: int | None = option_field("max_length")
    return_attention: bool = False


@bentoml.service(
    name="caption_model",
    workers=1,
    traffic={"timeout": 120, "max_concurrency": 256},
    # How the API's client connects to this service. BentoML's default recycles the HTTP
    # session every 100 requests, cutting the requests in flight on it; recycle hourly instead
    # (the API retries a dropped connection anyway).
    runner_connection={"max_requests": 1_000_000_000, "max_age": 3600.0},
    resources={"gpu": 1} if CONFIG.gpu else {"cpu": "2"},
)
class CaptionModelService:
    """Holds the Captioner; merges concurrent requests into batches."""

    @bentoml.on_deployment
    def check_settings() -> None:
        # Runs in the server's supervisor before any worker starts: a refusal stops the server.
        refuse_bad_settings(CONFIG.internal_auth_mode)

    def __init__(self) -> None:
        from captioning.config import get_device

        show_info_logs()
        logger.info("model service: callers %s", CONFIG.internal_auth_mode())
        self.source = CONFIG.source
        self.device = str(get_device())
        if CONFIG.torch_threads > 0:  # on a CPU shared with other work, fewer threads avoid OpenMP contention
            import torch

            torch.set_num_threads(CONFIG.torch_threads)
        self.tracking = registry_tracking(self.source, CONFIG.tracking_uri)  # read once: polls ask the same registry
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
        self.poll_seconds = CONFIG.poll_interval
        if self.poll_seconds > 0:
            threading.Thread(target=self._poll, name="registry-poll", daemon=True).start()

    def _load(self) -> str:
        from captioning.config import get_device
        from captioning.inference.predict import Captioner

        started = time.perf_counter()
        # One look-up gives the version and its folder: a champion promoted meanwhile is caught by the next poll.
        located = locate(self.source, self.tracking)
        captioner = Captioner.load(located.path, device=get_device(), version=located.version, source=self.source)
        self.drift = LiveDrift.for_package(located.path, captioner.config, drift_metrics())  # set before the captioner
        self.registry_version = located.version
        previous = self.captioner
        self.captioner = captioner  # one assignment: in-flight calls keep the old one
        self.loaded_at = time.time()
        version = version_of(captioner)
        gauge = metrics().model_info
        if previous is not None and version_of(previous) != version:
            gauge.labels(version=version_of(previous), source=self.source).set(0)
        gauge.labels(version=version, source=self.source).set(1)
        note_served_version(version)
        logger.info("loaded model %s from %s in %.1fs", version, self.source, time.perf_counter() - started)
        return version

    def _poll(self) -> None:
        while True:
            time.sleep(self.poll_seconds)
            try:
                latest = locate(self.source, self.tracking, download=False).version
                if latest is not None and latest != self.registry_version:
                    logger.info("registry points at version %s: reloading", latest)
                    self._reload()
            except Exception:  # a registry hiccup must not stop serving
                logger.exception("registry poll failed; still serving %s", version_of(self.captioner))

    def __is_ready__(self) -> bool:
        return self.captioner is not None

    @bentoml.api(
        batchable=CONFIG.adaptive_batching,
        max_batch_size=CONFIG.max_batch_size,
        max_latency_ms=CONFIG.max_latency_ms,
    )
    def caption(self, jobs: list[CaptionJob]) -> list[dict]:
        """Caption a batch; jobs with the same options share one model call."""
        captioner, drift = self.captioner, self.drift  # in this order: a reload replaces the monitor first
        return caption_jobs(captioner, jobs, metrics(), CONFIG.fault_delay_ms, CONFIG.fault_fail_captions, drift.add)

    @bentoml.api
    async def ready(self) -> dict:
        """Readiness for the API service. Async on purpose: BentoML runs the sync APIs (caption,
        info, reload) one at a time on one worker thread, so `info` waits behind caption batches;
        this answers from the event loop at once."""
        captioner = self.captioner
        return {
            "ready": captioner is not None,
            "model_version": version_of(captioner) if captioner is not None else None,
        }

    @bentoml.api
    def replica(self) -> dict:
        return CONFIG.replica("model")

    @bentoml.api
    def info(self) -> dict:
        captioner = self.captioner
        config = getattr(captioner, "config", None)
        return jsonable(
            {
                "model_version": version_of(captioner),
                "source": self.source,
                "registry_version": self.registry_version,
                "device": self.device,
                "loaded_at": self.loaded_at,
                "poll_seconds": self.poll_seconds,
                "adaptive_batching": CONFIG.adaptive_batching,
                "max_batch_size": CONFIG.max_batch_size,
                "drift": self.drift.figures(),
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
            previous = version_of(self.captioner)
            try:
                version = self._load()
            except Exception:
                metrics().reloads.labels(outcome="failed").inc()
                logger.exception("reload failed; still serving %s", previous)
                # The details are in this log line; the answer names no exception text.
                return {"reloaded": False, "model_version": previous, "error": "the reload failed: see the model log"}
        metrics().reloads.labels(outcome="ok").inc()
        return {
            "reloaded": True,
            "previous_version": previous,
            "model_version": version,
            "changed": previous != version,
        }


# ---------------------------------------------------------------- HTTP API


def open_feedback_store():
    from captioning.data.feedback import FeedbackStore

    url = with_connect_timeout(CONFIG.feedback_db, CONFIG.feedback_connect_seconds)
    return FeedbackStore(url=url, max_bytes=CONFIG.feedback_max_bytes)


UPLOADS = Uploads.from_config(CONFIG)
FEEDBACK_LIMITER = RateLimiter(CONFIG.feedback_per_minute)
CAPTION_LIMITER = RateLimiter(CONFIG.captions_per_minute)  # /caption and /caption_batch together

app = FastAPI(title="Image captioning", docs_url=None, redoc_url=None, openapi_url=None)
add_error_handlers(app)
app.add_middleware(RequestMetrics, skip_paths=HEALTH_PATHS)  # counts and times every route below
app.add_middleware(ReleaseUploads, budget=UPLOADS.budget)


@bentoml.service(
    name="caption_api",
    workers=1,
    # Beyond max_concurrency requests in flight BentoML answers 429 (health checks and /metrics
    # bypass it): each request holds its upload, so this bounds the worker's memory.
    traffic={"timeout": 120, "max_concurrency": CONFIG.max_concurrency},
)
@bentoml.asgi_app(app, path="/")
class CaptionAPI:
    """HTTP routes: checks and decodes input, calls the model service, serves the page."""

    model = bentoml.depends(CaptionModelService)

    @bentoml.on_deployment
    def check_settings() -> None:
        # Runs in the server's supervisor before any worker starts: a refusal stops the server.
        refuse_bad_settings(CONFIG.public_auth_mode, CONFIG.internal_auth_mode)

    def __init__(self) -> None:
        show_info_logs()
        public, internal = CONFIG.public_auth_mode(), CONFIG.internal_auth_mode()
        open_on_purpose = public == "open" and CONFIG.production
        log = logger.warning if open_on_purpose else logger.info
        log(
            "public API: %s%s; model service calls: %s",
            public,
            " (CAPTIONING_ALLOW_NO_KEY=1)" if open_on_purpose else "",
            internal,
        )
        self.feedback = FeedbackStoreOpener(open_feedback_store).start()  # off the event loop
        self.readiness = CachedReadiness(
            self._model_ready, READY_REFRESH_SECONDS, READY_TIMEOUT_SECONDS, count=metrics().readiness_checks.inc
        )
        send_internal_token(self.model, CONFIG.internal_token)
        self.shadow = shadow_from_config(CONFIG, CaptionModelService)
        metrics()  # create the series at start-up so /metrics lists them at once

    async def __is_ready__(self) -> bool:
        return await self.readiness.ready()  # the last background answer: probes cost no model call

    async def _model_ready(self) -> bool:
        # The model's `ready`, not `info`: sync model APIs queue behind caption batches.
        answer = await self.model.to_async.ready()
        return bool(answer.get("ready"))

    async def _caption_files(self, files: list, fields: dict, missing: str) -> list[dict]:
        """Check the uploaded images and options, caption them, count caption lengths."""
        if not files:
            raise InputError(400, "missing_field", missing)
        options = decoding_options(fields)
        await UPLOADS.check_images(files)
        jobs = [CaptionJob(image=data, **options) for _, data in files]
        results = await call_model(lambda: self.model.to_async.caption(jobs))
        note_model_version(results[0].get("model_version") if results else None)
        for result in results:
            if "error" in result:
                logger.error("the model failed on an image: %s", result["error"])  # the log line has the request id
                raise InputError(500, "model_error", "the model failed on this image")
        self.shadow.copy(jobs, results)  # after the client's answer is known; never waited for
        answers = [public_answer(result, options["return_attention"]) for result in results]
        for answer in answers:
            metrics().caption_words.observe(len(answer["caption"].split()))
        return answers

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

    @app.post("/caption")
    async def caption(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        CAPTION_LIMITER.check(client_id(request, CONFIG.proxy_hops), "/caption")  # before reading the upload
        files, fields = await UPLOADS.read(request, max_files=1)
        if len(files) > 1:
            raise InputError(400, "too_many_images", "send one image to /caption (several go to /caption_batch)")
        (answer,) = await self._caption_files(files, fields, "no file in the multipart field 'image'")
        answer["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return JSONResponse(answer)

    @app.post("/caption_batch")
    async def caption_batch(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        most = CONFIG.max_batch_images
        CAPTION_LIMITER.check(client_id(request, CONFIG.proxy_hops), "/caption_batch")
        files, fields = await UPLOADS.read(request, max_files=most)
        if len(files) > most:
            raise InputError(413, "too_many_images", f"{len(files)} images, at most {most} per request")
        answers = await self._caption_files(
            files, fields, "no file in the multipart field 'image' (repeat it per image)"
        )
        for answer, (name, _) in zip(answers, files):
            answer["filename"] = name
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        return JSONResponse(
            {"results": answers, "model_version": answers[0]["model_version"], "latency_ms": latency_ms}
        )

    @app.post("/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        client = client_id(request, CONFIG.proxy_hops)
        FEEDBACK_LIMITER.check(client, "/feedback")  # before reading the upload
        files, fields = await UPLOADS.read(request, max_files=1)
        if not files:
            raise InputError(400, "missing_field", "no file in the multipart field 'image'")
        caption = fields.get("caption", "")
        if not caption.strip():
            raise InputError(400, "missing_caption", "the field 'caption' (the corrected caption) is empty")
        self.feedback.get()  # 503 while the store cannot be opened, before any decoding
        image = await UPLOADS.decode_to_keep(files[0][1])  # bounded: never the full-size pixels
        version, predicted = fields.get("model_version") or None, fields.get("predicted_caption") or None
        item = await self.feedback.add(image, caption, version, predicted, client)
        metrics().feedback.inc()
        answer = {"stored": True, "id": item.id, "image_sha256": item.image_sha256, "caption": item.caption}
        return JSONResponse(answer, status_code=201)

    @app.get("/model")
    async def model_info(self) -> JSONResponse:
        return JSONResponse(await call_model(self.model.to_async.info, retry=False))

    @app.post("/replica")
    async def replica(self) -> JSONResponse:
        return JSONResponse(CONFIG.replica("api"))

    @app.post("/reload")
    async def reload(self, request: Request) -> JSONResponse:
        check_reload_token(request, CONFIG.reload_token)
        answer = await call_model(self.model.to_async.reload, retry=False)
        if not answer.get("reloaded"):  # never the exception text: the model's log has it
            answer.update(error="the reload failed: see the model service's log", request_id=current_request_id())
        return JSONResponse(answer, status_code=200 if answer.get("reloaded") else 500)


add_request_logs(CaptionAPI, CaptionModelService, CONFIG.proxy_hops)  # first: it logs what the checks refuse
CaptionAPI.add_asgi_middleware(ApiKeyMiddleware, key=CONFIG.api_key)
CaptionModelService.add_asgi_middleware(InternalTokenMiddleware, token=CONFIG.internal_token)
