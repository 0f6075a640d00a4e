"""The drift of the live photos the served model versions caption, as the retrain decision shows it.

    live = read_live_drift(settings.retrain.drift_source)
    live["servers"]   # one per model server: version, server, score, threshold, p_value, alarm, note
    live["source"]    # where they were read, e.g. "the local stack's Prometheus (http://127.0.0.1:3009)"
    live["reason"]    # why there are none ("" when there are)

The model servers export the figures as gauges (captioning/serving/drift.py). They are read from,
in order:
- `retrain.drift_source` when set: a URL whose path ends in /metrics is one model server's metrics
  page (read with `drift_figures`, the version from its `captioning_model_info`); any other URL is
  a Prometheus server, asked through its HTTP API;
- the local stack's Prometheus when `make up` runs one (captioning/release/stack.py);
- nowhere: no figures, and the reason says so.
Through Prometheus each scraped model server is one row, named by its target's `version` and
`instance` labels. A source that does not answer within `timeout` seconds, or answers something
other than figures, gives no figures and the reason: reading never raises for it (a retrain must
not fail because monitoring is down). A configured source that fails is not replaced by the local
stack's Prometheus: the figures shown always come from where the settings say.
"""

from __future__ import annotations

import http.client
import math
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any, Optional
from urllib.parse import urlsplit

from captioning.release.analysis import Prometheus, PrometheusError, PrometheusUnreachable
from captioning.serving.drift import SERIES, drift_figures

TIMEOUT_SECONDS = 3.0
MODEL_INFO = "captioning_model_info"
MAX_PAGE_BYTES = 4_000_000  # a model server's /metrics is some kB; anything far larger is not one
NO_SOURCE = "no live drift figures: no stack running and retrain.drift_source unset"


def read_live_drift(source: str = "", timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """The live drift figures of what is served, from `source` (retrain.drift_source) or the local
    stack's Prometheus; never raises for a source that cannot be read (see the module docstring)."""
    if source:
        if is_metrics_page(source):
            return read_metrics_page(source, timeout)
        return read_prometheus(Prometheus(source, timeout), f"Prometheus at {source.rstrip('/')}")
    url = local_prometheus()
    if url is None:
        return no_figures(NO_SOURCE)
    return read_prometheus(Prometheus(url, timeout), f"the local stack's Prometheus ({url})")


def is_metrics_page(url: str) -> bool:
    """A model server's metrics page (the path ends in /metrics) rather than a Prometheus server."""
    return urlsplit(url).path.rstrip("/").endswith("/metrics")


def local_prometheus() -> Optional[str]:
    """The URL of the local stack's Prometheus when it runs (a state left by a stack that was not
    stopped names a Prometheus that is gone: None)."""
    from captioning.release import prometheus, stack

    state = stack.read_state()
    if state is None or prometheus.pid(stack.prometheus_dir()) is None:
        return None
    return stack.prometheus_url(state["port"])


def no_figures(reason: str, source: Optional[str] = None) -> dict[str, Any]:
    return {"source": source, "servers": [], "reason": reason, "read_at": _now()}


def server_row(version: Optional[str], server: str, figures: dict[str, Optional[float]]) -> dict[str, Any]:
    """One model server's figures (score, threshold, p_value: None where NaN or missing), its alarm
    (the score above the threshold, as CaptioningDriftHigh compares them) and a note when there is
    no score to judge."""
    score, threshold = figures.get("score"), figures.get("threshold")
    note = ""
    if threshold is None:
        note = "drift monitoring off: the package served has no drift reference"
    elif score is None:
        note = "fewer live photos than a window so far"
    return {
        "version": version or "unknown",
        "server": server,
        "score": score,
        "threshold": threshold,
        "p_value": figures.get("p_value"),
        "alarm": None if score is None or threshold is None else score > threshold,
        "note": note,
    }


# --------------------------------------------------------------------------- a model server's /metrics


def read_metrics_page(url: str, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """The figures of the one model server whose metrics page is at `url`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            text = answer.read(MAX_PAGE_BYTES).decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        return no_figures(f"no live drift figures: {url} answered {error.code}", url)
    except (OSError, ValueError, http.client.HTTPException) as error:  # refused, timed out, not HTTP
        reason = getattr(error, "reason", None) or error
        return no_figures(f"no live drift figures: {url} did not answer ({reason})", url)
    return figures_from_page(text, url)


def figures_from_page(text: str, source: str) -> dict[str, Any]:
    """The figures on a model server's metrics page (Prometheus' text format) read from `source`."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        families = list(text_string_to_metric_families(text))
        figures = drift_figures(text)
    except ValueError as error:
        return no_figures(f"no live drift figures: {source} is not a Prometheus metrics page ({error})", source)
    names = {sample.name for family in families for sample in family.samples}
    if not names & set(SERIES.values()):
        return no_figures(f"no live drift figures: {source} shows no {SERIES['score']} (not a model server?)", source)
    served = [
        sample.labels.get("version")
        for family in families
        for sample in family.samples
        if sample.name == MODEL_INFO and sample.value == 1
    ]
    row = server_row(served[-1] if served else None, urlsplit(source).netloc, figures)
    return {"source": source, "servers": [row], "reason": "", "read_at": _now()}


# --------------------------------------------------------------------------- Prometheus


def read_prometheus(prometheus: Prometheus, source: str) -> dict[str, Any]:
    """Every scraped model server's figures, from the gauges' latest samples in Prometheus."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for key, series in SERIES.items():
            for sample in prometheus.query(series):
                labels = sample["metric"]
                server = found.setdefault((labels.get("version", ""), labels.get("instance", "")), {})
                server[key] = _number(sample["value"][1])
    except (PrometheusUnreachable, PrometheusError, http.client.HTTPException) as error:
        return no_figures(f"no live drift figures: {error}", source)
    if not found:
        reason = f"no live drift figures: {source} has no {SERIES['score']} series (no model server scraped there)"
        return no_figures(reason, source)
    servers = [server_row(version, server, figures) for (version, server), figures in sorted(found.items())]
    return {"source": source, "servers": servers, "reason": "", "read_at": _now()}


def _number(text: Any) -> Optional[float]:
    """A sample's value; None for NaN (the gauges are NaN until a window is full, or without drift monitoring)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
