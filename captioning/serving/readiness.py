"""The API's readiness as its probes see it: the model service's answer, asked in the background.

`/readyz` is public and unauthenticated, and BentoML answers it outside the concurrency bound:
if each probe called the model service, a flood of probes would be a flood of model calls.
Instead one task asks the model every `period` seconds and probes read its last answer; an
answer older than `stale_after` (the task stuck or gone) counts as not ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

logger = logging.getLogger("captioning.service")


class CachedReadiness:
    """The last answer of `ask()` (True: ready), refreshed by a background task on the worker's
    event loop. The task starts with the first probe; that probe waits for the first answer."""

    def __init__(
        self,
        ask: Callable[[], Awaitable[bool]],
        period: float = 1.0,
        timeout: float = 2.0,
        stale_after: float = 10.0,
        count: Callable[[], None] = lambda: None,
    ):
        self.ask, self.period, self.timeout, self.stale_after = ask, period, timeout, stale_after
        self.count = count  # called for each question asked (a metric)
        self.value, self.checked_at, self.asked = False, float("-inf"), 0
        self._task: asyncio.Task | None = None
        self._first: asyncio.Event | None = None

    async def ready(self) -> bool:
        if self._task is None:
            self._first = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._refresh_forever())
        if not self._first.is_set():
            try:
                await asyncio.wait_for(self._first.wait(), timeout=self.timeout + 1)
            except asyncio.TimeoutError:
                return False
        return self.value and time.monotonic() - self.checked_at <= self.stale_after

    async def refresh(self) -> bool:
        """Ask once; a failure or no answer within `timeout` is "not ready"."""
        self.asked += 1
        self.count()
        try:
            value = bool(await asyncio.wait_for(self.ask(), timeout=self.timeout))
        except Exception:  # unreachable, busy, timed out: not ready until an answer says otherwise
            value = False
        if value != self.value:
            logger.info("model service %s", "ready" if value else "not ready")
        self.value, self.checked_at = value, time.monotonic()
        return value

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            self._first.set()
            await asyncio.sleep(self.period)
