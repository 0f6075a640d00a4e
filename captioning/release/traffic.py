"""Bounded request loops against a local service: what a rollout must not disturb.

    with RequestLoop("http://127.0.0.1:3000", photo, clients=4) as loop:
        ...                       # promote, roll back, restart replicas
    loop.summary()                # {"requests": N, "failed": 0, "by_status": ..., "by_version": ...}

Each client sends one image to /caption after the other, on its own keep-alive connection,
until stopped or `max_requests` were sent; loopback only, bounded in count and time.
"""

from __future__ import annotations

import collections
import threading
import time
from urllib.parse import urlparse


class RequestLoop:
    def __init__(
        self,
        url: str,
        image: bytes,
        clients: int = 4,
        max_requests: int = 20_000,
        max_seconds: float = 1200,
        timeout: float = 120,
    ):
        if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"request loops stay on loopback, not {url!r}")
        self.url, self.image, self.clients = url.rstrip("/"), image, clients
        self.max_requests, self.max_seconds, self.timeout = max_requests, max_seconds, timeout
        self.by_status: collections.Counter = collections.Counter()
        self.by_version: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = self.stopped = 0.0

    def __enter__(self) -> "RequestLoop":
        self.started = time.monotonic()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def requests(self) -> int:
        return sum(self.by_status.values())

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 10)
        self.stopped = self.stopped or time.monotonic()

    def _client(self) -> None:
        import requests

        session = requests.Session()
        while (
            not self._stop.is_set()
            and self.requests < self.max_requests
            and time.monotonic() - self.started < self.max_seconds
        ):
            self._record(*self._send(session))

    def _send(self, session) -> tuple[str, str | None, str | None]:
        try:
            answer = session.post(
                f"{self.url}/caption", files={"image": ("photo.jpg", self.image)}, timeout=self.timeout
            )
        except Exception as error:  # a dropped connection is a failed request too
            return type(error).__name__, None, f"{type(error).__name__}: {error}"
        if answer.status_code != 200:
            return str(answer.status_code), None, f"{answer.status_code}: {answer.text[:200]}"
        return "200", str(answer.json().get("model_version")), None

    def _record(self, status: str, version: str | None, failure: str | None) -> None:
        with self._lock:
            self.by_status[status] += 1
            if version is not None:
                self.by_version[version] += 1
            if failure is not None:
                self.failures.append(failure)

    def counts(self) -> dict:
        """The requests so far by status and by the version that answered, and the failed ones,
        read at one instant (the clients keep counting): two of them bound a stretch of traffic."""
        with self._lock:
            return {
                "by_status": dict(self.by_status),
                "by_version": dict(self.by_version),
                "failed": len(self.failures),
            }

    def summary(self) -> dict:
        seconds = (self.stopped or time.monotonic()) - self.started
        return {
            "requests": self.requests,
            "failed": len(self.failures),
            "clients": self.clients,
            "seconds": round(seconds, 1),
            "by_status": dict(self.by_status),
            "by_version": dict(self.by_version),
            "first_failures": self.failures[:5],
        }
