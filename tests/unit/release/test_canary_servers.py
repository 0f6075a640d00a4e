"""How many model servers a candidate gets at each canary share, and what each then carries."""

from __future__ import annotations

import math

import pytest

from captioning.release import haproxy
from captioning.release.analysis import Limits
from captioning.release.rollout import candidate_servers, step_limits

LIMITS = Limits(window_seconds=30, min_requests=10, max_error_rate=0.02, max_latency_ratio=2.0, max_p95_seconds=5.0)


@pytest.mark.parametrize(
    "share, replicas, expected",
    [(10, 2, 1), (50, 2, 2), (100, 2, 2), (10, 1, 1), (50, 1, 1), (100, 1, 1), (25, 3, 1), (50, 3, 3), (60, 4, 4)],
)
def test_the_candidate_gets_servers_with_its_share(share, replicas, expected):
    assert candidate_servers(share, replicas) == expected


@pytest.mark.parametrize("share", [1, 10, 25, 33, 50])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_up_to_half_no_candidate_server_carries_more_than_a_stable_one(share, replicas):
    # The analysis compares the candidate's p95 with the stable version's in the same window:
    # a fair comparison needs no more load on a candidate server than on a stable one.
    servers = candidate_servers(share, replicas)
    candidate, stable = haproxy.shares(share, replicas, servers)
    total = servers * candidate + replicas * stable
    per_candidate, per_stable = candidate / total, stable / total
    assert 1 <= servers <= replicas
    assert per_candidate <= per_stable * 1.05, (servers, candidate, stable)


@pytest.mark.parametrize("share", [60, 75, 99, 100])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_above_half_the_candidate_has_every_replica(share, replicas):
    # More than half the traffic on at most as many servers as the stable version has: its
    # servers carry more than a stable one, so the canary judges no latency ratio there.
    assert candidate_servers(share, replicas) == replicas
    assert step_limits(share, LIMITS).max_latency_ratio == math.inf


def test_up_to_half_the_latency_ratio_is_judged():
    assert step_limits(50, LIMITS) == LIMITS and step_limits(10, LIMITS) == LIMITS
