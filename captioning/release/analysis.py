"""The analysis of a rollout: how a candidate version's model servers fare against the stable ones.

    prometheus = Prometheus("http://127.0.0.1:3009")
    limits = Limits.canary(settings.release)
    verdict = wait_for_verdict(prometheus, candidate="7", stable="6", limits=limits, stage="canary 10%")
    verdict.outcome                   # "passed" | "failed" | "inconclusive" (too few requests)
    verdict.reason                    # one line: stage, figure, threshold

The figures come from the model servers' own request metrics (BentoML's, on every replica) and
their count of captions by outcome (a model server answers 200 with an error inside a failed
image's result, so only that count sees a model that fails every caption), read through
Prometheus with the PromQL below: this module holds those queries, and
deploy/rollouts/analysis-template.yaml (Argo Rollouts) uses the very same ones (a test checks
it). Each replica's metrics carry the model version as a Prometheus target label (`version`),
and the role as `component` (the label Kubernetes' relabelling gives in deploy/prometheus):
the service itself knows nothing of rollouts.

The shadow stage reads the API's metrics instead: the copies of live requests it sent to the
candidate and how far the candidate's captions agreed with the served ones, labelled with the
version the candidate reported (`candidate`):

    figures = measure_shadow(prometheus, candidate="7", window_seconds=30)
    verdict = judge_shadow(figures, ShadowLimits.from_release(settings.release), stage="shadow")

Prometheus unreachable never lets a candidate pass: `wait_for_verdict` waits for it, and once it
has been unreachable for `release.prometheus_timeout_seconds` the verdict is a failure saying so.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

from captioning.settings import ReleaseSettings

# BentoML's request metrics on each model server: requests by endpoint and HTTP status, and
# their duration as a histogram (BentoML's default buckets, 5 ms to 10 s).
REQUESTS = "bentoml_service_request_total"
LATENCY_BUCKETS = "bentoml_service_request_duration_seconds_bucket"
ROUTE = "/caption"  # the model servers' captioning endpoint (the API calls it for each request)
ROLE = "model"  # the `component` label of the model servers' targets
# The model servers' count of images captioned, by outcome ("ok", "error", "empty"); no endpoint label.
CAPTIONS = "captioning_model_captions_total"
FAILED_OUTCOMES = "error|empty"
# The API's shadow copies (by candidate version and outcome) and their captions' agreement (percent).
API_ROLE = "api"  # the `component` label of the API replicas' targets
SHADOW_REQUESTS = "captioning_shadow_requests_total"
SHADOW_AGREEMENT = "captioning_shadow_agreement"
SENT_OUTCOMES = "ok|error"  # copies that reached the candidate or failed there ("dropped" never left)
QUANTILE = 0.95


# --------------------------------------------------------------------------- PromQL


def duration(seconds: float) -> str:
    """A PromQL range: 30 -> "30s", 0.5 -> "500ms"."""
    if seconds <= 0:
        raise ValueError(f"a window must be longer than 0 s, not {seconds}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def selector(version: Optional[str], extra: str = "") -> str:
    """The label matchers of one version's model-server captioning requests (every version's: None)."""
    matchers = [f"component={_quote(ROLE)}", f"endpoint={_quote(ROUTE)}"]
    matchers += [f"version={_quote(version)}"] if version is not None else []
    return "{" + ",".join(matchers + ([extra] if extra else [])) + "}"


def captions_selector(version: Optional[str], extra: str = "") -> str:
    """The label matchers of one version's model-server caption counts (every version's: None)."""
    matchers = [f"component={_quote(ROLE)}"] + ([f"version={_quote(version)}"] if version is not None else [])
    return "{" + ",".join(matchers + ([extra] if extra else [])) + "}"


def _share_query(part: str, whole: str, window: str) -> str:
    """The rate of the part's series over the whole's (0 when the part has none; NaN or nothing
    when the whole has none)."""
    return f"(sum(rate({part}[{window}])) or vector(0)) / sum(rate({whole}[{window}]))"


def requests_query(version: str, window: str) -> str:
    """Requests the version's model servers answered over the window."""
    return f"sum(increase({REQUESTS}{selector(version)}[{window}]))"


def error_rate_query(version: str, window: str) -> str:
    """The share of the version's requests answered 5xx over the window (NaN or nothing without requests)."""
    errors = REQUESTS + selector(version, "http_response_code=~" + _quote("5.."))
    return _share_query(errors, REQUESTS + selector(version), window)


