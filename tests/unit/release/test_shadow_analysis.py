"""The shadow stage's analysis: its PromQL over the API's shadow series, and its verdicts on fixed
figures (too few copies, failing copies, captions that disagree with the served ones)."""

from __future__ import annotations

import pytest

from captioning.release.analysis import (
    FAILED,
    INCONCLUSIVE,
    PASSED,
    Prometheus,
    ShadowFigures,
    ShadowLimits,
    judge_shadow,
    shadow_agreement_query,
    shadow_error_rate_query,
    shadow_requests_query,
    wait_for_shadow_verdict,
)
from harness.serving import free_port
from harness.settings import test_settings

LIMITS = ShadowLimits(window_seconds=30, min_requests=10, max_error_rate=0.02, min_agreement=10.0)


def figures(copies=40, error_rate=0.0, agreement=55.0) -> ShadowFigures:
    return ShadowFigures(candidate="7", copies=copies, error_rate=error_rate, agreement=agreement)


def test_the_limits_come_from_the_release_settings():
    release = test_settings().release
    limits = ShadowLimits.from_release(release)
    assert (limits.window_seconds, limits.min_requests) == (release.shadow.window_seconds, release.shadow.min_requests)
    assert limits.min_agreement == release.shadow.min_agreement
    assert limits.max_error_rate == release.canary.max_error_rate


def test_the_queries_select_the_apis_series_for_one_candidate():
    sent = 'captioning_shadow_requests_total{component="api",candidate="7",outcome=~"ok|error"}[30s]'
    assert shadow_requests_query("7", "30s") == f"sum(increase({sent}))"
    failed, total = shadow_error_rate_query("7", "30s").split(" / ")
    assert 'outcome="error"' in failed and failed.endswith(" or vector(0))") and sent in total
    assert shadow_agreement_query("7", "1m") == (
        'sum(rate(captioning_shadow_agreement_sum{component="api",candidate="7"}[1m])) / '
        'sum(rate(captioning_shadow_agreement_count{component="api",candidate="7"}[1m]))'
    )
    assert 'candidate="a\\"b"' in shadow_agreement_query('a"b', "1m")  # quoted, not injected


def test_too_few_copies_is_inconclusive():
    verdict = judge_shadow(figures(copies=4, error_rate=1.0, agreement=0.0), LIMITS)
    assert verdict.outcome == INCONCLUSIVE and (verdict.check, verdict.figure, verdict.threshold) == (
        "shadow requests",
        4,
        10,
    )
    assert verdict.reason == "shadow: 4 copies sent to version 7 < 10 needed for a verdict"


def test_failing_copies_fail_first():
    verdict = judge_shadow(figures(error_rate=0.25, agreement=0.0), LIMITS)
    assert verdict.outcome == FAILED and verdict.check == "shadow error rate"
    assert (verdict.figure, verdict.threshold) == (0.25, 0.02)
    assert verdict.reason == "shadow: shadow error rate of version 7 25.0% > 2.0% allowed (40 copies)"


def test_captions_that_disagree_with_the_served_ones_fail():
    verdict = judge_shadow(figures(agreement=3.2), LIMITS, stage="shadow 20%")
    assert verdict.outcome == FAILED and verdict.check == "shadow agreement"
    assert (verdict.figure, verdict.threshold) == (3.2, 10.0)
    assert verdict.reason == (
        "shadow 20%: agreement of version 7's captions with the served ones 3.2% < 10.0% required (40 copies)"
    )


def test_a_candidate_that_agrees_passes_with_its_figures():
    verdict = judge_shadow(figures(error_rate=0.01, agreement=55.0), LIMITS)
    assert verdict.outcome == PASSED and verdict.check is None
    assert verdict.reason == "shadow: version 7 within limits over 40 copies (shadow error rate 1.0%, agreement 55.0%)"
    assert verdict.figures == {"copies": 40, "error_rate": 0.01, "agreement": 55.0}
    assert verdict.to_dict()["figures"]["agreement"] == 55.0


def test_no_compared_caption_is_inconclusive():
    verdict = judge_shadow(figures(error_rate=None, agreement=None), LIMITS)
    assert verdict.outcome == INCONCLUSIVE and verdict.check == "shadow agreement"


def test_an_unreachable_prometheus_fails_the_shadow_analysis_after_its_timeout():
    prometheus = Prometheus(f"http://127.0.0.1:{free_port()}", timeout=1)
    lines: list[str] = []
    verdict = wait_for_shadow_verdict(
        prometheus, "7", LIMITS, "shadow", timeout_seconds=1.0, interval_seconds=0.2, report=lines.append
    )
    assert verdict.failed and verdict.check == "prometheus unreachable" and verdict.paused_seconds >= 1.0
    assert lines and all("paused" in line for line in lines)


@pytest.mark.parametrize("agreement, outcome", [(10.0, PASSED), (9.99, FAILED)])
def test_the_agreement_threshold_is_inclusive(agreement, outcome):
    assert judge_shadow(figures(agreement=agreement), LIMITS).outcome == outcome
