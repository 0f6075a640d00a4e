"""When the API retries a model call, and what it answers when the call fails.

A request that kills a model pod must not go on to kill the next one: only failures that never
reached a model are retried up to three times, a connection dropped after sending once, an answer
never (even an error). The connection errors here are real ones, raised by aiohttp against real
sockets; the error answers are those the BentoML client raises for an HTTP status.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

import aiohttp
import pytest
from bentoml.exceptions import BentoMLException

from captioning.serving.model_calls import MODEL_CALL_ATTEMPTS, may_retry, model_failure
from harness.serving import free_port


async def _get(port: int) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/caption") as response:
            await response.read()


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the request arrived; then the "model" dies
    writer.close()


async def refused_connection() -> BaseException:
    """Nothing listens on the port: the request never left."""
    try:
        await _get(free_port())
    except aiohttp.ClientError as error:
        return error
    raise AssertionError("a closed port answered")


async def dropped_after_sending() -> BaseException:
    """The peer read the request, then closed the connection without answering."""
    server = await asyncio.start_server(_hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await _get(port)
    except aiohttp.ClientError as error:
        return error
    finally:
        server.close()
        await server.wait_closed()
    raise AssertionError("the server answered")


def answered(status: int) -> BentoMLException:
    return BentoMLException(f"the model answered {status}", error_code=HTTPStatus(status))


def test_a_connection_never_made_is_retried_up_to_the_limit():
    error = asyncio.run(refused_connection())
    assert isinstance(error, aiohttp.ClientConnectorError)
    assert [may_retry(error, attempt) for attempt in range(MODEL_CALL_ATTEMPTS)] == [True, True, False]
    assert model_failure(error).status == 503


def test_a_connection_dropped_after_sending_is_retried_once():
    error = asyncio.run(dropped_after_sending())
    assert isinstance(error, aiohttp.ServerDisconnectedError)
    assert [may_retry(error, attempt) for attempt in range(MODEL_CALL_ATTEMPTS)] == [True, False, False]
    assert model_failure(error).status == 503


@pytest.mark.parametrize("status, answer", [(500, 502), (400, 502), (401, 502), (429, 503), (503, 503)])
def test_an_answer_is_never_retried(status, answer):
    error = answered(status)
    assert not may_retry(error, 0)
    failure = model_failure(error)
    assert failure.status == answer
    assert failure.kind == ("model_unavailable" if answer == 503 else "model_refused")
    # A refusal says why: the token for 401, else the status the model answered.
    assert ("internal token" if status == 401 else str(status) if answer == 502 else "retry") in failure.message
