"""Shadow copies: a share of the requests copied to a candidate in tasks nobody waits for, its
captions scored against the served ones, its failures and the copies beyond the bound counted.
The candidates here are coroutines answering as a model service does, or a real connection to a
closed port."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from captioning.serving.config import ServiceConfig
from captioning.serving.shadow import Shadow, shadow_from_config
from harness.serving import free_port

SERVED = [{"caption": "a red circle above a blue square", "model_version": "6"}]


def answering(caption: str = "a red circle above a blue square", version: str = "7", delay: float = 0.0):
    """A candidate that answers each job with `caption` after `delay` seconds."""

    async def call(jobs: list) -> list[dict]:
        await asyncio.sleep(delay)
        return [{"caption": caption, "model_version": version} for _ in jobs]

    return call


def unreachable():
    port = free_port()

    async def call(jobs: list) -> list[dict]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/caption", json={"jobs": []}) as response:
                return await response.json()

    return call


def run(shadow: Shadow, copies: list[tuple[list, list]]) -> list[bool]:
    """Copy each (jobs, served) as the API does, from inside the event loop, then let the copies finish."""

    async def main() -> list[bool]:
        sent = [shadow.copy(jobs, served) for jobs, served in copies]
        await shadow.wait()
        return sent

    return asyncio.run(main())


def test_a_copy_is_scored_against_the_served_caption(series):
    shadow = Shadow(answering("a red circle above a green square"), share=100, metrics=lambda: series.metrics)
    two = SERVED + [{"caption": "a green triangle", "model_version": "6"}]
    assert run(shadow, [(["job"], SERVED), (["job", "job"], two)]) == [True, True]
    assert series.value("captioning_shadow_requests_total", candidate="7", outcome="ok") == 2
    assert series.value("captioning_shadow_agreement_count", candidate="7") == 3  # one per image
    total = series.value("captioning_shadow_agreement_sum", candidate="7")
    assert 0 < total < 300 and shadow.candidate == "7" and shadow.in_flight == 0


def test_the_same_captions_agree_fully(series):
    shadow = Shadow(answering(), share=100, metrics=lambda: series.metrics)
    run(shadow, [(["job"], SERVED)] * 3)
    assert series.value("captioning_shadow_agreement_sum", candidate="7") == pytest.approx(300.0)
    assert series.value("captioning_shadow_agreement_bucket", candidate="7", le="90.0") == 0


def test_only_the_share_drawn_is_copied(series):
    draws = iter([0.05, 0.5, 0.19, 0.2, 0.99])
    shadow = Shadow(answering(), share=20, metrics=lambda: series.metrics, draw=lambda: next(draws))
    assert run(shadow, [(["job"], SERVED)] * 5) == [True, False, True, False, False]
    assert series.value("captioning_shadow_requests_total", candidate="7", outcome="ok") == 2


def test_the_client_never_waits_for_a_slow_candidate(series):
    shadow = Shadow(answering(delay=0.5), share=100, timeout=0.2, metrics=lambda: series.metrics)

    async def main() -> float:
        started = time.perf_counter()
        assert shadow.copy(["job"], SERVED)
        returned = time.perf_counter() - started
        await shadow.wait()
        return returned

    assert asyncio.run(main()) < 0.05
    # Beyond the timeout the copy counts as slow, not as an error (the version is not known yet):
    # the canary judges latency.
    assert series.value("captioning_shadow_requests_total", candidate="unknown", outcome="slow") == 1
    assert series.value("captioning_shadow_requests_total", candidate="unknown", outcome="error") == 0


def test_an_unreachable_candidate_counts_errors_under_its_last_version(series):
    shadow = Shadow(answering(version="8"), share=100, metrics=lambda: series.metrics)
    run(shadow, [(["job"], SERVED)])
    shadow.call = unreachable()
    run(shadow, [(["job"], SERVED)] * 2)
    assert series.value("captioning_shadow_requests_total", candidate="8", outcome="ok") == 1
    assert series.value("captioning_shadow_requests_total", candidate="8", outcome="error") == 2


def test_a_failing_candidate_is_asked_its_version(series):
    async def ready() -> dict:
        return {"ready": True, "model_version": "9"}

    shadow = Shadow(unreachable(), share=100, ask_version=ready, metrics=lambda: series.metrics)
    run(shadow, [(["job"], SERVED)])
    assert series.value("captioning_shadow_requests_total", candidate="9", outcome="error") == 1


def test_errors_inside_the_answer_count_as_errors(series):
    async def failing(jobs: list) -> list[dict]:
        return [{"error": "RuntimeError: broken", "model_version": "7"} for _ in jobs]

    shadow = Shadow(failing, share=100, metrics=lambda: series.metrics)
    run(shadow, [(["job"], SERVED)])
    assert series.value("captioning_shadow_requests_total", candidate="7", outcome="error") == 1
    assert series.value("captioning_shadow_agreement_count", candidate="7") == 0


def test_copies_beyond_the_bound_are_dropped_and_counted(series):
    shadow = Shadow(answering(delay=0.3), share=100, max_in_flight=2, metrics=lambda: series.metrics)
    assert run(shadow, [(["job"], SERVED)] * 5) == [True, True, False, False, False]
    assert series.value("captioning_shadow_requests_total", candidate="unknown", outcome="dropped") == 3
    assert series.value("captioning_shadow_requests_total", candidate="7", outcome="ok") == 2
    assert shadow.in_flight == 0
    # Once the copies are done, new ones go out again.
    assert run(shadow, [(["job"], SERVED)]) == [True]


class Job:
    def __init__(self, size: int):
        self.image = b"x" * size


def test_copies_beyond_the_bytes_bound_are_dropped(series):
    shadow = Shadow(answering(delay=0.3), share=100, max_bytes=1000, metrics=lambda: series.metrics)
    copies = [([Job(600)], SERVED), ([Job(300)], SERVED), ([Job(200)], SERVED), ([Job(100)], SERVED)]
    assert run(shadow, copies) == [True, True, False, True]  # 600 + 300 + 200 > 1000; + 100 fits
    assert series.value("captioning_shadow_requests_total", candidate="unknown", outcome="dropped") == 1
    assert shadow.bytes_in_flight == 0 and shadow.in_flight == 0


def test_without_an_address_there_is_no_shadow(series):
    for environ in ({}, {"CAPTIONING_SHADOW_URL": "http://127.0.0.1:3001", "CAPTIONING_SHADOW_SHARE": "0"}):
        shadow = shadow_from_config(ServiceConfig.from_env(environ), service=None)
        assert not shadow.enabled
        assert run(shadow, [(["job"], SERVED)]) == [False]
