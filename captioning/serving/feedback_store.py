"""The API's feedback store: opened at start-up on a thread, never on the event loop.

Opening it connects to the database (PostgreSQL in a cluster) and creates its table: with the
database slow or unreachable that takes as long as the connection attempt, which would freeze
every route of the worker if done on its event loop. Here a thread opens it, each attempt
bounded by a connect timeout, and tries again every `retry_seconds` until it succeeds;
meanwhile POST /feedback answers 503 and the other routes are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from typing import Any, Callable

from captioning.serving.errors import InputError

logger = logging.getLogger("captioning.service")

POSTGRES_SCHEMES = ("postgresql", "postgres")


def with_connect_timeout(url: str | None, seconds: float) -> str | None:
    """A PostgreSQL URL with libpq's `connect_timeout` (whole seconds) unless it names one; other
    URLs as they are (SQLite does not connect over a network)."""
    if not url:
        return url
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername.split("+")[0] not in POSTGRES_SCHEMES or "connect_timeout" in parsed.query:
        return url
    parsed = parsed.update_query_dict({"connect_timeout": str(max(1, math.ceil(seconds)))})
    return parsed.render_as_string(hide_password=False)


class FeedbackStoreOpener:
    """Opens the store with `open_store()` on a daemon thread, retrying until it is open."""

    def __init__(self, open_store: Callable[[], Any], retry_seconds: float = 10.0):
        self.open_store, self.retry_seconds = open_store, retry_seconds
        self.store: Any = None
        self.attempts, self.failures = 0, 0
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._open, name="feedback-store", daemon=True)

    def start(self) -> "FeedbackStoreOpener":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def _open(self) -> None:
        while not self._stopped.is_set():
            self.attempts += 1
            try:
                self.store = self.open_store()
                logger.info("feedback store open")
                return
            except Exception as error:
                self.failures += 1
                # The driver's first line (host, port, reason); never the URL, which may hold a password.
                reason = str(getattr(error, "orig", None) or error).strip().splitlines()[:1]
                logger.error(
                    "cannot open the feedback store (%s: %s); POST /feedback answers 503, retrying in %g s",
                    type(error).__name__,
                    reason[0][:300] if reason else "",
                    self.retry_seconds,
                )
            self._stopped.wait(self.retry_seconds)

    def get(self) -> Any:
        """The open store, else a 503 refusal."""
        if self.store is None:
            raise InputError(
                503,
                "feedback_unavailable",
                "the feedback store is not reachable: retry later",
                headers={"Retry-After": str(math.ceil(self.retry_seconds))},
            )
        return self.store

    async def add(
        self, image: Any, caption: str, version: str | None, predicted: str | None, client: str | None = None
    ) -> Any:
        """Store one correction on a thread, `client` held to its share of the quota: a bad input
        or a used-up share answers 422 or 429, a database failure 503 (the details go to the log,
        never to the client)."""
        from sqlalchemy.exc import DBAPIError

        from captioning.data.feedback import FeedbackError, FeedbackQuotaError

        store = self.get()
        try:
            return await asyncio.to_thread(store.add, image, caption, version, predicted, client)
        except FeedbackQuotaError as error:
            raise InputError(429, "feedback_quota", str(error)) from None
        except FeedbackError as error:
            raise InputError(422, "bad_feedback", str(error)) from None
        except DBAPIError as error:
            logger.error("feedback store write failed: %s", str(error.orig or error).strip().splitlines()[:1])
            raise InputError(
                503, "feedback_unavailable", "the feedback store cannot store it now: retry later"
            ) from None
