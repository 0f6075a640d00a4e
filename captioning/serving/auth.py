"""Who may call what: the public API key, the token between the two services, the reload token."""

from __future__ import annotations

import hmac
from typing import Callable, Mapping

from starlette.requests import Request

from captioning.serving.errors import InputError, error_response
from captioning.serving.metrics import Metrics, metrics

HEALTH_PATHS = frozenset({"/livez", "/readyz", "/healthz"})
# What the public API answers without its key: probes and the web page.
PUBLIC_PATHS = HEALTH_PATHS | {"/", "/web/app.js", "/web/style.css", "/favicon.ico"}
# What the model service answers without the internal token: probes and Prometheus.
MODEL_OPEN_PATHS = HEALTH_PATHS | {"/metrics"}
INTERNAL_HEADER = "X-Captioning-Internal-Token"


def sent_secret(headers: Mapping[str, str], header: str) -> str:
    """The secret a request sends in `header`, else as `Authorization: Bearer` (how Prometheus sends it)."""
    sent = headers.get(header, "")
    auth = headers.get("authorization", "")
    if not sent and auth.lower().startswith("bearer "):
        sent = auth[7:].strip()
    return sent


def same_secret(sent: str, expected: str) -> bool:
    return hmac.compare_digest(sent.encode(), expected.encode())


class ApiKeyMiddleware:
    """With an API key set, every route but health checks and the page needs it (X-API-Key).

    Applied to the whole BentoML app, so /metrics and BentoML's own routes are
    covered too (Prometheus sends it as `Authorization: Bearer`).
    """

    def __init__(self, app, key: str, metrics: Callable[[], Metrics] = metrics):
        self.app, self.key, self.metrics = app, key, metrics

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            if not same_secret(sent_secret(Request(scope).headers, "x-api-key"), self.key):
                self.metrics().errors.labels(kind="unauthorized").inc()
                message = "missing or wrong API key: send it in the X-API-Key header"
                await error_response(401, "unauthorized", message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InternalTokenMiddleware:
    """With a token set, the model service answers only callers that send it in the
    X-Captioning-Internal-Token header (the API service does); probes and /metrics stay open.

    Checked before the body is read: the API's calls carry pickled data, which must never be
    unpickled for a caller we do not know.
    """

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if self.token and scope["type"] == "http" and scope["path"] not in MODEL_OPEN_PATHS:
            sent = Request(scope).headers.get(INTERNAL_HEADER, "")
            if not same_secret(sent, self.token):
                message = f"missing or wrong internal token (header {INTERNAL_HEADER})"
                await error_response(401, "unauthorized", message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_reload_token(request: Request, token: str) -> None:
    """Refuse a reload when reloading is off (no token set) or the request lacks the token."""
    if not token:
        raise InputError(403, "reload_disabled", "reload is disabled: set CAPTIONING_RELOAD_TOKEN to enable it")
    if not same_secret(sent_secret(request.headers, "x-reload-token"), token):
        raise InputError(401, "bad_reload_token", "missing or wrong reload token (header X-Reload-Token)")
