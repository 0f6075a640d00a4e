"""The rollout analysis: its settings, its PromQL, its verdicts on fixed figures, and an
unreachable Prometheus (a closed port on 127.0.0.1)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from captioning.release.analysis import (
    INCONCLUSIVE,
    PASSED,
    Figures,
    Limits,
    Prometheus,
    PrometheusUnreachable,
    caption_failure_rate_query,
    duration,
    error_rate_query,
    judge,
    p95_query,
    requests_query,
    selector,
    wait_for_verdict,
)
from captioning.settings import SettingsError, apply_overrides
from harness.serving import free_port
from harness.settings import test_settings

LIMITS = Limits(window_seconds=30, min_requests=20, max_error_rate=0.02, max_latency_ratio=2.0, max_p95_seconds=5.0)
STABLE = Figures(version="6", requests=200, error_rate=0.0, p95_seconds=0.4)


def test_params_yaml_declares_every_release_setting():
    release = test_settings().release
    assert release.canary.steps[-1] == 100 and release.canary.enabled
    assert release.smoke.enabled and release.shadow.enabled
    assert release.prometheus_timeout_seconds > 0 and release.keep_previous_seconds >= 0
    limits = Limits.canary(release)
    assert (limits.window_seconds, limits.min_requests) == (release.canary.window_seconds, release.canary.min_requests)
    assert Limits.shadow(release).min_requests == release.shadow.min_requests
    # Tests shorten the windows through the settings, like any other section.
    short = test_settings(release={"canary": {"window_seconds": 2, "min_requests": 1}})
    assert short.release.canary.window_seconds == 2 and short.release.canary.steps == release.canary.steps


@pytest.mark.parametrize(
    "item, reason",
    [
        ("release.canary.steps=[10, 50]", "release.canary.steps=[10, 50]: the last step must be 100 (all the traffic)"),
        (
            "release.canary.steps=[50, 10, 100]",
            "release.canary.steps=[50, 10, 100]: steps must grow, e.g. [10, 50, 100]",
        ),
        ("release.canary.steps=[0, 100]", "release.canary.steps=[0, 100]: steps are shares of the traffic in percent"),
        ("release.canary.max_error_rate=1.5", "release.canary.max_error_rate=1.5: Input should be less than or equal"),
        ("release.canary.max_latency_ratio=0", "release.canary.max_latency_ratio=0: Input should be greater than 0"),
        ("release.canary.min_requests=0", "release.canary.min_requests=0: Input should be greater than or equal to 1"),
        ("release.shadow.share=150", "release.shadow.share=150: Input should be less than or equal to 100"),
        ("release.smoke.photos=0", "release.smoke.photos=0: Input should be greater than or equal to 1"),
        ("release.smoke.enabled=maybe", "release.smoke.enabled='maybe': Input should be a valid boolean"),
        (
            "release.prometheus_timeout_seconds=0",
            "release.prometheus_timeout_seconds=0: Input should be greater than 0",
        ),
        ("release.keep_previous_seconds=-1", "release.keep_previous_seconds=-1: Input should be greater than or equal"),
        ("release.canary.windw_seconds=3", "release.canary.windw_seconds is not a setting"),
        ("release.stages=[smoke]", "release.stages is not a setting"),
    ],
)
def test_bad_release_settings_are_refused_with_one_line(item, reason):
    with pytest.raises(SettingsError) as refused:
        apply_overrides(test_settings(), [item])
    assert str(refused.value).startswith(reason)
    assert "\n" not in str(refused.value)


def test_the_queries_select_one_version_of_the_model_servers():
    assert duration(30) == "30s" and duration(30.0) == "30s" and duration(0.5) == "500ms"
    with pytest.raises(ValueError):
        duration(0)
    assert selector("7") == '{component="model",endpoint="/caption",version="7"}'
    assert selector('a"b') == '{component="model",endpoint="/caption",version="a\\"b"}'  # quoted, not injected
    assert requests_query("7", "30s") == (
        'sum(increase(bentoml_service_request_total{component="model",endpoint="/caption",version="7"}[30s]))'
    )
    assert 'http_response_code=~"5.."' in error_rate_query("7", "30s").split(" / ")[0]
    assert p95_query("7", "1m").startswith("histogram_quantile(0.95, sum by (le) (rate(")
    assert "bentoml_service_request_duration_seconds_bucket" in p95_query("7", "1m")


def test_the_caption_failure_query_counts_failed_and_empty_captions_of_one_version():
    query = caption_failure_rate_query("7", "30s")
    failed, total = query.split(" / ")
    # The captions counter has no endpoint label: the selector is the role and the version only.
    assert 'captioning_model_captions_total{component="model",version="7",outcome=~"error|empty"}[30s]' in failed
    assert failed.endswith(" or vector(0))")  # no failure at all is 0, not nothing
    assert total == 'sum(rate(captioning_model_captions_total{component="model",version="7"}[30s]))'


def _candidate(requests=100, error_rate=0.0, p95=0.5, caption_failures=None) -> Figures:
    return Figures(
        version="7", requests=requests, error_rate=error_rate, p95_seconds=p95, caption_failure_rate=caption_failures
    )


def test_too_few_requests_is_inconclusive():
    verdict = judge(_candidate(requests=12, p95=3.0), STABLE, LIMITS, "canary 10%")
    assert verdict.outcome == INCONCLUSIVE and not verdict.passed and not verdict.failed
    assert (verdict.check, verdict.figure, verdict.threshold) == ("requests", 12, 20)
    assert verdict.reason == "canary 10%: 12 requests to version 7 < 20 needed for a verdict"
    assert (
        judge(_candidate(requests=0, error_rate=None, p95=None), STABLE, LIMITS, "canary 10%").outcome == INCONCLUSIVE
    )


@pytest.mark.parametrize(
    "figures, check",
    [
        ({"error_rate": 1.0}, "error rate"),
        ({"caption_failures": 0.5}, "caption failure rate"),
        ({"p95": 9.5}, "p95 latency"),
    ],
)
def test_a_ceiling_breached_on_too_few_requests_fails(figures, check):
    # A version too slow to answer its share never collects the minimum: its few answers judge it.
    verdict = judge(_candidate(requests=3, **figures), STABLE, LIMITS, "canary 50%")
    assert verdict.failed and verdict.check == check
    assert verdict.reason.endswith("allowed (3 requests)")


def test_a_high_error_rate_fails_first():
    verdict = judge(_candidate(error_rate=0.05, p95=9.0), STABLE, LIMITS, "canary 50%")
    assert verdict.failed
    assert (verdict.check, verdict.figure, verdict.threshold) == ("error rate", 0.05, 0.02)
    assert verdict.reason == "canary 50%: error rate of version 7 5.0% > 2.0% allowed (100 requests)"


def test_captions_that_fail_inside_200_answers_fail_the_analysis():
    # Every HTTP answer a 200, every caption an error: only the caption count sees it.
    verdict = judge(_candidate(error_rate=0.0, caption_failures=1.0), STABLE, LIMITS, "canary 10%")
    assert verdict.failed
    assert (verdict.check, verdict.figure, verdict.threshold) == ("caption failure rate", 1.0, 0.02)
    assert verdict.reason == "canary 10%: caption failure rate of version 7 100.0% > 2.0% allowed (100 requests)"
    assert verdict.figures["caption_failure_rate"] == 1.0
    passed = judge(_candidate(caption_failures=0.01), STABLE, LIMITS, "canary 10%")
    assert passed.passed and "caption failure rate 1.0%" in passed.reason


def test_a_p95_above_the_ceiling_fails():
    verdict = judge(_candidate(p95=6.0), None, LIMITS, "canary")
    assert verdict.failed and (verdict.check, verdict.figure, verdict.threshold) == ("p95 latency", 6.0, 5.0)
    assert verdict.reason == "canary: p95 latency of version 7 6 s > 5 s allowed (100 requests)"


def test_a_p95_far_above_the_stable_versions_fails():
    verdict = judge(_candidate(p95=1.2), STABLE, LIMITS, "canary 10%")
    assert verdict.failed and verdict.check == "p95 latency ratio"
    assert verdict.figure == pytest.approx(3.0) and verdict.threshold == 2.0
    assert verdict.reason == (
        "canary 10%: p95 latency ratio of version 7 3.00x the stable version's > 2.00x the stable version's "
        "allowed (100 requests)"
    )
    assert verdict.figures["stable_p95_seconds"] == 0.4


def test_a_healthy_candidate_passes_with_its_figures():
    verdict = judge(_candidate(error_rate=0.01, p95=0.6), STABLE, LIMITS, "canary 100%")
    assert verdict.outcome == PASSED and verdict.passed
    assert verdict.check is None and verdict.figures["latency_ratio"] == pytest.approx(1.5)
    assert verdict.reason.startswith("canary 100%: version 7 within limits over 100 requests (error rate 1.0%")
    assert verdict.to_dict()["candidate"]["version"] == "7"


def test_without_stable_figures_the_ratio_is_not_judged():
    # The stable version had no requests in the window (e.g. the last step): ceiling and errors only.
    idle = Figures(version="6", requests=0, error_rate=None, p95_seconds=None)
    verdict = judge(_candidate(p95=1.2), idle, LIMITS, "canary 100%")
    assert verdict.passed and verdict.figures["latency_ratio"] is None


def test_a_stable_version_with_a_handful_of_requests_is_no_baseline_for_the_ratio():
    # At a canary's 100 % the stable slots keep a weight of 1: a few requests on idle servers,
    # whose p95 would make any loaded candidate look slow.
    few = Figures(version="6", requests=LIMITS.min_requests - 1, error_rate=0.0, p95_seconds=0.1)
    verdict = judge(_candidate(p95=0.9), few, LIMITS, "canary 100%")
    assert verdict.passed and verdict.figures["latency_ratio"] is None
    enough = replace(few, requests=LIMITS.min_requests)
    verdict = judge(_candidate(p95=0.9), enough, LIMITS, "canary 50%")
    assert verdict.failed and verdict.check == "p95 latency ratio" and verdict.figure == pytest.approx(9.0)


def test_no_figure_for_errors_is_not_a_breach():
    # error rate None: no series yet for the version (Prometheus returned nothing)
    verdict = judge(_candidate(error_rate=None, p95=None), STABLE, LIMITS, "shadow")
    assert verdict.passed


def test_an_unreachable_prometheus_is_said_so():
    port = free_port()  # nothing listens there
    with pytest.raises(PrometheusUnreachable, match=f"Prometheus at http://127.0.0.1:{port} is unreachable"):
        Prometheus(f"http://127.0.0.1:{port}", timeout=2).query("up")
    assert not Prometheus(f"http://127.0.0.1:{port}", timeout=2).ready()


def test_an_unreachable_prometheus_pauses_then_fails_the_analysis():
    prometheus = Prometheus(f"http://127.0.0.1:{free_port()}", timeout=1)
    lines: list[str] = []
    started = time.monotonic()
    verdict = wait_for_verdict(
        prometheus, "7", "6", LIMITS, "canary 10%", timeout_seconds=1.5, interval_seconds=0.2, report=lines.append
    )
    assert time.monotonic() - started >= 1.5
    assert verdict.failed and verdict.check == "prometheus unreachable"
    assert verdict.threshold == 1.5 and verdict.figure >= 1.5 and verdict.paused_seconds >= 1.5
    assert verdict.reason.startswith("canary 10%: Prometheus unreachable for ")
    assert "(> 1.5 s allowed), no figures" in verdict.reason
    assert lines and all("paused" in line for line in lines)  # it waited, reporting, before failing