def caption_failure_rate_query(version: str, window: str) -> str:
    """The share of the images the version's model servers captioned with an error or an empty
    caption over the window (NaN or nothing without captions)."""
    failed = CAPTIONS + captions_selector(version, "outcome=~" + _quote(FAILED_OUTCOMES))
    return _share_query(failed, CAPTIONS + captions_selector(version), window)


def p95_query(version: str, window: str) -> str:
    """The version's p95 request latency in seconds over the window, from the histogram's buckets."""
    buckets = f"sum by (le) (rate({LATENCY_BUCKETS}{selector(version)}[{window}]))"
    return f"histogram_quantile({QUANTILE}, {buckets})"


def latency_ratio_query(candidate: str, stable: str, window: str, min_requests: int) -> str:
    """Candidate's p95 over the stable version's, and nothing unless each answered `min_requests`
    over the window (as `judge` compares them): one query, for engines that judge one figure per
    metric (Argo Rollouts); the local analysis divides the two p95 figures itself."""
    ratio = f"({p95_query(candidate, window)}) / ({p95_query(stable, window)})"
    enough = [f"({requests_query(version, window)} >= {min_requests})" for version in (candidate, stable)]
    return " and on () ".join([ratio] + enough)


def breach_alert_query(max_error_rate: float, max_p95_seconds: float, window: str) -> str:
    """Any version's model servers above the analysis' limits of error rate, caption failure rate
    or p95 latency while another version serves next to it: what makes a rollout's analysis roll
    the candidate back. deploy/prometheus/alerts.yml alerts on it (a test checks the two agree)."""
    errors = f"sum by (version) (rate({REQUESTS}{selector(None, 'http_response_code=~' + _quote('5..'))}[{window}]))"
    total = f"sum by (version) (rate({REQUESTS}{selector(None)}[{window}]))"
    failed = (
        f"sum by (version) (rate({CAPTIONS}{captions_selector(None, 'outcome=~' + _quote(FAILED_OUTCOMES))}[{window}]))"
    )
    captions = f"sum by (version) (rate({CAPTIONS}{captions_selector(None)}[{window}]))"
    p95 = f"histogram_quantile({QUANTILE}, sum by (le, version) (rate({LATENCY_BUCKETS}{selector(None)}[{window}])))"
    versions = f"count(count by (version) (up{{component={_quote(ROLE)}}} == 1))"
    breaches = [f"({errors} / {total} > {max_error_rate:g})", f"({failed} / {captions} > {max_error_rate:g})"]
    breaches.append(f"({p95} > {max_p95_seconds:g})")
    return f"({' or '.join(breaches)}) and on () ({versions} > 1)"


def shadow_selector(candidate: str, extra: str = "") -> str:
    """The label matchers of the API's shadow series for one candidate version."""
    matchers = [f"component={_quote(API_ROLE)}", f"candidate={_quote(candidate)}"]
    return "{" + ",".join(matchers + ([extra] if extra else [])) + "}"


def shadow_requests_query(candidate: str, window: str) -> str:
    """Copies the API sent the candidate over the window (answered or failed; not the dropped ones)."""
    sent = shadow_selector(candidate, "outcome=~" + _quote(SENT_OUTCOMES))
    return f"sum(increase({SHADOW_REQUESTS}{sent}[{window}]))"


def shadow_error_rate_query(candidate: str, window: str) -> str:
    """The share of the copies sent to the candidate that failed (an error, no answer in time)."""
    failed = SHADOW_REQUESTS + shadow_selector(candidate, "outcome=" + _quote("error"))
    sent = SHADOW_REQUESTS + shadow_selector(candidate, "outcome=~" + _quote(SENT_OUTCOMES))
    return _share_query(failed, sent, window)


def shadow_agreement_query(candidate: str, window: str) -> str:
    """The candidate's mean agreement with the served captions over the window, in percent (the
    agreement histogram's sum over its count; NaN or nothing without compared captions)."""
    total = f"sum(rate({SHADOW_AGREEMENT}_sum{shadow_selector(candidate)}[{window}]))"
    count = f"sum(rate({SHADOW_AGREEMENT}_count{shadow_selector(candidate)}[{window}]))"
    return f"{total} / {count}"


# --------------------------------------------------------------------------- Prometheus


class PrometheusUnreachable(RuntimeError):
    """Prometheus did not answer (refused, timed out, or answered 5xx)."""


class PrometheusError(RuntimeError):
    """Prometheus answered but refused the query (a bad expression)."""


