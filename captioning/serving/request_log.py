"""One request followed through both services: its id, and one JSON log line per request.

The API gives every request an id, or keeps the client's `X-Request-ID` when it is a plausible
one (1 to 64 letters, digits and `._:-`; anything else is replaced, never echoed), answers it in
the `X-Request-ID` header and sends it on its calls to the model service (shadow copies
included), whose lines carry the same id. Each service writes one line per request on stdout:

    {"time": "2025-01-01T12:00:00.123Z", "service": "api", "request_id": "4f0c...", "method": "POST",
     "route": "/caption", "status": 200, "latency_ms": 84.2, "model_version": "7", "client": "10.0.0.3"}

(`client`: the caller's address, as the rate limits count it; on the model service, the API's.)
docs/operations.md shows how to follow a request with grep and jq.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Collection, Optional

from starlette.requests import Request

from captioning.serving.auth import HEALTH_PATHS
from captioning.serving.limits import client_id

HEADER = "X-Request-ID"
VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
LOGGER_NAME = "captioning.requests"
QUIET_PATHS = HEALTH_PATHS | {"/metrics"}  # probes and scrapes: no id, no line


def request_id(sent: Optional[str]) -> str:
    """The client's id when it is plausible, else a new one (32 hex digits)."""
    if sent is not None and VALID_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


@dataclass
class RequestRecord:
    """What one request's log line says beyond what the middleware sees."""

    request_id: str
    model_version: Optional[str] = None


_CURRENT: contextvars.ContextVar[Optional[RequestRecord]] = contextvars.ContextVar("captioning_request", default=None)
_SERVED_VERSION: list[Optional[str]] = [None]  # the model service's loaded version, for its lines


def current_request_id() -> Optional[str]:
    record = _CURRENT.get()
    return record.request_id if record is not None else None


def note_model_version(version: Optional[str]) -> None:
    """The model version that answered the request in progress (the API learns it from the answer)."""
    record = _CURRENT.get()
    if record is not None and version is not None:
        record.model_version = str(version)


def note_served_version(version: Optional[str]) -> None:
    """The version this process serves (the model service, at each load): its lines carry it."""
    _SERVED_VERSION[0] = version


def request_logger() -> logging.Logger:
    """The logger of the request lines: bare JSON on stdout, whatever the server's log format."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(getattr(handler, "request_lines", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.request_lines = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not again through the server's own handlers, in its format
    logger.disabled = False  # a logging set-up with disable_existing_loggers must not silence it
    return logger


class RequestLog:
    """ASGI middleware: the request's id (kept in a context variable for the calls it makes),
    the `X-Request-ID` answer header, and one JSON line when the answer is sent.

    `skip_paths` (probes, /metrics) get neither id nor line, so the log holds requests only.
    """

    def __init__(self, app, service: str, proxy_hops: int = 0, skip_paths: Collection[str] = QUIET_PATHS):
        self.app, self.service, self.proxy_hops = app, service, proxy_hops
        self.skip_paths = frozenset(skip_paths)
        self.logger = request_logger()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.skip_paths:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        record = RequestRecord(request_id(request.headers.get(HEADER)))
        token = _CURRENT.set(record)
        started, status = time.perf_counter(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", record.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _CURRENT.reset(token)
            latency_ms = (time.perf_counter() - started) * 1000
            self.logger.info(self.line(scope, request, record, status, latency_ms))

    def line(self, scope, request: Request, record: RequestRecord, status: int, latency_ms: float) -> str:
        route = getattr(scope.get("route"), "path", None) or scope["path"][:200]
        fields = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "service": self.service,
            "request_id": record.request_id,
            "method": scope.get("method"),
            "route": route,
            "status": status,
            "latency_ms": round(latency_ms, 2),
            "model_version": record.model_version or _SERVED_VERSION[0],
            "client": client_id(request, self.proxy_hops),
        }
        return json.dumps(fields, separators=(", ", ": "))


def propagate_request_id() -> None:
    """Make the BentoML client's calls carry the request's id as `X-Request-ID`.

    BentoML's client has no per-call headers, but it passes every call's headers through
    OpenTelemetry's global propagator (for trace context): a propagator added to it writes the
    id of the request in progress. Idempotent.
    """
    from opentelemetry import propagate
    from opentelemetry.context import get_current
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.propagators.textmap import TextMapPropagator, default_setter

    class RequestIdPropagator(TextMapPropagator):
        def inject(self, carrier, context=None, setter=default_setter) -> None:
            sent = current_request_id()
            if sent is not None:
                setter.set(carrier, HEADER, sent)

        def extract(self, carrier, context=None, getter=None):
            # The receiving side reads the header itself (RequestLog).
            return context if context is not None else get_current()

        @property
        def fields(self) -> set[str]:
            return {HEADER.lower()}

    current = propagate.get_global_textmap()
    if HEADER.lower() in (current.fields or set()):
        return
    propagate.set_global_textmap(CompositePropagator([current, RequestIdPropagator()]))


def add_request_logs(api, model, proxy_hops: int = 0) -> None:
    """The request log on both BentoML services (before their other middleware, so that it logs
    what they refuse too), and the request's id on the API's calls to the model service."""
    api.add_asgi_middleware(RequestLog, service="api", proxy_hops=proxy_hops)
    # The model's readiness API is the API's probe: as quiet as the probes.
    model.add_asgi_middleware(RequestLog, service="model", skip_paths=QUIET_PATHS | {"/ready"})
    propagate_request_id()
