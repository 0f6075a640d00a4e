"""A model call that cannot connect is tried again, up to the limit, and then answered 503."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from captioning.serving.errors import InputError
from captioning.serving.model_calls import MODEL_CALL_ATTEMPTS, call_model
from harness.serving import free_port


def closed_port_call(attempts: list[int]):
    """A call to a port nothing listens on, counting its attempts."""
    port = free_port()

    async def call() -> dict:
        attempts.append(1)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/caption") as response:
                return await response.json()

    return call


def test_a_connection_never_made_is_retried_then_answered_503(series):
    attempts: list[int] = []
    with pytest.raises(InputError) as failed:
        asyncio.run(call_model(closed_port_call(attempts), metrics=lambda: series.metrics))
    assert len(attempts) == MODEL_CALL_ATTEMPTS
    assert (failed.value.status, failed.value.kind) == (503, "model_unavailable")
    assert series.value("captioning_errors_total", kind="model_retry") == MODEL_CALL_ATTEMPTS - 1


def test_without_retry_one_attempt(series):
    attempts: list[int] = []
    with pytest.raises(InputError) as failed:
        asyncio.run(call_model(closed_port_call(attempts), retry=False, metrics=lambda: series.metrics))
    assert len(attempts) == 1 and failed.value.status == 503
    assert series.value("captioning_errors_total", kind="model_retry") == 0


def test_an_answer_is_returned(series):
    async def answer() -> dict:
        return {"ready": True}

    assert asyncio.run(call_model(answer, metrics=lambda: series.metrics)) == {"ready": True}
