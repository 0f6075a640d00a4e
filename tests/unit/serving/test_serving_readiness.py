"""The API's readiness: probes read the last background answer, never call the model themselves."""

from __future__ import annotations

import asyncio

from captioning.serving.readiness import CachedReadiness


def test_a_flood_of_probes_costs_one_model_call_per_period():
    calls = []

    async def ask() -> bool:
        calls.append(1)
        return True

    async def flood() -> list[bool]:
        readiness = CachedReadiness(ask, period=0.2)
        answers = []
        for _ in range(10):  # 10 rounds of 100 concurrent probes over about 0.5 s
            answers += await asyncio.gather(*(readiness.ready() for _ in range(100)))
            await asyncio.sleep(0.05)
        return answers

    answers = asyncio.run(flood())
    assert answers == [True] * 1000
    assert 1 <= len(calls) <= 5, len(calls)


def test_a_failing_or_silent_model_is_not_ready_and_a_recovery_is_seen():
    state = {"answer": "fail"}

    async def ask() -> bool:
        if state["answer"] == "fail":
            raise ConnectionError("no model")
        if state["answer"] == "hang":
            await asyncio.sleep(60)
        return True

    async def scenario() -> list[bool]:
        readiness = CachedReadiness(ask, period=0.05, timeout=0.1)
        seen = [await readiness.ready()]
        state["answer"] = "ok"
        await asyncio.sleep(0.2)
        seen.append(await readiness.ready())
        state["answer"] = "hang"
        await asyncio.sleep(0.4)
        seen.append(await readiness.ready())
        return seen

    assert asyncio.run(scenario()) == [False, True, False]


def test_a_stale_answer_counts_as_not_ready():
    async def ask() -> bool:
        return True

    async def scenario() -> tuple[bool, bool]:
        readiness = CachedReadiness(ask, period=60, stale_after=0.1)
        first = await readiness.ready()
        await asyncio.sleep(0.2)  # the next refresh is a minute away: the answer is too old
        return first, await readiness.ready()

    assert asyncio.run(scenario()) == (True, False)
