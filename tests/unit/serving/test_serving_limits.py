"""The per-client limit of POST /feedback: a token bucket per client address."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from captioning.serving.errors import InputError
from captioning.serving.limits import RateLimiter, client_id


def request(client: tuple[str, int] | None = ("198.51.100.7", 40000), forwarded: str | None = None) -> Request:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded is not None else []
    return Request({"type": "http", "method": "POST", "path": "/feedback", "headers": headers, "client": client})


def test_a_client_gets_its_burst_then_waits_for_the_refill():
    limiter = RateLimiter(per_minute=3)
    assert [limiter.wait("a", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait("a", now=100.0) == pytest.approx(20.0)  # one token per 20 s
    assert limiter.wait("b", now=100.0) == 0.0  # another client has its own bucket
    assert limiter.wait("a", now=110.0) == pytest.approx(10.0)
    assert limiter.wait("a", now=120.0) == 0.0


def test_no_limit_when_zero_per_minute():
    limiter = RateLimiter(per_minute=0)
    assert all(limiter.wait("a", now=1.0) == 0.0 for _ in range(1000))
    assert not limiter.buckets


def test_the_least_recently_seen_clients_are_forgotten():
    limiter = RateLimiter(per_minute=1, max_clients=2)
    for client in ("a", "b", "c"):
        limiter.wait(client, now=0.0)
    assert list(limiter.buckets) == ["b", "c"]
    assert limiter.wait("a", now=0.0) == 0.0  # forgotten: a full bucket again


def test_over_the_limit_is_answered_429_with_retry_after():
    limiter = RateLimiter(per_minute=1)
    limiter.check("a", "/feedback")
    with pytest.raises(InputError) as refused:
        limiter.check("a", "/feedback")
    error = refused.value
    assert (error.status, error.kind) == (429, "rate_limited")
    assert "/feedback" in error.message and 1 <= int(error.headers["Retry-After"]) <= 60


def test_the_client_is_the_peer_address_unless_the_proxy_is_trusted():
    assert client_id(request()) == "198.51.100.7"
    # A client can write any X-Forwarded-For it likes: ignored unless behind our proxy.
    assert client_id(request(forwarded="203.0.113.1")) == "198.51.100.7"
    # Behind the proxy, the last entry is the one it appended.
    assert client_id(request(forwarded="203.0.113.1, 192.0.2.10"), proxy_hops=1) == "192.0.2.10"
    assert client_id(request(), proxy_hops=1) == "198.51.100.7"
    assert client_id(request(client=None)) == "unknown"


def lines_request(*lines: str) -> Request:
    headers = [(b"x-forwarded-for", line.encode()) for line in lines]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": ("10.0.0.9", 1)})


def test_a_proxy_that_adds_its_own_header_line_is_read_not_the_clients_line():
    # haproxy adds a second X-Forwarded-For line; the first is whatever the client wrote.
    forged = lines_request("198.51.100.77", "203.0.113.5")
    assert client_id(forged, proxy_hops=1) == "203.0.113.5"
    assert client_id(lines_request("1.1.1.1, 2.2.2.2", "203.0.113.5"), proxy_hops=1) == "203.0.113.5"


def test_with_two_trusted_hops_the_client_is_the_second_entry_from_the_right():
    # client forged "6.6.6.6"; the edge proxy appended the client's address, the ingress the edge's.
    request_ = lines_request("6.6.6.6, 203.0.113.5, 10.1.0.4")
    assert client_id(request_, proxy_hops=2) == "203.0.113.5"
    assert client_id(request_, proxy_hops=1) == "10.1.0.4"
    # Changing the forged entries does not change the client.
    assert client_id(lines_request("7.7.7.7, 8.8.8.8, 203.0.113.5, 10.1.0.4"), proxy_hops=2) == "203.0.113.5"
    # Fewer entries than hops: the leftmost there is.
    assert client_id(lines_request("203.0.113.5"), proxy_hops=2) == "203.0.113.5"
