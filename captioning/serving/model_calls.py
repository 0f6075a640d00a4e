"""The API's calls to the model service: the internal token they carry, which failures are
retried, and what the API answers when a call fails."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, TypeVar

from captioning.serving.auth import INTERNAL_HEADER
from captioning.serving.errors import InputError
from captioning.serving.metrics import Metrics, metrics

logger = logging.getLogger("captioning.service")

MODEL_CALL_ATTEMPTS = 3
Answer = TypeVar("Answer")


def send_internal_token(model, token: str) -> None:
    """Make every call of the API's model client carry the internal token.

    BentoML 1.4's client has no per-call headers in its public interface; its default headers
    are the ones each of its HTTP sessions is created with, so the token goes there before the
    first call (the robustness tests check that calls carry it).
    """
    headers = getattr(getattr(model, "to_async", None), "default_headers", None)
    if token and isinstance(headers, dict):
        headers[INTERNAL_HEADER] = token
    elif token:
        logger.warning("the model client has no default headers: calls go without the internal token")


def may_retry(error: BaseException, attempt: int) -> bool:
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


def model_failure(error: BaseException) -> InputError:
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
    return InputError(503, "model_unavailable", "the model service is unavailable; retry shortly")


async def call_model(
    call: Callable[[], Awaitable[Answer]], retry: bool = True, metrics: Callable[[], Metrics] = metrics
) -> Answer:
    """The answer of `call()`; a failure is answered by `model_failure`. With `retry` (idempotent
    calls such as captioning), a dropped connection is tried again (see `may_retry`).

    BentoML 1.4's client closes its HTTP session when it recycles it, even with other
    requests in flight on it, and a model pod can go away during a rollout: both show
    up as connection errors, not as answers.
    """
    for attempt in range(MODEL_CALL_ATTEMPTS):
        try:
            return await call()
        except Exception as error:
            if not (retry and may_retry(error, attempt)):
                raise model_failure(error) from None
            metrics().errors.labels(kind="model_retry").inc()
            logger.warning("model service connection dropped (%s); retrying", type(error).__name__)
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")  # the last attempt may not retry