class Prometheus:
    """The HTTP API of one Prometheus server: instant queries."""

    def __init__(self, url: str, timeout: float = 5.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, expr: str) -> list[dict]:
        """The result vector of an instant query, or PrometheusUnreachable / PrometheusError."""
        address = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(address, timeout=self.timeout) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as error:
            if error.code >= 500:
                raise PrometheusUnreachable(f"Prometheus at {self.url} answered {error.code}") from None
            raise PrometheusError(f"Prometheus refused the query ({error.code}: {_message(error)}): {expr}") from None
        except (OSError, ValueError) as error:  # refused, timed out, cut off, not JSON
            reason = getattr(error, "reason", None) or error
            raise PrometheusUnreachable(f"Prometheus at {self.url} is unreachable ({reason})") from None
        if body.get("status") != "success":
            raise PrometheusError(f"Prometheus refused the query ({body.get('error')}): {expr}")
        return body["data"]["result"]

    def value(self, expr: str) -> Optional[float]:
        """The first sample's value; None when the result is empty or not a number (no requests)."""
        result = self.query(expr)
        if not result:
            return None
        number = float(result[0]["value"][1])
        return None if math.isnan(number) else number

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=self.timeout) as answer:
                return answer.status == 200
        except OSError:
            return False


def _message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read()).get("error", "")
    except (OSError, ValueError):
        return ""


# --------------------------------------------------------------------------- figures and verdicts


@dataclass(frozen=True)
class Figures:
    """One version's figures over a window: requests answered, 5xx share, p95 latency (seconds),
    and the share of its captions that failed or came out empty."""

    version: str
    requests: float
    error_rate: Optional[float]
    p95_seconds: Optional[float]
    caption_failure_rate: Optional[float] = None


def measure(prometheus: Prometheus, version: str, window_seconds: float) -> Figures:
    window = duration(window_seconds)
    return Figures(
        version=version,
        requests=prometheus.value(requests_query(version, window)) or 0.0,
        error_rate=prometheus.value(error_rate_query(version, window)),
        p95_seconds=prometheus.value(p95_query(version, window)),
        caption_failure_rate=prometheus.value(caption_failure_rate_query(version, window)),
    )


@dataclass(frozen=True)
class Limits:
    """What a candidate must show over `window_seconds`: at least `min_requests`, at most
    `max_error_rate` of them 5xx, a p95 at most `max_latency_ratio` times the stable version's
    and at most `max_p95_seconds`."""

    window_seconds: float
    min_requests: int
    max_error_rate: float
    max_latency_ratio: float
    max_p95_seconds: float

    @classmethod
    def canary(cls, release: ReleaseSettings) -> "Limits":
        c = release.canary
        return cls(c.window_seconds, c.min_requests, c.max_error_rate, c.max_latency_ratio, c.max_p95_seconds)

    @classmethod
    def shadow(cls, release: ReleaseSettings) -> "Limits":
        """The shadow copies' errors and latency, judged with the canary's thresholds."""
        c, s = release.canary, release.shadow
        return cls(s.window_seconds, s.min_requests, c.max_error_rate, c.max_latency_ratio, c.max_p95_seconds)


PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"


