"""The drift of the live photos the served versions caption, read for the retrain decision
(captioning/release/live_drift.py)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import run_logger


@task(name="live-drift", cache_policy=NO_CACHE)
def live_drift(source: str = "") -> dict[str, Any]:
    """The live drift figures from `source` (retrain.drift_source) or the local stack's Prometheus.

    Never fails: without figures the result's `reason` says why, and the decision shows it."""
    from captioning.release.live_drift import no_figures, read_live_drift

    try:
        live = read_live_drift(source)
    except Exception as error:  # a monitoring hiccup the reader did not foresee must not fail a retrain
        run_logger().warning("live drift figures not read: %r", error)
        return no_figures(f"no live drift figures: reading them failed ({error!r})", source or None)
    if not live["servers"]:
        run_logger().info(live["reason"])
        return live
    for server in live["servers"]:
        alarm = {True: "ALARM", False: "no alarm", None: server["note"]}[server["alarm"]]
        run_logger().info(
            "live drift of version %s on %s: score %s, threshold %s (%s), from %s",
            server["version"],
            server["server"],
            server["score"],
            server["threshold"],
            alarm,
            live["source"],
        )
    return live
