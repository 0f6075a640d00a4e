"""Per-client request limits: who a request counts against, and a token bucket per client."""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from starlette.requests import Request

from captioning.serving.errors import InputError


def client_id(request: Request, proxy_hops: int = 0) -> str:
    """Who a request counts against: its address. Not the API key: that is one secret shared
    by every legitimate client, so it would put them all in one bucket.

    Behind `proxy_hops` trusted proxies, the Nth X-Forwarded-For entry from the right: each
    proxy appends the address it was called from, so that entry is the one the outermost
    trusted proxy wrote; the client can write any entries to its left. Every header line
    counts (a proxy may add its own line rather than extend the client's).
    """
    if proxy_hops > 0:
        entries = forwarded_entries(request.headers.getlist("x-forwarded-for"))
        if entries:
            # Fewer entries than hops: the request skipped a proxy; the leftmost is all there is.
            return entries[-min(proxy_hops, len(entries))]
    return request.client.host if request.client else "unknown"


def forwarded_entries(lines: list[str]) -> list[str]:
    """The addresses of X-Forwarded-For header lines, in order (empty entries dropped)."""
    return [entry.strip() for line in lines for entry in line.split(",") if entry.strip()]


class RateLimiter:
    """At most `per_minute` requests per client: a token bucket per client, refilled continuously
    (0: no limit).

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

    def check(self, client: str, route: str) -> None:
        """Refuse the request with 429 and Retry-After when `client` is over its limit."""
        wait = self.wait(client)
        if wait > 0:
            seconds = math.ceil(wait)
            raise InputError(
                429,
                "rate_limited",
                f"too many requests to {route}: retry in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