@dataclass(frozen=True)
class Verdict:
    """An analysis' outcome; `check`, `figure` and `threshold` name what decided it (None when it passed)."""

    outcome: str
    stage: str
    reason: str
    check: Optional[str] = None
    figure: Optional[float] = None
    threshold: Optional[float] = None
    candidate: Optional[Figures] = None
    stable: Optional[Figures] = None
    paused_seconds: float = 0.0
    figures: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED

    @property
    def failed(self) -> bool:
        return self.outcome == FAILED

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Verdict":
        """A verdict from `to_dict`'s output (as a Prefect task hands it on)."""
        values = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        for side in ("candidate", "stable"):
            if isinstance(values.get(side), dict):
                values[side] = Figures(**values[side])
        return cls(**values)


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def judge(candidate: Figures, stable: Optional[Figures], limits: Limits, stage: str) -> Verdict:
    """The candidate's figures against the limits and the stable version's p95; the first breach
    decides. The latency ratio is judged only when the stable version answered at least
    `min_requests` in the window too: at a canary's 100 % it answers next to none, and a p95 of a
    handful of requests on idle servers is no baseline."""
    ratio = None
    compared = stable is not None and stable.requests >= limits.min_requests
    if compared and stable.p95_seconds and candidate.p95_seconds is not None:
        ratio = candidate.p95_seconds / stable.p95_seconds
    figures = {"requests": candidate.requests, "error_rate": candidate.error_rate}
    figures.update(caption_failure_rate=candidate.caption_failure_rate)
    figures.update(p95_seconds=candidate.p95_seconds, latency_ratio=ratio)
    figures["stable_p95_seconds"] = stable.p95_seconds if stable is not None else None
    common = dict(stage=stage, candidate=candidate, stable=stable, figures=figures)
    n = round(candidate.requests)
    ceilings = [
        ("error rate", candidate.error_rate, limits.max_error_rate, _percent),
        ("caption failure rate", candidate.caption_failure_rate, limits.max_error_rate, _percent),
        ("p95 latency", candidate.p95_seconds, limits.max_p95_seconds, lambda v: f"{v:.3g} s"),
    ]
    breaches = ceilings + [
        ("p95 latency ratio", ratio, limits.max_latency_ratio, lambda v: f"{v:.2f}x the stable version's")
    ]
    enough = candidate.requests >= limits.min_requests
    # Too few requests to pass, or to compare with the stable version; but a ceiling breached on the
    # few there are fails: a version too slow to answer its share never collects the minimum.
    judged = breaches if enough else ceilings
    for check, figure, threshold, shown in judged:
        if figure is not None and figure > threshold:
            reason = f"{stage}: {check} of version {candidate.version} {shown(figure)} > {shown(threshold)} allowed"
            return Verdict(
                FAILED, reason=f"{reason} ({n} requests)", check=check, figure=figure, threshold=threshold, **common
            )
    if not enough:
        reason = f"{stage}: {n} requests to version {candidate.version} < {limits.min_requests} needed for a verdict"
        return Verdict(
            INCONCLUSIVE,
            reason=reason,
            check="requests",
            figure=candidate.requests,
            threshold=limits.min_requests,
            **common,
        )
    shown = [f"{check} {show(figure)}" for check, figure, _, show in breaches if figure is not None]
    reason = f"{stage}: version {candidate.version} within limits over {n} requests ({', '.join(shown)})"
    return Verdict(PASSED, reason=reason, **common)


def analyse(prometheus: Prometheus, candidate: str, stable: Optional[str], limits: Limits, stage: str) -> Verdict:
    """One look at Prometheus: the candidate's and the stable version's figures, judged."""
    figures = measure(prometheus, candidate, limits.window_seconds)
    reference = measure(prometheus, stable, limits.window_seconds) if stable else None
    return judge(figures, reference, limits, stage)


# --------------------------------------------------------------------------- shadow copies


@dataclass(frozen=True)
class ShadowFigures:
    """A candidate's shadow copies over a window, from the API's metrics: copies sent, the share
    of them that failed, and the mean agreement of its captions with the served ones (percent)."""

    candidate: str
    copies: float
    error_rate: Optional[float]
    agreement: Optional[float]


def measure_shadow(prometheus: Prometheus, candidate: str, window_seconds: float) -> ShadowFigures:
    window = duration(window_seconds)
    return ShadowFigures(
        candidate=candidate,
        copies=prometheus.value(shadow_requests_query(candidate, window)) or 0.0,
        error_rate=prometheus.value(shadow_error_rate_query(candidate, window)),
        agreement=prometheus.value(shadow_agreement_query(candidate, window)),
    )


@dataclass(frozen=True)
class ShadowLimits:
    """What a candidate's shadow copies must show over `window_seconds`: at least `min_requests`
    copies, at most `max_error_rate` of them failed, a mean agreement of at least `min_agreement`
    percent."""

    window_seconds: float
    min_requests: int
    max_error_rate: float
    min_agreement: float

    @classmethod
    def from_release(cls, release: ReleaseSettings) -> "ShadowLimits":
        """release.shadow's window, minimum and agreement; release.canary's error rate."""
        s = release.shadow
        return cls(s.window_seconds, s.min_requests, release.canary.max_error_rate, s.min_agreement)


