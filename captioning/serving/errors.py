"""Refused requests and the JSON answers they get: `{"error": message, "kind": kind}`.

Every refusal is counted in captioning_errors_total by its kind. Answers name the request's id
(`request_id`, as in the X-Request-ID header and the log line); failures inside the service
(the model, a reload) answer a fixed message, their details going to the log under that id.
"""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from captioning.serving.metrics import Metrics, metrics

logger = logging.getLogger("captioning.service")


class InputError(Exception):
    """A request we refuse: HTTP status, error kind (metrics label) and message."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def error_response(
    status: int, kind: str, message: str, headers: dict[str, str] | None = None, request_id: str | None = None
) -> JSONResponse:
    body = {"error": message, "kind": kind}
    if request_id is not None:
        body["request_id"] = request_id
    return JSONResponse(body, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI, metrics: Callable[[], Metrics] = metrics) -> None:
    """Answer refusals, HTTP errors, invalid requests and bugs of `app` in JSON, counting each."""

    def answer(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        from captioning.serving.request_log import current_request_id  # it imports this module

        metrics().errors.labels(kind=kind).inc()
        return error_response(status, kind, message, headers, current_request_id())

    @app.exception_handler(InputError)
    async def input_error(_: Request, error: InputError) -> JSONResponse:
        return answer(error.status, error.kind, error.message, error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return answer(error.status_code, "http", str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return answer(400, "bad_request", f"invalid request: {error.errors()}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # A bug answers 500 and the process serves on.
        logger.error("unexpected error on %s", request.url.path, exc_info=error)
        return answer(500, "internal", f"internal error: {type(error).__name__}")
