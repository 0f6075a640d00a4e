"""Shadow copies: the API sends a share of its caption requests to a candidate model server too,
and discards its answers.

The client's answer comes from the stable model service, as without shadowing; only then is a
copy of the same images and options sent to the candidate (CAPTIONING_SHADOW_URL, the
`/caption` API of the same model service), in a task of its own that the client never waits
for. Its captions are scored against the served ones (captioning/serving/agreement.py) and
counted, by the version the candidate's answers report:

    captioning_shadow_requests_total{candidate, outcome="ok" | "error" | "slow" | "dropped"}
    captioning_shadow_agreement{candidate}  (histogram, percent, one per image)

A candidate that is slow, failing or unreachable costs at most `max_in_flight` pending copies
holding at most `max_bytes` of images, and `timeout` seconds each; copies beyond that are
dropped and counted, never queued. The
rollout analysis (captioning/release/analysis.py) reads these series from the API's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, Optional

from captioning.serving.agreement import agreement
from captioning.serving.metrics import Metrics, metrics
from captioning.serving.model_calls import send_internal_token

logger = logging.getLogger("captioning.service")

PICKLE = "application/vnd.bentoml+pickle"  # how BentoML's client sends the model service its arguments
UNKNOWN = "unknown"  # the candidate's version before it ever answered

Call = Callable[[list], Awaitable[list]]


class Shadow:
    """Copies requests to a candidate (`call(jobs)` -> its results) and compares its captions."""

    def __init__(
        self,
        call: Optional[Call],
        share: float,
        max_in_flight: int = 8,
        timeout: float = 5.0,
        max_bytes: int = 200 * 1024 * 1024,
        ask_version: Optional[Callable[[], Awaitable[dict]]] = None,
        metrics: Callable[[], Metrics] = metrics,
        draw: Callable[[], float] = random.random,
    ):
        self.call, self.share, self.max_in_flight, self.timeout = call, share, max_in_flight, timeout
        self.max_bytes = max_bytes
        self.ask_version, self.metrics, self.draw = ask_version, metrics, draw
        self.candidate: Optional[str] = None  # the version the candidate last reported
        self.in_flight = self.bytes_in_flight = 0
        self.failing = False
        self._tasks: set[asyncio.Task] = set()  # held until done: the loop keeps weak references only

    @classmethod
    def off(cls) -> "Shadow":
        return cls(call=None, share=0.0)

    @property
    def enabled(self) -> bool:
        return self.call is not None and self.share > 0

    def copy(self, jobs: list, served: list[dict]) -> bool:
        """Send this request's jobs to the candidate if drawn (`share` percent of the requests),
        comparing with the `served` results; returns at once, True when a copy went out."""
        if not self.enabled or self.draw() * 100 >= self.share:
            return False
        size = sum(len(getattr(job, "image", b"")) for job in jobs)  # the images a copy holds until done
        if self.in_flight >= self.max_in_flight or self.bytes_in_flight + size > self.max_bytes:
            self._count(self.candidate or UNKNOWN, "dropped")
            return False
        self.in_flight, self.bytes_in_flight = self.in_flight + 1, self.bytes_in_flight + size
        task = asyncio.get_running_loop().create_task(self._send(list(jobs), list(served)))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finished(done, size))
        return True

    def _finished(self, task: asyncio.Task, size: int) -> None:
        self._tasks.discard(task)
        self.in_flight, self.bytes_in_flight = self.in_flight - 1, self.bytes_in_flight - size

    async def wait(self) -> None:
        """Until the copies in flight are done (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _send(self, jobs: list, served: list[dict]) -> None:
        try:
            answer = await asyncio.wait_for(self.call(jobs), self.timeout)
        except asyncio.TimeoutError:
            # Slow, not failed: latency is the canary's to judge, on real traffic.
            self._count(await self._version(), "slow")
            return
        except Exception as error:  # refused, unreachable, answered 5xx: all the same here
            self._failed(f"{type(error).__name__}: {error}")
            self._count(await self._version(), "error")
            return
        self.compare(answer, served)

    def compare(self, answer: Any, served: list[dict]) -> str:
        """Count the candidate's `answer` to a copy of the request that got `served`: its outcome,
        and the agreement of each of its captions with the served one."""
        results = answer if isinstance(answer, list) else []
        version = next(
            (str(r["model_version"]) for r in results if isinstance(r, dict) and r.get("model_version")), None
        )
        self.candidate = version or self.candidate
        candidate = self.candidate or UNKNOWN
        broken = len(results) != len(served) or any(not isinstance(r, dict) or "error" in r for r in results)
        if broken:
            self._failed(f"{len(results)} results for {len(served)} images, or an error among them")
            self._count(candidate, "error")
            return "error"
        histogram = self.metrics().shadow_agreement.labels(candidate=candidate)
        for theirs, ours in zip(results, served):
            histogram.observe(agreement(str(theirs.get("caption") or ""), str(ours.get("caption") or "")))
        if self.failing:
            logger.info("shadow candidate %s answers again", candidate)
            self.failing = False
        self._count(candidate, "ok")
        return "ok"

    async def _version(self) -> str:
        """The candidate's version for a copy that failed: the last one it reported, else what
        its readiness API says (it may fail on captions but answer that), else "unknown"."""
        if self.candidate is None and self.ask_version is not None:
            try:
                answer = await asyncio.wait_for(self.ask_version(), self.timeout)
                self.candidate = str(answer["model_version"]) if answer.get("model_version") else None
            except Exception:
                pass
        return self.candidate or UNKNOWN

    def _failed(self, reason: str) -> None:
        if not self.failing:  # once per spell of failures, not once per copy
            logger.warning("shadow candidate failed (%s): its copies count as errors until it answers", reason)
            self.failing = True

    def _count(self, candidate: str, outcome: str) -> None:
        self.metrics().shadow_requests.labels(candidate=candidate, outcome=outcome).inc()


def candidate_client(url: str, service: Any, token: str = "") -> Any:
    """A client of the model service `service` at `url`, made as BentoML makes the API's client of
    the stable model service (its RemoteProxy, arguments pickled: the images are bytes), carrying
    the internal token."""
    from _bentoml_impl.client import RemoteProxy

    proxy = RemoteProxy(url, service=service, media_type=PICKLE)
    send_internal_token(proxy, token)
    return proxy


def shadow_from_config(config: Any, service: Any) -> Shadow:
    """The API's shadow (off without CAPTIONING_SHADOW_URL or with a share of 0)."""
    if not config.shadow_url or config.shadow_share <= 0:
        return Shadow.off()
    client = candidate_client(config.shadow_url, service, config.internal_token).to_async
    logger.info("shadow: %g%% of caption requests copied to %s", config.shadow_share, config.shadow_url)
    return Shadow(
        call=lambda jobs: client.call("caption", jobs),  # `call` needs no set-up (the endpoints are the service's)
        share=config.shadow_share,
        max_in_flight=config.shadow_max_in_flight,
        timeout=config.shadow_timeout_seconds,
        max_bytes=config.inflight_upload_bytes,  # as much again as the uploads in flight, at most
        ask_version=lambda: client.call("ready"),
    )