def judge_shadow(figures: ShadowFigures, limits: ShadowLimits, stage: str = "shadow") -> Verdict:
    """The candidate's shadow figures against the limits: too few copies is inconclusive, then
    the error rate, then the agreement decide."""
    n, version, agreed, failed = round(figures.copies), figures.candidate, figures.agreement, figures.error_rate
    shown = {"copies": figures.copies, "error_rate": failed, "agreement": agreed}
    decided = lambda outcome, reason, check, figure, threshold: Verdict(
        outcome, stage, f"{stage}: {reason}", check=check, figure=figure, threshold=threshold, figures=shown
    )
    if figures.copies < limits.min_requests:
        reason = f"{n} copies sent to version {version} < {limits.min_requests} needed for a verdict"
        return decided(INCONCLUSIVE, reason, "shadow requests", figures.copies, limits.min_requests)
    if failed is not None and failed > limits.max_error_rate:
        reason = (
            f"shadow error rate of version {version} {_percent(failed)} > {_percent(limits.max_error_rate)} allowed"
        )
        return decided(FAILED, f"{reason} ({n} copies)", "shadow error rate", failed, limits.max_error_rate)
    if agreed is None:
        reason = f"no caption of version {version} compared yet ({n} copies)"
        return decided(INCONCLUSIVE, reason, "shadow agreement", None, limits.min_agreement)
    if agreed < limits.min_agreement:
        reason = f"agreement of version {version}'s captions with the served ones {agreed:.1f}% < {limits.min_agreement:.1f}% required"
        return decided(FAILED, f"{reason} ({n} copies)", "shadow agreement", agreed, limits.min_agreement)
    reason = f"version {version} within limits over {n} copies (shadow error rate {_percent(failed or 0.0)}, agreement {agreed:.1f}%)"
    return decided(PASSED, reason, None, None, None)


def analyse_shadow(prometheus: Prometheus, candidate: str, limits: ShadowLimits, stage: str = "shadow") -> Verdict:
    """One look at Prometheus: the candidate's shadow figures, judged."""
    return judge_shadow(measure_shadow(prometheus, candidate, limits.window_seconds), limits, stage)


def wait_for_verdict(
    prometheus: Prometheus,
    candidate: str,
    stable: Optional[str],
    limits: Limits,
    stage: str,
    timeout_seconds: float,
    patience_seconds: Optional[float] = None,
    interval_seconds: float = 1.0,
    report: Callable[[str], None] = lambda line: None,
) -> Verdict:
    """Ask until the analysis passes or fails. Too few requests: ask again, for at most
    `patience_seconds` (default: two windows) of Prometheus answering, then the inconclusive
    verdict. Prometheus unreachable: the analysis pauses; unreachable for `timeout_seconds` in a
    row, the verdict is a failure (a candidate never passes without figures)."""
    look = lambda: analyse(prometheus, candidate, stable, limits, stage)
    patience = 2 * limits.window_seconds if patience_seconds is None else patience_seconds
    return _wait(look, stage, timeout_seconds, patience, interval_seconds, report)


def wait_for_shadow_verdict(
    prometheus: Prometheus,
    candidate: str,
    limits: "ShadowLimits",
    stage: str,
    timeout_seconds: float,
    patience_seconds: Optional[float] = None,
    interval_seconds: float = 1.0,
    report: Callable[[str], None] = lambda line: None,
) -> Verdict:
    """`wait_for_verdict` for the shadow stage: ask until the copies' analysis passes or fails."""
    look = lambda: analyse_shadow(prometheus, candidate, limits, stage)
    patience = 2 * limits.window_seconds if patience_seconds is None else patience_seconds
    return _wait(look, stage, timeout_seconds, patience, interval_seconds, report)


def _wait(
    look: Callable[[], Verdict],
    stage: str,
    timeout_seconds: float,
    patience: float,
    interval_seconds: float,
    report: Callable[[str], None],
) -> Verdict:
    waited = paused = 0.0
    unreachable_since: Optional[float] = None
    while True:
        started = time.monotonic()
        try:
            verdict = look()
        except PrometheusUnreachable as error:
            unreachable_since = unreachable_since or started
            down = time.monotonic() - unreachable_since
            if down >= timeout_seconds:
                return _unreachable(stage, error, down, timeout_seconds, paused + down)
            report(f"{stage}: paused, {error} for {down:.0f} s (rollback after {timeout_seconds:g} s)")
        else:
            if unreachable_since is not None:
                paused += started - unreachable_since
                unreachable_since = None
            if verdict.outcome != INCONCLUSIVE or waited >= patience:
                return replace(verdict, paused_seconds=paused)
            report(verdict.reason)
        time.sleep(interval_seconds)
        if unreachable_since is None:
            waited += time.monotonic() - started


def _unreachable(stage: str, error: Exception, down: float, timeout: float, paused: float) -> Verdict:
    reason = f"{stage}: Prometheus unreachable for {down:.0f} s (> {timeout:g} s allowed), no figures: {error}"
    return Verdict(
        FAILED,
        stage=stage,
        reason=reason,
        check="prometheus unreachable",
        figure=down,
        threshold=timeout,
        paused_seconds=paused,
    )
